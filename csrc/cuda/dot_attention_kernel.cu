// CUDA implementation of attention_ext::dot_attention and its backward: argument checks,
// contiguous inputs, dtype and vector-width dispatch, launches. The kernels: for few query
// rows per batch element, attention_forward.cuh with DotScorer (scorers.cuh) and
// dot_attention_backward.cuh (with softmax_backward.cuh); from kQueryTileMinRows up,
// dot_attention_tiles.cuh. What this op shares with the additive op is launched by
// launches.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "attention_ext/checks.h"
#include "attention_ext/inputs.h"
#include "dot_attention_backward.cuh"
#include "dot_attention_tiles.cuh"
#include "launch_setup.cuh"
#include "launches.cuh"
#include "runtime.cuh"
#include "scorers.cuh"
#include "tile_products.cuh"

namespace attention_ext {
namespace {

// The rows path (dot_attention_backward.cuh), or from kQueryTileMinRows query rows up the
// query-tile path: the pair products, ds and grad_values, then grad_query and grad_keys
// (with the keys as values, grad_keys sums both of its terms over 2 Tq rows).
template <typename scalar_t, typename acc_t, int VEC>
void launch_backward(const DotBackwardParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  if (!uses_query_tiles(p.Tq)) {
    launch_backward_rows<DotScorer<scalar_t, acc_t, VEC>>(
        p, p.D / VEC, dot_attention_backward_query_kernel<scalar_t, acc_t, VEC>,
        dot_attention_backward_keys_kernel<scalar_t, acc_t, VEC>, stream);
    return;
  }
  launch_backward_tiles<DotPairs, VEC>(p, !p.values_are_keys, stream);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_cuda(
    const at::Tensor& query_in, const at::Tensor& keys_in,
    const std::optional<at::Tensor>& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, double scale, bool need_weights,
    const std::optional<at::Tensor>& memory_index_in) {
  const DotShapes s = check_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in, scale,
                                       memory_index_in);
  const DeviceGuard guard(query_in.device());
  const DotInputs in = contiguous_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in,
                                             memory_index_in, DeviceLengths::kKernelsCheck);

  const ForwardBuffers buffers(in.query, s, s.S, s.Dv, need_weights);
  if (buffers.done()) return buffers.outputs();
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query.scalar_type(),
                                  "dot_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DotForwardParams<scalar_t, acc_t> p{};
    buffers.bind(p, in.values, in.lengths, in.mask, in.memory_index);
    p.query = in.query.data_ptr<scalar_t>();
    p.keys = in.keys.data_ptr<scalar_t>();
    p.D = s.D;
    p.scale = static_cast<acc_t>(scale);
    launch_forward<DotScorer, DotPairs>(p, s.D, {in.query, in.keys, in.values, buffers.context()},
                                        in.query, stream);
  });
  return buffers.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_backward_cuda(
    const at::Tensor& grad_context_in, const std::optional<at::Tensor>& grad_weights_in,
    const at::Tensor& query_in, const at::Tensor& keys_in,
    const std::optional<at::Tensor>& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, double scale, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& memory_index_in) {
  const DotShapes s = check_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in, scale,
                                       memory_index_in);
  check_dot_backward_extras(grad_context_in, grad_weights_in, lse_in, query_in, s);
  const DeviceGuard guard(query_in.device());
  const DotInputs in = contiguous_dot_inputs(query_in, keys_in, values_in, lengths_in, mask_in,
                                             memory_index_in, DeviceLengths::kKernelsCheck);
  // values = None: the keys are the values and grad_keys receives both gradients.
  const bool combined = !values_in.has_value();
  const at::Tensor grad_context = grad_context_in.contiguous();
  const auto grad_weights = contiguous_opt(grad_weights_in);
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = in.query.options();
  at::Tensor grad_query = at::empty(s.row_sizes(s.D), opts);
  const int64_t rows = s.B * s.Tq;
  if (rows == 0 || s.S == 0) {  // nothing attends anywhere: all gradients are zero
    return {grad_query.zero_(), at::zeros({s.M, s.S, s.D}, opts),
            combined ? at::empty({0}, opts) : at::zeros({s.M, s.S, s.Dv}, opts)};
  }
  const MemoryGradient grad_keys(in.query, in.memory_index, s.B, s.M, s.S, s.D);
  const MemoryGradient grad_values(in.query, in.memory_index, s.B, s.M, s.S, combined ? 0 : s.Dv);
  const BackwardScratch scratch(in.query, rows, s.S);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query.scalar_type(),
                                  "dot_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    DotBackwardParams<scalar_t, acc_t> p{};
    scratch.bind(p, s, grad_context, grad_weights, in.values, in.lengths, in.mask,
                 in.memory_index, lse,
                 combined ? std::nullopt : std::optional<at::Tensor>(grad_values.rows()));
    p.query = in.query.data_ptr<scalar_t>();
    p.keys = in.keys.data_ptr<scalar_t>();
    p.grad_query = grad_query.data_ptr<scalar_t>();
    p.grad_keys = grad_keys.rows().data_ptr<scalar_t>();
    p.D = s.D;
    p.scale = static_cast<acc_t>(scale);
    p.values_are_keys = combined;
    constexpr int kVec = vec_width<scalar_t>();
    if (can_vectorize(kVec, s.D, s.Dv,
                      {in.query, in.keys, in.values, grad_context, grad_query,
                       grad_keys.rows(), grad_values.rows()})) {
      launch_backward<scalar_t, acc_t, kVec>(p, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(p, stream);
    }
  });
  return {grad_query, grad_keys.sum(), combined ? at::empty({0}, opts) : grad_values.sum()};
}

}  // namespace
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, ATTENTION_EXT_KERNEL_DISPATCH_KEY, m) {
  m.impl("dot_attention", &attention_ext::dot_attention_cuda);
  m.impl("_dot_attention_backward", &attention_ext::dot_attention_backward_cuda);
}
