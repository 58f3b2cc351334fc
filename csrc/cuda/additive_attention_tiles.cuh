// The additive op's query-tile path (Tq >= kQueryTileMinRows: teacher forcing and its
// backward), on the tile products of tile_products.cuh and the shared steps of
// query_tiles.cuh. The score sum_a v[a] tanh(qp_t[a] + kp_j[a]) is formed tile by tile
// (FMAs and tanh in the accumulation type), never as a B x Tq x S x A tensor:
//  forward: scores -> lse and weights -> context = P V;
//  backward: p from the recomputed score and lse, and dp = dO V^T + grad_weights (one pair
//    product kernel) -> ds = p (dp - delta) -> grad_values = P^T dO, and the tanh
//    gradients (tanh_grad_kernel), tanh recomputed once per side:
//      grad_query_proj[t, a] = v[a] sum_j ds_tj (1 - tanh_tja^2), with grad_v's shares
//        sum_{t, j} ds_tj tanh_tja per block of 32 query rows;
//      grad_keys_proj[j, a] = v[a] sum_t ds_tj (1 - tanh_tja^2);
//    then grad_v from the shares, summed in block order (additive_grad_v_kernel).
#pragma once

#include <cstdint>

#include "additive_attention_backward.cuh"
#include "kernel_params.cuh"
#include "query_tiles.cuh"
#include "tile_products.cuh"

namespace attention_ext {

// Forward: scores[b, t, j] for the attending keys.
template <typename scalar_t, typename acc_t, int VEC>
struct AdditiveScorePairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 1;
  static constexpr bool kTanhScore = true;
  AdditiveForwardParams<scalar_t, acc_t> p;
  int64_t B, M, N;

  __device__ __forceinline__ int64_t len(int) const { return p.A; }
  __device__ __forceinline__ const scalar_t* v() const { return p.v; }
  __device__ __forceinline__ const scalar_t* x(int, int64_t b, int64_t t) const {
    return p.query_proj + (b * p.Tq + t) * p.A;
  }
  __device__ __forceinline__ const scalar_t* y(int, int64_t b, int64_t j) const {
    return attending_row(p.positions, p.keys_proj, p.S, p.A, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    p.scores[(b * p.Tq + t) * p.S + j] = c[0];
  }
};

// Backward: the recomputed score and <g_t, v_j>, to write_p_dp.
template <typename scalar_t, typename acc_t, int VEC>
struct AdditiveGradPairs : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr int kProducts = 2;
  static constexpr bool kTanhScore = true;
  AdditiveBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, N;

  __device__ __forceinline__ int64_t len(int i) const { return i == 0 ? p.A : p.Dv; }
  __device__ __forceinline__ const scalar_t* v() const { return p.v; }
  __device__ __forceinline__ const scalar_t* x(int i, int64_t b, int64_t t) const {
    const int64_t row = b * p.Tq + t;
    return i == 0 ? p.query_proj + row * p.A : p.grad_context + row * p.Dv;
  }
  __device__ __forceinline__ const scalar_t* y(int i, int64_t b, int64_t j) const {
    return i == 0 ? attending_row(p.positions, p.keys_proj, p.S, p.A, b, j)
                  : attending_row(p.positions, p.values, p.S, p.Dv, b, j);
  }
  __device__ __forceinline__ void finish(int64_t b, int64_t t, int64_t j, const acc_t* c) const {
    write_p_dp(p, b, t, j, c[0], c[1]);
  }
};

// One side's tanh gradient: own rows x_m (query_proj rows, or keys_proj rows of the keys)
// against partner rows y_k, weighted by c(m, k) = ds (or its transpose):
//   out_m[a] = v[a] sum_k c(m, k) (1 - tanh(x_m[a] + y_k[a])^2),
// and on the query side (kQuerySide) the block's share of grad_v,
//   share[a] = sum_{m, k} c(m, k) tanh(x_m[a] + y_k[a]).
template <typename scalar_t, typename acc_t, int VEC, bool kQuery>
struct TanhGradSide : KernelTypes<scalar_t, acc_t, VEC> {
  static constexpr bool kQuerySide = kQuery;
  AdditiveBackwardParams<scalar_t, acc_t> p;
  int64_t B, M, K, N;

  __device__ __forceinline__ const scalar_t* x(int64_t b, int64_t m) const {
    return kQuerySide ? p.query_proj + (b * p.Tq + m) * p.A
                      : attending_row(p.positions, p.keys_proj, p.S, p.A, b, m);
  }
  __device__ __forceinline__ const scalar_t* y(int64_t b, int64_t k) const {
    return kQuerySide ? attending_row(p.positions, p.keys_proj, p.S, p.A, b, k)
                      : p.query_proj + (b * p.Tq + k) * p.A;
  }
  __device__ __forceinline__ acc_t coef(int64_t b, int64_t m, int64_t k) const {
    return kQuerySide ? p.dscores[(b * p.Tq + m) * p.S + k] : p.dscores[(b * p.Tq + k) * p.S + m];
  }
  __device__ __forceinline__ scalar_t* out(int64_t b, int64_t m) const {
    return kQuerySide ? p.grad_query_proj + (b * p.Tq + m) * p.A
                      : p.grad_keys_proj + (b * p.S + m) * p.A;
  }
  __device__ __forceinline__ bool live(int64_t b, int64_t m) const {
    return kQuerySide || (m < p.positions.end(b) && p.positions.attends(b, m));
  }
};

