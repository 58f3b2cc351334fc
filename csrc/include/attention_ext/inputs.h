// The ops' inputs as both devices' kernels read them: contiguous (no copy when they
// already are), lengths and memory_index as int64 on the kernels' device with their values
// checked, values aliasing the keys when none were given; and the gradients of the memory
// side. Call after the checks in checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
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

// memory_index as the kernels read it: contiguous int64 on their device (the checks put it
// there), values in [0, M) checked as DeviceLengths says.
inline std::optional<at::Tensor> kernel_memory_index(const std::optional<at::Tensor>& memory_index,
                                                     int64_t M, DeviceLengths who) {
  if (!memory_index) return std::nullopt;
  if (who == DeviceLengths::kHostChecks) check_memory_index_range(*memory_index, M);
  return memory_index->to(at::kLong).contiguous();
}

// The kernels' view of lengths, mask and memory_index as returned by the functions above.
inline KeyPositions key_positions(const std::optional<at::Tensor>& lengths,
                                  const std::optional<at::Tensor>& mask, int64_t S,
                                  const std::optional<at::Tensor>& memory_index, int64_t M) {
  return KeyPositions{lengths ? lengths->data_ptr<int64_t>() : nullptr,
                      mask ? mask->data_ptr<bool>() : nullptr, S,
                      memory_index ? memory_index->data_ptr<int64_t>() : nullptr, M};
}

// The gradient of a memory-side input, (M, S, W): the kernels write one (S, W) slice per
// query row, into the result itself when each row has its own memory row; under
// memory_index into per-row slices, which sum() adds up per memory row in the order of the
// query rows (a stable sort and a segment sum: deterministic, and no host wait).
class MemoryGradient {
 public:
  MemoryGradient(const at::Tensor& like, const std::optional<at::Tensor>& memory_index,
                 int64_t B, int64_t M, int64_t S, int64_t W)
      : memory_index_(memory_index), M_(M),
        rows_(at::empty({memory_index ? B : M, S, W}, like.options())) {}

  // What the kernels write: (B, S, W).
  const at::Tensor& rows() const { return rows_; }

  at::Tensor sum() const {
    if (!memory_index_) return rows_;
    const int64_t B = rows_.size(0), S = rows_.size(1), W = rows_.size(2);
    const auto sorted =
        at::sort(*memory_index_, /*stable=*/std::optional<bool>(true), /*dim=*/0, false);
    const at::Tensor offsets = at::searchsorted(
        std::get<0>(sorted), at::arange(M_ + 1, memory_index_->options()));
    const at::Tensor per_row = rows_.index_select(0, std::get<1>(sorted))
                                   .to(acc_dtype(rows_.scalar_type()))
                                   .view({B, S * W});
    return at::segment_reduce(per_row, "sum", std::nullopt, std::nullopt, offsets, /*axis=*/0,
                              /*unsafe=*/true, /*initial=*/0)
        .view({M_, S, W})
        .to(rows_.scalar_type());
  }

 private:
  std::optional<at::Tensor> memory_index_;
  int64_t M_;
  at::Tensor rows_;
};

struct DotInputs {
  at::Tensor query, keys, values;
  std::optional<at::Tensor> lengths, mask, memory_index;
  bool values_are_keys;  // no values given, or the same tensor as the keys
};

inline DotInputs contiguous_dot_inputs(const at::Tensor& query, const at::Tensor& keys,
                                       const std::optional<at::Tensor>& values,
                                       const std::optional<at::Tensor>& lengths,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& memory_index,
                                       DeviceLengths who) {
  DotInputs in;
  in.values_are_keys = !values.has_value() || values->is_same(keys);
  in.query = query.contiguous();
  in.keys = keys.contiguous();
  in.values = in.values_are_keys ? in.keys : values->contiguous();
  in.lengths = kernel_lengths(lengths, query.device(), keys.size(1), who);
  in.mask = contiguous_opt(mask);
  in.memory_index = kernel_memory_index(memory_index, keys.size(0), who);
  return in;
}

struct AdditiveInputs {
  at::Tensor query_proj, keys_proj, v, values;
  std::optional<at::Tensor> lengths, mask, memory_index;
};

inline AdditiveInputs contiguous_additive_inputs(const at::Tensor& query_proj,
                                                 const at::Tensor& keys_proj, const at::Tensor& v,
                                                 const at::Tensor& values,
                                                 const std::optional<at::Tensor>& lengths,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& memory_index,
                                                 DeviceLengths who) {
  AdditiveInputs in;
  in.query_proj = query_proj.contiguous();
  in.keys_proj = keys_proj.contiguous();
  in.v = v.contiguous();
  in.values = values.contiguous();
  in.lengths = kernel_lengths(lengths, query_proj.device(), keys_proj.size(1), who);
  in.mask = contiguous_opt(mask);
  in.memory_index = kernel_memory_index(memory_index, keys_proj.size(0), who);
  return in;
}

// window as the kernels read it: contiguous int64 (B, 2) on their device (the checks put it
// there), rows checked as DeviceLengths says.
inline std::optional<at::Tensor> kernel_window(const std::optional<at::Tensor>& window,
                                               int64_t S, DeviceLengths who) {
  if (!window) return std::nullopt;
  if (who == DeviceLengths::kHostChecks) check_window_range(*window, S);
  return window->to(at::kLong).contiguous();
}

inline AttendedWindow attended_window(const std::optional<at::Tensor>& window, int64_t S) {
  return AttendedWindow{window ? window->data_ptr<int64_t>() : nullptr, S};
}

struct LocationInputs {
  at::Tensor query_proj, keys_proj, prev, conv_weight, location_weight, v, values;
  std::optional<at::Tensor> lengths, mask, window, score_bias, memory_index;
};

inline LocationInputs contiguous_location_inputs(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, const std::optional<at::Tensor>& memory_index,
    DeviceLengths who) {
  LocationInputs in;
  in.query_proj = query_proj.contiguous();
  in.keys_proj = keys_proj.contiguous();
  in.prev = prev.contiguous();
  in.conv_weight = conv_weight.contiguous();
  in.location_weight = location_weight.contiguous();
  in.v = v.contiguous();
  in.values = values.contiguous();
  const int64_t S = keys_proj.size(1);
  in.lengths = kernel_lengths(lengths, query_proj.device(), S, who);
  in.mask = contiguous_opt(mask);
  in.window = kernel_window(window, S, who);
  in.score_bias = contiguous_opt(score_bias);
  in.memory_index = kernel_memory_index(memory_index, keys_proj.size(0), who);
  return in;
}

}  // namespace attention_ext
