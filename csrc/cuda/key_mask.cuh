// The one masking rule every attention kernel uses (dot and additive).
#pragma once

#include <cstdint>

namespace attention_ext {

// Which keys of batch b attend: j < end(b) (lengths, else S) and mask[b, j] when a mask
// is given. Keys beyond end(b) are never touched, so padded rows are never read.
struct KeyMask {
  const int64_t* lengths;  // (B,) or nullptr
  const bool* mask;        // (B, S) or nullptr
  int64_t S;

  __device__ __forceinline__ int64_t end(int64_t b) const { return lengths ? lengths[b] : S; }
  // For j < end(b) only.
  __device__ __forceinline__ bool attends(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * S + j];
  }
};

}  // namespace attention_ext
