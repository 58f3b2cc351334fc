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

// The types a kernel's building block names: the dtype, its accumulation type and the
// chunk width it reads rows in.
template <typename scalar_t_, typename acc_t_, int VEC>
struct KernelTypes {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  static constexpr int kVec = VEC;
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

// Copies one chunk of VEC elements from global to shared memory without a register on the
// way: cp.async on sm_80 and later, so a thread issues all its copies of a round before
// waiting for any (commit_async_copies closes a group, wait_async_copies<N> waits until at
// most N groups are in flight). A plain copy elsewhere: older GPUs, chunks under 16 bytes
// (cp.async moves 4, 8 or 16; VEC = 1 of a 16-bit type is 2). The CPU emulation models
// cp.async (emulation.h): a copy lands only at the wait that covers its group.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void copy_chunk_async(scalar_t* shared_dst, const scalar_t* src) {
  if constexpr (VEC * sizeof(scalar_t) == 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
    return;
#elif defined(ATTENTION_EXT_CUDA_EMULATION)
    emu::copy_async(shared_dst, src, 16);
    return;
#endif
  }
  *reinterpret_cast<Pack<scalar_t, VEC>*>(shared_dst) =
      *reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
}

__device__ __forceinline__ void commit_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(ATTENTION_EXT_CUDA_EMULATION)
  emu::commit_async_group();
#endif
}

template <int N>
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(ATTENTION_EXT_CUDA_EMULATION)
  emu::wait_async_groups(N);
#endif
}

// Chunks a lane loads at once in its strided loops: all loads of a batch first, then the
// arithmetic, so each lane keeps several 16-byte loads in flight. (A loop with a run-time
// trip count and an exit test between iterations compiles to one load at a time.)
constexpr int kChunksInFlight = 4;

// sum of term(e) over the elements of the chunks first, first + stride, ... < chunks of
// the rows (e[r]: the element of row r, in acc_t), in chunk order. kBatch chunks of every
// row are loaded before any arithmetic; chunks past the end load as zeros, so term must
// be 0 at all-zero elements.
template <int kBatch, int VEC, typename acc_t, typename scalar_t, typename Term,
          typename... Rows>
__device__ __forceinline__ acc_t batched_chunk_sum(int64_t chunks, int64_t first, int stride,
                                                   Term term, const Rows*... rows) {
  constexpr int N = sizeof...(Rows);
  const scalar_t* const row[N] = {rows...};
  acc_t sum = acc_t(0);
  for (int64_t c0 = first; c0 < chunks; c0 += int64_t(kBatch) * stride) {
    Pack<scalar_t, VEC> x[kBatch][N];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + int64_t(u) * stride;
#pragma unroll
      for (int r = 0; r < N; ++r) {
        if (c < chunks) {
          x[u][r] = load_pack<VEC>(row[r], c);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[u][r].v[i] = scalar_t(0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t e[N];
#pragma unroll
        for (int r = 0; r < N; ++r) e[r] = unpack<acc_t>(x[u][r], i);
        sum += term(e);
      }
    }
  }
  return sum;
}

// This lane's share of <a, b> over the chunks first, first + stride, ... < chunks; sum
// the shares of the lanes that split the chunks for the full dot product.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const scalar_t* a, const scalar_t* b, int64_t chunks,
                                          int64_t first, int stride) {
  return batched_chunk_sum<kChunksInFlight, VEC, acc_t, scalar_t>(
      chunks, first, stride, [](const acc_t (&e)[2]) { return e[0] * e[1]; }, a, b);
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
