// The ops' inputs as both devices' kernels read them: contiguous (no copy when they
// already are), lengths as int64 (int32 is accepted at the boundary), values aliasing the
// keys when none were given. Call after the checks in checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace attention_ext {

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// lengths as contiguous int64 (int32 is accepted at the boundary).
inline std::optional<at::Tensor> int64_lengths(const std::optional<at::Tensor>& lengths) {
  return lengths ? std::optional<at::Tensor>(lengths->to(at::kLong).contiguous()) : std::nullopt;
}

struct DotInputs {
  at::Tensor query, keys, values;
  std::optional<at::Tensor> lengths, mask;
  bool values_are_keys;  // no values given, or the same tensor as the keys
};

inline DotInputs contiguous_dot_inputs(const at::Tensor& query, const at::Tensor& keys,
                                       const std::optional<at::Tensor>& values,
                                       const std::optional<at::Tensor>& lengths,
                                       const std::optional<at::Tensor>& mask) {
  DotInputs in;
  in.values_are_keys = !values.has_value() || values->is_same(keys);
  in.query = query.contiguous();
  in.keys = keys.contiguous();
  in.values = in.values_are_keys ? in.keys : values->contiguous();
  in.lengths = int64_lengths(lengths);
  in.mask = contiguous_opt(mask);
  return in;
}

struct AdditiveInputs {
  at::Tensor query_proj, keys_proj, v, values;
  std::optional<at::Tensor> lengths, mask;
};

inline AdditiveInputs contiguous_additive_inputs(const at::Tensor& query_proj,
                                                 const at::Tensor& keys_proj, const at::Tensor& v,
                                                 const at::Tensor& values,
                                                 const std::optional<at::Tensor>& lengths,
                                                 const std::optional<at::Tensor>& mask) {
  AdditiveInputs in;
  in.query_proj = query_proj.contiguous();
  in.keys_proj = keys_proj.contiguous();
  in.v = v.contiguous();
  in.values = values.contiguous();
  in.lengths = int64_lengths(lengths);
  in.mask = contiguous_opt(mask);
  return in;
}

}  // namespace attention_ext
