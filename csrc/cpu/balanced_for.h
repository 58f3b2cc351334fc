// A parallel loop whose items cost different amounts (rows of different lengths).
// at::parallel_for hands every thread the same number of items, so the thread holding the
// long rows finishes last while the others spin (docs/performance.md, "Thread balance").
// Here each thread gets a contiguous range of about equal total cost instead.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace attention_ext {
namespace cpu {

// Calls f(begin, end) on contiguous ranges covering [0, n); cost(i) >= 0 is item i's work.
template <typename Cost, typename F>
void balanced_parallel_for(int64_t n, const Cost& cost, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + static_cast<double>(cost(i));
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const double target = prefix[n] * static_cast<double>(t) / static_cast<double>(threads);
    const auto it = std::lower_bound(prefix.begin(), prefix.end(), target);
    bounds[t] = std::max(bounds[t - 1], static_cast<int64_t>(it - prefix.begin()));
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (bounds[t] < bounds[t + 1]) f(bounds[t], bounds[t + 1]);
  });
}

}  // namespace cpu
}  // namespace attention_ext
