// CUDA implementation of attention_ext::additive_attention and its backward: argument
// checks, contiguous inputs, dtype and vector-width dispatch, launches. The kernels: for few
// query rows per batch element, attention_forward.cuh with AdditiveScorer (scorers.cuh)
// and additive_attention_backward.cuh; from kQueryTileMinRows up,
// additive_attention_tiles.cuh. What this op shares with the dot op is launched by
// launches.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "additive_attention_backward.cuh"
#include "additive_attention_tiles.cuh"
#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "launch_setup.cuh"
#include "launches.cuh"
#include "runtime.cuh"
#include "scorers.cuh"
#include "tile_products.cuh"

namespace attention_ext {
namespace {

// grad_v from its shares in p.grad_v_partials, share_rows rows of A summed in row order
// (additive_grad_v_kernel).
template <typename scalar_t, typename acc_t>
void launch_grad_v(const AdditiveBackwardParams<scalar_t, acc_t>& p, int64_t share_rows,
                   scalar_t* grad_v, cudaStream_t stream) {
  launch_kernel(additive_grad_v_kernel<scalar_t, acc_t>,
                dim3(static_cast<unsigned>(ceil_div(p.A, kGradVThreads))), dim3(kGradVThreads),
                0, stream, static_cast<const acc_t*>(p.grad_v_partials), share_rows, p.A, grad_v);
}

// The rows path (additive_attention_backward.cuh: the query side writes a share of grad_v
// per query row), or from kQueryTileMinRows query rows up the query-tile path: the pair
// products, ds and grad_values, then both sides' tanh gradients with a share of grad_v per
// batch element (tanh_grads_kernel); then grad_v from the shares.
template <typename scalar_t, typename acc_t, int VEC>
void launch_backward(const AdditiveBackwardParams<scalar_t, acc_t>& p, scalar_t* grad_v,
                     const at::Tensor& like, cudaStream_t stream) {
  if (!uses_query_tiles(p.Tq)) {
    launch_backward_rows<AdditiveScorer<scalar_t, acc_t, VEC>>(
        p, p.A / VEC, additive_attention_backward_query_kernel<scalar_t, acc_t, VEC>,
        additive_attention_backward_keys_kernel<scalar_t, acc_t, VEC>, stream);
    launch_grad_v(p, p.B * p.Tq, grad_v, stream);
    return;
  }
  launch_backward_tiles<AdditivePairs, VEC>(p, true, stream);
  // The query side's running sums over key tiles: grad_query_proj itself when it has the
  // accumulation dtype.
  at::Tensor scratch;
  acc_t* query_sums = nullptr;
  if (p.S > kTile) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      query_sums = p.grad_query_proj;
    } else {
      scratch = at::empty({p.B * p.Tq * p.A}, like.options().dtype(acc_dtype(like.scalar_type())));
      query_sums = scratch.data_ptr<acc_t>();
    }
  }
  launch_kernel(tanh_grads_kernel<scalar_t, acc_t, VEC>,
                block_grid(p.B * ceil_div(p.A, kTile)), dim3(kTileThreads), 0, stream, p,
                query_sums);
  launch_grad_v(p, p.B, grad_v, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_cuda(
    const at::Tensor& query_proj_in, const at::Tensor& keys_proj_in, const at::Tensor& v_in,
    const at::Tensor& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, bool need_weights,
    const std::optional<at::Tensor>& memory_index_in) {
  const AdditiveShapes s = check_additive_inputs(query_proj_in, keys_proj_in, v_in, values_in,
                                                 lengths_in, mask_in, memory_index_in);
  const DeviceGuard guard(query_proj_in.device());
  const AdditiveInputs in = contiguous_additive_inputs(query_proj_in, keys_proj_in, v_in,
                                                       values_in, lengths_in, mask_in,
                                                       memory_index_in,
                                                       DeviceLengths::kKernelsCheck);

  const ForwardBuffers buffers(in.query_proj, s, s.S, s.Dv, need_weights);
  if (buffers.done()) return buffers.outputs();
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query_proj.scalar_type(),
                                  "additive_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AdditiveForwardParams<scalar_t, acc_t> p{};
    buffers.bind(p, in.values, in.lengths, in.mask, in.memory_index);
    p.query_proj = in.query_proj.data_ptr<scalar_t>();
    p.keys_proj = in.keys_proj.data_ptr<scalar_t>();
    p.v = in.v.data_ptr<scalar_t>();
    p.A = s.A;
    launch_forward<AdditiveScorer, AdditivePairs>(
        p, s.A, {in.query_proj, in.keys_proj, in.v, in.values, buffers.context()},
        in.query_proj, stream);
  });
  return buffers.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cuda(
    const at::Tensor& grad_context_in, const std::optional<at::Tensor>& grad_weights_in,
    const at::Tensor& query_proj_in, const at::Tensor& keys_proj_in, const at::Tensor& v_in,
    const at::Tensor& values_in, const std::optional<at::Tensor>& lengths_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& memory_index_in) {
  const AdditiveShapes s = check_additive_inputs(query_proj_in, keys_proj_in, v_in, values_in,
                                                 lengths_in, mask_in, memory_index_in);
  check_additive_backward_extras(grad_context_in, grad_weights_in, lse_in, query_proj_in, s);
  const DeviceGuard guard(query_proj_in.device());
  const AdditiveInputs in = contiguous_additive_inputs(query_proj_in, keys_proj_in, v_in,
                                                       values_in, lengths_in, mask_in,
                                                       memory_index_in,
                                                       DeviceLengths::kKernelsCheck);
  const at::Tensor grad_context = grad_context_in.contiguous();
  const auto grad_weights = contiguous_opt(grad_weights_in);
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = in.query_proj.options();
  at::Tensor grad_query_proj = at::empty(s.row_sizes(s.A), opts);
  at::Tensor grad_v = at::empty({s.A}, opts);
  const int64_t rows = s.B * s.Tq;
  if (rows == 0 || s.S == 0) {  // nothing attends anywhere: all gradients are zero
    return {grad_query_proj.zero_(), at::zeros({s.M, s.S, s.A}, opts), grad_v.zero_(),
            at::zeros({s.M, s.S, s.Dv}, opts)};
  }
  const MemoryGradient grad_keys_proj(in.query_proj, in.memory_index, s.B, s.M, s.S, s.A);
  const MemoryGradient grad_values(in.query_proj, in.memory_index, s.B, s.M, s.S, s.Dv);
  const BackwardScratch scratch(in.query_proj, rows, s.S);
  // grad_v's shares: one row per query row, or per batch element on the query-tile path.
  const int64_t share_rows = uses_query_tiles(s.Tq) ? s.B : rows;
  const at::Tensor grad_v_partials =
      at::empty({share_rows, s.A}, opts.dtype(acc_dtype(in.query_proj.scalar_type())));
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.query_proj.scalar_type(),
                                  "additive_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AdditiveBackwardParams<scalar_t, acc_t> p{};
    scratch.bind(p, s, grad_context, grad_weights, in.values, in.lengths, in.mask,
                 in.memory_index, lse, grad_values.rows());
    p.query_proj = in.query_proj.data_ptr<scalar_t>();
    p.keys_proj = in.keys_proj.data_ptr<scalar_t>();
    p.v = in.v.data_ptr<scalar_t>();
    p.grad_query_proj = grad_query_proj.data_ptr<scalar_t>();
    p.grad_keys_proj = grad_keys_proj.rows().data_ptr<scalar_t>();
    p.grad_v_partials = grad_v_partials.data_ptr<acc_t>();
    p.A = s.A;
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    constexpr int kVec = vec_width<scalar_t>();
    if (can_vectorize(kVec, s.A, s.Dv,
                      {in.query_proj, in.keys_proj, in.v, in.values, grad_context,
                       grad_query_proj, grad_keys_proj.rows(), grad_values.rows()})) {
      launch_backward<scalar_t, acc_t, kVec>(p, gv, in.query_proj, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(p, gv, in.query_proj, stream);
    }
  });
  return {grad_query_proj, grad_keys_proj.sum(), grad_v, grad_values.sum()};
}

}  // namespace
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, ATTENTION_EXT_KERNEL_DISPATCH_KEY, m) {
  m.impl("additive_attention", &attention_ext::additive_attention_cuda);
  m.impl("_additive_attention_backward", &attention_ext::additive_attention_backward_cuda);
}
