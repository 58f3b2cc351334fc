// Weighted sums over rows by one warp, coefficients dealt to the lanes and shuffled: the
// reduction both ops' backward kernels use for their gradients of rows (dot: query, keys,
// values; additive: values, and the tanh sums of additive_tanh.cuh).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

// Calls body(n, coef_n) in every lane, in order of n < count, for each nonzero
// coefficient. Lane l reads coef_of(n) for n = n0 + l (n0 a multiple of 32) and the
// values reach the warp by shuffles, so every lane must call this together; a zero
// coefficient (masked or underflowed) skips its n in every lane alike.
template <typename CoefOf, typename Body>
__device__ __forceinline__ void for_each_warp_coef(int64_t count, int lane, CoefOf coef_of,
                                                   Body body) {
  using acc_t = std::decay_t<decltype(coef_of(int64_t{0}))>;
  for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
    const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
    for (int nn = 0; nn < tile; ++nn) {
      const acc_t w = __shfl_sync(kFullWarpMask, my_coef, nn);
      if (w != acc_t(0)) body(n0 + nn, w);
    }
  }
}

// out_row = out_scale * sum_n coef_n * src_n over n < count (coefficients as in
// for_each_warp_coef). Each lane owns chunks lane, lane + 32, ... of out_row.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_row_sum(scalar_t* out_row, int64_t chunks,
                                                 int64_t count, acc_t out_scale, int lane,
                                                 CoefOf coef_of, SrcOf src_of) {
  for (int64_t r = 0; r < warp_rounds(chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    const bool active = c < chunks;
    acc_t a[VEC] = {};
    for_each_warp_coef(count, lane, coef_of, [&](int64_t n, acc_t w) {
      if (!active) return;
      acc_t x[VEC];
      load_chunk<VEC>(src_of(n), c, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += w * x[i];
    });
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] *= out_scale;
      store_chunk<VEC>(out_row, c, a);
    }
  }
}

}  // namespace attention_ext
