// Register-blocked tiles for the small matrix products inside the CPU kernels, so that
// several queries share each key row loaded from cache (Tq > 1) and accumulators stay in
// registers across the reduction instead of being re-read per key.
//
//   nt_tile:  C(m, n)  = sum_d A(m, d) B(n, d)        (scores: queries x keys)
//   nn_tile:  C(m, :) += sum_k A(m, k) B(k, :)        (context / gradient accumulation)
//
// All operands are in the accumulation type; A(m, k) of nn_tile is read through two
// strides so a transposed A (dS^T in the backward) needs no copy. nn_tile with many rows
// copies B's column panels contiguously first (nn_panels), so they stay in L1 while every
// row block reads them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"
#include "vec_ops.h"

namespace attention_ext {
namespace cpu {

// Scores of MR query rows against NR key rows, each of length D.
template <typename T, int MR, int NR>
inline void nt_micro(const T* const* a, const T* const* b, int64_t D, T* c, int64_t ldc) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = V(T(0));
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = V::loadu(b[n] + d);
    for (int m = 0; m < MR; ++m) {
      const V av = V::loadu(a[m] + d);
      for (int n = 0; n < NR; ++n) acc[m][n] = at::vec::fmadd(av, bv[n], acc[m][n]);
    }
  }
  if (d < D) {
    V bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = load_tail(b[n], d, D);
    for (int m = 0; m < MR; ++m) {
      const V av = load_tail(a[m], d, D);
      for (int n = 0; n < NR; ++n) acc[m][n] = at::vec::fmadd(av, bv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) c[m * ldc + n] = hsum(acc[m][n]);
}

// Blocks of 3 rows to take after the blocks of 4 so that no block of 1 or 2 rows is left
// where that can be avoided: every M >= 6 is a sum of 4s and 3s (M = 30: 6 x 4 + 2 x 3
// rather than 7 x 4 + 2). Each output's sum runs in the same order whatever its block.
inline int64_t blocks_of_three(int64_t M) { return M >= 6 ? (4 - M % 4) % 4 : (M == 3 ? 1 : 0); }

// C (M x N, row stride ldc) = A B^T for M query rows a[m] and N key rows b[n].
template <typename T>
inline void nt_tile(const T* const* a, int64_t M, const T* const* b, int64_t N, int64_t D, T* c,
                    int64_t ldc) {
  // 4 x 3 and 3 x 4 keep 12 accumulators in flight: fewer than about 12 independent FMA
  // chains leave the FMA units waiting on latency.
  const int64_t threes = blocks_of_three(M);
  int64_t m = 0;
  for (; m + 4 <= M - 3 * threes; m += 4) {
    int64_t n = 0;
    for (; n + 3 <= N; n += 3) nt_micro<T, 4, 3>(a + m, b + n, D, c + m * ldc + n, ldc);
    for (; n < N; ++n) nt_micro<T, 4, 1>(a + m, b + n, D, c + m * ldc + n, ldc);
  }
  for (; m + 3 <= M; m += 3) {
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) nt_micro<T, 3, 4>(a + m, b + n, D, c + m * ldc + n, ldc);
    for (; n < N; ++n) nt_micro<T, 3, 1>(a + m, b + n, D, c + m * ldc + n, ldc);
  }
  for (; m + 2 <= M; m += 2) {
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) nt_micro<T, 2, 4>(a + m, b + n, D, c + m * ldc + n, ldc);
    for (; n < N; ++n) nt_micro<T, 2, 1>(a + m, b + n, D, c + m * ldc + n, ldc);
  }
  for (; m < M; ++m) {
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) nt_micro<T, 1, 8>(a + m, b + n, D, c + m * ldc + n, ldc);
    for (; n + 4 <= N; n += 4) nt_micro<T, 1, 4>(a + m, b + n, D, c + m * ldc + n, ldc);
    for (; n < N; ++n) nt_micro<T, 1, 1>(a + m, b + n, D, c + m * ldc + n, ldc);
  }
}

