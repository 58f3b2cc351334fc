// The per-lane tanh arithmetic of the additive op, forward and backward. A lane owns the
// A-chunks lane, lane + 32, ... of a row; tanh is always fast_tanh (math.h) on the sum in
// the accumulation type, so backward recomputes exactly the forward's values.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

// This lane's share of score = sum_a v[a] tanh(q[a] + k[a]); warp_sum it for the score.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t lane_additive_score(const scalar_t* q, const scalar_t* k,
                                                     const scalar_t* v, int64_t chunks,
                                                     int lane) {
  acc_t sum = acc_t(0);
  for (int64_t c = lane; c < chunks; c += kWarpSize) {
    acc_t x[VEC], y[VEC], w[VEC];
    load_chunk<VEC>(q, c, x);
    load_chunk<VEC>(k, c, y);
    load_chunk<VEC>(v, c, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += w[i] * fast_tanh(x[i] + y[i]);
  }
  return sum;
}

// Chunk c of the gradient of a row x (A elements) from its partner rows y_n, n < count:
//   out_row[c, i] = v[c, i] sum_n coef_n (1 - t_ni^2)   and   dv[i] = sum_n coef_n t_ni,
// t_ni = tanh(x[c, i] + y_n[c, i]) (rows: x a query, y_n the keys; keys: the reverse).
// Lane l reads coef_of(n) for n = n0 + l, shuffled to the warp; zero coefficients skip
// their partner row. Every lane calls this together (the shuffles); `active` says whether
// chunk c exists for it, and an inactive lane writes nothing and returns dv = 0.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void tanh_grad_chunk(const scalar_t* x_row, const scalar_t* v,
                                                scalar_t* out_row, int64_t c, bool active,
                                                int64_t count, int lane, CoefOf coef_of,
                                                SrcOf src_of, acc_t (&dv)[VEC]) {
  acc_t x[VEC], dx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = dx[i] = dv[i] = acc_t(0);
  if (active) load_chunk<VEC>(x_row, c, x);
  for (int64_t n0 = 0; n0 < count; n0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, count - n0));
    const acc_t my_coef = lane < tile ? coef_of(n0 + lane) : acc_t(0);
    for (int nn = 0; nn < tile; ++nn) {
      const acc_t w = __shfl_sync(kFullWarpMask, my_coef, nn);
      if (!active || w == acc_t(0)) continue;
      acc_t y[VEC];
      load_chunk<VEC>(src_of(n0 + nn), c, y);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t t = fast_tanh(x[i] + y[i]);
        dx[i] += w * (acc_t(1) - t * t);
        dv[i] += w * t;
      }
    }
  }
  if (!active) return;
  acc_t vv[VEC];
  load_chunk<VEC>(v, c, vv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dx[i] *= vv[i];
  store_chunk<VEC>(out_row, c, dx);
}

}  // namespace attention_ext
