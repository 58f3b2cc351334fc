// The memory side of query row b for every kernel, CPU and CUDA, dot and additive: which
// memory row it reads (row(b): memory_index[b], else b) and the one masking rule, key j
// attends when j < end(b) (lengths of that memory row, else S) and mask[row(b), j] (when a
// mask is given). Keys at or past end(b) are never touched, so padding is never read.
#pragma once

#include <cstdint>

#include "attention_ext/device_check.h"
#include "attention_ext/math.h"

namespace attention_ext {

struct KeyPositions {
  const int64_t* lengths;  // (M,) or nullptr, per memory row
  const bool* mask;        // (M, S) or nullptr
  int64_t S;
  const int64_t* memory_index = nullptr;  // (B,): query row -> memory row; nullptr: b -> b
  int64_t M = 0;                          // memory rows, with memory_index

  // A memory_index on the GPU is checked here, as lengths are below: a value outside
  // [0, M) fails the launch; the clamp keeps the emulation's reads in bounds until then.
  HOST_DEVICE_INLINE int64_t row(int64_t b) const {
    if (memory_index == nullptr) return b;
    const int64_t m = memory_index[b];
    ATTENTION_EXT_DEVICE_CHECK(m >= 0 && m < M, "memory_index must lie in [0, M)");
    return m < 0 ? 0 : (m >= M ? M - 1 : m);
  }

  // Lengths on the GPU are checked here, where the kernels read them, rather than on the
  // host, which would wait for the device on every call: a length outside [0, S] fails
  // the launch (under the emulation the clamped value lets the grid finish first). A call
  // with no query row or no key launches nothing and so reads (and checks) no length.
  HOST_DEVICE_INLINE int64_t end(int64_t b) const {
    if (lengths == nullptr) return S;
    const int64_t e = lengths[row(b)];
    ATTENTION_EXT_DEVICE_CHECK(e >= 0 && e <= S, "lengths must lie in [0, S]");
    return e < 0 ? 0 : (e > S ? S : e);
  }
  // For j < end(b) only.
  HOST_DEVICE_INLINE bool attends(int64_t b, int64_t j) const {
    return mask == nullptr || mask[row(b) * S + j];
  }
  // Query row b's positions, as those of a one-element problem.
  HOST_DEVICE_INLINE KeyPositions element(int64_t b) const {
    const int64_t m = row(b);
    return KeyPositions{lengths ? lengths + m : nullptr, mask ? mask + m * S : nullptr, S};
  }
  // The attending positions in [j0, j1), compacted into idx; returns how many.
  HOST_DEVICE_INLINE int64_t gather(int64_t b, int64_t j0, int64_t j1, int64_t* idx) const {
    int64_t n = 0;
    if (mask == nullptr) {
      for (int64_t j = j0; j < j1; ++j) idx[n++] = j;
    } else {
      const bool* m = mask + row(b) * S;
      for (int64_t j = j0; j < j1; ++j)
        if (m[j]) idx[n++] = j;
    }
    return n;
  }
};

// Location-sensitive attention's attended window: query row b attends only positions in
// [start(b), end(b)) (besides lengths and mask), the monotonic constraint of TTS inference,
// read on the device so that a decode step needs no host read. A window on the GPU is
// checked here, as lengths are: a row outside 0 <= start <= end <= S fails the launch.
struct AttendedWindow {
  const int64_t* bounds;  // (B, 2) or nullptr: every position
  int64_t S;

  HOST_DEVICE_INLINE int64_t start(int64_t b) const {
    if (bounds == nullptr) return 0;
    const int64_t s = bounds[2 * b], e = bounds[2 * b + 1];
    ATTENTION_EXT_DEVICE_CHECK(0 <= s && s <= e && e <= S,
                               "window must hold rows [start, end) with 0 <= start <= end <= S");
    return s < 0 ? 0 : (s > S ? S : s);
  }
  HOST_DEVICE_INLINE int64_t end(int64_t b) const {
    if (bounds == nullptr) return S;
    const int64_t e = bounds[2 * b + 1];
    return e < 0 ? 0 : (e > S ? S : e);
  }
};

}  // namespace attention_ext
