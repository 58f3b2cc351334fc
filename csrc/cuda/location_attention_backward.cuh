// The location-sensitive op's backward; deterministic (no atomics), every sum in a fixed
// order:
//  1. location_backward_probs_kernel, one block per (row, tile): the scores recomputed as
//     the forward computes them, then p_j and dp_j = <grad_context, values_j> + grad_weights_j
//     (write_p_dp, softmax_backward.cuh; with sigmoid p_j from log sigmoid(e_j) and the
//     slope 1 - sigmoid(e_j) kept);
//  2. softmax_grad_rows_kernel (softmax_backward.cuh): p normalised, ds_j = p_j (dp_j - D);
//  3. location_grads_kernel, one block per (row, split), walking its split's tiles: L of a
//     tile recomputed in shared memory; per round of 32 units, z and tanh recomputed, dz into
//     shared memory, grad_keys_proj written, gL accumulated in shared memory; then the
//     block's partials of grad_query_proj, grad_v, grad_location_weight, grad_conv_weight
//     and grad_score_bias, the tile's share of grad_prev over its positions widened by the
//     convolution's reach, and grad_values;
//  4. sum_partials_kernel and location_grad_prev_kernel: the partials summed in block and
//     tile order.
// Scratch: (B, S) rows and partials per block and tile; never B x S x A or B x S x F.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "location_scores.cuh"
#include "softmax_backward.cuh"

namespace attention_ext {

// The columns of a gradient block's row of partials: grad_query_proj (A), grad_v (A),
// grad_location_weight (A x F), grad_conv_weight (F x C x K), grad_score_bias (1).
struct LocationPartials {
  int64_t query, v, location_weight, conv_weight, score_bias, width;

