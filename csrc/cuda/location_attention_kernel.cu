// CUDA implementation of attention_ext::location_attention and its backward: argument
// checks, contiguous inputs, dtype dispatch, scratch and launches. The kernels:
// location_attention_forward.cuh and location_attention_backward.cuh, over the pieces
// they share in location_scores.cuh. Window, lengths and memory_index are checked by the
// kernels as they read them: no call waits for the GPU, so a decode step can be captured
// in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "launch_setup.cuh"
#include "location_attention_backward.cuh"
#include "location_attention_forward.cuh"
#include "location_scores.cuh"
#include "runtime.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {
namespace {

// The gradient kernel's blocks: a few per multiprocessor, each walking a split of a row's
// tiles, so that the partials (a row of A x F and F x C x K per block) stay bounded by the
// GPU's size rather than growing with S.
constexpr int64_t kGradBlocksPerMultiprocessor = 2;
constexpr int kSumThreads = 128;

// A tile's location features must fit in shared memory (location_scores.cuh).
void check_location_filters(int64_t F) {
  TORCH_CHECK_VALUE(feature_stride(F) <= kStagedFeatures,
                    "conv_weight must have fewer than ", kStagedFeatures,
                    " filters for the CUDA kernels, got F = ", F);
}

template <typename scalar_t, typename acc_t>
void bind_score_inputs(LocationScoreInputs<scalar_t, acc_t>& p, const LocationInputs& in,
                       const LocationShapes& s, double scale, bool sigmoid) {
  p.query_proj = in.query_proj.data_ptr<scalar_t>();
  p.keys_proj = in.keys_proj.data_ptr<scalar_t>();
  p.prev = in.prev.data_ptr<scalar_t>();
  p.conv_weight = in.conv_weight.data_ptr<scalar_t>();
  p.location_weight = in.location_weight.data_ptr<scalar_t>();
  p.v = in.v.data_ptr<scalar_t>();
  p.score_bias = in.score_bias ? in.score_bias->data_ptr<scalar_t>() : nullptr;
  p.window = attended_window(in.window, s.S);
  p.A = s.A;
  p.C = s.C;
  p.F = s.F;
  p.K = s.K;
  p.tile = location_tile(s.F);
  p.tiles = ceil_div(s.S, p.tile);
  p.scale = static_cast<acc_t>(scale);
  p.sigmoid = sigmoid;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> location_attention_cuda(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale, bool sigmoid, bool need_weights,
    const std::optional<at::Tensor>& memory_index) {
  const LocationShapes s =
      check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight, v, values,
                            lengths, mask, window, score_bias, scale, memory_index);
  check_location_filters(s.F);
  const DeviceGuard guard(query_proj.device());
  const LocationInputs in = contiguous_location_inputs(
      query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
      window, score_bias, memory_index, DeviceLengths::kKernelsCheck);

  const ForwardBuffers buffers(in.query_proj, s, s.S, s.Dv, need_weights);
  if (buffers.done()) return buffers.outputs();
  const at::Tensor scores =
      at::empty({s.B * s.S}, in.query_proj.options().dtype(acc_dtype(in.query_proj.scalar_type())));
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query_proj.scalar_type(),
                                  "location_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LocationForwardParams<scalar_t, acc_t> p{};
    buffers.bind(p, in.values, in.lengths, in.mask, in.memory_index);
    bind_score_inputs(p, in, s, scale, sigmoid);
    p.scores = scores.data_ptr<acc_t>();
    p.slices = std::max<int64_t>(1, ceil_div(s.Dv, kLocationThreads));
    const dim3 block(kLocationThreads);
    launch_kernel(location_scores_kernel<scalar_t, acc_t>, block_grid(s.B * p.tiles), block, 0,
                  stream, p);
    launch_kernel(location_context_kernel<scalar_t, acc_t>, block_grid(s.B * p.slices), block, 0,
                  stream, p);
  });
  return buffers.outputs();
}

