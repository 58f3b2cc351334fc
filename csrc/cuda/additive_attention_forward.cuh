// The additive op's score, score_j = sum_a v[a] tanh(query_proj[a] + keys_proj[j, a]): a
// warp-wide sum over A, lanes over A-chunks. Its forward kernel is the shared
// online-softmax pass with this score, online_softmax_forward_kernel<AdditiveScorer<...>>
// (online_softmax_forward.cuh, which also holds the split-S merge); the backward rows
// kernel recomputes the scores with it. Each tanh lives in a register only: nothing of
// size B x Tq x S x A exists.
#pragma once

#include <cstdint>

#include "additive_attention_params.cuh"
#include "attention_ext/math.h"
#include "online_softmax_forward.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t, int VEC>
struct AdditiveScorer {
  using ForwardParams = AdditiveForwardParams<scalar_t, acc_t>;
  static constexpr int kVec = VEC;

  // For row (b, t) of p, an AdditiveForwardParams or AdditiveBackwardParams.
  template <typename Params>
  __device__ __forceinline__ AdditiveScorer(const Params& p, int64_t row, int lane_)
      : q(p.query_proj + row * p.A), keys(p.keys_proj + row / p.Tq * p.S * p.A), v(p.v),
        A(p.A), lane(lane_) {}

  // Called by every lane of the warp together; the same score in every lane. tanh is
  // fast_tanh (math.h) of the sum in acc_t, as in the backward's tanh_grad_chunk.
  __device__ __forceinline__ acc_t operator()(int64_t j) const {
    const scalar_t* k = keys + j * A;
    acc_t sum = acc_t(0);
    for (int64_t c = lane; c < A / VEC; c += kWarpSize) {
      acc_t x[VEC], y[VEC], w[VEC];
      load_chunk<VEC>(q, c, x);
      load_chunk<VEC>(k, c, y);
      load_chunk<VEC>(v, c, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += w[i] * fast_tanh(x[i] + y[i]);
    }
    return warp_sum(sum);
  }

  const scalar_t* q;
  const scalar_t* keys;
  const scalar_t* v;
  int64_t A;
  int lane;
};

}  // namespace attention_ext
