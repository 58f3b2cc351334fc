// The one masking rule every attention kernel uses (dot and additive).
#pragma once

#include <cstdint>

#include "device_check.cuh"

namespace attention_ext {

// Which keys of batch b attend: j < end(b) (lengths, else S) and mask[b, j] when a mask
// is given. Keys beyond end(b) are never touched, so padded rows are never read.
struct KeyMask {
  const int64_t* lengths;  // (B,) or nullptr
  const bool* mask;        // (B, S) or nullptr
  int64_t S;

  // Lengths on the GPU are checked here, where the kernels read them, rather than on the
  // host, which would wait for the device on every call. A length outside [0, S] fails
  // the launch; under the emulation the clamped value lets the grid finish first. A call
  // with no query row or no key launches nothing and so reads (and checks) no length.
  __device__ __forceinline__ int64_t end(int64_t b) const {
    if (lengths == nullptr) return S;
    const int64_t e = lengths[b];
    ATTENTION_EXT_DEVICE_CHECK(e >= 0 && e <= S, "lengths must lie in [0, S]");
    return e < 0 ? 0 : (e > S ? S : e);
  }
  // For j < end(b) only.
  __device__ __forceinline__ bool attends(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * S + j];
  }
};

}  // namespace attention_ext
