// The extension module: build information for Python (pybind11) and every operator
// schema (TORCH_LIBRARY). Kernels register themselves per device in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "attention_ext/test_hooks.h"
#include "attention_ext/forward_plan.h"

#ifndef ATTENTION_EXT_CPU_CAPABILITY_NAME
#define ATTENTION_EXT_CPU_CAPABILITY_NAME "DEFAULT"
#endif

#ifndef ATTENTION_EXT_VERSION
#error "setup.py defines ATTENTION_EXT_VERSION from pyproject.toml's version"
#endif

// Shapes (docs/design.md, section 1): a (B, D) query (query_proj (B, A)) is one decoder step and
// every per-row tensor, lse and the gradients of the outputs included, then drops the Tq
// dimension, so decoding loops call the ops without reshaping.
// values = None means the keys are also the values (Luong: both are the encoder states);
// the backward then returns one combined gradient in grad_keys and an empty grad_values,
// which saves writing, and autograd adding, a second (B, S, D) gradient.
// memory_index (B,) maps each query row to a row of keys, values, lengths and mask (M rows):
// beams read their sentence's memory in place; the memory-side gradients are (M, ...).
TORCH_LIBRARY(attention_ext, m) {
  m.def(
      "dot_attention(Tensor query, Tensor keys, Tensor? values, Tensor? lengths, Tensor? mask, "
      "float scale, bool need_weights, Tensor? memory_index=None) "
      "-> (Tensor context, Tensor weights, Tensor lse)");
  m.def(
      "_dot_attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query, "
      "Tensor keys, Tensor? values, Tensor? lengths, Tensor? mask, float scale, Tensor lse, "
      "Tensor? memory_index=None) "
      "-> (Tensor grad_query, Tensor grad_keys, Tensor grad_values)");
  m.def(
      "additive_attention(Tensor query_proj, Tensor keys_proj, Tensor v, Tensor values, "
      "Tensor? lengths, Tensor? mask, bool need_weights, Tensor? memory_index=None) "
      "-> (Tensor context, Tensor weights, Tensor lse)");
  m.def(
      "_additive_attention_backward(Tensor grad_context, Tensor? grad_weights, "
      "Tensor query_proj, Tensor keys_proj, Tensor v, Tensor values, Tensor? lengths, "
      "Tensor? mask, Tensor lse, Tensor? memory_index=None) "
      "-> (Tensor grad_query_proj, Tensor grad_keys_proj, Tensor grad_v, Tensor grad_values)");
  // Location-sensitive attention is one decoder step a call (the location term needs the
  // previous step's weights): query_proj (B, A), prev (B, C, S), conv_weight (F, C, K),
  // location_weight (A, F), window (B, 2) [start, end) per query row, score_bias (1,).
  // sigmoid: alpha_j = sigmoid(e_j) / sum_k sigmoid(e_k) instead of softmax; lse then holds
  // log sum_k sigmoid(e_k). grad_score_bias is (1,), or empty without score_bias.
  m.def(
      "location_attention(Tensor query_proj, Tensor keys_proj, Tensor prev, "
      "Tensor conv_weight, Tensor location_weight, Tensor v, Tensor values, Tensor? lengths, "
      "Tensor? mask, Tensor? window, Tensor? score_bias, float scale, bool sigmoid, "
      "bool need_weights, Tensor? memory_index=None) "
      "-> (Tensor context, Tensor weights, Tensor lse)");
  m.def(
      "_location_attention_backward(Tensor grad_context, Tensor? grad_weights, "
      "Tensor query_proj, Tensor keys_proj, Tensor prev, Tensor conv_weight, "
      "Tensor location_weight, Tensor v, Tensor values, Tensor? lengths, Tensor? mask, "
      "Tensor? window, Tensor? score_bias, float scale, bool sigmoid, Tensor lse, "
      "Tensor? memory_index=None) "
      "-> (Tensor grad_query_proj, Tensor grad_keys_proj, Tensor grad_prev, "
      "Tensor grad_conv_weight, Tensor grad_location_weight, Tensor grad_v, "
      "Tensor grad_values, Tensor grad_score_bias)");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "attention_ext build information (the operators live in torch.ops.attention_ext)";
  mod.attr("__version__") = ATTENTION_EXT_VERSION;
#ifdef ATTENTION_EXT_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
#ifdef ATTENTION_EXT_WITH_EMULATED_CUDA
  mod.attr("emulated_cuda") = true;  // the ops' CPU kernels are the CUDA code, emulated
#else
  mod.attr("emulated_cuda") = false;
#endif
  mod.attr("cpu_capability") = ATTENTION_EXT_CPU_CAPABILITY_NAME;
  // The test hook (test_hooks.h): nothing a user calls.
  auto testing = mod.def_submodule("_testing", "Test hook: not part of the API");
  testing.def(
      "set_forced_splits",
      [](int64_t n) {
        TORCH_CHECK_VALUE(n >= 0, "splits must be >= 0 (0 = automatic), got ", n);
        attention_ext::forced_splits_storage().store(n);
      },
      "Force the number of split-S chunks of every later call (0 = automatic).");
  testing.def("forced_splits", &attention_ext::forced_splits);
  testing.def(
      "forward_plan",
      [](int64_t rows, int64_t S, int64_t d_chunks, int64_t v_chunks, bool values_are_keys,
         int64_t sm_count) {
        const auto plan = attention_ext::plan_forward(rows, S, d_chunks, v_chunks,
                                                      values_are_keys, sm_count, /*forced=*/0);
        pybind11::dict d;
        d["splits"] = plan.splits;
        d["split_len"] = plan.split_len;
        d["slices"] = plan.slices;
        d["slice_chunks"] = plan.slice_chunks;
        d["warps"] = plan.warps;
        d["key_lanes"] = plan.key_lanes;
        d["round_keys"] = plan.round_keys;
        d["stage_buffers"] = plan.stage_buffers;
        d["stage_values"] = plan.stage_values;
        d["weight_parts"] = plan.weight_parts;
        d["blocks"] = plan.blocks(rows);
        return d;
      },
      "The CUDA forward's launch plan (attention_ext/forward_plan.h) for rows x S keys, row "
      "lengths in 16-byte chunks (values_are_keys: the values are the key rows), on a GPU of "
      "sm_count SMs.");
#ifndef ATTENTION_EXT_WITH_EMULATED_CUDA
  testing.def("tanh_float32", &attention_ext::cpu::tanh_float32,
              "The CPU kernels' float32 tanh, elementwise.");
#endif
}
