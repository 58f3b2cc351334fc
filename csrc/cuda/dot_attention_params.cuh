// Kernel arguments of the dot attention op, one struct per kernel family. All tensors are
// contiguous; sizes are 64-bit.
#pragma once

#include <cstdint>

#include "softmax_params.cuh"

namespace attention_ext {

// Values, mask, outputs or gradients, workspace and sizes but D are in the bases.
template <typename scalar_t, typename acc_t>
struct DotForwardParams : SoftmaxForwardParams<scalar_t, acc_t> {
  const scalar_t* query;  // (B, Tq, D)
  const scalar_t* keys;   // (B, S, D)
  int64_t D;
  acc_t scale;
};

template <typename scalar_t, typename acc_t>
struct DotBackwardParams : SoftmaxBackwardParams<scalar_t, acc_t> {
  const scalar_t* query;
  const scalar_t* keys;
  scalar_t* grad_query;  // (B, Tq, D)
  scalar_t* grad_keys;   // (B, S, D); also the values' gradient when grad_values is nullptr
  int64_t D;
  acc_t scale;
};

}  // namespace attention_ext