// The MR x NR accumulators of C's rows c[m] at columns col + n W: zero (overwrite), or C's
// values, times c_scale[m] when given. kPartial: the last vector has `last` valid lanes.
template <typename T, int MR, int NR, bool kPartial>
inline void load_c(Vectorized<T> (&acc)[MR][NR], T* const* c, int64_t col, bool overwrite,
                   const T* c_scale, int last) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      if (overwrite) {
        acc[m][n] = V(T(0));
      } else {
        const T* cp = c[m] + col + n * W;
        acc[m][n] = (kPartial && n == NR - 1) ? V::loadu(cp, last) : V::loadu(cp);
        if (c_scale) acc[m][n] = acc[m][n] * V(c_scale[m]);
      }
    }
}

// Stores what load_c loaded.
template <typename T, int MR, int NR, bool kPartial>
inline void store_c(const Vectorized<T> (&acc)[MR][NR], T* const* c, int64_t col, int last) {
  constexpr int W = Vectorized<T>::size();
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      T* cp = c[m] + col + n * W;
      if (kPartial && n == NR - 1) {
        acc[m][n].store(cp, last);
      } else {
        acc[m][n].store(cp);
      }
    }
}

// C(m, cols) += sum_k A(m, k) B(k, cols) for MR rows and NR vectors of columns starting at
// col, with A packed by pack_a. kPartial: one vector of which `last` lanes are valid; a
// separate instantiation, so the full-width one keeps its accumulators in registers (a
// runtime lane count made GCC spill them around every call).
template <typename T, int MR, int NR, bool kPartial = false>
inline void nn_micro(int64_t K, const T* ap, const T* const* b, int64_t col, T* const* c,
                     bool overwrite, const T* c_scale, int last = 0) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  static_assert(!kPartial || NR == 1, "only a single vector can be partial");
  V acc[MR][NR];
  load_c<T, MR, NR, kPartial>(acc, c, col, overwrite, c_scale, last);
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b[k] + col;
    V bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = kPartial ? V::loadu(bk, last) : V::loadu(bk + n * W);
    for (int m = 0; m < MR; ++m) {
      const V av = V::loadu(ap + (k * MR + m) * W);
      for (int n = 0; n < NR; ++n) acc[m][n] = at::vec::fmadd(av, bv[n], acc[m][n]);
    }
  }
  store_c<T, MR, NR, kPartial>(acc, c, col, last);
}

// A's terms per k as whole vectors (each A(m, k) in every lane): the micro-kernel then
// reads them as plain loads instead of issuing a broadcast per FMA row, and the packing is
// paid once per K chunk for all column blocks.
template <typename T, int MR>
inline void pack_a(int64_t K, const T* a, int64_t am, int64_t ak, T* ap) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < MR; ++m) V(a[m * am + k * ak]).store(ap + (k * MR + m) * W);
}

// Terms of A packed at a time: the packed chunk (kPackK x 4 vectors, 8 KB) stays in L1
// while every column block of C reads it.
constexpr int64_t kPackK = 64;

