// The additive op's query-tile path (Tq >= kQueryTileMinRows: teacher forcing and its
// backward): what its tile products (tile_products.cuh) compute, beside the shared steps
// of query_tiles.cuh, and its tanh gradients' kernel; additive_attention_kernel.cu
// launches them (with launches.cuh). The score sum_a v[a] tanh(qp_t[a] + kp_j[a]) is
// formed tile by tile (FMAs and tanh in the accumulation type), never as a B x Tq x S x A
// tensor:
//  forward: scores -> lse and weights -> context = P V;
//  backward: p from the recomputed score and lse, and dp = dO V^T + grad_weights (one pair
//    product kernel) -> ds = p (dp - delta) -> grad_values = P^T dO, and both sides' tanh
//    gradients and grad_v's shares in one pass that computes each tanh once
//    (tanh_grads_kernel), then grad_v from the shares, summed in batch order
//    (additive_grad_v_kernel). tanh is computed twice in the backward: for the score, and
//    for the gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "kernel_params.cuh"
#include "query_tiles.cuh"
#include "softmax_backward.cuh"
#include "tile_products.cuh"

namespace attention_ext {

// The pair products (pair_product_kernel, tile_products.cuh) of the forward: the scores
// of the attending keys, into p.scores; of the backward (kBackward): the recomputed score
// and <g_t, v_j>, to write_p_dp.
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
struct AdditivePairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = kBackward ? 2 : 1;
  static constexpr bool kTanhScore = true;
  std::conditional_t<kBackward, AdditiveBackwardParams<scalar_t, acc_t>,
                     AdditiveForwardParams<scalar_t, acc_t>>
      p;
  int64_t B, M, N;

  // Product 1, the backward's <g_t, v_j>; product 0, the score.
  __device__ __forceinline__ static bool grad_product(int i) { return kBackward && i == 1; }

