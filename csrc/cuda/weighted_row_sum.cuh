// A row written as a weighted sum of other rows, by one warp; the reduction both ops'
// backward kernels use for their gradients of rows (dot: query, keys, values; additive:
// values).
#pragma once

#include <algorithm>
#include <cstdint>

#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

// out_row = out_scale * sum_n coef_n * src_n over n < count, where lane l's `coef_of(n)`
// is read for n = n0 + l (n0 a multiple of 32), shuffled to the warp, and zero
// coefficients skip their source row. Each lane owns chunks lane, lane + 32, ... of out_row.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void weighted_row_sum(scalar_t* out_row, int64_t chunks,
                                                 int64_t count, acc_t out_scale, int lane,
                                                 CoefOf coef_of, SrcOf src_of) {
  for (int64_t r = 0; r < warp_rounds(chunks); ++r) {
    const int64_t c = r * kWarpSize + lane;
    const bool active = c < chunks;
    acc_t a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = acc_t(0);
    for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
      const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
      const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
      for (int nn = 0; nn < tile; ++nn) {
        const acc_t w = __shfl_sync(kFullWarpMask, my_coef, nn);
        if (!active || w == acc_t(0)) continue;
        acc_t x[VEC];
        load_chunk<VEC>(src_of(n0 + nn), c, x);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] += w * x[i];
      }
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] *= out_scale;
      store_chunk<VEC>(out_row, c, a);
    }
  }
}

}  // namespace attention_ext
