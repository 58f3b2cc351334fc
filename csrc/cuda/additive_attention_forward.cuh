// Forward kernel of the additive op: the shared online-softmax pass
// (online_softmax_forward.cuh, which also holds the split-S merge) with
// score_j = sum_a v[a] tanh(query_proj[a] + keys_proj[j, a]), a warp-wide sum over A.
// Nothing of size B x Tq x S x A exists: each tanh lives in a register.
#pragma once

#include <cstdint>

#include "additive_attention_params.cuh"
#include "additive_tanh.cuh"
#include "online_softmax_forward.cuh"
#include "warp_ops.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t, int VEC>
__global__ void additive_attention_forward_kernel(const AdditiveForwardParams<scalar_t, acc_t> p) {
  const int lane = lane_id();
  const int64_t task = global_warp_id(kForwardWarpsPerBlock);
  if (task >= p.B * p.Tq * p.splits) return;  // whole warps only
  const int64_t row = task / p.splits;
  const int64_t b = row / p.Tq;
  const scalar_t* q = p.query_proj + row * p.A;
  const scalar_t* keys = p.keys_proj + b * p.S * p.A;
  const scalar_t* v = p.v;
  const int64_t a_chunks = p.A / VEC;
  online_softmax_task<VEC>(p, task, lane, [&](int64_t j) {
    return warp_sum(lane_additive_score<VEC, scalar_t, acc_t>(q, keys + j * p.A, v, a_chunks, lane));
  });
}

}  // namespace attention_ext
