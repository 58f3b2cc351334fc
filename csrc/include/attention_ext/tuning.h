// Test-only knob: force the number of source (S) splits a kernel uses, so tests exercise
// both sides of every split-S launch decision. 0 (the default) lets the heuristic choose.
#pragma once

#include <atomic>
#include <cstdint>

namespace attention_ext {

inline std::atomic<int64_t>& forced_splits_storage() {
  static std::atomic<int64_t> value{0};
  return value;
}

inline int64_t forced_splits() { return forced_splits_storage().load(std::memory_order_relaxed); }

}  // namespace attention_ext
