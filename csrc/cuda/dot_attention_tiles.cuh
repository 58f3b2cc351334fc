// The dot op's query-tile path (Tq >= kQueryTileMinRows: teacher forcing and its
// backward), built from the tile products of tile_products.cuh and the softmax row
// kernels. Scratch is (B, Tq, S) in the accumulation type, never B x Tq x S x D.
//  forward: scores = scale Q K^T (pair_product_kernel) -> lse and weights
//    (softmax_rows_kernel) -> context = P V (weighted_rows_kernel, P = exp(score - lse)
//    computed as the tile is staged);
//  backward: p = exp(scale Q K^T - lse) and dp = dO V^T + grad_weights (one pair product
//    kernel) -> ds = p (dp - delta) (softmax_grad_rows_kernel) -> grad_query = scale dS K,
//    grad_keys = scale dS^T Q and grad_values = P^T dO (weighted_rows_kernel each; with the
//    keys as values, grad_keys sums both over 2 Tq rows).
#pragma once

#include <cstdint>

#include "attention_forward.cuh"
#include "host_helpers.cuh"
#include "kernel_params.cuh"
#include "runtime.cuh"
#include "softmax_backward.cuh"
#include "tile_products.cuh"

namespace attention_ext {

// Key j's row of a (B, S, width) tensor when it attends, else nullptr (staged as zeros:
// padding is never read).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* attending_row(const KeyPositions& kp,
                                                         const scalar_t* base, int64_t S,
                                                         int64_t width, int64_t b, int64_t j) {
  return j < kp.end(b) && kp.attends(b, j) ? base + (b * S + j) * width : nullptr;
}

template <typename scalar_t_, typename acc_t_, int VEC>
struct DotTileTypes {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kVec = VEC;
};

// Forward, step 1: scores[b, t, j] = scale <q_t, k_j> for the attending keys.
template <typename scalar_t, typename acc_t, int VEC>
struct DotScorePairs : DotTileTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 1;
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

// Forward, step 3: context_t = sum_j p_tj v_j.
template <typename scalar_t, typename acc_t, int VEC>
struct DotContextRows : DotTileTypes<scalar_t, acc_t, VEC> {
  DotForwardParams<scalar_t, acc_t> p;
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

// Backward, step 1: p_tj from the recomputed score and lse, dp_tj = <g_t, v_j> + gw_tj;
// both 0 where j does not attend.
template <typename scalar_t, typename acc_t, int VEC>
struct DotGradPairs : DotTileTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 2;
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
    const int64_t row = b * p.Tq + t;
    const int64_t at = row * p.S + j;
    const bool att = j < p.positions.end(b) && p.positions.attends(b, j);
    p.probs[at] = att ? prob_from_lse(p.scale * c[0], p.lse[row]) : acc_t(0);
    p.dscores[at] =
        att ? c[1] + (p.grad_weights ? static_cast<acc_t>(p.grad_weights[at]) : acc_t(0))
            : acc_t(0);
  }
};

// Backward, step 3: grad_query_t = scale sum_j ds_tj k_j.
template <typename scalar_t, typename acc_t, int VEC>
struct DotGradQueryRows : DotTileTypes<scalar_t, acc_t, VEC> {
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

// Backward, step 3: a key's gradients, sums over the query rows t:
//  keys:   grad_keys_j = scale sum_t ds_tj q_t;
//  values: grad_values_j = sum_t p_tj g_t;
//  keys as values: grad_keys_j = sum over 2 Tq rows, scale ds_tj q_t then p_tj g_t.
enum class KeyGrad { kKeys, kValues, kKeysAsValues };

template <typename scalar_t, typename acc_t, int VEC, KeyGrad kWhich>
struct DotGradKeyRows : DotTileTypes<scalar_t, acc_t, VEC> {
  DotBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;
  acc_t alpha;

