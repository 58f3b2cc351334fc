// The additive op's backward on the rows path (few query rows per batch element);
// deterministic (no atomics), five launches:
//  1. backward_probs_kernel, one warp per (row, key): p and dp (softmax_backward.cuh,
//     scores recomputed by AdditiveScorer);
//  2. softmax_grad_rows_kernel, one warp per row: ds;
//  3. query, one warp per (row, 32 A-chunks):
//     grad_query_proj[a] = v[a] sum_j ds_j (1 - tanh_ja^2), and the row's share of
//     grad_v[a] = sum_j ds_j tanh_ja, one (rows, A) partial per row;
//  4. keys, one warp per key (b, j): grad_keys_proj[a] = v[a] sum_t ds_tj (1 - tanh_ta^2)
//     and grad_values_j = sum_t p_tj grad_ctx_t, summing t in order;
//  5. grad_v, one thread per a: the rows' partials summed in row order.
// tanh is recomputed every time (tanh_grad_chunk); scratch is (B, Tq, S), partials
// (rows, A): never B x Tq x S x A.
#pragma once

#include <cstdint>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "scorers.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {

// Chunk c of the gradient of a row x (A elements) from its partner rows y_n, n < count:
//   out_row[c, i] = v[c, i] sum_n coef_n (1 - t_ni^2)   and   dv[i] = sum_n coef_n t_ni,
// t_ni = tanh(x[c, i] + y_n[c, i]) (rows: x a query, y_n the keys; keys: the reverse).
// Coefficients as in for_each_coef_chunk (softmax_backward.cuh): every lane calls this
// together; `active` says whether chunk c exists for it, and an inactive lane writes
// nothing and returns dv = 0.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void tanh_grad_chunk(const scalar_t* x_row, const scalar_t* v,
                                                scalar_t* out_row, int64_t c, bool active,
                                                int64_t count, int lane, CoefOf coef_of,
                                                SrcOf src_of, acc_t (&dv)[VEC]) {
  acc_t x[VEC], dx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = dx[i] = dv[i] = acc_t(0);
  if (active) load_chunk<VEC>(x_row, c, x);
  for_each_coef_chunk<VEC>(count, lane, c, active, coef_of, src_of,
                           [&](acc_t w, const auto& y) {
#pragma unroll
                             for (int i = 0; i < VEC; ++i) {
                               const acc_t t = score_tanh(x[i] + unpack<acc_t>(y, i));
                               dx[i] += w * (acc_t(1) - t * t);
                               dv[i] += w * t;
                             }
                           });
  if (!active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dv[i] = acc_t(0);
    return;
  }
  acc_t vv[VEC];
  load_chunk<VEC>(v, c, vv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dx[i] *= vv[i];
  store_chunk<VEC>(out_row, c, dx);
}

constexpr int kGradVThreads = 128;

template <typename scalar_t, typename acc_t, int VEC>
__global__ void additive_attention_backward_query_kernel(
    const AdditiveBackwardParams<scalar_t, acc_t> p) {
  const int64_t A = p.A;
  const RowRound at = row_round(A / VEC);
  if (at.row >= p.B * p.Tq) return;
  const int64_t b = at.row / p.Tq;
  const bool active = at.chunk < A / VEC;
  const scalar_t* keys = p.keys_proj + p.positions.row(b) * p.S * A;
  const acc_t* dscores = p.dscores + at.row * p.S;
  acc_t dv[VEC];
  tanh_grad_chunk<VEC>(
      p.query_proj + at.row * A, p.v, p.grad_query_proj + at.row * A, at.chunk, active,
      p.positions.end(b), lane_id(), [=](int64_t j) { return dscores[j]; },
      [=](int64_t j) { return keys + j * A; }, dv);
  if (!active) return;
  acc_t* share = p.grad_v_partials + at.row * A + at.chunk * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) share[i] = dv[i];
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void additive_attention_backward_keys_kernel(
    const AdditiveBackwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t key = global_warp_id(kBackwardWarpsPerBlock);
  if (key >= p.B * p.S) return;
  const int64_t b = key / p.S;
  const int64_t j = key % p.S;
  const int64_t A = p.A, S = p.S, Dv = p.Dv;
  const int64_t a_chunks = A / VEC;
  const int64_t v_chunks = Dv / VEC;
  scalar_t* gk = p.grad_keys_proj + key * A;
  scalar_t* gv = p.grad_values + key * Dv;

  if (j >= p.positions.end(b) || !p.positions.attends(b, j)) {
    const acc_t zero[VEC] = {};
    for (int64_t c = lane; c < a_chunks; c += kWarpSize) store_chunk<VEC>(gk, c, zero);
    for (int64_t c = lane; c < v_chunks; c += kWarpSize) store_chunk<VEC>(gv, c, zero);
    return;
  }
  // Column j of the (Tq, S) scratch of batch b, summed over t in order.
  const acc_t* dscores = p.dscores + b * p.Tq * S + j;
  const acc_t* probs = p.probs + b * p.Tq * S + j;
  const scalar_t* q = p.query_proj + b * p.Tq * A;
  const scalar_t* k = p.keys_proj + (p.positions.row(b) * S + j) * A;
  const scalar_t* g = p.grad_context + b * p.Tq * Dv;
  for (int64_t r = 0; r < warp_rounds(a_chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    acc_t dv[VEC];  // unused: grad_v is the query side's
    tanh_grad_chunk<VEC>(
        k, p.v, gk, c, c < a_chunks, p.Tq, lane, [=](int64_t t) { return dscores[t * S]; },
        [=](int64_t t) { return q + t * A; }, dv);
  }
  weighted_row_sum<VEC>(
      gv, v_chunks, p.Tq, acc_t(1), lane, [=](int64_t t) { return probs[t * S]; },
      [=](int64_t t) { return g + t * Dv; });
}

// grad_v[a] = the sum of the `blocks` rows of partials, in row order.
template <typename scalar_t, typename acc_t>
__global__ void additive_grad_v_kernel(const acc_t* partials, int64_t blocks, int64_t A,
                                       scalar_t* grad_v) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= A) return;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < blocks; ++k) sum += partials[k * A + a];
  grad_v[a] = static_cast<scalar_t>(sum);
}

}  // namespace attention_ext
