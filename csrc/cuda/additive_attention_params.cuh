// Kernel arguments of the additive (Bahdanau) attention op, one struct per kernel family;
// values, mask, outputs or gradients, workspace and the sizes but A are in the bases
// (softmax_params.cuh).
#pragma once

#include <cstdint>

#include "softmax_params.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t>
struct AdditiveForwardParams : SoftmaxForwardParams<scalar_t, acc_t> {
  const scalar_t* query_proj;  // (B, Tq, A)
  const scalar_t* keys_proj;   // (B, S, A)
  const scalar_t* v;           // (A,)
  int64_t A;
};

template <typename scalar_t, typename acc_t>
struct AdditiveBackwardParams : SoftmaxBackwardParams<scalar_t, acc_t> {
  const scalar_t* query_proj;
  const scalar_t* keys_proj;
  const scalar_t* v;
  scalar_t* grad_query_proj;  // (B, Tq, A)
  scalar_t* grad_keys_proj;   // (B, S, A)
  // grad_v per block of the rows kernel, (blocks, A); summed over blocks in block order
  // by additive_grad_v_kernel: no atomics, the same bits on every run.
  acc_t* grad_v_partials;
  int64_t A;
};

}  // namespace attention_ext
