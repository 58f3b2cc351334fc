// The first half of the rows kernel of both ops' backward, everything but the scores:
// one warp per row (b, t) recomputes p_j = exp(s_j - lse) and
// dp_j = <grad_ctx, values_j> + grad_weights_j, then normalises p (softmax_prob_scale) and
// forms ds_j = p_j (dp_j - delta) with delta from softmax_grad_delta, and writes p and ds
// to the (B, Tq, S) scratch for the attending keys. Every lane later reads back only the
// entries it wrote itself (j = lane, lane + 32, ...), so no barrier is needed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"

namespace attention_ext {

constexpr int kBackwardWarpsPerBlock = 4;

// score_of(j) is called by every lane together for each attending key j < end(b) and
// returns the same score in every lane.
template <int VEC, typename scalar_t, typename acc_t, typename ScoreOf>
__device__ __forceinline__ void softmax_backward_row(
    const SoftmaxBackwardParams<scalar_t, acc_t>& p, int64_t row, int lane, ScoreOf score_of) {
  const int64_t b = row / p.Tq;
  const int64_t end = p.positions.end(b);
  const scalar_t* g = p.grad_context + row * p.Dv;
  const scalar_t* values = p.values + p.positions.row(b) * p.S * p.Dv;
  acc_t* probs = p.probs + row * p.S;
  acc_t* dscores = p.dscores + row * p.S;
  const acc_t lse = p.lse[row];
  const int64_t v_chunks = p.Dv / VEC;

  // p_j and dp_j; lane l keeps key j0 + l of each tile and stores dp in dscores for now.
  acc_t my_delta = acc_t(0), my_psum = acc_t(0);
  for (int64_t j0 = 0; j0 < end; j0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, end - j0));
    acc_t my_p = acc_t(0), my_dp = acc_t(0);
    for (int jj = 0; jj < tile; ++jj) {
      const int64_t j = j0 + jj;
      if (!p.positions.attends(b, j)) continue;  // same for all lanes
      const acc_t s = score_of(j);
      const acc_t dp =
          warp_sum(lane_dot<VEC, scalar_t, acc_t>(g, values + j * p.Dv, v_chunks, lane, kWarpSize));
      if (lane == jj) {
        my_p = prob_from_lse(s, lse);
        my_dp = dp + (p.grad_weights ? static_cast<acc_t>(p.grad_weights[row * p.S + j])
                                     : acc_t(0));
      }
    }
    if (lane < tile && p.positions.attends(b, j0 + lane)) {
      probs[j0 + lane] = my_p;
      dscores[j0 + lane] = my_dp;
    }
    my_delta += my_p * my_dp;
    my_psum += my_p;
  }
  const acc_t psum = warp_sum(my_psum);
  const acc_t delta = softmax_grad_delta(warp_sum(my_delta), psum);
  const acc_t scale = softmax_prob_scale(psum);
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.positions.attends(b, j)) {
      probs[j] *= scale;
      dscores[j] = softmax_backward(probs[j], dscores[j], delta);
    }
  }
}

// Calls body(n, coef_n) in every lane, in order of n < count, for each nonzero
// coefficient. Lane l reads coef_of(n) for n = n0 + l (n0 a multiple of 32) and the
// values reach the warp by shuffles, so every lane must call this together; a zero
// coefficient (masked or underflowed) skips its n in every lane alike.
template <typename CoefOf, typename Body>
__device__ __forceinline__ void for_each_warp_coef(int64_t count, int lane, CoefOf coef_of,
                                                   Body body) {
  using acc_t = std::decay_t<decltype(coef_of(int64_t{0}))>;
  for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
    const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
    for (int nn = 0; nn < tile; ++nn) {
      const acc_t w = __shfl_sync(kFullWarpMask, my_coef, nn);
      if (w != acc_t(0)) body(n0 + nn, w);
    }
  }
}

// out_row = out_scale * sum_n coef_n * src_n over n < count (coefficients as in
// for_each_warp_coef). Each lane owns chunks lane, lane + 32, ... of out_row.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_row_sum(scalar_t* out_row, int64_t chunks,
                                                 int64_t count, acc_t out_scale, int lane,
                                                 CoefOf coef_of, SrcOf src_of) {
  for (int64_t r = 0; r < warp_rounds(chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    const bool active = c < chunks;
    acc_t a[VEC] = {};
    for_each_warp_coef(count, lane, coef_of, [&](int64_t n, acc_t w) {
      if (!active) return;
      acc_t x[VEC];
      load_chunk<VEC>(src_of(n), c, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += w * x[i];
    });
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] *= out_scale;
      store_chunk<VEC>(out_row, c, a);
    }
  }
}


// The query-tile path's second step (tile_products.cuh), after its products wrote
// p_j and dp_j (0 where j does not attend) for whole rows: one warp per row normalises p
// (softmax_prob_scale) and turns dp into ds_j = p_j (dp_j - delta) in place, delta from
// softmax_grad_delta.
template <typename scalar_t, typename acc_t>
__global__ void softmax_grad_rows_kernel(const SoftmaxBackwardParams<scalar_t, acc_t> p) {
  const int64_t row = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t b = row / p.Tq;
  const int64_t end = p.positions.end(b);
  acc_t* probs = p.probs + row * p.S;
  acc_t* dscores = p.dscores + row * p.S;
  acc_t my_delta = acc_t(0), my_psum = acc_t(0);
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.positions.attends(b, j)) {
      my_delta += probs[j] * dscores[j];
      my_psum += probs[j];
    }
  }
  const acc_t psum = warp_sum(my_psum);
  const acc_t delta = softmax_grad_delta(warp_sum(my_delta), psum);
  const acc_t scale = softmax_prob_scale(psum);
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.positions.attends(b, j)) {
      probs[j] *= scale;
      dscores[j] = softmax_backward(probs[j], dscores[j], delta);
    }
  }
}

}  // namespace attention_ext
