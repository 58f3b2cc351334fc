// The part of the kernels' arguments that the code shared by the attention ops reads
// (online_softmax_forward.cuh, softmax_backward.cuh): values, mask, softmax outputs or
// gradients, workspace, sizes. Each op's params derive from these and add what its
// scores need. All tensors are contiguous; sizes are 64-bit.
#pragma once

#include <cstdint>

#include "attention_ext/key_positions.h"

namespace attention_ext {

template <typename scalar_t, typename acc_t>
struct SoftmaxForwardParams {
  const scalar_t* values;  // (B, S, Dv)
  KeyPositions positions;
  scalar_t* context;  // (B, Tq, Dv)
  scalar_t* weights;  // (B, Tq, S), nullptr when need_weights is false
  acc_t* lse;         // (B, Tq)
  // Workspace. scores: raw scores (B, Tq, S), only with weights (it may alias them when
  // scalar_t == acc_t). ctx_acc: unnormalised context per (row, split), (rows, splits, Dv).
  // part_max / part_sum: softmax state per (row, split), only when splits > 1.
  acc_t* scores;
  acc_t* ctx_acc;
  acc_t* part_max;
  acc_t* part_sum;
  int64_t B, Tq, S, Dv;
  int64_t splits, split_len;
};

template <typename scalar_t, typename acc_t>
struct SoftmaxBackwardParams {
  const scalar_t* grad_context;  // (B, Tq, Dv)
  const scalar_t* grad_weights;  // (B, Tq, S) or nullptr
  const scalar_t* values;        // (B, S, Dv)
  KeyPositions positions;
  const acc_t* lse;       // (B, Tq)
  scalar_t* grad_values;  // (B, S, Dv); dot: unused when the keys are the values
  // Scratch (B, Tq, S), written by the rows kernel for attending keys only, read after it.
  acc_t* probs;
  acc_t* dscores;
  int64_t B, Tq, S, Dv;
};

}  // namespace attention_ext
