// The kernels' arguments. The softmax part (values, key positions, outputs or gradients,
// workspace, sizes) is what the code shared by both ops reads (attention_forward.cuh,
// softmax_backward.cuh); each op's params derive from it and add what its scores need.
// All tensors are contiguous; sizes are 64-bit. Memory-side inputs (keys, values) have M
// rows, read for query row b at positions.row(b); their gradients have one (S, width) slice
// per query row b (inputs.h: MemoryGradient).
#pragma once

#include <cstdint>

#include "attention_ext/key_positions.h"

namespace attention_ext {

template <typename scalar_t, typename acc_t>
struct SoftmaxForwardParams {
  const scalar_t* values;  // (M, S, Dv)
  KeyPositions positions;
  scalar_t* context;  // (B, Tq, Dv)
  scalar_t* weights;  // (B, Tq, S), nullptr when need_weights is false
  acc_t* lse;         // (B, Tq)
  // Workspace. scores: raw scores (B, Tq, S), only with weights (it may alias them when
  // scalar_t == acc_t). With splits > 1, per (row, split): ctx_acc the unnormalised context
  // (rows, splits, Dv), part_max / part_sum the softmax state.
  acc_t* scores;
  acc_t* ctx_acc;
  acc_t* part_max;
  acc_t* part_sum;
  int64_t B, Tq, S, Dv;
  // The launch plan (forward_plan.h): source splits, context slices (in chunks of the
  // kernel's vector width), the merge's blocks per row (slices, then weight parts), lanes
  // that score one key together, keys per round, the stage's buffers (0: none) and whether
  // it holds value rows; values_are_keys: the values are the key rows (the stage's key
  // rows serve as both).
  int64_t splits, split_len;
  int64_t slices, slice_chunks;
  int64_t merge_parts;
  int key_lanes;
  int round_keys;
  int stage_buffers;
  bool stage_values;
  bool values_are_keys;
};

template <typename scalar_t, typename acc_t>
struct SoftmaxBackwardParams {
  const scalar_t* grad_context;  // (B, Tq, Dv)
  const scalar_t* grad_weights;  // (B, Tq, S) or nullptr
  const scalar_t* values;        // (M, S, Dv)
  KeyPositions positions;
  const acc_t* lse;       // (B, Tq)
  scalar_t* grad_values;  // (B, S, Dv); dot: unused when the keys are the values
  // Scratch (B, Tq, S): p and dp, then p and ds (softmax_backward.cuh); 0 where a key
  // does not attend.
  acc_t* probs;
  acc_t* dscores;
  int64_t B, Tq, S, Dv;
};

// The dot op: score_j = scale * <query_row, key_j>.
template <typename scalar_t, typename acc_t>
struct DotForwardParams : SoftmaxForwardParams<scalar_t, acc_t> {
  const scalar_t* query;  // (B, Tq, D)
  const scalar_t* keys;   // (M, S, D)
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

// The additive (Bahdanau) op: score_j = sum_a v[a] tanh(query_proj[a] + keys_proj[j, a]).
template <typename scalar_t, typename acc_t>
struct AdditiveForwardParams : SoftmaxForwardParams<scalar_t, acc_t> {
  const scalar_t* query_proj;  // (B, Tq, A)
  const scalar_t* keys_proj;   // (M, S, A)
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
  // grad_v's shares, one row per query row (rows path) or per batch element (tile path);
  // summed in row order by additive_grad_v_kernel: no atomics, the same bits on every run.
  acc_t* grad_v_partials;
  int64_t A;
};

// The location-sensitive op's score inputs (one decoder step, Tq = 1): e_j =
// scale * sum_a v[a] tanh(query_proj[a] + keys_proj[j, a] + sum_f U[a, f] L[j, f]) + bias,
// L[j, f] = sum_{c, k} conv_weight[f, c, k] prev[c, j + k - (K - 1) / 2]. Rows are cut into
// tiles of `tile` positions (location_scores.cuh: location_tile).
template <typename scalar_t, typename acc_t>
struct LocationScoreInputs {
  const scalar_t* query_proj;       // (B, A)
  const scalar_t* keys_proj;        // (M, S, A)
  const scalar_t* prev;             // (B, C, S)
  const scalar_t* conv_weight;      // (F, C, K)
  const scalar_t* location_weight;  // (A, F), U
  const scalar_t* v;                // (A,)
  const scalar_t* score_bias;       // (1,) or nullptr
  AttendedWindow window;
  int64_t A, C, F, K;
  int64_t tile, tiles;  // positions per tile, tiles per row
  acc_t scale;
  bool sigmoid;
};

// The forward: scores holds the raw scores e (B, S); slices (of the context, kLocationThreads
// elements each) per row; the rest of the softmax part is unused.
template <typename scalar_t, typename acc_t>
struct LocationForwardParams : SoftmaxForwardParams<scalar_t, acc_t>,
                               LocationScoreInputs<scalar_t, acc_t> {};

// The backward. slopes: 1 - sigmoid(e_j) (B, S), with sigmoid only. Each block of the
// gradient kernel owns one row of partials (location_backward.cuh: LocationPartials) and
// the tiles of its split of a row; prev_partials: each tile's share of grad_prev over its
// positions widened by the convolution's reach, (B, tiles, C, tile + K - 1). Both zeroed.
template <typename scalar_t, typename acc_t>
struct LocationBackwardParams : SoftmaxBackwardParams<scalar_t, acc_t>,
                                LocationScoreInputs<scalar_t, acc_t> {
  acc_t* slopes;
  scalar_t* grad_keys_proj;  // (B, S, A)
  acc_t* partials;           // (B * splits, LocationPartials::width)
  acc_t* prev_partials;
  int64_t splits;
};

}  // namespace attention_ext
