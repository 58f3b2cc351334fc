// The device code's building blocks: row access in 16-byte chunks and warp reductions.
//
// Row access in chunks of VEC elements: VEC = 16 / sizeof(scalar_t) turns every chunk
// into one 16-byte load/store; VEC = 1 is the fallback for rows that are not 16-byte
// aligned (a row length not a multiple of VEC, or a base pointer with an odd storage
// offset).
//
// Reductions are built only from __shfl_xor_sync. The butterfly leaves the result in every
// lane it spans, bitwise identical (IEEE addition is commutative), so all lanes take the
// same branches afterwards and later shuffles stay converged.
#pragma once

#include <cstdint>

#include "attention_ext/math.h"

namespace attention_ext {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Chunk `c` (elements [c*VEC, c*VEC+VEC)) of `row`, converted to the accumulation type.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* row, int64_t c, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc_t>(row[c]);
  } else {
    const Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(row)[c];
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(p.v[i]);
  }
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* row, int64_t c, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 1) {
    row[c] = static_cast<scalar_t>(in[0]);
  } else {
    Pack<scalar_t, VEC> p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.v[i] = static_cast<scalar_t>(in[i]);
    reinterpret_cast<Pack<scalar_t, VEC>*>(row)[c] = p;
  }
}

// This lane's share of <a, b> over the chunks first, first + stride, ... < chunks; sum
// the shares of the lanes that split the chunks for the full dot product.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const scalar_t* a, const scalar_t* b, int64_t chunks,
                                          int64_t first, int stride) {
  acc_t sum = acc_t(0);
#pragma unroll 4
  for (int64_t c = first; c < chunks; c += stride) {
    acc_t x[VEC], y[VEC];
    load_chunk<VEC>(a, c, x);
    load_chunk<VEC>(b, c, y);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += x[i] * y[i];
  }
  return sum;
}

// The sum over each aligned group of `lanes` lanes (a power of two <= 32), in every lane
// of the group. Every lane of the warp calls it together.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return group_sum(v, kWarpSize);
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
// `warps_per_block` warps (the backward kernels: one warp per row or key).
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
