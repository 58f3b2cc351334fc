// The argument checks declared in attention_ext/checks.h (see there for why they live in a
// .cpp file).
#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace attention_ext {

// query (B, Tq, feat) or (B, feat): the rows; `feat` names the feature size in messages.
static QueryRows query_rows(const at::Tensor& query, const char* name, const char* feat) {
  TORCH_CHECK_VALUE(query.dim() == 2 || query.dim() == 3, name, " must have shape (B, ",
                    feat, ") for one decoder step or (B, Tq, ", feat, "), got ",
                    query.sizes());
  const bool single = query.dim() == 2;
  return QueryRows{query.size(0), single ? 1 : query.size(1), single};
}

static void check_same_device_dtype(const at::Tensor& ref, const char* ref_name,
                                    const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

static void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_lengths_range(const at::Tensor& lengths, int64_t S) {
  TORCH_INTERNAL_ASSERT(lengths.device().is_cpu());
  const at::Tensor c = lengths.contiguous();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "check_lengths_range", [&] {
    const index_t* p = c.data_ptr<index_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      lo = std::min<int64_t>(lo, p[i]);
      hi = std::max<int64_t>(hi, p[i]);
    }
  });
  TORCH_CHECK_VALUE(lo >= 0 && hi <= S, "lengths must lie in [0, S] = [0, ", S,
                    "], got values in [", lo, ", ", hi, "]");
}

void check_memory_index_range(const at::Tensor& memory_index, int64_t M) {
  TORCH_INTERNAL_ASSERT(memory_index.device().is_cpu());
  const at::Tensor c = memory_index.contiguous();
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "check_memory_index_range", [&] {
    const index_t* p = c.data_ptr<index_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < M, "memory_index must lie in [0, M) = [0, ", M,
                        ") (M = keys.size(0), the memory rows), got memory_index[", i,
                        "] = ", p[i]);
    }
  });
}

// memory_index: integer (B,) on ref's device, query row b attends memory row
// memory_index[b]. Its values are checked where they are read (inputs.h: kernel_memory_index).
static void check_memory_index_arg(const std::optional<at::Tensor>& memory_index,
                                   const at::Tensor& ref, const char* ref_name, int64_t B) {
  if (!memory_index.has_value()) return;
  const auto& mi = *memory_index;
  TORCH_CHECK(mi.device() == ref.device(), "memory_index must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", mi.device());
  TORCH_CHECK_VALUE(mi.scalar_type() == at::kLong || mi.scalar_type() == at::kInt,
                    "memory_index must be an int64 or int32 tensor of shape (B,) = (", B,
                    ",), got dtype ", mi.scalar_type());
  TORCH_CHECK_VALUE(mi.dim() == 1 && mi.size(0) == B, "memory_index must have shape (B,) = (",
                    B, ",), one memory row per query row of ", ref_name, ", got ", mi.sizes());
}

// lengths: integer (M,), 0 <= lengths[m] <= S, on the CPU or on ref's device. mask: bool
// (M, S), True = attend, on ref's device (M: the memory rows). The values of lengths are
// checked where they are read (inputs.h: kernel_lengths), so that no call waits for a GPU.
static void check_mask_args(const std::optional<at::Tensor>& lengths,
                            const std::optional<at::Tensor>& mask, const at::Tensor& ref,
                            const char* ref_name, int64_t M, int64_t S) {
  TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()),
                    "pass either lengths or mask, not both");
  if (lengths.has_value()) {
    const auto& l = *lengths;
    TORCH_CHECK(l.device() == ref.device() || l.device().is_cpu(),
                "lengths must be on the CPU or on the same device as ", ref_name, " (",
                ref.device(), "), got ", l.device());
    TORCH_CHECK_VALUE(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
                      "lengths must be an int64 or int32 tensor of shape (B,) = (", M,
                      ",), got dtype ", l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == M, "lengths must have shape (B,) = (", M,
                      ",), got ", l.sizes());
  }
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.device() == ref.device(), "mask must be on the same device as ", ref_name,
                " (", ref.device(), "), got ", m.device());
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool,
                      "mask must be a bool tensor (True = attend), got dtype ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == M && m.size(1) == S,
                      "mask must have shape (B, S) = (", M, ", ", S, "), got ", m.sizes());
  }
}

// What both ops check alike: query (B, Tq, W) or (B, W), keys (M, S, W) and values
// (M, S, Dv), of one floating dtype on one device, and memory_index (B,) or M = B; `width`
// names W (D or A) in messages.
struct OperandShapes {
  QueryRows rows;
  int64_t S, W, Dv, M;
};

