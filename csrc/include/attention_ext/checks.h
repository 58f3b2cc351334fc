// Argument checks shared by the CPU and CUDA kernels. Every message names the argument
// and what was expected; shape and value errors raise ValueError, dtype/device errors
// RuntimeError. Python (functional.py) only normalises ranks; everything else is here,
// defined once in csrc/checks.cpp for every build.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace attention_ext {

// The B x Tq query rows of a call. A (B, D) query is one decoder step: Tq = 1 and
// `single`, and every per-row tensor (outputs, their gradients, lse) drops the Tq
// dimension, so a decode loop needs no reshaping around the op.
struct QueryRows {
  int64_t B, Tq;
  bool single;

  at::DimVector row_sizes() const {
    return single ? at::DimVector{B} : at::DimVector{B, Tq};
  }
  at::DimVector row_sizes(int64_t last) const {
    at::DimVector sizes = row_sizes();
    sizes.push_back(last);
    return sizes;
  }
  // Names of those shapes for messages: "(B, Tq, X)" / "(B, X)", or "(B, Tq)" / "(B,)".
  std::string row_shape_name(const char* last = nullptr) const {
    if (last == nullptr) return single ? "(B,)" : "(B, Tq)";
    return std::string(single ? "(B, " : "(B, Tq, ") + last + ")";
  }
};

// M: the memory rows, keys.size(0); B, unless memory_index maps the B query rows onto them.
struct DotShapes : QueryRows {
  int64_t S, D, Dv, M;
};

// lengths read on the host (a CPU tensor): every value in [0, S]. A plain loop: an ATen
// reduction costs more than a decode step's kernel.
void check_lengths_range(const at::Tensor& lengths, int64_t S);

// memory_index read on the host (a CPU tensor): every value in [0, M).
void check_memory_index_range(const at::Tensor& memory_index, int64_t M);

// query (B, Tq, D) or (B, D), keys (M, S, D), values (M, S, Dv) or None (= keys); lengths
// (M,) and mask (M, S) per memory row; memory_index integer (B,) on the query's device, or
// None and M = B.
DotShapes check_dot_inputs(const at::Tensor& query, const at::Tensor& keys,
                           const std::optional<at::Tensor>& values_opt,
                           const std::optional<at::Tensor>& lengths,
                           const std::optional<at::Tensor>& mask, double scale,
                           const std::optional<at::Tensor>& memory_index);

struct AdditiveShapes : QueryRows {
  int64_t S, A, Dv, M;
};

// query_proj (B, Tq, A) or (B, A), keys_proj (M, S, A), v (A,), values (M, S, Dv).
AdditiveShapes check_additive_inputs(const at::Tensor& query_proj,
                                     const at::Tensor& keys_proj, const at::Tensor& v,
                                     const at::Tensor& values,
                                     const std::optional<at::Tensor>& lengths,
                                     const std::optional<at::Tensor>& mask,
                                     const std::optional<at::Tensor>& memory_index);

// Location-sensitive attention, one decoder step: C channels of previous weights, F filters
// of K taps (K odd), A units.
struct LocationShapes : QueryRows {
  int64_t S, A, Dv, M, C, F, K;
};

// window read on the host (a CPU tensor): 0 <= start <= end <= S in every row.
void check_window_range(const at::Tensor& window, int64_t S);

// query_proj (B, A), keys_proj (M, S, A), prev (B, C, S), conv_weight (F, C, K) with K odd,
// location_weight (A, F), v (A,), values (M, S, Dv), window integer (B, 2) on query_proj's
// device, score_bias (1,); lengths, mask and memory_index as for the other ops.
LocationShapes check_location_inputs(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale,
    const std::optional<at::Tensor>& memory_index);

void check_dot_backward_extras(const at::Tensor& grad_context,
                               const std::optional<at::Tensor>& grad_weights,
                               const at::Tensor& lse, const at::Tensor& query,
                               const DotShapes& s);

void check_additive_backward_extras(const at::Tensor& grad_context,
                                    const std::optional<at::Tensor>& grad_weights,
                                    const at::Tensor& lse, const at::Tensor& query_proj,
                                    const AdditiveShapes& s);

void check_location_backward_extras(const at::Tensor& grad_context,
                                    const std::optional<at::Tensor>& grad_weights,
                                    const at::Tensor& lse, const at::Tensor& query_proj,
                                    const LocationShapes& s);

}  // namespace attention_ext
