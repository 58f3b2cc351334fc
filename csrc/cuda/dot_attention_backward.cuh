// Backward kernels of the dot attention op; deterministic (no atomics), two launches.
//  phase 1, one warp per row (b, t): recomputes p_j = exp(s_j - lse) and
//    dp_j = <grad_ctx, v_j> + grad_weights_j, then ds_j = p_j (dp_j - delta), writes p and
//    ds to scratch and grad_query = scale * sum_j ds_j k_j;
//  phase 2, one warp per key (b, j): grad_keys_j = scale * sum_t ds_tj q_t and
//    grad_values_j = sum_t p_tj grad_ctx_t, summing t in order.
// Scratch entries are only written for attending keys and are only read for them; in
// phase 1 every lane reads back only the entries it wrote itself.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "dot_attention_params.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

constexpr int kBackwardWarpsPerBlock = 4;

// out_row = out_scale * sum_n coef_n * src_n over n < count, where lane l's `coef_of(n)`
// is read for n = n0 + l (n0 a multiple of 32), shuffled to the warp, and zero
// coefficients skip their source row. Each lane owns chunks lane, lane + 32, ... of out_row.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_row_sum(scalar_t* out_row, int64_t chunks,
                                                 int64_t count, acc_t out_scale, int lane,
                                                 CoefOf coef_of, SrcOf src_of) {
  for (int64_t r = 0; r < warp_rounds(chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    const bool active = c < chunks;
    acc_t a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = acc_t(0);
    for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
      const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
      const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
      for (int nn = 0; nn < tile; ++nn) {
        const acc_t w = __shfl_sync(kFullWarpMask, my_coef, nn);
        if (!active || w == acc_t(0)) continue;
        acc_t x[VEC];
        load_chunk<VEC>(src_of(n0 + nn), c, x);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] += w * x[i];
      }
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] *= out_scale;
      store_chunk<VEC>(out_row, c, a);
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void dot_attention_backward_rows_kernel(const DotBackwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t row = global_warp_id(kBackwardWarpsPerBlock);
  if (row >= p.B * p.Tq) return;
  const int64_t b = row / p.Tq;
  const int64_t end = p.keymask.end(b);
  const scalar_t* q = p.query + row * p.D;
  const scalar_t* g = p.grad_context + row * p.Dv;
  const scalar_t* keys = p.keys + b * p.S * p.D;
  const scalar_t* values = p.values + b * p.S * p.Dv;
  acc_t* probs = p.probs + row * p.S;
  acc_t* dscores = p.dscores + row * p.S;
  const acc_t lse = p.lse[row];
  const int64_t d_chunks = p.D / VEC;
  const int64_t v_chunks = p.Dv / VEC;

  // p_j and dp_j; lane l keeps key j0 + l of each tile and stores dp in dscores for now.
  acc_t my_delta = acc_t(0);
  for (int64_t j0 = 0; j0 < end; j0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, end - j0));
    acc_t my_p = acc_t(0), my_dp = acc_t(0);
    for (int jj = 0; jj < tile; ++jj) {
      const int64_t j = j0 + jj;
      if (!p.keymask.attends(b, j)) continue;  // same for all lanes
      const acc_t s =
          p.scale * warp_sum(lane_dot<VEC, scalar_t, acc_t>(q, keys + j * p.D, d_chunks, lane));
      const acc_t dp =
          warp_sum(lane_dot<VEC, scalar_t, acc_t>(g, values + j * p.Dv, v_chunks, lane));
      if (lane == jj) {
        my_p = prob_from_lse(s, lse);
        my_dp = dp + (p.grad_weights ? static_cast<acc_t>(p.grad_weights[row * p.S + j])
                                     : acc_t(0));
      }
    }
    if (lane < tile && p.keymask.attends(b, j0 + lane)) {
      probs[j0 + lane] = my_p;
      dscores[j0 + lane] = my_dp;
    }
    my_delta += my_p * my_dp;
  }
  const acc_t delta = warp_sum(my_delta);
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.keymask.attends(b, j)) dscores[j] = softmax_backward(probs[j], dscores[j], delta);
  }

  const KeyMask km = p.keymask;
  const int64_t D = p.D;
  weighted_row_sum<VEC>(
      p.grad_query + row * p.D, d_chunks, end, p.scale, lane,
      [=](int64_t j) { return km.attends(b, j) ? dscores[j] : acc_t(0); },
      [=](int64_t j) { return keys + j * D; });
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void dot_attention_backward_keys_kernel(const DotBackwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t key = global_warp_id(kBackwardWarpsPerBlock);
  if (key >= p.B * p.S) return;
  const int64_t b = key / p.S;
  const int64_t j = key % p.S;
  const int64_t d_chunks = p.D / VEC;
  const int64_t v_chunks = p.Dv / VEC;
  scalar_t* gk = p.grad_keys + key * p.D;
  scalar_t* gv = p.grad_values ? p.grad_values + key * p.Dv : nullptr;

  if (j >= p.keymask.end(b) || !p.keymask.attends(b, j)) {
    const acc_t zero[VEC] = {};
    for (int64_t c = lane; c < d_chunks; c += kWarpSize) store_chunk<VEC>(gk, c, zero);
    if (gv) {
      for (int64_t c = lane; c < v_chunks; c += kWarpSize) store_chunk<VEC>(gv, c, zero);
    }
    return;
  }
  // Column j of the (Tq, S) scratch of batch b, summed over t in order.
  const acc_t* dscores = p.dscores + b * p.Tq * p.S + j;
  const acc_t* probs = p.probs + b * p.Tq * p.S + j;
  const scalar_t* q = p.query + b * p.Tq * p.D;
  const scalar_t* g = p.grad_context + b * p.Tq * p.Dv;
  const int64_t S = p.S, D = p.D, Dv = p.Dv, Tq = p.Tq;
  if (!gv) {
    // Keys are the values (D == Dv): one sum over 2 Tq terms, dS-weighted queries then
    // p-weighted output gradients.
    const acc_t scale = p.scale;
    weighted_row_sum<VEC>(
        gk, d_chunks, 2 * Tq, acc_t(1), lane,
        [=](int64_t t) { return t < Tq ? scale * dscores[t * S] : probs[(t - Tq) * S]; },
        [=](int64_t t) { return t < Tq ? q + t * D : g + (t - Tq) * Dv; });
    return;
  }
  weighted_row_sum<VEC>(
      gk, d_chunks, p.Tq, p.scale, lane, [=](int64_t t) { return dscores[t * S]; },
      [=](int64_t t) { return q + t * D; });
  weighted_row_sum<VEC>(
      gv, v_chunks, p.Tq, acc_t(1), lane, [=](int64_t t) { return probs[t * S]; },
      [=](int64_t t) { return g + t * Dv; });
}

}  // namespace attention_ext
