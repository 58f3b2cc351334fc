// Row access in chunks of VEC elements. VEC = 16 / sizeof(scalar_t) turns every chunk
// into one 16-byte load/store; VEC = 1 is the fallback for rows that are not 16-byte
// aligned (D not a multiple of VEC, or a base pointer with an odd storage offset).
#pragma once

#include <cstdint>

namespace attention_ext {

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

// This lane's share of <a, b> over `chunks` chunks (lane, lane + 32, ...); warp_sum the
// results for the full dot product.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_dot(const scalar_t* a, const scalar_t* b, int64_t chunks,
                                          int lane) {
  acc_t sum = acc_t(0);
  for (int64_t c = lane; c < chunks; c += 32) {
    acc_t x[VEC], y[VEC];
    load_chunk<VEC>(a, c, x);
    load_chunk<VEC>(b, c, y);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += x[i] * y[i];
  }
  return sum;
}

}  // namespace attention_ext
