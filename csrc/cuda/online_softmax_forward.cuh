// The forward pass shared by the attention ops, everything but the scores (each op's
// Scorer). One warp per (row, split), row = (b, t):
//  - the warp walks its keys in tiles of 32; the op's score of a key is a warp-wide
//    reduction whose result lane (j - tile start) keeps, so a tile's online-softmax step
//    (max, rescale, sum) is one warp_max and one warp_sum;
//  - the unnormalised context lives in ctx_acc (float/double workspace); each lane owns
//    the same Dv chunks throughout, so only shuffles carry data between lanes;
//  - with one split the warp also finalises (context, lse, weights); with several, each
//    writes its partial (max, sum, context) and split_merge_kernel combines the splits in
//    a fixed order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "softmax_params.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

constexpr int kForwardWarpsPerBlock = 4;

// weights[row, j] = exp(score_j - lse), 0 where j does not attend. Lane l handles
// j = l, l + 32, ...: the lanes that wrote those raw scores in the split-free kernel.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_weights(const SoftmaxForwardParams<scalar_t, acc_t>& p,
                                              int64_t row, int64_t b, acc_t lse, int lane) {
  const int64_t end = p.positions.end(b);
  scalar_t* w = p.weights + row * p.S;
  const acc_t* s = p.scores + row * p.S;
  for (int64_t j = lane; j < p.S; j += kWarpSize) {
    const bool att = j < end && p.positions.attends(b, j);
    w[j] = static_cast<scalar_t>(att ? prob_from_lse(s[j], lse) : acc_t(0));
  }
}

// Task `task` (< B * Tq * splits) of a forward kernel, run by the whole warp. score_of(j)
// is called by every lane together for each attending key j of the split and returns the
// same score in every lane.
template <int VEC, typename scalar_t, typename acc_t, typename ScoreOf>
__device__ __forceinline__ void online_softmax_task(const SoftmaxForwardParams<scalar_t, acc_t>& p,
                                                    int64_t task, int lane, ScoreOf score_of) {
  const int64_t row = task / p.splits;
  const int64_t split = task % p.splits;
  const int64_t b = row / p.Tq;

  const int64_t j_begin = split * p.split_len;
  const int64_t j_end = std::min(j_begin + p.split_len, p.positions.end(b));
  const scalar_t* values = p.values + b * p.S * p.Dv;
  acc_t* acc = p.ctx_acc + task * p.Dv;
  const int64_t v_chunks = p.Dv / VEC;

  SoftmaxState<acc_t> state = softmax_init<acc_t>();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, j_end - j0));
    const bool my_att = lane < tile && p.positions.attends(b, j0 + lane);
    acc_t my_score = neg_inf<acc_t>();
    for (int jj = 0; jj < tile; ++jj) {
      if (!p.positions.attends(b, j0 + jj)) continue;  // same for all lanes
      const acc_t s = score_of(j0 + jj);
      if (lane == jj) my_score = s;
    }
    if (my_att && p.scores != nullptr) p.scores[row * p.S + j0 + lane] = my_score;

    const acc_t tile_max = warp_max(my_score);
    if (tile_max == neg_inf<acc_t>()) continue;  // nothing attends in this tile
    const bool had_keys = state.max != neg_inf<acc_t>();
    const acc_t alpha = softmax_raise_max(state, tile_max);
    const acc_t my_p = my_att ? ae_exp(my_score - state.max) : acc_t(0);
    state.sum += warp_sum(my_p);

    // acc = acc * alpha + sum_jj p_jj * v_jj, one read and one write of acc per tile.
    for (int64_t r = 0; r < warp_rounds(v_chunks); ++r) {
      const int64_t c = r * kWarpSize + lane;
      const bool active = c < v_chunks;
      acc_t a[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        a[i] = (active && had_keys) ? acc[c * VEC + i] * alpha : acc_t(0);
      }
      for (int jj = 0; jj < tile; ++jj) {
        const acc_t pj = __shfl_sync(kFullWarpMask, my_p, jj);
        // pj == 0: masked (never read its value row) or underflowed (adds nothing).
        if (!active || pj == acc_t(0)) continue;
        acc_t v[VEC];
        load_chunk<VEC>(values + (j0 + jj) * p.Dv, c, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] += pj * v[i];
      }
      if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[c * VEC + i] = a[i];
      }
    }
  }

  if (p.splits > 1) {
    if (lane == 0) {
      p.part_max[task] = state.max;
      p.part_sum[task] = state.sum;
    }
    return;
  }
  // Single split: finalise. acc was written only if some key attended.
  const acc_t inv_sum = softmax_inv_sum(state);
  const bool any = softmax_saw_keys(state);
  scalar_t* out = p.context + row * p.Dv;
  for (int64_t c = lane; c < v_chunks; c += kWarpSize) {
    acc_t a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = any ? acc[c * VEC + i] * inv_sum : acc_t(0);
    store_chunk<VEC>(out, c, a);
  }
  const acc_t lse = softmax_lse(state);
  if (lane == 0) p.lse[row] = lse;
  if (p.weights != nullptr) write_weights(p, row, b, lse, lane);
}

