// The dot op's query-tile path (Tq >= kQueryTileMinRows: teacher forcing and its
// backward): what its tile products (tile_products.cuh) compute, beside the shared steps
// of query_tiles.cuh; dot_attention_kernel.cu launches them (with launches.cuh):
//  forward: scores = scale Q K^T -> lse and weights -> context = P V;
//  backward: p = exp(scale Q K^T - lse) and dp = dO V^T + grad_weights (one pair product
//    kernel) -> ds = p (dp - delta) -> grad_values = P^T dO, grad_query = scale dS K,
//    grad_keys = scale dS^T Q (with the keys as values, grad_keys sums both over 2 Tq
//    rows).
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "query_tiles.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {

// The pair products (pair_product_kernel, tile_products.cuh) of the forward: the scores
// scale <q_t, k_j> of the attending keys, into p.scores; of the backward (kBackward): the
// recomputed score and <g_t, v_j>, to write_p_dp.
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
struct DotPairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = kBackward ? 2 : 1;
  static constexpr bool kTanhScore = false;
  std::conditional_t<kBackward, DotBackwardParams<scalar_t, acc_t>,
                     DotForwardParams<scalar_t, acc_t>>
      p;
  int64_t B, M, N;

  // Product 1, the backward's <g_t, v_j>; product 0, the score.
  __device__ __forceinline__ static bool grad_product(int i) { return kBackward && i == 1; }

  __device__ __forceinline__ int64_t len(int i) const { return grad_product(i) ? p.Dv : p.D; }
  __device__ __forceinline__ const scalar_t* x(int i, int64_t b, int64_t t) const {
    if constexpr (kBackward) {
      const int64_t row = b * p.Tq + t;
      return grad_product(i) ? p.grad_context + row * p.Dv : p.query + row * p.D;
    } else {
      return p.query + (b * p.Tq + t) * p.D;
    }
  }
  __device__ __forceinline__ const scalar_t* y(int i, int64_t b, int64_t j) const {
    return grad_product(i) ? attending_row(p.positions, p.values, p.S, p.Dv, b, j)
                           : attending_row(p.positions, p.keys, p.S, p.D, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    if constexpr (kBackward) {
      write_p_dp(p, b, t, j, p.scale * c[0], c[1]);
    } else {
      p.scores[(b * p.Tq + t) * p.S + j] = p.scale * c[0];
    }
  }
};

// Backward: grad_query_t = scale sum_j ds_tj k_j.
template <typename scalar_t, typename acc_t, int VEC>
struct DotGradQueryRows : KernelTypes<scalar_t, acc_t, VEC> {
  DotBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;
  acc_t alpha;

  __device__ __forceinline__ acc_t coef(int64_t b, int64_t t, int64_t j) const {
    return p.dscores[(b * p.Tq + t) * p.S + j];
  }
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t j) const {
    return attending_row(p.positions, p.keys, p.S, p.D, b, j);
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t t) const {
    return p.grad_query + (b * p.Tq + t) * p.D;
  }
  __device__ __forceinline__ bool live(int64_t, int64_t) const { return true; }
};

// Backward: grad_keys_j = scale sum_t ds_tj q_t, or with the keys as values the sum over
// 2 Tq rows, scale ds_tj q_t then p_tj g_t (alpha 1).
template <typename scalar_t, typename acc_t, int VEC, bool kKeysAsValues>
struct DotGradKeyRows : KernelTypes<scalar_t, acc_t, VEC> {
  DotBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;
  acc_t alpha;

  __device__ __forceinline__ acc_t coef(int64_t b, int64_t j, int64_t t) const {
    const int64_t at = b * p.Tq * p.S + j;
    if (!kKeysAsValues) return p.dscores[at + t * p.S];
    return t < p.Tq ? p.scale * p.dscores[at + t * p.S] : p.probs[at + (t - p.Tq) * p.S];
  }
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t t) const {
    if (!kKeysAsValues || t < p.Tq) return p.query + (b * p.Tq + t) * p.D;
    return p.grad_context + (b * p.Tq + t - p.Tq) * p.Dv;
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t j) const {
    return p.grad_keys + (b * p.S + j) * p.D;
  }
  __device__ __forceinline__ bool live(int64_t b, int64_t j) const {
    return j < p.positions.end(b) && p.positions.attends(b, j);
  }
};

}  // namespace attention_ext