  __device__ __forceinline__ int64_t len(int i) const { return grad_product(i) ? p.Dv : p.A; }
  __device__ __forceinline__ const scalar_t* v() const { return p.v; }
  __device__ __forceinline__ const scalar_t* x(int i, int64_t b, int64_t t) const {
    if constexpr (kBackward) {
      const int64_t row = b * p.Tq + t;
      return grad_product(i) ? p.grad_context + row * p.Dv : p.query_proj + row * p.A;
    } else {
      return p.query_proj + (b * p.Tq + t) * p.A;
    }
  }
  __device__ __forceinline__ const scalar_t* y(int i, int64_t b, int64_t j) const {
    return grad_product(i) ? attending_row(p.positions, p.values, p.S, p.Dv, b, j)
                           : attending_row(p.positions, p.keys_proj, p.S, p.A, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    if constexpr (kBackward) {
      write_p_dp(p, b, t, j, c[0], c[1]);
    } else {
      p.scores[(b * p.Tq + t) * p.S + j] = c[0];
    }
  }
};

// The tanh gradients of both sides in one pass over (t, j, a), each tanh computed once:
//   grad_query_proj[t, a] = v[a] sum_j ds_tj (1 - h_tja^2),
//   grad_keys_proj[j, a] = v[a] sum_t ds_tj (1 - h_tja^2),
//   grad_v's share of batch element b: sum_{t, j} ds_tj h_tja,
// h_tja = tanh(qp_t[a] + kp_j[a]). One block per (b, 32 columns a) owns all of b's query
// rows and keys for its columns, so every sum is one block's, in a fixed order: keys in
// tiles of 32 (outer loop), query rows in tiles of 32 (inner). Thread (warp w, lane l)
// takes column 8 w + l % 8 and the 8 keys from 8 (l / 8) of the key tile: its key-side
// sums stay in registers over all query rows; the query side's sum over the tile's keys is
// its 8 terms plus shuffles over the 4 lanes of its column. With more than one key tile
// the query side's running sums go through query_sums ((B, Tq, A), acc_t).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kTileThreads)
    tanh_grads_kernel(const AdditiveBackwardParams<scalar_t, acc_t> p, acc_t* query_sums) {
  constexpr int kLd = kTile + 16 / static_cast<int>(sizeof(acc_t));
  constexpr int kKeysPerThread = 8;
  static_assert(kTileThreads == kTile * kTile / kKeysPerThread, "a thread per (column, 8 keys)");
  __shared__ acc_t qs[kTile][kLd], ks[kTile][kLd], cs[kTile][kLd];
  __shared__ acc_t query_part[kTile][kTile + 1];
  const int64_t a_tiles = ceil_div(p.A, kTile);
  const int64_t b = blockIdx.x / a_tiles;
  const int64_t a0 = (blockIdx.x % a_tiles) * kTile;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int col = (tid / kWarpSize) * 8 + lane % 8;
  const int key0 = (lane / 8) * kKeysPerThread;
  const bool col_live = a0 + col < p.A;
  const int64_t key_tiles = ceil_div(p.S, kTile);
  acc_t share = acc_t(0);

  LineShare<VEC, scalar_t, kTile> key_rows, query_rows;
  for (int64_t jt = 0; jt < key_tiles; ++jt) {
    const int64_t j0 = jt * kTile;
    key_rows.fetch(a0, p.A, [&](int l) {
      return j0 + l < p.S ? attending_row(p.positions, p.keys_proj, p.S, p.A, b, j0 + l)
                          : nullptr;
    });
    key_rows.put(ks);
    __syncthreads();
    acc_t key[kKeysPerThread], key_sum[kKeysPerThread];
#pragma unroll
    for (int u = 0; u < kKeysPerThread; ++u) {
      key[u] = ks[key0 + u][col];
      key_sum[u] = acc_t(0);
    }
    for (int64_t t0 = 0; t0 < p.Tq; t0 += kTile) {
      query_rows.fetch(a0, p.A, [&](int l) -> const scalar_t* {
        return t0 + l < p.Tq ? p.query_proj + (b * p.Tq + t0 + l) * p.A : nullptr;
      });
      stage_coefficients<acc_t>(cs, [&](int m, int k) {
        const int64_t t = t0 + m, j = j0 + k;
        return t < p.Tq && j < p.S ? p.dscores[(b * p.Tq + t) * p.S + j] : acc_t(0);
      });
      query_rows.put(qs);
      __syncthreads();
      const int rows = static_cast<int>(std::min<int64_t>(kTile, p.Tq - t0));  // block-wide
      for (int m = 0; m < rows; ++m) {
        const acc_t x = qs[m][col];
        acc_t part = acc_t(0);
#pragma unroll
        for (int u = 0; u < kKeysPerThread; ++u) {
          const acc_t c = cs[m][key0 + u];
          const acc_t h = score_tanh(x + key[u]);
          const acc_t e = c * (acc_t(1) - h * h);
          key_sum[u] += e;
          part += e;
          share += c * h;
        }
        part += __shfl_xor_sync(kFullWarpMask, part, 8);
        part += __shfl_xor_sync(kFullWarpMask, part, 16);
        if (lane < 8) query_part[m][col] = part;
      }
      // query_part is complete, and qs, cs and ks are read no more in this query tile, so
      // the next tile's stores to them need no barrier of their own; query_part is next
      // written after the next tile's first barrier, which every thread reaches only once
      // it is done with the sums below.
      __syncthreads();
      // The query side: this key tile's sums added to the earlier tiles', in tile order.
      for (int i = tid; i < kTile * kTile; i += kTileThreads) {
        const int m = i / kTile, n = i % kTile;
        if (m >= rows || a0 + n >= p.A) continue;
        const int64_t at = (b * p.Tq + t0 + m) * p.A + a0 + n;
        acc_t sum = query_part[m][n];
        if (jt > 0) sum += query_sums[at];
        if (jt + 1 < key_tiles) {
          query_sums[at] = sum;
        } else {
          p.grad_query_proj[at] = static_cast<scalar_t>(static_cast<acc_t>(p.v[a0 + n]) * sum);
        }
      }
    }
    if (col_live) {
      const acc_t v = static_cast<acc_t>(p.v[a0 + col]);
#pragma unroll
      for (int u = 0; u < kKeysPerThread; ++u) {
        const int64_t j = j0 + key0 + u;
        if (j >= p.S) break;
        const bool live = j < p.positions.end(b) && p.positions.attends(b, j);
        p.grad_keys_proj[(b * p.S + j) * p.A + a0 + col] =
            live ? static_cast<scalar_t>(v * key_sum[u]) : scalar_t(0);
      }
    }
  }
  share += __shfl_xor_sync(kFullWarpMask, share, 8);
  share += __shfl_xor_sync(kFullWarpMask, share, 16);
  if (lane < 8 && col_live) p.grad_v_partials[b * p.A + a0 + col] = share;
}

}  // namespace attention_ext