  HOST_DEVICE_INLINE LocationPartials(int64_t A, int64_t F, int64_t C, int64_t K)
      : query(0), v(A), location_weight(2 * A), conv_weight(2 * A + A * F),
        score_bias(conv_weight + F * C * K), width(score_bias + 1) {}
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLocationThreads)
    location_backward_probs_kernel(const LocationBackwardParams<scalar_t, acc_t> p) {
  const LocationTile t = location_tile_of(blockIdx.x, p.tiles, p.tile, p.S);
  const AttendedRange range = attended_range(p.positions, p.window, t.b);
  __shared__ acc_t features[kStagedFeatures];
  if (range.overlaps(t.j0, t.n)) location_features(p, p.S, t, features);
  __syncthreads();
  const int64_t m = p.positions.row(t.b);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = lane_id();
  bool live[kWarpPositions];
  warp_live_positions(p.positions, range, t, warp, live);
  acc_t e[kWarpPositions];
  warp_location_scores(p, p.S, m, t, warp, live, features, e);
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    const int64_t jj = warp_position(warp, i), j = t.j0 + jj, at = t.b * p.S + j;
    if (live[i]) {  // the same in every lane
      const scalar_t* values = p.values + (m * p.S + j) * p.Dv;
      const acc_t g = warp_sum(lane_dot<1, scalar_t, acc_t>(p.grad_context + t.b * p.Dv,
                                                            values, p.Dv, lane, kWarpSize));
      if (lane == 0) {
        write_p_dp(p, t.b, 0, j, p.sigmoid ? log_sigmoid(e[i]) : e[i], g);
        if (p.sigmoid) p.slopes[at] = acc_t(1) - stable_sigmoid(e[i]);
      }
    } else if (jj < t.n && lane == 0) {
      p.probs[at] = p.dscores[at] = acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLocationThreads)
    location_grads_kernel(const LocationBackwardParams<scalar_t, acc_t> p) {
  constexpr int kRound = kWarpSize;  // units a round: one per lane
  const int64_t b = blockIdx.x / p.splits, split = blockIdx.x % p.splits;
  const int64_t A = p.A, F = p.F, C = p.C, K = p.K, S = p.S, Dv = p.Dv;
  const int64_t P = (K - 1) / 2, ld = feature_stride(F);
  const LocationPartials cols(A, F, C, K);
  acc_t* partials = p.partials + blockIdx.x * cols.width;
  const AttendedRange range = attended_range(p.positions, p.window, b);
  const int64_t m = p.positions.row(b);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = lane_id();

  __shared__ acc_t features[kStagedFeatures];    // L of the tile
  __shared__ acc_t features_grad[kStagedFeatures];  // gL of the tile
  __shared__ acc_t dz[kLocationTile][kRound + 1];  // this round's dz, padded against conflicts
  __shared__ acc_t dscore[kLocationTile];          // de_j, 0 where j does not attend
  __shared__ acc_t unit_sums[2][kLocationWarps][kRound];  // per warp: sum_j dz, sum_j de h

  for (int64_t tile = split; tile < p.tiles; tile += p.splits) {
    const LocationTile t = location_tile_of(b * p.tiles + tile, p.tiles, p.tile, S);
    scalar_t* grad_keys = p.grad_keys_proj + (b * S + t.j0) * A;
    scalar_t* grad_values = p.grad_values + (b * S + t.j0) * Dv;
    const scalar_t* grad_ctx = p.grad_context + b * Dv;
    const acc_t* probs = p.probs + b * S + t.j0;
    __syncthreads();  // the previous tile's shared rows are read out
    if (!range.overlaps(t.j0, t.n)) {  // nothing attends: zero rows; the partials stay
      for (int64_t i = threadIdx.x; i < t.n * A; i += kLocationThreads) grad_keys[i] = scalar_t(0);
      for (int64_t i = threadIdx.x; i < t.n * Dv; i += kLocationThreads) grad_values[i] = scalar_t(0);
      continue;
    }
    location_features(p, S, t, features);
    for (int64_t jj = threadIdx.x; jj < t.n; jj += kLocationThreads) {
      const int64_t j = t.j0 + jj;
      const acc_t ds = p.dscores[b * S + j];
      dscore[jj] = !attends(p.positions, range, b, j) ? acc_t(0)
                   : p.sigmoid                       ? ds * p.slopes[b * S + j]
                                                     : ds;
    }
    __syncthreads();
    bool live[kWarpPositions];  // the warp's positions with a score gradient
#pragma unroll
    for (int i = 0; i < kWarpPositions; ++i) {
      const int64_t jj = warp_position(warp, i);
      live[i] = jj < t.n && dscore[jj] != acc_t(0);
    }

    for (int64_t a0 = 0; a0 < A; a0 += kRound) {
      const int64_t a = a0 + lane;
      const int64_t units = std::min<int64_t>(kRound, A - a0);
      acc_t sum_dz = acc_t(0), sum_de_h = acc_t(0);
      acc_t z[kWarpPositions] = {};
      if (a < A) warp_pre_activations(p, S, b, m, t, warp, live, a, features, z);
      const acc_t scaled_v = a < A ? p.scale * static_cast<acc_t>(p.v[a]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < kWarpPositions; ++i) {
        const int64_t jj = warp_position(warp, i);
        if (jj >= t.n) continue;
        acc_t g = acc_t(0);
        if (live[i]) {
          const acc_t de = dscore[jj], h = score_tanh(z[i]);
          g = de * scaled_v * (acc_t(1) - h * h);
          sum_de_h += de * h;
        }
        dz[jj][lane] = g;
        sum_dz += g;
        if (a < A) grad_keys[jj * A + a] = static_cast<scalar_t>(g);
      }
      unit_sums[0][warp][lane] = sum_dz;
      unit_sums[1][warp][lane] = sum_de_h;
      __syncthreads();
      if (warp == 0 && a < A) {
        acc_t q = acc_t(0), h = acc_t(0);
        for (int w = 0; w < kLocationWarps; ++w) {
          q += unit_sums[0][w][lane];
          h += unit_sums[1][w][lane];
        }
        partials[cols.query + a] += q;
        partials[cols.v + a] += p.scale * h;
      }
      // gL[jj, f] += sum_a U[a, f] dz[jj, a]; lanes over filters read U's rows in order.
      for (int64_t idx = threadIdx.x; idx < t.n * F; idx += kLocationThreads) {
        const int64_t jj = idx / F, f = idx % F;
        acc_t g = a0 == 0 ? acc_t(0) : features_grad[jj * ld + f];
        for (int64_t u = 0; u < units; ++u) {
          g += static_cast<acc_t>(p.location_weight[(a0 + u) * F + f]) * dz[jj][u];
        }
        features_grad[jj * ld + f] = g;
      }
      // grad_U[a, f] += sum_j dz[j, a] L[j, f].
      for (int64_t idx = threadIdx.x; idx < units * F; idx += kLocationThreads) {
        const int64_t u = idx / F, f = idx % F;
        acc_t g = acc_t(0);
        for (int64_t jj = 0; jj < t.n; ++jj) g += dz[jj][u] * features[jj * ld + f];
        partials[cols.location_weight + (a0 + u) * F + f] += g;
      }
      __syncthreads();  // dz and unit_sums are rewritten next round
    }

    const scalar_t* prev = p.prev + b * C * S;
    // grad_W[f, c, k] += sum_j gL[j, f] prev[c, j + k - P].
    for (int64_t idx = threadIdx.x; idx < F * C * K; idx += kLocationThreads) {
      const int64_t k = idx % K, c = (idx / K) % C, f = idx / (K * C);
      const int64_t jj_lo = std::max<int64_t>(0, P - k - t.j0);
      const int64_t jj_hi = std::min<int64_t>(t.n, S + P - k - t.j0);
      const scalar_t* x = prev + c * S + t.j0 + k - P;
      acc_t g = acc_t(0);
      for (int64_t jj = jj_lo; jj < jj_hi; ++jj) {
        g += features_grad[jj * ld + f] * static_cast<acc_t>(x[jj]);
      }
      partials[cols.conv_weight + idx] += g;
    }
    // The tile's share of grad_prev[c, i] = sum_{f, k} W[f, c, k] gL[i - k + P, f] at
    // i = j0 - P + r, r < n + K - 1 (location_grad_prev_kernel sums the tiles' shares).
    const int64_t reach = p.tile + K - 1;
    acc_t* share = p.prev_partials + (b * p.tiles + tile) * C * reach;
    for (int64_t idx = threadIdx.x; idx < C * (t.n + K - 1); idx += kLocationThreads) {
      const int64_t c = idx / (t.n + K - 1), r = idx % (t.n + K - 1);
      const int64_t jj_lo = std::max<int64_t>(0, r - K + 1), jj_hi = std::min(t.n, r + 1);
      acc_t g = acc_t(0);
      for (int64_t f = 0; f < F; ++f) {
        const scalar_t* w = p.conv_weight + (f * C + c) * K + r;
        for (int64_t jj = jj_lo; jj < jj_hi; ++jj) {
          g += static_cast<acc_t>(w[-jj]) * features_grad[jj * ld + f];
        }
      }
      share[c * reach + r] = g;
    }
    if (threadIdx.x == 0) {
      acc_t g = acc_t(0);
      for (int64_t jj = 0; jj < t.n; ++jj) g += dscore[jj];
      partials[cols.score_bias] += g;
    }
    // grad_values[j] = alpha_j grad_context.
    for (int64_t idx = threadIdx.x; idx < t.n * Dv; idx += kLocationThreads) {
      const int64_t jj = idx / Dv, d = idx % Dv;
      grad_values[idx] = static_cast<scalar_t>(probs[jj] * static_cast<acc_t>(grad_ctx[d]));
    }
  }
}

// out[g, c] = the sum over r < rows, in order, of partials[g * rows + r, col + c]: the
// column range [col, col + cols) of the partials' rows summed in groups of `rows` rows.
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* partials, int64_t width, int64_t col,
                                    int64_t groups, int64_t rows, int64_t cols, scalar_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= groups * cols) return;
  const int64_t g = i / cols, c = i % cols;
  const acc_t* at = partials + g * rows * width + col + c;
  acc_t sum = acc_t(0);
  for (int64_t r = 0; r < rows; ++r) sum += at[r * width];
  out[i] = static_cast<scalar_t>(sum);
}

// grad_prev[b, c, i]: the shares of the tiles whose widened positions hold i, in tile order.
template <typename scalar_t, typename acc_t>
__global__ void location_grad_prev_kernel(const LocationBackwardParams<scalar_t, acc_t> p,
                                          scalar_t* grad_prev) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.B * p.C * p.S) return;
  const int64_t i = idx % p.S, c = (idx / p.S) % p.C, b = idx / (p.C * p.S);
  const int64_t P = (p.K - 1) / 2, reach = p.tile + p.K - 1;
  // Tile t's widened positions are [t tile - P, t tile - P + reach) (fewer for a short last
  // tile, whose share is 0 past them).
  const int64_t t_lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(0, i + P - reach + 1), p.tile));
  const int64_t t_hi = std::min(p.tiles - 1, (i + P) / p.tile);
  acc_t sum = acc_t(0);
  for (int64_t t = t_lo; t <= t_hi; ++t) {
    sum += p.prev_partials[((b * p.tiles + t) * p.C + c) * reach + (i + P - t * p.tile)];
  }
  grad_prev[idx] = static_cast<scalar_t>(sum);
}

}  // namespace attention_ext
