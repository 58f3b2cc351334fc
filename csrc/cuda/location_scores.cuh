// What the location-sensitive op's forward and backward kernels share: the block shape,
// the tile of positions a block works on, the attended positions of a row, the sigmoid
// normalisation's arithmetic, and the score's pieces for one tile: the location features
// L of its positions, staged in shared memory, and the pre-activation
// z[j, a] = query_proj[a] + keys_proj[j, a] + sum_f U[a, f] L[j, f], one unit per lane.
// Nothing of size S x A or S x F per row exists: z and tanh live in registers, L for one
// tile in shared memory.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/key_positions.h"
#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"

namespace attention_ext {

constexpr int kLocationThreads = 128;
constexpr int kLocationWarps = kLocationThreads / kWarpSize;
// A tile's positions at most, dealt to the warps (kWarpPositions each).
constexpr int kLocationTile = kWarpSize;
// Location features a block stages (a tile's positions x the filters, rows padded to an
// odd stride so that a warp's column access is free of bank conflicts).
constexpr int kStagedFeatures = 1024;

// The stride of a tile's rows of location features: odd, so that lanes reading one filter
// of consecutive positions hit distinct banks.
HOST_DEVICE_INLINE int64_t feature_stride(int64_t F) { return F | 1; }

// Positions per tile: kLocationTile, fewer where the filters' rows would not fit in
// kStagedFeatures (at least one while F < kStagedFeatures, which the host checks).
HOST_DEVICE_INLINE int64_t location_tile(int64_t F) {
  return std::min<int64_t>(kLocationTile, kStagedFeatures / feature_stride(F));
}

// Query row b attends j in [first, last) (its window and lengths) where its mask allows.
struct AttendedRange {
  int64_t first, last;

  __device__ __forceinline__ bool overlaps(int64_t j0, int64_t n) const {
    return j0 < last && j0 + n > first;
  }
};

__device__ __forceinline__ AttendedRange attended_range(const KeyPositions& positions,
                                                        const AttendedWindow& window,
                                                        int64_t b) {
  const int64_t first = window.start(b);
  return AttendedRange{first, std::max(first, std::min(window.end(b), positions.end(b)))};
}

__device__ __forceinline__ bool attends(const KeyPositions& positions,
                                        const AttendedRange& range, int64_t b, int64_t j) {
  return j >= range.first && j < range.last && positions.attends(b, j);
}

// The reduction of one value per thread over the block, in every thread, combined in warp
// order (the same bits on every run). Every thread of the block calls it together.
template <int kWarps, typename T, typename WarpReduce, typename Combine>
__device__ __forceinline__ T block_reduce(T v, T (&per_warp)[kWarps], WarpReduce warp_reduce,
                                          Combine combine) {
  v = warp_reduce(v);
  if (lane_id() == 0) per_warp[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T out = per_warp[0];
  for (int w = 1; w < kWarps; ++w) out = combine(out, per_warp[w]);
  __syncthreads();  // per_warp is free again
  return out;
}

// The block's tile: positions [j0, j0 + n) of query row b.
struct LocationTile {
  int64_t b, j0, n;
};

__device__ __forceinline__ LocationTile location_tile_of(int64_t tile, int64_t tiles, int64_t size,
                                                         int64_t S) {
  const int64_t j0 = (tile % tiles) * size;
  return LocationTile{tile / tiles, j0, std::min(size, S - j0)};
}

// features[jj * feature_stride(F) + f] = L[j0 + jj, f] for jj < n, by the whole block
// (the caller synchronises before reading). Lanes take consecutive positions: their prev
// reads are contiguous and the filter's taps are the same address in every lane.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void location_features(const LocationScoreInputs<scalar_t, acc_t>& in,
                                                  int64_t S, const LocationTile& t,
                                                  acc_t* features) {
  const int64_t P = (in.K - 1) / 2, ld = feature_stride(in.F);
  const scalar_t* prev = in.prev + t.b * in.C * S;
  for (int64_t idx = threadIdx.x; idx < t.n * in.F; idx += kLocationThreads) {
    const int64_t f = idx / t.n, jj = idx % t.n, j = t.j0 + jj;
    // Taps whose input lies in [0, S): the zero padding adds nothing.
    const int64_t k_lo = std::max<int64_t>(0, P - j), k_hi = std::min(in.K, S + P - j);
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < in.C; ++c) {
      const scalar_t* w = in.conv_weight + (f * in.C + c) * in.K;
      const scalar_t* x = prev + c * S + j - P;
      for (int64_t k = k_lo; k < k_hi; ++k) {
        sum += static_cast<acc_t>(w[k]) * static_cast<acc_t>(x[k]);
      }
    }
    features[jj * ld + f] = sum;
  }
}

