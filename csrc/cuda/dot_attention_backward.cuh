// The dot op's backward on the rows path (few query rows per batch element); deterministic
// (no atomics), four launches:
//  1. backward_probs_kernel, one warp per (row, key): p and dp (softmax_backward.cuh,
//     scores recomputed by DotScorer);
//  2. softmax_grad_rows_kernel, one warp per row: ds;
//  3. query, one warp per (row, 32 chunks of D): grad_query = scale * sum_j ds_j k_j;
//  4. keys, one warp per key (b, j): grad_keys_j = scale * sum_t ds_tj q_t and
//     grad_values_j = sum_t p_tj grad_ctx_t, summing t in order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "scorers.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t, int VEC>
__global__ void dot_attention_backward_query_kernel(const DotBackwardParams<scalar_t, acc_t> p) {
  const RowRound at = row_round(p.D / VEC);
  if (at.row >= p.B * p.Tq) return;
  const int64_t b = at.row / p.Tq;
  const KeyPositions km = p.positions;
  const acc_t* dscores = p.dscores + at.row * p.S;
  const scalar_t* keys = p.keys + km.row(b) * p.S * p.D;
  const int64_t D = p.D;
  weighted_chunk_sum<VEC>(
      p.grad_query + at.row * D, at.chunk, at.chunk < D / VEC, km.end(b), p.scale, lane_id(),
      [=](int64_t j) { return dscores[j]; }, [=](int64_t j) { return keys + j * D; });
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
  scalar_t* gv = p.values_are_keys ? nullptr : p.grad_values + key * p.Dv;

  if (j >= p.positions.end(b) || !p.positions.attends(b, j)) {
    const acc_t zero[VEC] = {};
    for (int64_t c = lane; c < d_chunks; c += kWarpSize) store_chunk<VEC>(gk, c, zero);
    if (!p.values_are_keys) {
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
  if (p.values_are_keys) {
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