// out (groups x cols) from the column range [col, col + cols) of the partials, rows summed
// in groups of `rows` (sum_partials_kernel).
template <typename scalar_t, typename acc_t>
void launch_sum_partials(const acc_t* partials, int64_t width, int64_t col, int64_t groups,
                         int64_t rows, int64_t cols, at::Tensor& out, cudaStream_t stream) {
  launch_kernel(sum_partials_kernel<scalar_t, acc_t>,
                block_grid(ceil_div(groups * cols, kSumThreads)), dim3(kSumThreads), 0, stream,
                partials, width, col, groups, rows, cols, out.data_ptr<scalar_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
location_attention_backward_cuda(
    const at::Tensor& grad_context_in, const std::optional<at::Tensor>& grad_weights_in,
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale, bool sigmoid,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& memory_index) {
  const LocationShapes s =
      check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight, v, values,
                            lengths, mask, window, score_bias, scale, memory_index);
  check_location_backward_extras(grad_context_in, grad_weights_in, lse_in, query_proj, s);
  check_location_filters(s.F);
  const DeviceGuard guard(query_proj.device());
  const LocationInputs in = contiguous_location_inputs(
      query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
      window, score_bias, memory_index, DeviceLengths::kKernelsCheck);
  const at::Tensor grad_context = grad_context_in.contiguous();
  const auto grad_weights = contiguous_opt(grad_weights_in);
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = in.query_proj.options();
  const auto acc_opts = opts.dtype(acc_dtype(in.query_proj.scalar_type()));
  at::Tensor grad_query_proj = at::empty({s.B, s.A}, opts);
  at::Tensor grad_prev = at::empty({s.B, s.C, s.S}, opts);
  at::Tensor grad_conv_weight = at::empty({s.F, s.C, s.K}, opts);
  at::Tensor grad_location_weight = at::empty({s.A, s.F}, opts);
  at::Tensor grad_v = at::empty({s.A}, opts);
  at::Tensor grad_score_bias = at::empty({score_bias ? 1 : 0}, opts);
  if (s.B == 0 || s.S == 0) {  // nothing attends anywhere: all gradients are zero
    return {grad_query_proj.zero_(), at::zeros({s.M, s.S, s.A}, opts), grad_prev.zero_(),
            grad_conv_weight.zero_(), grad_location_weight.zero_(), grad_v.zero_(),
            at::zeros({s.M, s.S, s.Dv}, opts), grad_score_bias.zero_()};
  }
  const MemoryGradient grad_keys_proj(in.query_proj, in.memory_index, s.B, s.M, s.S, s.A);
  const MemoryGradient grad_values(in.query_proj, in.memory_index, s.B, s.M, s.S, s.Dv);
  const BackwardScratch scratch(in.query_proj, s.B, s.S);
  const at::Tensor slopes = sigmoid ? at::empty({s.B * s.S}, acc_opts) : at::Tensor();
  const int64_t tile = location_tile(s.F), tiles = ceil_div(s.S, tile);
  const int64_t splits = std::min(
      tiles, std::max<int64_t>(1, ceil_div(kGradBlocksPerMultiprocessor *
                                                multiprocessor_count(query_proj.device().index()),
                                            s.B)));
  const LocationPartials cols(s.A, s.F, s.C, s.K);
  const at::Tensor partials = at::zeros({s.B * splits, cols.width}, acc_opts);
  const at::Tensor prev_partials = at::zeros({s.B * tiles * s.C * (tile + s.K - 1)}, acc_opts);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query_proj.scalar_type(),
                                  "location_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LocationBackwardParams<scalar_t, acc_t> p{};
    scratch.bind(p, s, grad_context, grad_weights, in.values, in.lengths, in.mask,
                 in.memory_index, lse, grad_values.rows());
    bind_score_inputs(p, in, s, scale, sigmoid);
    p.slopes = sigmoid ? slopes.data_ptr<acc_t>() : nullptr;
    p.grad_keys_proj = grad_keys_proj.rows().data_ptr<scalar_t>();
    p.partials = partials.data_ptr<acc_t>();
    p.prev_partials = prev_partials.data_ptr<acc_t>();
    p.splits = splits;
    const dim3 block(kLocationThreads);
    launch_kernel(location_backward_probs_kernel<scalar_t, acc_t>, block_grid(s.B * tiles),
                  block, 0, stream, p);
    launch_kernel(softmax_grad_rows_kernel<scalar_t, acc_t>, block_grid(s.B), dim3(kWarpSize), 0,
                  stream, static_cast<const SoftmaxBackwardParams<scalar_t, acc_t>&>(p));
    launch_kernel(location_grads_kernel<scalar_t, acc_t>, block_grid(s.B * splits), block, 0,
                  stream, p);
    const acc_t* sums = p.partials;
    const int64_t blocks = s.B * splits;
    launch_sum_partials<scalar_t>(sums, cols.width, cols.query, s.B, splits, s.A,
                                  grad_query_proj, stream);
    launch_sum_partials<scalar_t>(sums, cols.width, cols.v, 1, blocks, s.A, grad_v, stream);
    launch_sum_partials<scalar_t>(sums, cols.width, cols.location_weight, 1, blocks, s.A * s.F,
                                  grad_location_weight, stream);
    launch_sum_partials<scalar_t>(sums, cols.width, cols.conv_weight, 1, blocks,
                                  s.F * s.C * s.K, grad_conv_weight, stream);
    if (score_bias) {
      launch_sum_partials<scalar_t>(sums, cols.width, cols.score_bias, 1, blocks, 1,
                                    grad_score_bias, stream);
    }
    launch_kernel(location_grad_prev_kernel<scalar_t, acc_t>,
                  block_grid(ceil_div(s.B * s.C * s.S, kSumThreads)), dim3(kSumThreads), 0,
                  stream, p, grad_prev.data_ptr<scalar_t>());
  });
  return {grad_query_proj, grad_keys_proj.sum(), grad_prev, grad_conv_weight,
          grad_location_weight, grad_v, grad_values.sum(), grad_score_bias};
}

}  // namespace
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, ATTENTION_EXT_KERNEL_DISPATCH_KEY, m) {
  m.impl("location_attention", &attention_ext::location_attention_cuda);
  m.impl("_location_attention_backward", &attention_ext::location_attention_backward_cuda);
}