// A warp's positions of a tile: jj = warp + kLocationWarps * i for i < kWarpPositions, so
// that each lane's loads of its unit's row of U serve all of them.
constexpr int kWarpPositions = kLocationTile / kLocationWarps;

__device__ __forceinline__ int64_t warp_position(int warp, int i) {
  return warp + int64_t(kLocationWarps) * i;
}

// z[i] = z[j, a] for unit a < A at the warp's positions j = j0 + warp_position(warp, i)
// where live[i] (the same in every lane), 0 elsewhere: an unattended position's keys_proj
// row (padding past the lengths) is never read.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_pre_activations(
    const LocationScoreInputs<scalar_t, acc_t>& in, int64_t S, int64_t b, int64_t m,
    const LocationTile& t, int warp, const bool (&live)[kWarpPositions], int64_t a,
    const acc_t* features, acc_t (&z)[kWarpPositions]) {
  const int64_t ld = feature_stride(in.F);
  const acc_t q = static_cast<acc_t>(in.query_proj[b * in.A + a]);
  const scalar_t* keys = in.keys_proj + (m * S + t.j0) * in.A + a;
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    z[i] = live[i] ? q + static_cast<acc_t>(keys[warp_position(warp, i) * in.A]) : acc_t(0);
  }
  const scalar_t* u = in.location_weight + a * in.F;
  for (int64_t f = 0; f < in.F; ++f) {
    const acc_t uf = static_cast<acc_t>(u[f]);
#pragma unroll
    for (int i = 0; i < kWarpPositions; ++i) {
      if (live[i]) z[i] += uf * features[warp_position(warp, i) * ld + f];
    }
  }
}

// The warp's attended positions of the tile: live[i] as warp_pre_activations takes it.
__device__ __forceinline__ void warp_live_positions(const KeyPositions& positions,
                                                    const AttendedRange& range,
                                                    const LocationTile& t, int warp,
                                                    bool (&live)[kWarpPositions]) {
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    const int64_t jj = warp_position(warp, i);
    live[i] = jj < t.n && attends(positions, range, t.b, t.j0 + jj);
  }
}

// e_j at the warp's live positions (lanes over the units), in every lane; 0 elsewhere.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_location_scores(
    const LocationScoreInputs<scalar_t, acc_t>& in, int64_t S, int64_t m, const LocationTile& t,
    int warp, const bool (&live)[kWarpPositions], const acc_t* features,
    acc_t (&e)[kWarpPositions]) {
  acc_t sum[kWarpPositions] = {};
  for (int64_t a = lane_id(); a < in.A; a += kWarpSize) {
    acc_t z[kWarpPositions];
    warp_pre_activations(in, S, t.b, m, t, warp, live, a, features, z);
    const acc_t va = static_cast<acc_t>(in.v[a]);
#pragma unroll
    for (int i = 0; i < kWarpPositions; ++i) sum[i] += va * score_tanh(z[i]);
  }
  const acc_t bias = in.score_bias ? static_cast<acc_t>(in.score_bias[0]) : acc_t(0);
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    e[i] = live[i] ? in.scale * warp_sum(sum[i]) + bias : acc_t(0);
  }
}

}  // namespace attention_ext