static OperandShapes check_operands(const at::Tensor& query, const char* query_name,
                                    const at::Tensor& keys, const char* keys_name,
                                    const at::Tensor& values, const char* width,
                                    const std::optional<at::Tensor>& memory_index) {
  const QueryRows rows = query_rows(query, query_name, width);
  TORCH_CHECK_VALUE(keys.dim() == 3, keys_name, " must have shape (B, S, ", width, "), got ",
                    keys.sizes());
  TORCH_CHECK_VALUE(values.dim() == 3, "values must have shape (B, S, Dv), got ",
                    values.sizes());
  check_float_dtype(query, query_name);
  check_same_device_dtype(query, query_name, keys, keys_name);
  check_same_device_dtype(query, query_name, values, "values");
  const int64_t B = rows.B, W = query.size(-1);
  const int64_t S = keys.size(1), Dv = values.size(2), M = keys.size(0);
  check_memory_index_arg(memory_index, query, query_name, B);
  TORCH_CHECK_VALUE(!memory_index.has_value() || M > 0 || B == 0,
                    "memory_index must lie in [0, M), but ", keys_name,
                    " has no memory rows (M = 0) for the ", B, " query rows of ", query_name);
  TORCH_CHECK_VALUE(memory_index.has_value() || M == B, keys_name,
                    " must have batch size B = ", B, " like ", query_name,
                    " (or pass memory_index to map query rows to memory rows), got shape ",
                    keys.sizes());
  TORCH_CHECK_VALUE(values.size(0) == M, "values must have batch size ", M, " like ",
                    keys_name, ", got shape ", values.sizes());
  TORCH_CHECK_VALUE(keys.size(2) == W, keys_name, " must have feature size ", width, " = ", W,
                    " like ", query_name, ", got shape ", keys.sizes());
  TORCH_CHECK_VALUE(values.size(1) == S, "values must have source length S = ", S, " like ",
                    keys_name, ", got shape ", values.sizes());
  return OperandShapes{rows, S, W, Dv, M};
}

DotShapes check_dot_inputs(const at::Tensor& query, const at::Tensor& keys,
                           const std::optional<at::Tensor>& values_opt,
                           const std::optional<at::Tensor>& lengths,
                           const std::optional<at::Tensor>& mask, double scale,
                           const std::optional<at::Tensor>& memory_index) {
  const OperandShapes o = check_operands(query, "query", keys, "keys", values_opt.value_or(keys),
                                         "D", memory_index);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  check_mask_args(lengths, mask, query, "query", o.M, o.S);
  return DotShapes{o.rows, o.S, o.W, o.Dv, o.M};
}

AdditiveShapes check_additive_inputs(const at::Tensor& query_proj,
                                     const at::Tensor& keys_proj, const at::Tensor& v,
                                     const at::Tensor& values,
                                     const std::optional<at::Tensor>& lengths,
                                     const std::optional<at::Tensor>& mask,
                                     const std::optional<at::Tensor>& memory_index) {
  const OperandShapes o = check_operands(query_proj, "query_proj", keys_proj, "keys_proj",
                                         values, "A", memory_index);
  check_same_device_dtype(query_proj, "query_proj", v, "v");
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == o.W, "v must have shape (A,) = (", o.W,
                    ",) like query_proj's last dimension, got ", v.sizes());
  check_mask_args(lengths, mask, query_proj, "query_proj", o.M, o.S);
  return AdditiveShapes{o.rows, o.S, o.W, o.Dv, o.M};
}

void check_window_range(const at::Tensor& window, int64_t S) {
  TORCH_INTERNAL_ASSERT(window.device().is_cpu());
  const at::Tensor c = window.contiguous();
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "check_window_range", [&] {
    const index_t* p = c.data_ptr<index_t>();
    for (int64_t i = 0; i < c.size(0); ++i) {
      const int64_t start = p[2 * i], end = p[2 * i + 1];
      TORCH_CHECK_VALUE(0 <= start && start <= end && end <= S,
                        "window must hold rows [start, end) with 0 <= start <= end <= S = ", S,
                        ", got window[", i, "] = [", start, ", ", end, ")");
    }
  });
}

