// The one masking rule of every kernel, CPU and CUDA, dot and additive: key j of batch
// element b attends when j < end(b) (lengths, else S) and mask[b, j] (when a mask is
// given). Keys at or past end(b) are never touched, so padding is never read.
#pragma once

#include <cstdint>

#include "attention_ext/device_check.h"
#include "attention_ext/math.h"

namespace attention_ext {

struct KeyPositions {
  const int64_t* lengths;  // (B,) or nullptr
  const bool* mask;        // (B, S) or nullptr
  int64_t S;

  // Lengths on the GPU are checked here, where the kernels read them, rather than on the
  // host, which would wait for the device on every call: a length outside [0, S] fails
  // the launch (under the emulation the clamped value lets the grid finish first). A call
  // with no query row or no key launches nothing and so reads (and checks) no length.
  HOST_DEVICE_INLINE int64_t end(int64_t b) const {
    if (lengths == nullptr) return S;
    const int64_t e = lengths[b];
    ATTENTION_EXT_DEVICE_CHECK(e >= 0 && e <= S, "lengths must lie in [0, S]");
    return e < 0 ? 0 : (e > S ? S : e);
  }
  // For j < end(b) only.
  HOST_DEVICE_INLINE bool attends(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * S + j];
  }
  // Batch element b's positions, as those of a one-element problem.
  HOST_DEVICE_INLINE KeyPositions element(int64_t b) const {
    return KeyPositions{lengths ? lengths + b : nullptr, mask ? mask + b * S : nullptr, S};
  }
  // The attending positions in [j0, j1), compacted into idx; returns how many.
  HOST_DEVICE_INLINE int64_t gather(int64_t b, int64_t j0, int64_t j1, int64_t* idx) const {
    int64_t n = 0;
    if (mask == nullptr) {
      for (int64_t j = j0; j < j1; ++j) idx[n++] = j;
    } else {
      const bool* m = mask + b * S;
      for (int64_t j = j0; j < j1; ++j)
        if (m[j]) idx[n++] = j;
    }
    return n;
  }
};

}  // namespace attention_ext
