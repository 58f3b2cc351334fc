// What both ops' query-tile paths (Tq >= kQueryTileMinRows; dot_attention_tiles.cuh,
// additive_attention_tiles.cuh) share on the device: rows of keys that attend, and the
// products that only the softmax part takes part in, the context P V (forward) and the
// values' gradient P^T dO (backward), as WeightedRows of weighted_rows_kernel
// (tile_products.cuh). Scratch is (B, Tq, S) in the accumulation type: raw scores in the
// forward, p and ds in the backward. Their launches are in launches.cuh.
#pragma once

#include <cstdint>

#include "attention_ext/key_positions.h"
#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"

namespace attention_ext {

// Key j's row for query row b of a memory-side (M, S, width) tensor when it attends, else
// nullptr (staged as zeros: padding is never read).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* attending_row(const KeyPositions& kp,
                                                         const scalar_t* base, int64_t S,
                                                         int64_t width, int64_t b, int64_t j) {
  return j < kp.end(b) && kp.attends(b, j) ? base + (kp.row(b) * S + j) * width : nullptr;
}

// Forward: context_t = sum_j p_tj v_j, p_tj = exp(score_tj - lse_t) from the raw scores.
template <typename scalar_t, typename acc_t, int VEC>
struct ContextRows : KernelTypes<scalar_t, acc_t, VEC> {
  SoftmaxForwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;
  acc_t alpha;

  __device__ __forceinline__ acc_t coef(int64_t b, int64_t t, int64_t j) const {
    const int64_t row = b * p.Tq + t;
    return j < p.positions.end(b) && p.positions.attends(b, j)
               ? prob_from_lse(p.scores[row * p.S + j], p.lse[row])
               : acc_t(0);
  }
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t j) const {
    return attending_row(p.positions, p.values, p.S, p.Dv, b, j);
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t t) const {
    return p.context + (b * p.Tq + t) * p.Dv;
  }
  __device__ __forceinline__ bool live(int64_t, int64_t) const { return true; }
};

// Backward: grad_values_j = sum_t p_tj g_t (0 for a key that does not attend).
template <typename scalar_t, typename acc_t, int VEC>
struct ValueGradRows : KernelTypes<scalar_t, acc_t, VEC> {
  SoftmaxBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;
  acc_t alpha;

  __device__ __forceinline__ acc_t coef(int64_t b, int64_t j, int64_t t) const {
    return p.probs[(b * p.Tq + t) * p.S + j];
  }
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t t) const {
    return p.grad_context + (b * p.Tq + t) * p.Dv;
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t j) const {
    return p.grad_values + (b * p.S + j) * p.Dv;
  }
  __device__ __forceinline__ bool live(int64_t b, int64_t j) const {
    return j < p.positions.end(b) && p.positions.attends(b, j);
  }
};

}  // namespace attention_ext
