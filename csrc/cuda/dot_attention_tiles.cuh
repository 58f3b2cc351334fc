// The dot op's query-tile path (Tq >= kQueryTileMinRows: teacher forcing and its
// backward), on the tile products of tile_products.cuh and the shared steps of
// query_tiles.cuh:
//  forward: scores = scale Q K^T -> lse and weights -> context = P V;
//  backward: p = exp(scale Q K^T - lse) and dp = dO V^T + grad_weights (one pair product
//    kernel) -> ds = p (dp - delta) -> grad_values = P^T dO, grad_query = scale dS K,
//    grad_keys = scale dS^T Q (with the keys as values, grad_keys sums both over 2 Tq
//    rows).
#pragma once

#include <cstdint>

#include "kernel_params.cuh"
#include "query_tiles.cuh"
#include "tile_products.cuh"

namespace attention_ext {

// Forward: scores[b, t, j] = scale <q_t, k_j> for the attending keys.
template <typename scalar_t, typename acc_t, int VEC>
struct DotScorePairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 1;
  static constexpr bool kTanhScore = false;
  DotForwardParams<scalar_t, acc_t> p;
  int64_t B, M, N;

  __device__ __forceinline__ int64_t len(int) const { return p.D; }
  __device__ __forceinline__ const scalar_t* x(int, int64_t b, int64_t t) const {
    return p.query + (b * p.Tq + t) * p.D;
  }
  __device__ __forceinline__ const scalar_t* y(int, int64_t b, int64_t j) const {
    return attending_row(p.positions, p.keys, p.S, p.D, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    p.scores[(b * p.Tq + t) * p.S + j] = p.scale * c[0];
  }
};

// Backward: the recomputed score and <g_t, v_j>, to write_p_dp.
template <typename scalar_t, typename acc_t, int VEC>
struct DotGradPairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 2;
  static constexpr bool kTanhScore = false;
  DotBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, N;

  __device__ __forceinline__ int64_t len(int i) const { return i == 0 ? p.D : p.Dv; }
  __device__ __forceinline__ const scalar_t* x(int i, int64_t b, int64_t t) const {
    const int64_t row = b * p.Tq + t;
    return i == 0 ? p.query + row * p.D : p.grad_context + row * p.Dv;
  }
  __device__ __forceinline__ const scalar_t* y(int i, int64_t b, int64_t j) const {
    return i == 0 ? attending_row(p.positions, p.keys, p.S, p.D, b, j)
                  : attending_row(p.positions, p.values, p.S, p.Dv, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    write_p_dp(p, b, t, j, p.scale * c[0], c[1]);
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

template <int VEC, typename scalar_t, typename acc_t>
void launch_dot_forward_tiles(DotForwardParams<scalar_t, acc_t>& p, const at::Tensor& like,
                              cudaStream_t stream) {
  launch_forward_tiles<DotScorePairs<scalar_t, acc_t, VEC>>(p, like, stream);
}

template <int VEC, typename scalar_t, typename acc_t>
void launch_dot_backward_tiles(const DotBackwardParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  launch_backward_tiles<DotGradPairs<scalar_t, acc_t, VEC>>(p, !p.values_are_keys, stream);
  using Query = DotGradQueryRows<scalar_t, acc_t, VEC>;
  launch_weighted_rows(Query{{}, p, p.B, p.Tq, p.S, p.D, p.scale}, stream);
  if (p.values_are_keys) {
    using Both = DotGradKeyRows<scalar_t, acc_t, VEC, true>;
    launch_weighted_rows(Both{{}, p, p.B, p.S, 2 * p.Tq, p.D, acc_t(1)}, stream);
  } else {
    using Keys = DotGradKeyRows<scalar_t, acc_t, VEC, false>;
    launch_weighted_rows(Keys{{}, p, p.B, p.S, p.Tq, p.D, p.scale}, stream);
  }
}

}  // namespace attention_ext
