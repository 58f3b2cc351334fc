// The tanh gradients of the additive op's backward. A lane owns the A-chunks lane,
// lane + 32, ... of a row; tanh is fast_tanh (math.h) of the sum in the accumulation type,
// as in the forward's AdditiveScorer, so backward recomputes exactly the forward's values.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "vector_io.cuh"
#include "warp_ops.cuh"
#include "weighted_row_sum.cuh"

namespace attention_ext {

// Chunk c of the gradient of a row x (A elements) from its partner rows y_n, n < count:
//   out_row[c, i] = v[c, i] sum_n coef_n (1 - t_ni^2)   and   dv[i] = sum_n coef_n t_ni,
// t_ni = tanh(x[c, i] + y_n[c, i]) (rows: x a query, y_n the keys; keys: the reverse).
// Coefficients as in for_each_warp_coef (weighted_row_sum.cuh): every lane calls this
// together; `active` says whether chunk c exists for it, and an inactive lane writes
// nothing and returns dv = 0.
template <int VEC, typename scalar_t, typename acc_t, typename CoefOf, typename SrcOf>
__device__ __forceinline__ void tanh_grad_chunk(const scalar_t* x_row, const scalar_t* v,
                                                scalar_t* out_row, int64_t c, bool active,
                                                int64_t count, int lane, CoefOf coef_of,
                                                SrcOf src_of, acc_t (&dv)[VEC]) {
  acc_t x[VEC], dx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = dx[i] = dv[i] = acc_t(0);
  if (active) load_chunk<VEC>(x_row, c, x);
  for_each_warp_coef(count, lane, coef_of, [&](int64_t n, acc_t w) {
    if (!active) return;
    acc_t y[VEC];
    load_chunk<VEC>(src_of(n), c, y);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t t = fast_tanh(x[i] + y[i]);
      dx[i] += w * (acc_t(1) - t * t);
      dv[i] += w * t;
    }
  });
  if (!active) return;
  acc_t vv[VEC];
  load_chunk<VEC>(v, c, vv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dx[i] *= vv[i];
  store_chunk<VEC>(out_row, c, dx);
}

}  // namespace attention_ext
