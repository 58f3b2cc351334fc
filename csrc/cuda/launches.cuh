// The launch sequences both ops share, host code over the shared kernels: the forward
// (attention_forward.cuh on the rows path, the query-tile path's pair products, softmax and
// context), the rows path's backward (softmax_backward.cuh, then the op's two row kernels)
// and the start of the query-tile path's backward. An op brings its Scorer (scorers.cuh,
// rows path) and its Pairs (the op's *_tiles.cuh, query-tile path); its entry point
// (*_kernel.cu) launches what is the op's own.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention_ext/forward_outputs.h"
#include "attention_ext/forward_plan.h"
#include "attention_ext/math.h"
#include "attention_ext/test_hooks.h"
#include "attention_forward.cuh"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "launch_setup.cuh"
#include "query_tiles.cuh"
#include "runtime.cuh"
#include "softmax_backward.cuh"
#include "tile_products.cuh"

namespace attention_ext {

// The rows path's forward with the op's Scorer, p bound by ForwardBuffers and the op: the
// launch plan (forward_plan.h) for rows of D score features, one workspace allocation,
// attention_forward_kernel, then split_merge_kernel when the keys are split.
template <template <typename, typename, int> class Scorer, int VEC,
          template <typename, typename> class Params, typename scalar_t, typename acc_t>
void launch_attention_forward(Params<scalar_t, acc_t>& p, int64_t D, const at::Tensor& like,
                              cudaStream_t stream) {
  using ScorerT = Scorer<scalar_t, acc_t, VEC>;
  const int64_t rows = p.B * p.Tq;
  p.values_are_keys = p.values == ScorerT::keys_of(p) && p.Dv == D;
  const ForwardPlan plan = plan_forward(rows, p.S, D / VEC, p.Dv / VEC, p.values_are_keys,
                                        multiprocessor_count(like.device().index()),
                                        forced_splits());
  p.splits = plan.splits;
  p.split_len = plan.split_len;
  p.slices = plan.slices;
  p.slice_chunks = plan.slice_chunks;
  p.merge_parts = plan.merge_parts(p.weights != nullptr);
  p.key_lanes = plan.key_lanes;
  p.round_keys = plan.round_keys;
  p.stage_buffers = plan.stage_buffers;
  p.stage_values = plan.stage_values;

  // Workspace: split partials (context, max, sum), then the raw scores unless the weights
  // hold them (they have the accumulation type).
  const int64_t parts = plan.splits > 1 ? rows * plan.splits : 0;
  const bool own_scores = p.weights != nullptr && !std::is_same_v<scalar_t, acc_t>;
  const at::Tensor workspace =
      at::empty({parts * p.Dv + 2 * parts + (own_scores ? rows * p.S : 0)},
                like.options().dtype(acc_dtype(like.scalar_type())));
  acc_t* ws = workspace.data_ptr<acc_t>();
  p.ctx_acc = ws;  // first: its rows keep the allocation's alignment for chunk access
  p.part_max = ws + parts * p.Dv;
  p.part_sum = p.part_max + parts;
  p.scores = p.weights == nullptr ? nullptr
             : own_scores         ? p.part_sum + parts
                                  : reinterpret_cast<acc_t*>(p.weights);

  const dim3 block(plan.warps * kWarpSize);
  launch_kernel(attention_forward_kernel<ScorerT>,
                block_grid(plan.blocks(rows)), block, 0, stream, p);
  if (plan.splits > 1) {
    launch_kernel(split_merge_kernel<scalar_t, acc_t, VEC>, block_grid(rows * p.merge_parts),
                  block, 0, stream, static_cast<const SoftmaxForwardParams<scalar_t, acc_t>&>(p));
  }
}

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

// The query-tile path's forward with the op's Pairs (its forward's write the raw scores to
// p.scores), p bound by ForwardBuffers and the op: scores, then lse and weights, then the
// context. One scratch allocation.
template <template <typename, typename, int, bool> class Pairs, int VEC,
          template <typename, typename> class Params, typename scalar_t, typename acc_t>
void launch_forward_tiles(Params<scalar_t, acc_t>& p, const at::Tensor& like,
                          cudaStream_t stream) {
  const at::Tensor scores =
      at::empty({p.B * p.Tq * p.S}, like.options().dtype(acc_dtype(like.scalar_type())));
  p.scores = scores.data_ptr<acc_t>();
  launch_pair_products(Pairs<scalar_t, acc_t, VEC, false>{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq), dim3(kWarpSize),
                0, stream, static_cast<const SoftmaxForwardParams<scalar_t, acc_t>&>(p));
  using Context = ContextRows<scalar_t, acc_t, VEC>;
  launch_weighted_rows(Context{{}, p, p.B, p.Tq, p.S, p.Dv, acc_t(1)}, stream);
}

// An op's forward, p bound by ForwardBuffers and the op (rows of `width` score features):
// the query-tile path with the op's Pairs from kQueryTileMinRows query rows up, else the
// rows path with its Scorer; both read rows in 16-byte chunks when every row of `rows`
// allows it (can_vectorize).
template <template <typename, typename, int> class Scorer,
          template <typename, typename, int, bool> class Pairs,
          template <typename, typename> class Params, typename scalar_t, typename acc_t>
void launch_forward(Params<scalar_t, acc_t>& p, int64_t width,
                    std::initializer_list<at::Tensor> rows, const at::Tensor& like,
                    cudaStream_t stream) {
  constexpr int kVec = vec_width<scalar_t>();
  const bool vec = can_vectorize(kVec, width, p.Dv, rows);
  if (uses_query_tiles(p.Tq)) {
    vec ? launch_forward_tiles<Pairs, kVec>(p, like, stream)
        : launch_forward_tiles<Pairs, 1>(p, like, stream);
  } else {
    vec ? launch_attention_forward<Scorer, kVec>(p, width, like, stream)
        : launch_attention_forward<Scorer, 1>(p, width, like, stream);
  }
}

// The rows path's backward (few query rows per batch element): p and dp for every
// (row, key) with the op's Scorer, then ds (softmax_backward.cuh), then the op's query-side
// kernel, one warp per (row, round of 32 of its width_chunks chunks), and its keys-side
// kernel, one warp per key. Stream order is the only synchronisation needed.
template <typename Scorer, typename Params>
void launch_backward_rows(const Params& p, int64_t width_chunks, void (*query_kernel)(Params),
                          void (*keys_kernel)(Params), cudaStream_t stream) {
  using SoftmaxParams = SoftmaxBackwardParams<typename Scorer::scalar_t, typename Scorer::acc_t>;
  const dim3 block(kBackwardWarpsPerBlock * kWarpSize);
  const int64_t rows = p.B * p.Tq;
  launch_kernel(backward_probs_kernel<Scorer, Params>,
                warp_grid(rows * p.S, kBackwardWarpsPerBlock), block, 0, stream, p);
  launch_kernel(softmax_grad_rows_kernel<typename Scorer::scalar_t, typename Scorer::acc_t>,
                block_grid(rows), dim3(kWarpSize), 0, stream,
                static_cast<const SoftmaxParams&>(p));
  launch_kernel(query_kernel,
                warp_grid(row_round_warps(rows, width_chunks), kBackwardWarpsPerBlock), block,
                0, stream, p);
  launch_kernel(keys_kernel, warp_grid(p.B * p.S, kBackwardWarpsPerBlock), block, 0, stream, p);
}

// The start of the query-tile path's backward with the op's Pairs (its backward's write p
// and dp for whole rows): the pair products, then ds in place of dp, then grad_values
// unless the op takes them elsewhere (the dot op's keys as values).
template <template <typename, typename, int, bool> class Pairs, int VEC,
          template <typename, typename> class Params, typename scalar_t, typename acc_t>
void launch_backward_tiles(const Params<scalar_t, acc_t>& p, bool grad_values,
                           cudaStream_t stream) {
  launch_pair_products(Pairs<scalar_t, acc_t, VEC, true>{{}, p, p.B, p.Tq, p.S}, stream);
  launch_kernel(softmax_grad_rows_kernel<scalar_t, acc_t>, block_grid(p.B * p.Tq),
                dim3(kWarpSize), 0, stream,
                static_cast<const SoftmaxBackwardParams<scalar_t, acc_t>&>(p));
  if (grad_values) {
    using Values = ValueGradRows<scalar_t, acc_t, VEC>;
    launch_weighted_rows(Values{{}, p, p.B, p.S, p.Tq, p.Dv, acc_t(1)}, stream);
  }
}

}  // namespace attention_ext
