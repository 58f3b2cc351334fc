// Host code shared by the ops' CUDA entry points (dot_attention_kernel.cu,
// additive_attention_kernel.cu): 16-byte path test, grid sizing, the
// softmax part of the kernels' arguments (outputs, workspace, scratch, mask, sizes), the
// forward's launches and the rows-path backward's first two.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "attention_ext/test_hooks.h"
#include "attention_forward.cuh"
#include "attention_ext/forward_plan.h"
#include "kernel_params.cuh"
#include "runtime.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// 16-byte chunks need every row start aligned: aligned bases and the row lengths (D or A,
// and Dv) multiples of VEC.
inline bool can_vectorize(int64_t vec, int64_t D, int64_t Dv,
                          std::initializer_list<at::Tensor> ts) {
  if (D % vec != 0 || Dv % vec != 0) return false;
  for (const auto& t : ts) {
    if (t.numel() > 0 && !aligned16(t)) return false;
  }
  return true;
}

inline dim3 block_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "attention_ext (CUDA): problem too large for one launch (", blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks));
}

inline dim3 warp_grid(int64_t warps, int warps_per_block) {
  return block_grid(ceil_div(warps, warps_per_block));
}

// A forward's outputs (forward_outputs.h) for B x Tq rows over S keys. With no row or no
// key the outputs are final at once (done): nothing attends anywhere.
class ForwardBuffers {
 public:
  ForwardBuffers(const at::Tensor& like, const QueryRows& rows_of, int64_t S, int64_t Dv,
                 bool need_weights)
      : out_(like, rows_of, S, Dv, need_weights),
        B_(rows_of.B), Tq_(rows_of.Tq), S_(S), Dv_(Dv), need_weights_(need_weights) {
    if (B_ * Tq_ == 0) {
      done_ = true;
    } else if (S == 0) {  // every row is empty
      out_.context.zero_();
      out_.lse.fill_(-std::numeric_limits<double>::infinity());
      done_ = true;
    }
  }

  bool done() const { return done_; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return out_.as_tuple(); }
  const at::Tensor& context() const { return out_.context; }

  // Points the outputs, values, key positions and sizes of p at these buffers and inputs;
  // launch_attention_forward adds the plan and the workspace.
  template <typename scalar_t, typename acc_t>
  void bind(SoftmaxForwardParams<scalar_t, acc_t>& p, const at::Tensor& values,
            const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
            const std::optional<at::Tensor>& memory_index) const {
    p.values = values.data_ptr<scalar_t>();
    p.positions = key_positions(lengths, mask, S_, memory_index, values.size(0));
    p.context = out_.context.data_ptr<scalar_t>();
    p.weights = need_weights_ ? out_.weights.data_ptr<scalar_t>() : nullptr;
    p.lse = out_.lse.data_ptr<acc_t>();
    p.B = B_; p.Tq = Tq_; p.S = S_; p.Dv = Dv_;
  }

 private:
  ForwardOutputs out_;
  int64_t B_, Tq_, S_, Dv_;
  bool need_weights_;
  bool done_ = false;
};

// A backward's (B x Tq, S) scratch of probabilities and score gradients, in the
// accumulation dtype: never B x Tq x S x D (or A).
class BackwardScratch {
 public:
  BackwardScratch(const at::Tensor& like, int64_t rows, int64_t S)
      : scratch_(at::empty({2, rows * S}, like.options().dtype(acc_dtype(like.scalar_type())))) {}

  // Points the softmax part of p at the scratch and at the inputs it reads; grad_values is
  // absent for the dot op with the keys as values (grad_keys then holds both gradients).
  template <typename scalar_t, typename acc_t>
  void bind(SoftmaxBackwardParams<scalar_t, acc_t>& p, const QueryRows& rows,
            const at::Tensor& grad_context,
            const std::optional<at::Tensor>& grad_weights, const at::Tensor& values,
            const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
            const std::optional<at::Tensor>& memory_index, const at::Tensor& lse,
            const std::optional<at::Tensor>& grad_values) const {
    p.grad_context = grad_context.data_ptr<scalar_t>();
    p.grad_weights = grad_weights ? grad_weights->data_ptr<scalar_t>() : nullptr;
    p.values = values.data_ptr<scalar_t>();
    p.positions = key_positions(lengths, mask, values.size(1), memory_index, values.size(0));
    p.lse = lse.data_ptr<acc_t>();
    p.grad_values = grad_values ? grad_values->data_ptr<scalar_t>() : nullptr;
    p.probs = scratch_[0].data_ptr<acc_t>();
    p.dscores = scratch_[1].data_ptr<acc_t>();
    p.B = rows.B;
    p.Tq = rows.Tq;
    p.S = values.size(1);
    p.Dv = values.size(2);
  }

 private:
  at::Tensor scratch_;
};

// An op's forward with the op's Scorer (scorers.cuh), p bound by ForwardBuffers and the op:
// the launch plan (forward_plan.h) for rows of D score features, one workspace
// allocation, attention_forward_kernel, then split_merge_kernel when the keys are split.
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

// The rows path's backward, first two steps (softmax_backward.cuh): p and dp for every
// (row, key) with the op's Scorer, then ds; the op's kernels then read the scratch.
template <typename Scorer, typename Params>
void launch_backward_probs(const Params& p, cudaStream_t stream) {
  using SoftmaxParams = SoftmaxBackwardParams<typename Scorer::scalar_t, typename Scorer::acc_t>;
  const int64_t rows = p.B * p.Tq;
  launch_kernel(backward_probs_kernel<Scorer, Params>,
                warp_grid(rows * p.S, kBackwardWarpsPerBlock),
                dim3(kBackwardWarpsPerBlock * kWarpSize), 0, stream, p);
  launch_kernel(softmax_grad_rows_kernel<typename Scorer::scalar_t, typename Scorer::acc_t>,
                block_grid(rows), dim3(kWarpSize), 0, stream,
                static_cast<const SoftmaxParams&>(p));
}

}  // namespace attention_ext
