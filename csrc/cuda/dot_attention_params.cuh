// Kernel arguments of the dot attention op, one struct per kernel family, and the one
// masking rule every kernel uses. All tensors are contiguous; sizes are 64-bit.
#pragma once

#include <cstdint>

namespace attention_ext {

// Which keys of batch b attend: j < end(b) (lengths, else S) and mask[b, j] when a mask
// is given. Keys beyond end(b) are never touched, so padded rows are never read.
struct KeyMask {
  const int64_t* lengths;  // (B,) or nullptr
  const bool* mask;        // (B, S) or nullptr
  int64_t S;

  __device__ __forceinline__ int64_t end(int64_t b) const { return lengths ? lengths[b] : S; }
  // For j < end(b) only.
  __device__ __forceinline__ bool attends(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * S + j];
  }
};

template <typename scalar_t, typename acc_t>
struct DotForwardParams {
  const scalar_t* query;   // (B, Tq, D)
  const scalar_t* keys;    // (B, S, D)
  const scalar_t* values;  // (B, S, Dv)
  KeyMask keymask;
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
  int64_t B, Tq, S, D, Dv;
  int64_t splits, split_len;
  acc_t scale;
};

template <typename scalar_t, typename acc_t>
struct DotBackwardParams {
  const scalar_t* grad_context;  // (B, Tq, Dv)
  const scalar_t* grad_weights;  // (B, Tq, S) or nullptr
  const scalar_t* query;
  const scalar_t* keys;
  const scalar_t* values;
  KeyMask keymask;
  const acc_t* lse;  // (B, Tq)
  scalar_t* grad_query;   // (B, Tq, D)
  scalar_t* grad_keys;    // (B, S, D)
  scalar_t* grad_values;  // (B, S, Dv); nullptr: keys are the values, grad_keys gets both
  // Scratch (B, Tq, S), written by phase 1 for attending keys only, read by phase 2.
  acc_t* probs;
  acc_t* dscores;
  int64_t B, Tq, S, D, Dv;
  acc_t scale;
};

}  // namespace attention_ext
