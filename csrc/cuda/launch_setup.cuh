// Host code that the ops' CUDA entry points (dot_attention_kernel.cu,
// additive_attention_kernel.cu) run before their launches: the 16-byte path test, grid
// sizes, a forward's outputs and a backward's scratch, bound to the softmax part of the
// kernels' arguments (kernel_params.cuh). No kernel of its own.
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
#include "attention_ext/math.h"
#include "kernel_params.cuh"
#include "runtime.cuh"

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

}  // namespace attention_ext
