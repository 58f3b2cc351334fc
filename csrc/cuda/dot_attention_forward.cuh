// Forward kernel of the dot attention op: the shared online-softmax pass
// (online_softmax_forward.cuh, which also holds the split-S merge) with
// score_j = scale * <query_row, key_j>, a warp-wide dot product over D.
#pragma once

#include <cstdint>

#include "dot_attention_params.cuh"
#include "online_softmax_forward.cuh"
#include "vector_io.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t, int VEC>
__global__ void dot_attention_forward_kernel(const DotForwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t task = global_warp_id(kForwardWarpsPerBlock);
  if (task >= p.B * p.Tq * p.splits) return;  // whole warps only
  const int64_t row = task / p.splits;
  const int64_t b = row / p.Tq;
  const scalar_t* q = p.query + row * p.D;
  const scalar_t* keys = p.keys + b * p.S * p.D;
  const int64_t d_chunks = p.D / VEC;
  const acc_t scale = p.scale;
  online_softmax_task<VEC>(p, task, lane, [&](int64_t j) {
    return scale * warp_sum(lane_dot<VEC, scalar_t, acc_t>(q, keys + j * p.D, d_chunks, lane));
  });
}

}  // namespace attention_ext
