// Warp-wide reductions built only from __shfl_xor_sync. The butterfly leaves the result
// in every lane, bitwise identical (IEEE addition is commutative), so all lanes take the
// same branches afterwards and later shuffles stay converged.
#pragma once

#include <cstdint>

#include "attention_ext/math.h"

namespace attention_ext {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = ae_max(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  }
  return v;
}

// This thread's lane, and the index of its warp in the grid when every block holds
// `warps_per_block` warps (one warp per row or key in every kernel here).
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }

__device__ __forceinline__ int64_t global_warp_id(int warps_per_block) {
  return static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
}

// Loops whose body shuffles must run the same number of times in every lane: this is
// that count for `n` items dealt round-robin to the lanes.
__device__ __forceinline__ int64_t warp_rounds(int64_t n) {
  return ceil_div(n, kWarpSize);
}

}  // namespace attention_ext
