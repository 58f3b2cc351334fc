// Each op's score of key j for one query row, the only part of the forward pass that
// differs between the ops (attention_forward.cuh runs everything else); the backward rows
// kernels recompute the scores with the same code.
//
// A scorer splits a key's score into lane shares: partial(key_row, first, stride) sums
// the 16-byte chunks first, first + stride, ... of the feature dimension against the key's
// row, the lanes that split the chunks add their shares (group_sum), and finish() turns
// the sum into the score. The row (width() elements) is key(j) in global memory, or the
// forward's copy of it in shared memory; keys_of(p) is the rows' base, which the launch
// compares with the values'.
#pragma once

#include <cstdint>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"

namespace attention_ext {

// score_j = scale * <query_row, key_j>.
template <typename scalar_t, typename acc_t, int VEC>
struct DotScorer : KernelTypes<scalar_t, acc_t, VEC> {
  using ForwardParams = DotForwardParams<scalar_t, acc_t>;

  // For row (b, t) of p, a DotForwardParams or DotBackwardParams.
  template <typename Params>
  __device__ __forceinline__ DotScorer(const Params& p, int64_t row)
      : q(p.query + row * p.D), keys(p.keys + p.positions.row(row / p.Tq) * p.S * p.D), D(p.D),
        scale(p.scale) {}

  static const scalar_t* keys_of(const ForwardParams& p) { return p.keys; }
  __device__ __forceinline__ const scalar_t* key(int64_t j) const { return keys + j * D; }
  __device__ __forceinline__ int64_t width() const { return D; }

  __device__ __forceinline__ acc_t partial(const scalar_t* key_row, int64_t first,
                                           int stride) const {
    return lane_dot<VEC, scalar_t, acc_t>(q, key_row, D / VEC, first, stride);
  }
  __device__ __forceinline__ acc_t finish(acc_t sum) const { return scale * sum; }

  const scalar_t* q;
  const scalar_t* keys;
  int64_t D;
  acc_t scale;
};

// score_j = sum_a v[a] tanh(query_proj[a] + keys_proj[j, a]). tanh is score_tanh (math.h)
// of the sum in acc_t, as in the backward's tanh_grad_chunk. Each tanh lives in a
// register only: nothing of size B x Tq x S x A exists.
template <typename scalar_t, typename acc_t, int VEC>
struct AdditiveScorer : KernelTypes<scalar_t, acc_t, VEC> {
  using ForwardParams = AdditiveForwardParams<scalar_t, acc_t>;

  // For row (b, t) of p, an AdditiveForwardParams or AdditiveBackwardParams.
  template <typename Params>
  __device__ __forceinline__ AdditiveScorer(const Params& p, int64_t row)
      : q(p.query_proj + row * p.A), keys(p.keys_proj + p.positions.row(row / p.Tq) * p.S * p.A), v(p.v),
        A(p.A) {}

  // Three rows per chunk, so half of lane_dot's batch keeps about as many loads in flight
  // and the 16-bit kernels within their 128 registers (ptxas: a batch of 4 spills).
  static constexpr int kBatch = kChunksInFlight / 2;

  static const scalar_t* keys_of(const ForwardParams& p) { return p.keys_proj; }
  __device__ __forceinline__ const scalar_t* key(int64_t j) const { return keys + j * A; }
  __device__ __forceinline__ int64_t width() const { return A; }

  __device__ __forceinline__ acc_t partial(const scalar_t* key_row, int64_t first,
                                           int stride) const {
    return batched_chunk_sum<kBatch, VEC, acc_t, scalar_t>(
        A / VEC, first, stride,
        [](const acc_t (&e)[3]) { return e[2] * score_tanh(e[0] + e[1]); }, q, key_row, v);
  }
  __device__ __forceinline__ acc_t finish(acc_t sum) const { return sum; }

  const scalar_t* q;
  const scalar_t* keys;
  const scalar_t* v;
  int64_t A;
};

// The score of key j by a whole warp, the same in every lane; every lane calls it together
// (backward_probs_kernel).
template <typename Scorer>
__device__ __forceinline__ typename Scorer::acc_t warp_score(const Scorer& scorer, int64_t j,
                                                             int lane) {
  return scorer.finish(warp_sum(scorer.partial(scorer.key(j), lane, kWarpSize)));
}

}  // namespace attention_ext
