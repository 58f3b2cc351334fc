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

// The same in two steps: the raw 16 bytes (four registers whatever the type), then the
// conversion, so a batch of loads in flight holds packed data, not floats.
template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* row, int64_t c) {
  return reinterpret_cast<const Pack<scalar_t, VEC>*>(row)[c];
}

template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ acc_t unpack(const Pack<scalar_t, VEC>& p, int i) {
  return static_cast<acc_t>(p.v[i]);
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

// Chunks a lane loads at once in its strided loops: all loads of a batch first, then the
// arithmetic, so each lane keeps several 16-byte loads in flight. (A loop with a run-time
// trip count and an exit test between iterations compiles to one load at a time.)
constexpr int kChunksInFlight = 4;

// This lane's share of <a, b> over the chunks first, first + stride, ... < chunks; sum
// the shares of the lanes that split the chunks for the full dot product. The terms are
// added in chunk order.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const scalar_t* a, const scalar_t* b, int64_t chunks,
                                          int64_t first, int stride) {
  acc_t sum = acc_t(0);
  for (int64_t c0 = first; c0 < chunks; c0 += int64_t(kChunksInFlight) * stride) {
    Pack<scalar_t, VEC> x[kChunksInFlight], y[kChunksInFlight];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      const int64_t c = c0 + int64_t(u) * stride;
      if (c < chunks) {
        x[u] = load_pack<VEC>(a, c);
        y[u] = load_pack<VEC>(b, c);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[u].v[i] = y[u].v[i] = scalar_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += unpack<acc_t>(x[u], i) * unpack<acc_t>(y[u], i);
    }
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
