// Test build only (ATTENTION_EXT_EMULATE_CUDA=1, see setup.py): the CUDA additive attention
// source compiled as C++ against the CPU emulation of the CUDA execution model
// (csrc/cuda/emulation.h), registered as CPU ops of its own so tests can run the very
// kernels the GPU runs and compare them with reference.py. Never part of a normal build.
#define ATTENTION_EXT_CUDA_EMULATION 1

// Torch's headers first, so they are parsed without the emulation's CUDA keywords.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include "../cuda/emulation.h"
#include "../cuda/additive_attention_kernel.cu"

// Same schemas as additive_attention / _additive_attention_backward (csrc/attention_ext.cpp),
// no autograd or fake kernels: the tests call forward and backward directly.
TORCH_LIBRARY_FRAGMENT(attention_ext, m) {
  m.def(
      "_emulated_additive_attention(Tensor query_proj, Tensor keys_proj, Tensor v, "
      "Tensor values, Tensor? lengths, Tensor? mask, bool need_weights) "
      "-> (Tensor context, Tensor weights, Tensor lse)");
  m.def(
      "_emulated_additive_attention_backward(Tensor grad_context, Tensor? grad_weights, "
      "Tensor query_proj, Tensor keys_proj, Tensor v, Tensor values, Tensor? lengths, "
      "Tensor? mask, Tensor lse) "
      "-> (Tensor grad_query_proj, Tensor grad_keys_proj, Tensor grad_v, Tensor grad_values)");
}

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("_emulated_additive_attention", &attention_ext::additive_attention_cuda);
  m.impl("_emulated_additive_attention_backward",
         &attention_ext::additive_attention_backward_cuda);
}
