// The first half of the rows kernel of both ops' backward, everything but the scores:
// one warp per row (b, t) recomputes p_j = exp(s_j - lse) and
// dp_j = <grad_ctx, values_j> + grad_weights_j, then ds_j = p_j (dp_j - delta) with delta
// from softmax_grad_delta, and writes p and ds to the (B, Tq, S) scratch for the attending
// keys. Every lane later reads back only the entries it wrote itself (j = lane,
// lane + 32, ...), so no barrier is needed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "softmax_params.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

constexpr int kBackwardWarpsPerBlock = 4;

// score_of(j) is called by every lane together for each attending key j < end(b) and
// returns the same score in every lane.
template <int VEC, typename scalar_t, typename acc_t, typename ScoreOf>
__device__ __forceinline__ void softmax_backward_row(
    const SoftmaxBackwardParams<scalar_t, acc_t>& p, int64_t row, int lane, ScoreOf score_of) {
  const int64_t b = row / p.Tq;
  const int64_t end = p.positions.end(b);
  const scalar_t* g = p.grad_context + row * p.Dv;
  const scalar_t* values = p.values + b * p.S * p.Dv;
  acc_t* probs = p.probs + row * p.S;
  acc_t* dscores = p.dscores + row * p.S;
  const acc_t lse = p.lse[row];
  const int64_t v_chunks = p.Dv / VEC;

  // p_j and dp_j; lane l keeps key j0 + l of each tile and stores dp in dscores for now.
  acc_t my_delta = acc_t(0), my_psum = acc_t(0);
  for (int64_t j0 = 0; j0 < end; j0 += kWarpSize) {
    const int tile = static_cast<int>(std::min<int64_t>(kWarpSize, end - j0));
    acc_t my_p = acc_t(0), my_dp = acc_t(0);
    for (int jj = 0; jj < tile; ++jj) {
      const int64_t j = j0 + jj;
      if (!p.positions.attends(b, j)) continue;  // same for all lanes
      const acc_t s = score_of(j);
      const acc_t dp =
          warp_sum(lane_dot<VEC, scalar_t, acc_t>(g, values + j * p.Dv, v_chunks, lane));
      if (lane == jj) {
        my_p = prob_from_lse(s, lse);
        my_dp = dp + (p.grad_weights ? static_cast<acc_t>(p.grad_weights[row * p.S + j])
                                     : acc_t(0));
      }
    }
    if (lane < tile && p.positions.attends(b, j0 + lane)) {
      probs[j0 + lane] = my_p;
      dscores[j0 + lane] = my_dp;
    }
    my_delta += my_p * my_dp;
    my_psum += my_p;
  }
  const acc_t delta = softmax_grad_delta(warp_sum(my_delta), warp_sum(my_psum));
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.positions.attends(b, j)) dscores[j] = softmax_backward(probs[j], dscores[j], delta);
  }
}

}  // namespace attention_ext
