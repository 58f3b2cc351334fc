// The score functors of blocked_softmax.h, one per op, on rows of the accumulation type:
// score(q_rows, M, key_rows, n, Dk, out) writes out[m * kBlock + i], the score of query
// row m against key row i.
#pragma once

#include <cstdint>

#include "blocked_softmax.h"
#include "gemm_tiles.h"
#include "vec_ops.h"
#include "vec_tanh.h"

namespace attention_ext {
namespace cpu {

// score = scale * <q, k> for a tile of query rows against a block of key rows.
template <typename acc_t>
struct DotScore {
  acc_t scale;
  void operator()(const acc_t* const* q, int64_t M, const acc_t* const* k, int64_t n,
                  int64_t D, acc_t* out) const {
    nt_tile(q, M, k, n, D, out, kBlock);
    if (scale == acc_t(1)) return;  // Luong's unscaled dot, the default
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < n; ++i) out[m * kBlock + i] *= scale;
  }
};

// out[m * ldo + i] = sum_a v[a] tanh(q[m][a] + k[i][a]) for MR query rows and n key rows:
// each key vector is loaded once for all MR queries. Tails are loaded zero-filled, and
// v = 0 there, so they add nothing.
template <typename T, int MR>
inline void tanh_score_rows(const T* const* q, const T* const* k, int64_t n, const T* v,
                            int64_t A, T* out, int64_t ldo) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t i = 0; i < n; ++i) {
    V acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = V(T(0));
    int64_t a = 0;
    for (; a + W <= A; a += W) {
      const V kv = V::loadu(k[i] + a), vv = V::loadu(v + a);
      for (int m = 0; m < MR; ++m)
        acc[m] = at::vec::fmadd(vv, vec_tanh(V::loadu(q[m] + a) + kv), acc[m]);
    }
    if (a < A) {
      const V kv = load_tail(k[i], a, A), vv = load_tail(v, a, A);
      for (int m = 0; m < MR; ++m)
        acc[m] = at::vec::fmadd(vv, vec_tanh(load_tail(q[m], a, A) + kv), acc[m]);
    }
    for (int m = 0; m < MR; ++m) out[m * ldo + i] = hsum(acc[m]);
  }
}

// The additive score for blocked_softmax.h: v . tanh(q + k).
template <typename T>
struct TanhScore {
  const T* v;  // (A,)
  void operator()(const T* const* q, int64_t M, const T* const* k, int64_t n, int64_t A,
                  T* out) const {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tanh_score_rows<T, 4>(q + m, k, n, v, A, out + m * kBlock, kBlock);
    switch (M - m) {
      case 3: tanh_score_rows<T, 3>(q + m, k, n, v, A, out + m * kBlock, kBlock); break;
      case 2: tanh_score_rows<T, 2>(q + m, k, n, v, A, out + m * kBlock, kBlock); break;
      case 1: tanh_score_rows<T, 1>(q + m, k, n, v, A, out + m * kBlock, kBlock); break;
      default: break;
    }
  }
};

}  // namespace cpu
}  // namespace attention_ext
