// What the product build exposes to tests, as the module attention_ext._C._testing
// (csrc/attention_ext.cpp) and nowhere else:
// - a forced number of source (S) splits, so tests drive both sides of every split-S
//   decision whatever the machine; 0 (the default) lets the planners choose. A planner
//   reads it with one relaxed atomic load per call.
// - the CUDA forward's launch plan (forward_plan.h, plain C++), so a test checks
//   what it gives a 132-SM GPU in every build;
// - the CPU kernels' vectorised float32 tanh, elementwise, so its accuracy can be checked
//   against torch.tanh (builds with the CPU kernels only).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>

namespace attention_ext {

inline std::atomic<int64_t>& forced_splits_storage() {
  static std::atomic<int64_t> value{0};
  return value;
}

inline int64_t forced_splits() { return forced_splits_storage().load(std::memory_order_relaxed); }

namespace cpu {
// Defined with the CPU additive kernels (csrc/cpu/additive_attention_kernel.cpp).
at::Tensor tanh_float32(const at::Tensor& x);
}  // namespace cpu

}  // namespace attention_ext