template <typename T, int MR>
inline void nn_rows(int64_t K, const T* a, int64_t am, int64_t ak, const T* const* b,
                    int64_t N, T* const* c, bool overwrite, const T* c_scale) {
  constexpr int64_t W = Vectorized<T>::size();
  // Wider column blocks for fewer rows: the MR x NR accumulators stay within the
  // registers while each vector of A feeds as many FMAs as possible.
  constexpr int kWide = MR == 1 ? 8 : (MR == 2 ? 4 : (MR == 4 ? 3 : 2));
  alignas(64) T ap[kPackK * MR * W];
  for (int64_t k0 = 0; k0 < K; k0 += kPackK) {
    const int64_t kn = std::min(kPackK, K - k0);
    pack_a<T, MR>(kn, a + k0 * ak, am, ak, ap);
    const T* const* bk = b + k0;
    const bool ow = overwrite && k0 == 0;
    const T* cs = k0 == 0 ? c_scale : nullptr;
    int64_t col = 0;
    for (; col + kWide * W <= N; col += kWide * W)
      nn_micro<T, MR, kWide>(kn, ap, bk, col, c, ow, cs);
    for (; col + 2 * W <= N; col += 2 * W) nn_micro<T, MR, 2>(kn, ap, bk, col, c, ow, cs);
    if (col + W <= N) {
      nn_micro<T, MR, 1>(kn, ap, bk, col, c, ow, cs);
      col += W;
    }
    if (col < N) nn_micro<T, MR, 1, true>(kn, ap, bk, col, c, ow, cs, static_cast<int>(N - col));
  }
}

// Panel path of nn_tile for many rows. B's rows are usually a power-of-two number of bytes
// apart (D = 512 floats: 2 KB), so the same columns of K rows fall into two L1 sets and evict
// each other: a column panel read in place does not stay in L1 for the next row block. A
// contiguous copy of the panel (kPanelK x NR vectors) does, and serves every row block of C.
constexpr int64_t kPanelK = 128;
constexpr int kPanelNR = 3;

// C(m, col + n W ...) over NR vectors for MR rows from a packed panel bp (k-major, NR
// vectors per k); A(m, k) = a[m * am + k * ak] broadcast. kPartial: the last vector has
// `last` valid lanes in C (the panel is zero-padded, so its loads stay whole).
template <typename T, int MR, int NR, bool kPartial>
inline void nn_panel_micro(int64_t K, const T* a, int64_t am, int64_t ak, const T* bp,
                           int64_t col, T* const* c, bool overwrite, const T* c_scale,
                           int last) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V acc[MR][NR];
  load_c<T, MR, NR, kPartial>(acc, c, col, overwrite, c_scale, last);
  for (int64_t k = 0; k < K; ++k) {
    V bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = V::loadu(bp + (k * NR + n) * W);
    for (int m = 0; m < MR; ++m) {
      const V av(a[m * am + k * ak]);
      for (int n = 0; n < NR; ++n) acc[m][n] = at::vec::fmadd(av, bv[n], acc[m][n]);
    }
  }
  store_c<T, MR, NR, kPartial>(acc, c, col, last);
}

// Packs columns [col, col + NR W) of rows b[0..K) (valid up to N) into bp and runs every
// row block of C against it (ow: C = A B, overwritten).
template <typename T, int NR, bool kPartial>
inline void nn_panel_column(int64_t M, int64_t K, const T* a, int64_t am, int64_t ak,
                            const T* const* b, int64_t col, int last, T* const* c,
                            bool ow, const T* c_scale, T* bp) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int64_t k = 0; k < K; ++k)
    for (int n = 0; n < NR; ++n) {
      const T* src = b[k] + col + n * W;
      const V v = (kPartial && n == NR - 1) ? V::loadu(src, last) : V::loadu(src);
      v.store(bp + (k * NR + n) * W);
    }
  // M >= kPanelMinRows: blocks of 4 and 3 cover every row, none runs short of FMA chains.
  const int64_t threes = blocks_of_three(M);
  int64_t m = 0;
  for (; m + 4 <= M - 3 * threes; m += 4)
    nn_panel_micro<T, 4, NR, kPartial>(K, a + m * am, am, ak, bp, col, c + m, ow,
                                       c_scale ? c_scale + m : nullptr, last);
  for (; m + 3 <= M; m += 3)
    nn_panel_micro<T, 3, NR, kPartial>(K, a + m * am, am, ak, bp, col, c + m, ow,
                                       c_scale ? c_scale + m : nullptr, last);
}

