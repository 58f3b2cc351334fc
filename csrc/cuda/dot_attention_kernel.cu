// CUDA implementation of attention_ext::dot_attention and its backward: argument checks,
// contiguous inputs, workspace, split-S plan, dtype and vector-width dispatch, launches.
// The kernels themselves are in dot_attention_forward.cuh / dot_attention_backward.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "attention_ext/checks.h"
#include "attention_ext/inputs.h"
#include "attention_ext/tuning.h"
#include "device_context.cuh"
#include "dot_attention_backward.cuh"
#include "dot_attention_forward.cuh"
#include "launch.cuh"
#include "split_plan.h"

namespace attention_ext {
namespace {

at::ScalarType acc_dtype_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// 16-byte chunks need every row start aligned: aligned bases and D, Dv multiples of VEC.
bool can_vectorize(int64_t vec, int64_t D, int64_t Dv, std::initializer_list<at::Tensor> ts) {
  if (D % vec != 0 || Dv % vec != 0) return false;
  for (const auto& t : ts) {
    if (t.numel() > 0 && !aligned16(t)) return false;
  }
  return true;
}

dim3 warp_grid(int64_t warps, int warps_per_block) {
  const int64_t blocks = ceil_div(warps, warps_per_block);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "dot_attention (CUDA): problem too large for one launch (", warps, " warps)");
  return dim3(static_cast<unsigned>(blocks));
}

KeyMask make_keymask(const std::optional<at::Tensor>& lengths,
                     const std::optional<at::Tensor>& mask, int64_t S) {
  return KeyMask{lengths ? lengths->data_ptr<int64_t>() : nullptr,
                 mask ? mask->data_ptr<bool>() : nullptr, S};
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_forward(const DotForwardParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  const dim3 block(kForwardWarpsPerBlock * kWarpSize);
  launch_kernel(dot_attention_forward_kernel<scalar_t, acc_t, VEC>,
                warp_grid(p.B * p.Tq * p.splits, kForwardWarpsPerBlock), block, 0, stream, p);
  if (p.splits > 1) {
    launch_kernel(dot_attention_merge_kernel<scalar_t, acc_t, VEC>,
                  warp_grid(p.B * p.Tq, kForwardWarpsPerBlock), block, 0, stream, p);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_backward(const DotBackwardParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  const dim3 block(kBackwardWarpsPerBlock * kWarpSize);
  launch_kernel(dot_attention_backward_rows_kernel<scalar_t, acc_t, VEC>,
                warp_grid(p.B * p.Tq, kBackwardWarpsPerBlock), block, 0, stream, p);
  launch_kernel(dot_attention_backward_keys_kernel<scalar_t, acc_t, VEC>,
                warp_grid(p.B * p.S, kBackwardWarpsPerBlock), block, 0, stream, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_cuda(
    const at::Tensor& query_in, const at::Tensor& keys_in,
    const std::optional<at::Tensor>& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, double scale, bool need_weights) {
  const DotShapes s = check_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in, scale);
  const DeviceGuard guard(query_in.device());
  const DotInputs in = contiguous_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in);
  const at::Tensor& query = in.query;
  const at::Tensor& keys = in.keys;
  const at::Tensor& values = in.values;
  const auto& lengths = in.lengths;
  const auto& mask = in.mask;

  const auto opts = query.options();
  const auto acc_opts = opts.dtype(acc_dtype_for(query.scalar_type()));
  at::Tensor context = at::empty({s.B, s.Tq, s.Dv}, opts);
  at::Tensor weights = need_weights ? at::empty({s.B, s.Tq, s.S}, opts) : at::empty({0}, opts);
  at::Tensor lse = at::empty({s.B, s.Tq}, acc_opts);
  const int64_t rows = s.B * s.Tq;
  if (rows == 0) return {context, weights, lse};
  if (s.S == 0) {  // every row is empty
    context.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {context, weights, lse};
  }

  const int64_t sm_count = multiprocessor_count(query.device().index());
  const SplitPlan plan = plan_splits(rows, s.S, sm_count, forced_splits());
  at::Tensor ctx_acc = at::empty({rows * plan.splits * s.Dv}, acc_opts);
  at::Tensor partials = at::empty({2, plan.splits > 1 ? rows * plan.splits : 0}, acc_opts);
  const bool weights_hold_scores = query.scalar_type() == acc_dtype_for(query.scalar_type());
  at::Tensor scores = (need_weights && !weights_hold_scores) ? at::empty({rows * s.S}, acc_opts)
                                                             : at::Tensor();
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DotForwardParams<scalar_t, acc_t> p{};
    p.query = query.data_ptr<scalar_t>();
    p.keys = keys.data_ptr<scalar_t>();
    p.values = values.data_ptr<scalar_t>();
    p.keymask = make_keymask(lengths, mask, s.S);
    p.context = context.data_ptr<scalar_t>();
    p.weights = need_weights ? weights.data_ptr<scalar_t>() : nullptr;
    p.lse = lse.data_ptr<acc_t>();
    if (need_weights) {
      p.scores = weights_hold_scores ? reinterpret_cast<acc_t*>(p.weights)
                                     : scores.data_ptr<acc_t>();
    }
    p.ctx_acc = ctx_acc.data_ptr<acc_t>();
    if (plan.splits > 1) {
      p.part_max = partials[0].data_ptr<acc_t>();
      p.part_sum = partials[1].data_ptr<acc_t>();
    }
    p.B = s.B; p.Tq = s.Tq; p.S = s.S; p.D = s.D; p.Dv = s.Dv;
    p.splits = plan.splits;
    p.split_len = plan.split_len;
    p.scale = static_cast<acc_t>(scale);
    constexpr int kVec = vec_width<scalar_t>();
    if (can_vectorize(kVec, s.D, s.Dv, {query, keys, values, context})) {
      launch_forward<scalar_t, acc_t, kVec>(p, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(p, stream);
    }
  });
  return {context, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_backward_cuda(
    const at::Tensor& grad_context_in, const std::optional<at::Tensor>& grad_weights_in,
    const at::Tensor& query_in, const at::Tensor& keys_in,
    const std::optional<at::Tensor>& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, double scale, const at::Tensor& lse_in) {
  const DotShapes s = check_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in, scale);
  check_dot_backward_extras(grad_context_in, grad_weights_in, lse_in, query_in, s);
  const DeviceGuard guard(query_in.device());
  const DotInputs in = contiguous_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in);
  const at::Tensor& query = in.query;
  const at::Tensor& keys = in.keys;
  const at::Tensor& values = in.values;
  const auto& lengths = in.lengths;
  const auto& mask = in.mask;
  // values = None: the keys are the values and grad_keys receives both gradients.
  const bool combined = !values_in.has_value();
  const at::Tensor grad_context = grad_context_in.contiguous();
  const auto grad_weights = contiguous_opt(grad_weights_in);
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = query.options();
  at::Tensor grad_query = at::empty({s.B, s.Tq, s.D}, opts);
  at::Tensor grad_keys = at::empty({s.B, s.S, s.D}, opts);
  at::Tensor grad_values = combined ? at::empty({0}, opts) : at::empty({s.B, s.S, s.Dv}, opts);
  const int64_t rows = s.B * s.Tq;
  if (rows == 0 || s.S == 0) {  // nothing attends anywhere: all gradients are zero
    grad_query.zero_();
    grad_keys.zero_();
    grad_values.zero_();
    return {grad_query, grad_keys, grad_values};
  }
  // p and ds per (b, t, j): float32 (float64) scratch, never B x Tq x S x D.
  at::Tensor scratch = at::empty({2, rows * s.S}, opts.dtype(acc_dtype_for(query.scalar_type())));
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DotBackwardParams<scalar_t, acc_t> p{};
    p.grad_context = grad_context.data_ptr<scalar_t>();
    p.grad_weights = grad_weights ? grad_weights->data_ptr<scalar_t>() : nullptr;
    p.query = query.data_ptr<scalar_t>();
    p.keys = keys.data_ptr<scalar_t>();
    p.values = values.data_ptr<scalar_t>();
    p.keymask = make_keymask(lengths, mask, s.S);
    p.lse = lse.data_ptr<acc_t>();
    p.grad_query = grad_query.data_ptr<scalar_t>();
    p.grad_keys = grad_keys.data_ptr<scalar_t>();
    p.grad_values = combined ? nullptr : grad_values.data_ptr<scalar_t>();
    p.probs = scratch[0].data_ptr<acc_t>();
    p.dscores = scratch[1].data_ptr<acc_t>();
    p.B = s.B; p.Tq = s.Tq; p.S = s.S; p.D = s.D; p.Dv = s.Dv;
    p.scale = static_cast<acc_t>(scale);
    constexpr int kVec = vec_width<scalar_t>();
    if (can_vectorize(kVec, s.D, s.Dv,
                      {query, keys, values, grad_context, grad_query, grad_keys, grad_values})) {
      launch_backward<scalar_t, acc_t, kVec>(p, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(p, stream);
    }
  });
  return {grad_query, grad_keys, grad_values};
}

}  // namespace
}  // namespace attention_ext

// Under the CPU emulation (tests) csrc/emulated/ registers these functions as CPU ops of
// their own instead: they must never stand in for the real CUDA kernels.
#ifndef ATTENTION_EXT_CUDA_EMULATION
TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("dot_attention", &attention_ext::dot_attention_cuda);
  m.impl("_dot_attention_backward", &attention_ext::dot_attention_backward_cuda);
}
#endif
