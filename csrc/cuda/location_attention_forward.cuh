// The location-sensitive op's forward, two launches:
//  1. location_scores_kernel, one block per (row, tile of positions): the tile's location
//     features in shared memory, then each warp scores its positions of the tile (lanes
//     over the units) into the (B, S) scratch; tiles with no attended position do nothing;
//  2. location_context_kernel, one block per (row, slice of the context): the row's
//     normaliser (softmax or sigmoid) from the scores, the weights and lse (the row's first
//     slice), and the slice of the context, one element per thread.
#pragma once

#include <cstdint>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "location_scores.cuh"

namespace attention_ext {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLocationThreads)
    location_scores_kernel(const LocationForwardParams<scalar_t, acc_t> p) {
  const LocationTile t = location_tile_of(blockIdx.x, p.tiles, p.tile, p.S);
  const AttendedRange range = attended_range(p.positions, p.window, t.b);
  if (!range.overlaps(t.j0, t.n)) return;
  __shared__ acc_t features[kStagedFeatures];
  location_features(p, p.S, t, features);
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  bool live[kWarpPositions];
  warp_live_positions(p.positions, range, t, warp, live);
  acc_t e[kWarpPositions];
  warp_location_scores(p, p.S, p.positions.row(t.b), t, warp, live, features, e);
  if (lane_id() != 0) return;
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    if (live[i]) p.scores[t.b * p.S + t.j0 + warp_position(warp, i)] = e[i];
  }
}

// The weights of a row from its scores: softmax, exp(e_j - max) / sum, or the sigmoid
// normalisation, sigmoid(e_j) / sum; lse is log of the sum (plus max for softmax), -inf
// for a row with nothing attended (its weights 0).
template <typename acc_t>
struct RowNormaliser {
  acc_t max, inv_sum, lse;
  bool sigmoid;

  __device__ __forceinline__ acc_t weight(acc_t e) const {
    return sigmoid ? stable_sigmoid(e) * inv_sum : ae_exp(e - max) * inv_sum;
  }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RowNormaliser<acc_t> row_normaliser(
    const LocationForwardParams<scalar_t, acc_t>& p, int64_t b, const AttendedRange& range) {
  __shared__ acc_t per_warp[kLocationWarps];
  const acc_t* e = p.scores + b * p.S;
  const auto sum = [](acc_t x, acc_t y) { return x + y; };
  const auto warp_sum_of = [](acc_t x) { return warp_sum(x); };
  if (p.sigmoid) {
    acc_t mine = acc_t(0);
    for (int64_t j = range.first + threadIdx.x; j < range.last; j += kLocationThreads) {
      if (p.positions.attends(b, j)) mine += stable_sigmoid(e[j]);
    }
    const acc_t total = block_reduce(mine, per_warp, warp_sum_of, sum);
    // A NaN total reaches lse and the weights; only a row with nothing attended sums to 0.
    const bool empty = total == acc_t(0);
    return RowNormaliser<acc_t>{acc_t(0), empty ? acc_t(0) : acc_t(1) / total,
                                empty ? neg_inf<acc_t>() : ae_log(total), true};
  }
  acc_t mine = neg_inf<acc_t>();
  for (int64_t j = range.first + threadIdx.x; j < range.last; j += kLocationThreads) {
    if (p.positions.attends(b, j)) mine = ae_max(mine, e[j]);
  }
  SoftmaxState<acc_t> state = softmax_init<acc_t>();
  state.max = block_reduce(
      mine, per_warp, [](acc_t x) { return warp_max(x); },
      [](acc_t x, acc_t y) { return ae_max(x, y); });
  acc_t my_sum = acc_t(0);
  for (int64_t j = range.first + threadIdx.x; j < range.last; j += kLocationThreads) {
    if (p.positions.attends(b, j)) my_sum += ae_exp(e[j] - state.max);
  }
  state.sum = block_reduce(my_sum, per_warp, warp_sum_of, sum);
  return RowNormaliser<acc_t>{state.max, softmax_inv_sum(state), softmax_lse(state), false};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLocationThreads)
    location_context_kernel(const LocationForwardParams<scalar_t, acc_t> p) {
  const int64_t b = blockIdx.x / p.slices, slice = blockIdx.x % p.slices;
  const AttendedRange range = attended_range(p.positions, p.window, b);
  const RowNormaliser<acc_t> norm = row_normaliser(p, b, range);
  const acc_t* e = p.scores + b * p.S;
  const auto weight = [&](int64_t j) {
    return attends(p.positions, range, b, j) ? norm.weight(e[j]) : acc_t(0);
  };
  if (slice == 0) {
    if (threadIdx.x == 0) p.lse[b] = norm.lse;
    if (p.weights != nullptr) {
      for (int64_t j = threadIdx.x; j < p.S; j += kLocationThreads) {
        p.weights[b * p.S + j] = static_cast<scalar_t>(weight(j));
      }
    }
  }
  // Rounds of kLocationThreads positions: each thread computes one weight into shared
  // memory, then every thread adds the round's value rows at its context element.
  __shared__ acc_t round_weights[kLocationThreads];
  const int64_t d = slice * kLocationThreads + threadIdx.x;
  const scalar_t* values = p.values + p.positions.row(b) * p.S * p.Dv;
  acc_t ctx = acc_t(0);
  for (int64_t j0 = range.first; j0 < range.last; j0 += kLocationThreads) {
    const int64_t j = j0 + threadIdx.x;
    round_weights[threadIdx.x] = j < range.last ? weight(j) : acc_t(0);
    __syncthreads();
    const int64_t n = std::min<int64_t>(kLocationThreads, range.last - j0);
    if (d < p.Dv) {
      for (int64_t u = 0; u < n; ++u) {
        const acc_t w = round_weights[u];
        if (w != acc_t(0)) ctx += w * static_cast<acc_t>(values[(j0 + u) * p.Dv + d]);
      }
    }
    __syncthreads();  // round_weights is rewritten next round
  }
  if (d < p.Dv) p.context[b * p.Dv + d] = static_cast<scalar_t>(ctx);
}

}  // namespace attention_ext
