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
  scalar_t* grad_keys;   // (B, S, D); also the values' gradient when values_are_keys
  int64_t D;
  acc_t scale;
  // No values were given: the keys are the values and grad_keys takes both gradients
  // (grad_values is unused). A flag, not a null grad_values: zero-width values (Dv = 0)
  // have a null data pointer too.
  bool values_are_keys;
};

}  // namespace attention_ext