// One block per (b, 32 own rows, 32 columns a); the partner rows in steps of 32. Thread
// (tm, tn) owns rows tm + 16 i and columns tn + 8 j, as TileAccumulator's FMA tiles; a
// thread sums its grad_v share in (k, i) order, then the block over tm in order.
template <typename Side>
__global__ void __launch_bounds__(kTileThreads) tanh_grad_kernel(const Side w) {
  using scalar_t = typename Side::scalar_t;
  using acc_t = typename Side::acc_t;
  constexpr int kLd = kTile + 16 / static_cast<int>(sizeof(acc_t));
  constexpr int kRows = 2, kCols = 4;
  constexpr int kRowGroups = kTileThreads / 8;
  __shared__ acc_t xs[kTile][kLd], ys[kTile][kLd], cs[kTile][kLd];
  __shared__ acc_t shares[kRowGroups][kTile];
  const int64_t m_tiles = ceil_div(w.M, kTile);
  const TileIndex at = tile_index(m_tiles, ceil_div(w.N, kTile));
  const int tm = static_cast<int>(threadIdx.x) / 8, tn = static_cast<int>(threadIdx.x) % 8;

  stage_lines<Side::kVec, acc_t>(xs, at.n0, w.N, [&](int l) {
    return at.m0 + l < w.M ? w.x(at.b, at.m0 + l) : nullptr;
  });
  acc_t g[kRows][kCols] = {}, share[kCols] = {};
  LineShare<Side::kVec, scalar_t, kTile> partners;
  for (int64_t k0 = 0; k0 < w.K; k0 += kTile) {
    // The partner rows' loads fly while the coefficients are loaded.
    partners.fetch(at.n0, w.N, [&](int l) { return k0 + l < w.K ? w.y(at.b, k0 + l) : nullptr; });
    stage_coefficients<acc_t>(cs, [&](int m, int k) {
      const int64_t mm = at.m0 + m, kk = k0 + k;
      return mm < w.M && kk < w.K ? w.coef(at.b, mm, kk) : acc_t(0);
    });
    partners.put(ys);
    __syncthreads();
    for (int k = 0; k < kTile; ++k) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const acc_t c = cs[tm + 16 * i][k];
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const acc_t th = score_tanh(xs[tm + 16 * i][tn + 8 * j] + ys[k][tn + 8 * j]);
          g[i][j] += c * (acc_t(1) - th * th);
          if (Side::kQuerySide) share[j] += c * th;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t m = at.m0 + tm + 16 * i;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t n = at.n0 + tn + 8 * j;
      if (m >= w.M || n >= w.N) continue;
      w.out(at.b, m)[n] = w.live(at.b, m)
                              ? static_cast<scalar_t>(static_cast<acc_t>(w.p.v[n]) * g[i][j])
                              : scalar_t(0);
    }
  }
  if constexpr (Side::kQuerySide) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) shares[tm][tn + 8 * j] = share[j];
    __syncthreads();
    const int n = static_cast<int>(threadIdx.x);
    if (n < kTile && at.n0 + n < w.N) {
      acc_t sum = acc_t(0);
      for (int r = 0; r < kRowGroups; ++r) sum += shares[r][n];
      w.p.grad_v_partials[(at.b * m_tiles + at.m0 / kTile) * w.N + at.n0 + n] = sum;
    }
  }
}

// Rows of grad_v shares the tile backward writes: one per batch element and 32 query rows.
inline int64_t additive_tile_share_rows(int64_t B, int64_t Tq) {
  return B * ceil_div(Tq, kTile);
}

template <int VEC, typename scalar_t, typename acc_t>
void launch_additive_forward_tiles(AdditiveForwardParams<scalar_t, acc_t>& p,
                                   const at::Tensor& like, cudaStream_t stream) {
  launch_forward_tiles<AdditiveScorePairs<scalar_t, acc_t, VEC>>(p, like, stream);
}

// p.grad_v_partials holds additive_tile_share_rows(B, Tq) rows of A.
template <int VEC, typename scalar_t, typename acc_t>
void launch_additive_backward_tiles(const AdditiveBackwardParams<scalar_t, acc_t>& p,
                                    scalar_t* grad_v, cudaStream_t stream) {
  launch_backward_tiles<AdditiveGradPairs<scalar_t, acc_t, VEC>>(p, true, stream);
  using Query = TanhGradSide<scalar_t, acc_t, VEC, true>;
  launch_tiles(tanh_grad_kernel<Query>, Query{{}, p, p.B, p.Tq, p.S, p.A}, stream);
  using Keys = TanhGradSide<scalar_t, acc_t, VEC, false>;
  launch_tiles(tanh_grad_kernel<Keys>, Keys{{}, p, p.B, p.S, p.Tq, p.A}, stream);
  launch_kernel(additive_grad_v_kernel<scalar_t, acc_t>,
                dim3(static_cast<unsigned>(ceil_div(p.A, kGradVThreads))), dim3(kGradVThreads),
                0, stream, static_cast<const acc_t*>(p.grad_v_partials),
                additive_tile_share_rows(p.B, p.Tq), p.A, grad_v);
}

}  // namespace attention_ext