LocationShapes check_location_inputs(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale,
    const std::optional<at::Tensor>& memory_index) {
  TORCH_CHECK_VALUE(query_proj.dim() == 2,
                    "query_proj must have shape (B, A): location-sensitive attention takes one "
                    "decoder step a call (the previous weights feed the next), got ",
                    query_proj.sizes());
  const OperandShapes o = check_operands(query_proj, "query_proj", keys_proj, "keys_proj",
                                         values, "A", memory_index);
  const int64_t B = o.rows.B, A = o.W, S = o.S;
  check_same_device_dtype(query_proj, "query_proj", prev, "prev");
  check_same_device_dtype(query_proj, "query_proj", conv_weight, "conv_weight");
  check_same_device_dtype(query_proj, "query_proj", location_weight, "location_weight");
  check_same_device_dtype(query_proj, "query_proj", v, "v");
  TORCH_CHECK_VALUE(prev.dim() == 3 && prev.size(0) == B && prev.size(2) == S,
                    "prev must have shape (B, C, S) = (", B, ", C, ", S,
                    "), the previous weights of every query row, got ", prev.sizes());
  const int64_t C = prev.size(1);
  TORCH_CHECK_VALUE(conv_weight.dim() == 3 && conv_weight.size(1) == C,
                    "conv_weight must have shape (F, C, K) with C = ", C,
                    " like prev's channels, got ", conv_weight.sizes());
  const int64_t F = conv_weight.size(0), K = conv_weight.size(2);
  TORCH_CHECK_VALUE(K % 2 == 1,
                    "conv_weight must have an odd number of taps K (the convolution is "
                    "centred, padding (K - 1) / 2), got K = ", K);
  TORCH_CHECK_VALUE(location_weight.dim() == 2 && location_weight.size(0) == A &&
                        location_weight.size(1) == F,
                    "location_weight must have shape (A, F) = (", A, ", ", F,
                    ") (A like query_proj, F like conv_weight's filters), got ",
                    location_weight.sizes());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == A, "v must have shape (A,) = (", A,
                    ",) like query_proj's last dimension, got ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  if (score_bias.has_value()) {
    check_same_device_dtype(query_proj, "query_proj", *score_bias, "score_bias");
    TORCH_CHECK_VALUE(score_bias->dim() == 1 && score_bias->size(0) == 1,
                      "score_bias must have shape (1,), got ", score_bias->sizes());
  }
  if (window.has_value()) {
    const auto& w = *window;
    TORCH_CHECK(w.device() == query_proj.device(), "window must be on the same device as ",
                "query_proj (", query_proj.device(), "), got ", w.device());
    TORCH_CHECK_VALUE(w.scalar_type() == at::kLong || w.scalar_type() == at::kInt,
                      "window must be an int64 or int32 tensor of shape (B, 2) = (", B,
                      ", 2), got dtype ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == B && w.size(1) == 2,
                      "window must have shape (B, 2) = (", B,
                      ", 2), [start, end) per query row, got ", w.sizes());
  }
  check_mask_args(lengths, mask, query_proj, "query_proj", o.M, S);
  LocationShapes s;
  static_cast<QueryRows&>(s) = o.rows;
  s.S = S;
  s.A = A;
  s.Dv = o.Dv;
  s.M = o.M;
  s.C = C;
  s.F = F;
  s.K = K;
  return s;
}

// Extra arguments of every backward op: the incoming gradients and the forward's
// log-sum-exp, shaped by the query's rows. `ref` is the query (dot) or query_proj (additive).
static void check_backward_extras(const at::Tensor& grad_context,
                                  const std::optional<at::Tensor>& grad_weights,
                                  const at::Tensor& lse, const at::Tensor& ref,
                                  const char* ref_name, const QueryRows& rows, int64_t S,
                                  int64_t Dv) {
  check_same_device_dtype(ref, ref_name, grad_context, "grad_context");
  const at::DimVector context_sizes = rows.row_sizes(Dv);
  TORCH_CHECK_VALUE(grad_context.sizes() == at::IntArrayRef(context_sizes),
                    "grad_context must have shape ", rows.row_shape_name("Dv"), " = ",
                    at::IntArrayRef(context_sizes), ", got ", grad_context.sizes());
  if (grad_weights.has_value()) {
    check_same_device_dtype(ref, ref_name, *grad_weights, "grad_weights");
    const at::DimVector weights_sizes = rows.row_sizes(S);
    TORCH_CHECK_VALUE(grad_weights->sizes() == at::IntArrayRef(weights_sizes),
                      "grad_weights must have shape ", rows.row_shape_name("S"), " = ",
                      at::IntArrayRef(weights_sizes), ", got ", grad_weights->sizes());
  }
  const auto lse_dtype = acc_dtype(ref.scalar_type());
  TORCH_CHECK(lse.device() == ref.device() && lse.scalar_type() == lse_dtype,
              "lse must be a ", lse_dtype, " tensor on ", ref.device(), ", got ",
              lse.scalar_type(), " on ", lse.device());
  const at::DimVector lse_sizes = rows.row_sizes();
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_sizes), "lse must have shape ",
                    rows.row_shape_name(), " = ", at::IntArrayRef(lse_sizes), ", got ",
                    lse.sizes());
}

void check_dot_backward_extras(const at::Tensor& grad_context,
                               const std::optional<at::Tensor>& grad_weights,
                               const at::Tensor& lse, const at::Tensor& query,
                               const DotShapes& s) {
  check_backward_extras(grad_context, grad_weights, lse, query, "query", s, s.S, s.Dv);
}

void check_additive_backward_extras(const at::Tensor& grad_context,
                                    const std::optional<at::Tensor>& grad_weights,
                                    const at::Tensor& lse, const at::Tensor& query_proj,
                                    const AdditiveShapes& s) {
  check_backward_extras(grad_context, grad_weights, lse, query_proj, "query_proj", s, s.S,
                        s.Dv);
}

void check_location_backward_extras(const at::Tensor& grad_context,
                                    const std::optional<at::Tensor>& grad_weights,
                                    const at::Tensor& lse, const at::Tensor& query_proj,
                                    const LocationShapes& s) {
  check_backward_extras(grad_context, grad_weights, lse, query_proj, "query_proj", s, s.S,
                        s.Dv);
}

}  // namespace attention_ext