template <typename T>
inline void nn_panels(int64_t M, int64_t K, const T* a, int64_t am, int64_t ak,
                      const T* const* b, int64_t N, T* const* c, bool overwrite,
                      const T* c_scale) {
  constexpr int64_t W = Vectorized<T>::size();
  constexpr int64_t kWidth = kPanelNR * W;
  alignas(64) T bp[kPanelK * kWidth];
  for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
    const int64_t kn = std::min(kPanelK, K - k0);
    const T* ak0 = a + k0 * ak;
    const T* const* bk = b + k0;
    const bool ow = overwrite && k0 == 0;
    const T* cs = k0 == 0 ? c_scale : nullptr;
    int64_t col = 0;
    for (; col + kWidth <= N; col += kWidth)
      nn_panel_column<T, kPanelNR, false>(M, kn, ak0, am, ak, bk, col, 0, c, ow, cs, bp);
    const int64_t rest = N - col;
    if (rest == 0) continue;
    static_assert(kPanelNR == 3, "the dispatch below covers tails of up to 3 vectors");
    // The last columns: 1 to kPanelNR - 1 whole vectors, or up to kPanelNR vectors of
    // which the last is partial (`last` of its lanes).
    const int64_t vectors = ceil_div(rest, W);
    const int last = static_cast<int>(rest % W);
    if (last == 0) {
      if (vectors == 1) nn_panel_column<T, 1, false>(M, kn, ak0, am, ak, bk, col, 0, c, ow, cs, bp);
      if (vectors == 2) nn_panel_column<T, 2, false>(M, kn, ak0, am, ak, bk, col, 0, c, ow, cs, bp);
    } else {
      if (vectors == 1) nn_panel_column<T, 1, true>(M, kn, ak0, am, ak, bk, col, last, c, ow, cs, bp);
      if (vectors == 2) nn_panel_column<T, 2, true>(M, kn, ak0, am, ak, bk, col, last, c, ow, cs, bp);
      if (vectors == 3) nn_panel_column<T, 3, true>(M, kn, ak0, am, ak, bk, col, last, c, ow, cs, bp);
    }
  }
}

// Rows of C at which nn_tile switches to the panel path: the copy of a panel pays off once
// it serves a few row blocks.
constexpr int64_t kPanelMinRows = 8;
static_assert(kPanelMinRows >= 6, "nn_panel_column splits M into blocks of 4 and 3");

// C rows c[m] (length N) += sum_k A(m, k) B rows b[k], for M rows and K terms;
// A(m, k) = a[m * am + k * ak]. overwrite: C = A B instead (C need not be initialised),
// which spares callers a zero fill and a copy when C is the output itself. c_scale (M
// values, not with overwrite): C(m, :) = c_scale[m] C(m, :) + ..., the online softmax's
// rescale of the running contexts folded into the load of C.
template <typename T>
inline void nn_tile(int64_t M, int64_t K, const T* a, int64_t am, int64_t ak, const T* const* b,
                    int64_t N, T* const* c, bool overwrite = false, const T* c_scale = nullptr) {
  if (N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      if (overwrite) {
        std::fill(c[m], c[m] + N, T(0));
      } else if (c_scale) {
        scale_inplace(c[m], c_scale[m], N);
      }
    }
    return;
  }
  if (M >= kPanelMinRows) {
    nn_panels(M, K, a, am, ak, b, N, c, overwrite, c_scale);
    return;
  }
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    nn_rows<T, 4>(K, a + m * am, am, ak, b, N, c + m, overwrite, c_scale ? c_scale + m : nullptr);
  const T* cs = c_scale ? c_scale + m : nullptr;
  switch (M - m) {
    case 3: nn_rows<T, 3>(K, a + m * am, am, ak, b, N, c + m, overwrite, cs); break;
    case 2: nn_rows<T, 2>(K, a + m * am, am, ak, b, N, c + m, overwrite, cs); break;
    case 1: nn_rows<T, 1>(K, a + m * am, am, ak, b, N, c + m, overwrite, cs); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace attention_ext