// The forward kernel of an op whose score of key j for one row is Scorer(p, row, lane)(j)
// (dot_attention_forward.cuh, additive_attention_forward.cuh).
template <typename Scorer>
__global__ void online_softmax_forward_kernel(const typename Scorer::ForwardParams p) {
  const int lane = lane_id();
  const int64_t task = global_warp_id(kForwardWarpsPerBlock);
  if (task >= p.B * p.Tq * p.splits) return;  // whole warps only
  online_softmax_task<Scorer::kVec>(p, task, lane, Scorer(p, task / p.splits, lane));
}

// One warp per row: merges the row's split partials in split order (deterministic).
// Lane k holds split k's rescale factor exp(max_k - max); the context is
// sum_k factor_k * acc_k / sum.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void split_merge_kernel(const SoftmaxForwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t row = global_warp_id(kForwardWarpsPerBlock);
  if (row >= p.B * p.Tq) return;
  const int64_t b = row / p.Tq;
  const int splits = static_cast<int>(p.splits);  // <= kMaxSplits = warp size
  const acc_t* part_max = p.part_max + row * p.splits;
  const acc_t* part_sum = p.part_sum + row * p.splits;

  SoftmaxState<acc_t> state = softmax_init<acc_t>();
  for (int k = 0; k < splits; ++k) {
    const SoftmaxState<acc_t> part{part_max[k], part_sum[k]};
    acc_t scale_state, scale_part;
    softmax_merge(state, part, scale_state, scale_part);
  }
  // Empty splits (sum 0) never wrote their acc: factor 0 makes the loop below skip them.
  const acc_t my_factor =
      (lane < splits && softmax_saw_keys(SoftmaxState<acc_t>{part_max[lane], part_sum[lane]}))
          ? rescale_factor(part_max[lane], state.max)
          : acc_t(0);
  const acc_t inv_sum = softmax_inv_sum(state);
  const int64_t v_chunks = p.Dv / VEC;
  const acc_t* acc = p.ctx_acc + row * p.splits * p.Dv;
  scalar_t* out = p.context + row * p.Dv;
  for (int64_t r = 0; r < warp_rounds(v_chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    const bool active = c < v_chunks;
    acc_t a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = acc_t(0);
    for (int k = 0; k < splits; ++k) {
      const acc_t f = __shfl_sync(kFullWarpMask, my_factor, k);
      if (!active || f == acc_t(0)) continue;
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += f * acc[k * p.Dv + c * VEC + i];
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] *= inv_sum;
      store_chunk<VEC>(out, c, a);
    }
  }
  const acc_t lse = softmax_lse(state);
  if (lane == 0) p.lse[row] = lse;
  if (p.weights != nullptr) write_weights(p, row, b, lse, lane);
}

}  // namespace attention_ext
