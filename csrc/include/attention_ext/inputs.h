// The ops' inputs as both devices' kernels read them: contiguous (no copy when they
// already are), lengths as int64 on the kernels' device with their values checked, values
// aliasing the keys when none were given. Call after the checks in checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "attention_ext/checks.h"
#include "attention_ext/key_positions.h"

namespace attention_ext {

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Who checks the values of lengths that are already on the kernels' device: the CPU
// kernels' host code, which reads them anyway, or the CUDA kernels as they read them
// (KeyPositions::end), so that no call waits for the GPU. Lengths on the CPU beside inputs on
// another device are checked on the host before they are copied.
enum class DeviceLengths { kHostChecks, kKernelsCheck };

// lengths as the kernels on `device` read them: contiguous int64 (int32 is accepted at the
// boundary), values in [0, S] checked as DeviceLengths says.
inline std::optional<at::Tensor> kernel_lengths(const std::optional<at::Tensor>& lengths,
                                                c10::Device device, int64_t S,
                                                DeviceLengths who) {
  if (!lengths) return std::nullopt;
  if (lengths->device() == device) {
    if (who == DeviceLengths::kHostChecks) check_lengths_range(*lengths, S);
    return lengths->to(at::kLong).contiguous();
  }
  // On the CPU beside inputs on a GPU: a private copy is checked and sent, so the copy
  // to the device (asynchronous from pinned memory) never reads values the caller changes
  // after the call.
  const at::Tensor host =
      lengths->to(at::kLong, /*non_blocking=*/false, /*copy=*/true).contiguous();
  check_lengths_range(host, S);
  return host.to(device, /*non_blocking=*/true);
}

// The kernels' view of lengths and mask as returned by the functions below.
inline KeyPositions key_positions(const std::optional<at::Tensor>& lengths,
                                  const std::optional<at::Tensor>& mask, int64_t S) {
  return KeyPositions{lengths ? lengths->data_ptr<int64_t>() : nullptr,
                      mask ? mask->data_ptr<bool>() : nullptr, S};
}

struct DotInputs {
  at::Tensor query, keys, values;
  std::optional<at::Tensor> lengths, mask;
  bool values_are_keys;  // no values given, or the same tensor as the keys
};

inline DotInputs contiguous_dot_inputs(const at::Tensor& query, const at::Tensor& keys,
                                       const std::optional<at::Tensor>& values,
                                       const std::optional<at::Tensor>& lengths,
                                       const std::optional<at::Tensor>& mask,
                                       DeviceLengths who) {
  DotInputs in;
  in.values_are_keys = !values.has_value() || values->is_same(keys);
  in.query = query.contiguous();
  in.keys = keys.contiguous();
  in.values = in.values_are_keys ? in.keys : values->contiguous();
  in.lengths = kernel_lengths(lengths, query.device(), keys.size(1), who);
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
                                                 const std::optional<at::Tensor>& mask,
                                                 DeviceLengths who) {
  AdditiveInputs in;
  in.query_proj = query_proj.contiguous();
  in.keys_proj = keys_proj.contiguous();
  in.v = v.contiguous();
  in.values = values.contiguous();
  in.lengths = kernel_lengths(lengths, query_proj.device(), keys_proj.size(1), who);
  in.mask = contiguous_opt(mask);
  return in;
}

}  // namespace attention_ext