  __device__ __forceinline__ acc_t coef(int64_t b, int64_t j, int64_t t) const {
    const acc_t* ds = p.dscores + b * p.Tq * p.S + j;
    const acc_t* pr = p.probs + b * p.Tq * p.S + j;
    if (kWhich == KeyGrad::kKeys) return ds[t * p.S];
    if (kWhich == KeyGrad::kValues) return pr[t * p.S];
    return t < p.Tq ? p.scale * ds[t * p.S] : pr[(t - p.Tq) * p.S];
  }
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t t) const {
    const scalar_t* q = p.query + b * p.Tq * p.D;
    const scalar_t* g = p.grad_context + b * p.Tq * p.Dv;
    if (kWhich == KeyGrad::kKeys) return q + t * p.D;
    if (kWhich == KeyGrad::kValues) return g + t * p.Dv;
    return t < p.Tq ? q + t * p.D : g + (t - p.Tq) * p.Dv;
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t j) const {
    return kWhich == KeyGrad::kValues ? p.grad_values + (b * p.S + j) * p.Dv
                                      : p.grad_keys + (b * p.S + j) * p.D;
  }
  __device__ __forceinline__ bool live(int64_t b, int64_t j) const {
    return j < p.positions.end(b) && p.positions.attends(b, j);
  }
};

// A tile product's launch: one block per 32 x 32 tile of each batch element's M x N.
template <typename Kernel, typename Work>
void launch_tiles(Kernel kernel, const Work& w, cudaStream_t stream) {
  launch_kernel(kernel, block_grid(w.B * ceil_div(w.M, kTile) * ceil_div(w.N, kTile)),
                dim3(kTileThreads), 0, stream, w);
}

// The forward of p (bound by ForwardBuffers and the op), with one scratch allocation
// for the raw scores.
template <int VEC, typename scalar_t, typename acc_t>
void launch_dot_forward_tiles(DotForwardParams<scalar_t, acc_t>& p, const at::Tensor& like,
                              cudaStream_t stream) {
  const at::Tensor scores =
      at::empty({p.B * p.Tq * p.S}, like.options().dtype(acc_dtype(like.scalar_type())));
  p.scores = scores.data_ptr<acc_t>();
  using Pairs = DotScorePairs<scalar_t, acc_t, VEC>;
  launch_tiles(pair_product_kernel<Pairs>, Pairs{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq), dim3(kWarpSize),
                0, stream, static_cast<const SoftmaxForwardParams<scalar_t, acc_t>&>(p));
  using Context = DotContextRows<scalar_t, acc_t, VEC>;
  launch_tiles(weighted_rows_kernel<Context>, Context{{}, p, p.B, p.Tq, p.S, p.Dv, acc_t(1)},
               stream);
}

template <int VEC, typename scalar_t, typename acc_t>
void launch_dot_backward_tiles(const DotBackwardParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  using Pairs = DotGradPairs<scalar_t, acc_t, VEC>;
  launch_tiles(pair_product_kernel<Pairs>, Pairs{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_grad_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq),
                dim3(kWarpSize), 0, stream,
                static_cast<const SoftmaxBackwardParams<scalar_t, acc_t>&>(p));
  using Query = DotGradQueryRows<scalar_t, acc_t, VEC>;
  launch_tiles(weighted_rows_kernel<Query>, Query{{}, p, p.B, p.Tq, p.S, p.D, p.scale}, stream);
  if (p.values_are_keys) {
    using Both = DotGradKeyRows<scalar_t, acc_t, VEC, KeyGrad::kKeysAsValues>;
    launch_tiles(weighted_rows_kernel<Both>, Both{{}, p, p.B, p.S, 2 * p.Tq, p.D, acc_t(1)},
                 stream);
    return;
  }
  using Keys = DotGradKeyRows<scalar_t, acc_t, VEC, KeyGrad::kKeys>;
  launch_tiles(weighted_rows_kernel<Keys>, Keys{{}, p, p.B, p.S, p.Tq, p.D, p.scale}, stream);
  using Values = DotGradKeyRows<scalar_t, acc_t, VEC, KeyGrad::kValues>;
  launch_tiles(weighted_rows_kernel<Values>, Values{{}, p, p.B, p.S, p.Tq, p.Dv, acc_t(1)},
               stream);
}

}  // namespace attention_ext
