// The dot op's score, score_j = scale * <query_row, key_j>: a warp-wide dot product over
// D. Its forward kernel is the shared online-softmax pass with this score,
// online_softmax_forward_kernel<DotScorer<...>> (online_softmax_forward.cuh, which also
// holds the split-S merge); the backward rows kernel recomputes the scores with it.
#pragma once

#include <cstdint>

#include "dot_attention_params.cuh"
#include "online_softmax_forward.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t, int VEC>
struct DotScorer {
  using ForwardParams = DotForwardParams<scalar_t, acc_t>;
  static constexpr int kVec = VEC;

  // For row (b, t) of p, a DotForwardParams or DotBackwardParams.
  template <typename Params>
  __device__ __forceinline__ DotScorer(const Params& p, int64_t row, int lane_)
      : q(p.query + row * p.D), keys(p.keys + row / p.Tq * p.S * p.D), D(p.D),
        scale(p.scale), lane(lane_) {}

  // Called by every lane of the warp together; the same score in every lane.
  __device__ __forceinline__ acc_t operator()(int64_t j) const {
    return scale * warp_sum(lane_dot<VEC, scalar_t, acc_t>(q, keys + j * D, D / VEC, lane));
  }

  const scalar_t* q;
  const scalar_t* keys;
  int64_t D;
  acc_t scale;
  int lane;
};

}  // namespace attention_ext
