// What both ops' backward shares, everything but the scores: p and ds for every (row,
// key) into the (B, Tq, S) scratch, in two steps,
//  - p_j = exp(s_j - lse) and dp_j = <grad_ctx, values_j> + grad_weights_j (write_p_dp;
//    the rows path's backward_probs_kernel, or the query-tile path's pair products),
//  - softmax_grad_rows_kernel: p normalised (softmax_prob_scale) and
//    ds_j = p_j (dp_j - delta), delta from softmax_grad_delta;
// and the weighted sums of rows by coefficients from the scratch that the gradients are.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "scorers.cuh"

namespace attention_ext {

constexpr int kBackwardWarpsPerBlock = 4;

// The backward's first step for element (t, j) of batch element b, from the recomputed
// score and <g_t, v_j>: p_tj = exp(score - lse_t) and dp_tj = <g_t, v_j> + gw_tj, both 0
// where j does not attend (the later steps read whole rows).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_p_dp(const SoftmaxBackwardParams<scalar_t, acc_t>& p,
                                           int64_t b, int64_t t, int64_t j, acc_t score,
                                           acc_t g_dot_v) {
  const int64_t row = b * p.Tq + t;
  const int64_t at = row * p.S + j;
  const bool att = j < p.positions.end(b) && p.positions.attends(b, j);
  p.probs[at] = att ? prob_from_lse(score, p.lse[row]) : acc_t(0);
  p.dscores[at] =
      att ? g_dot_v + (p.grad_weights ? static_cast<acc_t>(p.grad_weights[at]) : acc_t(0))
          : acc_t(0);
}

// The rows path's first step (few query rows per batch element): one warp per (row, key)
// recomputes the score (the op's Scorer, scorers.cuh) and <g_t, v_j>, to write_p_dp. A
// row's keys spread over many warps, each with its loads in flight at once, so a decoder
// step's backward (B rows) fills the GPU instead of walking each row's keys in turn.
template <typename Scorer, typename Params>
__global__ void backward_probs_kernel(const Params p) {
  using scalar_t = typename Scorer::scalar_t;
  using acc_t = typename Scorer::acc_t;
  constexpr int VEC = Scorer::kVec;
  const int lane = lane_id();
  const int64_t pair = global_warp_id(kBackwardWarpsPerBlock);
  if (pair >= p.B * p.Tq * p.S) return;
  const int64_t row = pair / p.S;
  const int64_t j = pair % p.S;
  const int64_t b = row / p.Tq;
  acc_t score = acc_t(0), g_dot_v = acc_t(0);
  if (j < p.positions.end(b) && p.positions.attends(b, j)) {  // the same in every lane
    const Scorer scorer(p, row);
    score = warp_score(scorer, j, lane);
    const scalar_t* values = p.values + (p.positions.row(b) * p.S + j) * p.Dv;
    g_dot_v = warp_sum(
        lane_dot<VEC, scalar_t, acc_t>(p.grad_context + row * p.Dv, values, p.Dv / VEC, lane,
                                       kWarpSize));
  }
  if (lane == 0) write_p_dp(p, b, row % p.Tq, j, score, g_dot_v);
}

// Calls body(coef_n, chunk c of src_of(n)) in every lane, in order of n < count, for
// each nonzero coefficient. Lane l reads coef_of(n) for n = n0 + l (n0 a multiple of 32)
// and the values reach the warp by shuffles, so every lane must call this together; a
// zero coefficient (masked or underflowed) skips its n in every lane alike. The chunks of
// kChunksInFlight rows are loaded before any of them is used; a lane whose chunk is not
// `active` loads nothing and gets zeros.
template <int VEC, typename CoefOf, typename SrcOf, typename Body>
__device__ __forceinline__ void for_each_coef_chunk(int64_t count, int lane, int64_t c,
                                                    bool active, CoefOf coef_of,
                                                    SrcOf src_of, Body body) {
  using acc_t = std::decay_t<decltype(coef_of(int64_t{0}))>;
  using row_t = std::remove_cv_t<std::remove_pointer_t<decltype(src_of(int64_t{0}))>>;
  for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
    const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
    for (int nn0 = 0; nn0 < tile; nn0 += kChunksInFlight) {
      acc_t w[kChunksInFlight];
      Pack<row_t, VEC> y[kChunksInFlight];
#pragma unroll
      for (int u = 0; u < kChunksInFlight; ++u) {
        const int nn = nn0 + u;
        w[u] = __shfl_sync(kFullWarpMask, my_coef, nn % kWarpSize);
        if (nn >= tile) w[u] = acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kChunksInFlight; ++u) {
        if (active && w[u] != acc_t(0)) {
          y[u] = load_pack<VEC>(src_of(n0 + nn0 + u), c);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) y[u].v[i] = row_t(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kChunksInFlight; ++u) {
        if (w[u] != acc_t(0)) body(w[u], y[u]);
      }
    }
  }
}

// Chunk c of out_row = out_scale * sum_n coef_n * src_n over n < count (coefficients as
// in for_each_coef_chunk); every lane calls it together, and a lane whose chunk is not
// `active` writes nothing.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_chunk_sum(scalar_t* out_row, int64_t c, bool active,
                                                   int64_t count, acc_t out_scale, int lane,
                                                   CoefOf coef_of, SrcOf src_of) {
  acc_t a[VEC] = {};
  for_each_coef_chunk<VEC>(count, lane, c, active, coef_of, src_of,
                           [&](acc_t w, const auto& x) {
#pragma unroll
                             for (int i = 0; i < VEC; ++i) a[i] += w * unpack<acc_t>(x, i);
                           });
  if (!active) return;
#pragma unroll
  for (int i = 0; i < VEC; ++i) a[i] *= out_scale;
  store_chunk<VEC>(out_row, c, a);
}

// The whole of out_row (chunks lane, lane + 32, ... of it in each lane) by one warp.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_row_sum(scalar_t* out_row, int64_t chunks,
                                                 int64_t count, acc_t out_scale, int lane,
                                                 CoefOf coef_of, SrcOf src_of) {
  for (int64_t r = 0; r < warp_rounds(chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    weighted_chunk_sum<VEC>(out_row, c, c < chunks, count, out_scale, lane, coef_of, src_of);
  }
}

// A rows-path kernel's work item: one warp per (row, round of 32 chunks of a row of
// `chunks`), rounds fastest, at least one round per row; row >= rows is past the end.
struct RowRound {
  int64_t row, chunk;
};

HOST_DEVICE_INLINE int64_t rounds_per_row(int64_t chunks) {
  return std::max<int64_t>(1, ceil_div(chunks, kWarpSize));
}

__device__ __forceinline__ RowRound row_round(int64_t chunks) {
  const int64_t item = global_warp_id(kBackwardWarpsPerBlock);
  const int64_t rounds = rounds_per_row(chunks);
  return RowRound{item / rounds, (item % rounds) * kWarpSize + lane_id()};
}

inline int64_t row_round_warps(int64_t rows, int64_t chunks) {
  return rows * rounds_per_row(chunks);
}

// The second step, after the first wrote p_j and dp_j (0 where j does not attend) for
// whole rows: one warp per row normalises p (softmax_prob_scale) and turns dp into
// ds_j = p_j (dp_j - delta) in place, delta from softmax_grad_delta.
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
