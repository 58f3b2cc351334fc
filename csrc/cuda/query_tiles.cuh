// What both ops' query-tile paths (Tq >= kQueryTileMinRows; dot_attention_tiles.cuh,
// additive_attention_tiles.cuh) share: the tile launch, rows of keys that attend, and the
// products that only the softmax part takes part in, the context P V (forward) and the
// values' gradient P^T dO (backward). Scratch is (B, Tq, S) in the accumulation type:
// raw scores in the forward, p and ds in the backward.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "attention_forward.cuh"
#include "host_helpers.cuh"
#include "kernel_params.cuh"
#include "runtime.cuh"
#include "softmax_backward.cuh"
#include "tile_products.cuh"

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

// A tile kernel's launch: one block per 32 x 32 tile of each batch element's M x N.
template <typename Kernel, typename Work>
void launch_tiles(Kernel kernel, const Work& w, cudaStream_t stream) {
  launch_kernel(kernel, block_grid(w.B * ceil_div(w.M, kTile) * ceil_div(w.N, kTile)),
                dim3(kTileThreads), 0, stream, w);
}

// The one choice of the tile products' float32 terms: the TF32 tensor cores when the user
// allows TF32 for matmuls (torch.backends.cuda.matmul.allow_tf32), as matmul does, else
// exact FMAs. launch(std::bool_constant<tf32>) launches with that choice.
template <typename scalar_t, typename Launch>
void with_tile_terms(Launch launch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (at::globalContext().allowTF32CuBLAS()) {
      launch(std::true_type{});
      return;
    }
  }
  launch(std::false_type{});
}

// pair_product_kernel and weighted_rows_kernel (tile_products.cuh) over w's tiles.
template <typename Pairs>
void launch_pair_products(const Pairs& w, cudaStream_t stream) {
  with_tile_terms<typename Pairs::scalar_t>([&](auto tf32) {
    launch_tiles(pair_product_kernel<Pairs, decltype(tf32)::value>, w, stream);
  });
}

template <typename WeightedRows>
void launch_weighted_rows(const WeightedRows& w, cudaStream_t stream) {
  with_tile_terms<typename WeightedRows::scalar_t>([&](auto tf32) {
    launch_tiles(weighted_rows_kernel<WeightedRows, decltype(tf32)::value>, w, stream);
  });
}

// The forward of an op whose Pairs (built from p, bound by ForwardBuffers and the op)
// writes the raw scores to p.scores: scores, then lse and weights, then the context. One
// scratch allocation.
template <typename Pairs, template <typename, typename> class Params, typename scalar_t,
          typename acc_t>
void launch_forward_tiles(Params<scalar_t, acc_t>& p, const at::Tensor& like,
                          cudaStream_t stream) {
  constexpr int VEC = Pairs::kVec;
  const at::Tensor scores =
      at::empty({p.B * p.Tq * p.S}, like.options().dtype(acc_dtype(like.scalar_type())));
  p.scores = scores.data_ptr<acc_t>();
  launch_pair_products(Pairs{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq), dim3(kWarpSize),
                0, stream, static_cast<const SoftmaxForwardParams<scalar_t, acc_t>&>(p));
  using Context = ContextRows<scalar_t, acc_t, VEC>;
  launch_weighted_rows(Context{{}, p, p.B, p.Tq, p.S, p.Dv, acc_t(1)}, stream);
}

// The start of the backward of an op whose Pairs (built from p) writes p and dp for whole
// rows: the pair products, then ds in place of dp, then grad_values unless the op takes
// them elsewhere (the dot op's keys as values).
template <typename Pairs, template <typename, typename> class Params, typename scalar_t,
          typename acc_t>
void launch_backward_tiles(const Params<scalar_t, acc_t>& p, bool grad_values,
                           cudaStream_t stream) {
  constexpr int VEC = Pairs::kVec;
  launch_pair_products(Pairs{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_grad_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq),
                dim3(kWarpSize), 0, stream,
                static_cast<const SoftmaxBackwardParams<scalar_t, acc_t>&>(p));
  if (grad_values) {
    using Values = ValueGradRows<scalar_t, acc_t, VEC>;
    launch_weighted_rows(Values{{}, p, p.B, p.S, p.Tq, p.Dv, acc_t(1)}, stream);
  }
}

}  // namespace attention_ext
