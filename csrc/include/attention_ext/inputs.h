// The dot op's inputs as both devices' kernels read them: contiguous (no copy when they
// already are), lengths as int64 (int32 is accepted at the boundary), values aliasing the
// keys when none were given. Call after the checks in checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace attention_ext {

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
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
  if (lengths) in.lengths = lengths->to(at::kLong).contiguous();
  in.mask = contiguous_opt(mask);
  return in;
}

}  // namespace attention_ext
