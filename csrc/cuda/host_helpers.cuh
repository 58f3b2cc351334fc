// Host code shared by the ops' CUDA entry points (dot_attention_kernel.cu,
// additive_attention_kernel.cu): 16-byte path test, grid sizing, the
// softmax part of the kernels' arguments (outputs, workspace, scratch, mask, sizes) and
// the forward's launches.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "attention_ext/test_hooks.h"
#include "device_context.cuh"
#include "launch.cuh"
#include "online_softmax_forward.cuh"
#include "softmax_params.cuh"
#include "split_plan.h"

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

inline dim3 warp_grid(int64_t warps, int warps_per_block) {
  const int64_t blocks = ceil_div(warps, warps_per_block);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "attention_ext (CUDA): problem too large for one launch (", warps, " warps)");
  return dim3(static_cast<unsigned>(blocks));
}

// A forward's outputs (forward_outputs.h) and workspace for B x Tq rows over S keys.
// With no row or no key the outputs are final at once (done): nothing attends anywhere.
class ForwardBuffers {
 public:
  ForwardBuffers(const at::Tensor& like, const QueryRows& rows_of, int64_t S, int64_t Dv,
                 bool need_weights)
      : out_(like, rows_of, S, Dv, need_weights),
        B_(rows_of.B), Tq_(rows_of.Tq), S_(S), Dv_(Dv), need_weights_(need_weights) {
    const at::ScalarType acc = acc_dtype(like.scalar_type());
    const auto acc_opts = like.options().dtype(acc);
    const int64_t rows = B_ * Tq_;
    if (rows == 0) {
      done_ = true;
      return;
    }
    if (S == 0) {  // every row is empty
      out_.context.zero_();
      out_.lse.fill_(-std::numeric_limits<double>::infinity());
      done_ = true;
      return;
    }
    const int64_t sm_count = multiprocessor_count(like.device().index());
    plan_ = plan_splits(rows, S, sm_count, forced_splits());
    ctx_acc_ = at::empty({rows * plan_.splits * Dv}, acc_opts);
    partials_ = at::empty({2, plan_.splits > 1 ? rows * plan_.splits : 0}, acc_opts);
    // The raw scores go to the weights themselves when they have the accumulation dtype.
    weights_hold_scores_ = like.scalar_type() == acc;
    if (need_weights && !weights_hold_scores_) scores_ = at::empty({rows * S}, acc_opts);
  }

  bool done() const { return done_; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return out_.as_tuple(); }
  const at::Tensor& context() const { return out_.context; }

  // Points everything of p but the op's own inputs at these buffers and at values/mask.
  template <typename scalar_t, typename acc_t>
  void bind(SoftmaxForwardParams<scalar_t, acc_t>& p, const at::Tensor& values,
            const std::optional<at::Tensor>& lengths,
            const std::optional<at::Tensor>& mask) const {
    p.values = values.data_ptr<scalar_t>();
    p.positions = key_positions(lengths, mask, S_);
    p.context = out_.context.data_ptr<scalar_t>();
    p.weights = need_weights_ ? out_.weights.data_ptr<scalar_t>() : nullptr;
    p.lse = out_.lse.data_ptr<acc_t>();
    if (need_weights_) {
      p.scores = weights_hold_scores_ ? reinterpret_cast<acc_t*>(p.weights)
                                      : scores_.data_ptr<acc_t>();
    }
    p.ctx_acc = ctx_acc_.data_ptr<acc_t>();
    if (plan_.splits > 1) {
      p.part_max = partials_[0].data_ptr<acc_t>();
      p.part_sum = partials_[1].data_ptr<acc_t>();
    }
    p.B = B_; p.Tq = Tq_; p.S = S_; p.Dv = Dv_;
    p.splits = plan_.splits;
    p.split_len = plan_.split_len;
  }

 private:
  ForwardOutputs out_;
  int64_t B_, Tq_, S_, Dv_;
  bool need_weights_;
  at::Tensor ctx_acc_, partials_, scores_;
  SplitPlan plan_{1, 0};
  bool weights_hold_scores_ = false;
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
            const at::Tensor& lse, const std::optional<at::Tensor>& grad_values) const {
    p.grad_context = grad_context.data_ptr<scalar_t>();
    p.grad_weights = grad_weights ? grad_weights->data_ptr<scalar_t>() : nullptr;
    p.values = values.data_ptr<scalar_t>();
    p.positions = key_positions(lengths, mask, values.size(1));
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

// An op's forward, online_softmax_forward_kernel with the op's Scorer (one warp per
// (row, split)), then the split-S merge if any.
template <template <typename, typename, int> class Scorer, int VEC,
          template <typename, typename> class Params, typename scalar_t, typename acc_t>
void launch_online_softmax_forward(const Params<scalar_t, acc_t>& p, cudaStream_t stream) {
  const dim3 block(kForwardWarpsPerBlock * kWarpSize);
  launch_kernel(online_softmax_forward_kernel<Scorer<scalar_t, acc_t, VEC>>,
                warp_grid(p.B * p.Tq * p.splits, kForwardWarpsPerBlock), block, 0, stream, p);
  if (p.splits > 1) {
    launch_kernel(split_merge_kernel<scalar_t, acc_t, VEC>,
                  warp_grid(p.B * p.Tq, kForwardWarpsPerBlock), block, 0, stream,
                  static_cast<const SoftmaxForwardParams<scalar_t, acc_t>&>(p));
  }
}

}  // namespace attention_ext
