// The score-agnostic half of the CPU attention kernels: a blocked online softmax forward
// (with split-S and a fixed-order log-sum-exp merge), and the softmax part of the backward
// (P and dS per query tile). The score itself is a functor:
//
//   score(q_rows, M, key_rows, n, Dk, out)  out[m * kBlock + i] = score(q_rows[m], key_rows[i])
//
// over rows of the accumulation type (dot: scale * <q, k>; additive: v . tanh(q + k)).
// Forward: per tile of up to kMaxTileRows query rows of one batch element and per block of
// kBlock keys, the scores, one rescale of the running contexts, then the block's context
// updates while its rows are still in cache (a rescale after every key, or a second pass
// over all keys, is slower: docs/performance.md). Positions past `lengths` are never read.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention_ext/key_positions.h"
#include "attention_ext/math.h"
#include "attention_ext/test_hooks.h"
#include "balanced_for.h"
#include "gemm_tiles.h"
#include "vec_ops.h"

namespace attention_ext {
namespace cpu {

// Keys per online-softmax block for tiles of several query rows, and the row stride of the
// score buffers: one block covers typical sentence lengths, so the context product runs once
// over all of them. One-row tiles use blocks of 8.
constexpr int64_t kBlock = 64;
// Keys per online-softmax block of a tile of M query rows. One row (decode) loads each key
// once per pass and is bound by the context pass's loads: blocks of 8 keys (16 KB at
// D = 512) stay in L1 for it and fit axpy8.
inline int64_t forward_block(int64_t M) { return M == 1 ? 8 : kBlock; }
// Keys per block in the backward's softmax part, where the block size hardly matters
// (docs/performance.md).
constexpr int64_t kGradBlock = 32;
// A backward tile is up to kTile consecutive query rows of one batch element: they share
// every key block loaded into cache.
constexpr int64_t kTile = 4;
// A forward tile has up to kMaxTileRows rows: with several row blocks the context product
// takes nn_tile's panel path, each key block's panel serving all of them.
constexpr int64_t kMaxTileRows = 32;
// Fewest keys worth a thread's task of their own when query tiles are too few to fill the
// threads (a task costs a merge of one context row).
constexpr int64_t kMinKeysPerThreadSplit = 32;

// q (B, Tq, Dk) scored against k (M, S, Dk); v (M, S, Dv) are the values; query row b
// reads memory row pos.row(b). Dk, the width of the rows the score reads, is D for the dot
// op and A, the attention width of the projections q and k, for the additive op.
template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  bool v_is_k;
  int64_t B, Tq, S, Dk, Dv;
  KeyPositions pos;
};

// Pointers to rows idx[0..n) of a (S, width) matrix in the accumulation type: the rows
// themselves when no conversion is needed, else converted copies in buf.
template <typename scalar_t, typename acc_t>
inline void rows_as_acc(const scalar_t* mat, const int64_t* idx, int64_t n, int64_t width,
                        acc_t* buf, const acc_t** rows) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = mat + idx[i] * width;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows[i] = src;
    } else {
      to_acc(src, buf + i * width, width);
      rows[i] = buf + i * width;
    }
  }
}

// The row in the accumulation type (a pointer into the input when no conversion).
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    to_acc(src, buf, n);
    return buf;
  }
}

// Points out[0..M) at the M rows starting at row r (converted into buf when needed).
template <typename scalar_t, typename acc_t>
inline void load_queries(const scalar_t* rows, int64_t r, int64_t M, int64_t width,
                         acc_t* buf, const acc_t** out) {
  for (int64_t m = 0; m < M; ++m) {
    out[m] = row_as_acc<scalar_t, acc_t>(rows + (r + m) * width, width, buf + m * width);
  }
}

// Per-thread working memory for tiles of up to `rows` query rows, sized once per parallel
// chunk. convert: the inputs are not in the accumulation type, so key, value, query and
// gradient rows need converted copies.
template <typename acc_t>
struct Scratch {
  Buffer<int64_t> idx;
  Buffer<acc_t> s, p, dp, kbuf, vbuf, q, g, acc, alpha;
  std::vector<const acc_t*> krows, vrows, qrows, grows;
  std::vector<acc_t*> accrows, outrows;
  std::vector<SoftmaxState<acc_t>> st;
  Scratch(int64_t D, int64_t Dv, int64_t rows, bool convert)
      : idx(kBlock), s(rows * kBlock), p(rows * kBlock), dp(rows * kBlock),
        kbuf(convert ? kBlock * D : 0), vbuf(convert ? kBlock * Dv : 0),
        q(convert ? rows * D : 0), g(convert ? rows * Dv : 0), acc(rows * Dv), alpha(rows),
        krows(kBlock), vrows(kBlock), qrows(rows), grows(rows), accrows(rows), outrows(rows),
        st(rows) {
    for (int64_t m = 0; m < rows; ++m) accrows[m] = acc.data() + m * Dv;
  }
};

// Loads the attending key (and value) rows of block [jb, je) of batch b into w.krows /
// w.vrows; returns how many.
template <typename scalar_t, typename acc_t>
inline int64_t load_block(const Problem<scalar_t>& pb, int64_t b, int64_t jb, int64_t je,
                          bool with_values, Scratch<acc_t>& w) {
  const int64_t n = pb.pos.gather(b, jb, je, w.idx.data());
  if (n == 0) return 0;
  rows_as_acc(pb.k + pb.pos.row(b) * pb.S * pb.Dk, w.idx.data(), n, pb.Dk, w.kbuf.data(), w.krows.data());
  if (!with_values) return n;
  if (pb.v_is_k) {
    std::copy(w.krows.begin(), w.krows.begin() + n, w.vrows.begin());
  } else {
    rows_as_acc(pb.v + pb.pos.row(b) * pb.S * pb.Dv, w.idx.data(), n, pb.Dv, w.vbuf.data(),
                w.vrows.data());
  }
  return n;
}

// How a task's context rows take each block of keys. Chosen in forward_mode only.
enum class ContextUpdate {
  // One query row (decode): axpy8 for each full block of 8 keys, the next block's keys
  // prefetched meanwhile (faster than nn_tile's one-row product); nn_tile for a block the
  // length or the mask leaves short.
  kOneRow,
  // Several rows whose keys fit one block, inputs in the accumulation type: the block's
  // probabilities, divided by their sum, times its values go straight into the output
  // rows (no running context and no final pass over it).
  kTileIntoOutput,
  // Several rows otherwise: nn_tile into the running contexts, rescaled by the online
  // softmax as the max rises (the rescale folded into the product's load of C).
  kTileAccumulate,
};

struct ForwardMode {
  ContextUpdate update;
  // The task has its rows to itself and its keys fit one block: the scores buffer keeps
  // exp(score - max) and the weights are those over their sum (no second exp).
  bool weights_from_probs;
};

// The mode of a task of M query rows over `keys` key positions, the source cut in `splits`.
template <typename scalar_t>
inline ForwardMode forward_mode(int64_t M, int64_t keys, int64_t splits) {
  const bool one_block = splits == 1 && keys <= forward_block(M);
  if (M == 1) return {ContextUpdate::kOneRow, one_block};
  if (one_block && std::is_same_v<scalar_t, at::opmath_type<scalar_t>>)
    return {ContextUpdate::kTileIntoOutput, true};
  return {ContextUpdate::kTileAccumulate, one_block};
}

// Online softmax over the attending keys of [j0, j1) for the M query rows w.qrows of batch
// b, updating the context as `mode` says. Leaves each row's state in w.st and, but with
// kTileIntoOutput, the unnormalised contexts in w.accrows; with kTileIntoOutput, `out`
// holds the tile's output rows (in the accumulation type), which get the normalised
// contexts. scores (row stride S), when given, receives at each attending position its
// score, or with mode.weights_from_probs its exp(score - the row's max).
template <typename scalar_t, typename acc_t, typename Score>
void forward_range(const Problem<scalar_t>& pb, const Score& score, int64_t b, int64_t M,
                   int64_t j0, int64_t j1, ForwardMode mode, acc_t* scores, acc_t* const* out,
                   Scratch<acc_t>& w) {
  SoftmaxState<acc_t>* st = w.st.data();
  for (int64_t m = 0; m < M; ++m) st[m] = softmax_init<acc_t>();
  const int64_t block = forward_block(M);
  // One row accumulates from zero; several rows overwrite on their first block (no fill).
  const bool one_row = mode.update == ContextUpdate::kOneRow;
  if (one_row) std::fill(w.accrows[0], w.accrows[0] + pb.Dv, acc_t(0));
  bool first = !one_row;
  for (int64_t jb = j0; jb < j1; jb += block) {
    const int64_t n = load_block(pb, b, jb, std::min(jb + block, j1), true, w);
    if (n == 0) continue;
    score(w.qrows.data(), M, w.krows.data(), n, pb.Dk, w.s.data());
    acc_t* alpha = w.alpha.data();
    bool rescale = false;
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* sm = w.s.data() + m * kBlock;
      acc_t* pm = w.p.data() + m * kBlock;
      acc_t block_max = neg_inf<acc_t>();
      for (int64_t i = 0; i < n; ++i) block_max = ae_max(block_max, sm[i]);
      alpha[m] = softmax_raise_max(st[m], block_max);
      rescale = rescale || alpha[m] != acc_t(1);
      std::copy(sm, sm + n, pm);
      st[m].sum += exp_shifted_sum(pm, st[m].max, n);
      if (scores) {
        const acc_t* src = mode.weights_from_probs ? pm : sm;
        for (int64_t i = 0; i < n; ++i) scores[m * pb.S + w.idx[i]] = src[i];
      }
    }
    switch (mode.update) {
      case ContextUpdate::kOneRow:
        if (n == 8) {
          // The next block's key rows (positions, not necessarily attending: a prefetch
          // reads nothing), so its score pass finds them in cache.
          const int64_t nb = std::min(jb + block, j1), ne = std::min(jb + 2 * block, j1);
          const scalar_t* keys_b = pb.k + pb.pos.row(b) * pb.S * pb.Dk;
          axpy8(w.accrows[0], alpha[0], w.p.data(), w.vrows.data(), pb.Dv,
                reinterpret_cast<const char*>(keys_b + nb * pb.Dk),
                reinterpret_cast<const char*>(keys_b + ne * pb.Dk));
        } else {
          nn_tile(1, n, w.p.data(), kBlock, 1, w.vrows.data(), pb.Dv, w.accrows.data(),
                  /*overwrite=*/false, rescale ? alpha : nullptr);
        }
        break;
      case ContextUpdate::kTileIntoOutput:
        for (int64_t m = 0; m < M; ++m)
          scale_inplace(w.p.data() + m * kBlock, softmax_inv_sum(st[m]), n);
        nn_tile(M, n, w.p.data(), kBlock, 1, w.vrows.data(), pb.Dv, out, /*overwrite=*/true);
        first = false;
        break;
      case ContextUpdate::kTileAccumulate:
        nn_tile(M, n, w.p.data(), kBlock, 1, w.vrows.data(), pb.Dv, w.accrows.data(),
                /*overwrite=*/first, rescale && !first ? alpha : nullptr);
        first = false;
        break;
    }
  }
  if (first) {  // several rows and no attending key
    for (int64_t m = 0; m < M; ++m) {
      acc_t* row = mode.update == ContextUpdate::kTileIntoOutput ? out[m] : w.accrows[m];
      std::fill(row, row + pb.Dv, acc_t(0));
    }
  }
}

// weights[j] = exp(score_j - lse) for attending j, 0 elsewhere; scores_row holds -inf at
// positions that do not attend.
template <typename scalar_t, typename acc_t>
void write_weights(acc_t* scores_row, acc_t lse, int64_t limit, int64_t S, scalar_t* out) {
  if (lse == neg_inf<acc_t>()) {
    std::fill(out, out + S, scalar_t(0));
    return;
  }
  (void)exp_shifted_sum(scores_row, lse, limit);
  from_acc_scaled(scores_row, acc_t(1), out, limit);
  std::fill(out + limit, out + S, scalar_t(0));
}

// Query rows per forward tile: up to kMaxTileRows, fewer (down to kTile) while there would
// be fewer than two tiles per thread.
inline int64_t forward_tile_rows(int64_t B, int64_t Tq, int64_t threads) {
  int64_t rows = std::min(kMaxTileRows, Tq);
  while (rows > kTile && B * ceil_div(Tq, rows) < 2 * threads)
    rows = std::max(kTile, ceil_div(rows / 2, kTile) * kTile);
  return std::max<int64_t>(rows, 1);
}

// The whole forward: context (B, Tq, Dv), weights (B, Tq, S) when not null, lse (B, Tq).
// Tiles are spread over threads; when there are fewer tiles than threads the source is
// split and the partial states merged by log-sum-exp in a fixed order (deterministic).
template <typename scalar_t, typename Score>
void blocked_softmax_forward(const Problem<scalar_t>& pb, const Score& score,
                             scalar_t* context, scalar_t* weights,
                             at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t threads = at::get_num_threads();
  const int64_t tile_rows = forward_tile_rows(pb.B, pb.Tq, threads);
  const int64_t tiles_per_b = ceil_div(pb.Tq, tile_rows);
  const int64_t tiles = pb.B * tiles_per_b;

  int64_t splits = forced_splits();
  if (splits == 0) {
    splits = tiles >= threads ? 1
                              : std::min(ceil_div(threads, tiles),
                                         ceil_div(pb.S, kMinKeysPerThreadSplit));
  }
  splits = std::max<int64_t>(1, std::min(splits, pb.S));
  // Row r's scores: per-thread when one task owns the row, shared across splits otherwise.
  std::vector<acc_t> shared_scores(weights && splits > 1 ? pb.B * pb.Tq * pb.S : 0);
  std::vector<SoftmaxState<acc_t>> part_state(splits > 1 ? pb.B * pb.Tq * splits : 0);
  std::vector<acc_t> part_acc(splits > 1 ? pb.B * pb.Tq * splits * pb.Dv : 0);

  auto run_tasks = [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(pb.Dk, pb.Dv, tile_rows, !std::is_same_v<scalar_t, acc_t>);
    std::vector<acc_t> own_scores(weights && splits == 1 ? tile_rows * pb.S : 0);
    const SoftmaxState<acc_t>* st = w.st.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / splits, sp = task % splits;
      const int64_t b = tile / tiles_per_b;
      const int64_t t0 = (tile % tiles_per_b) * tile_rows;
      const int64_t M = std::min(tile_rows, pb.Tq - t0);
      const int64_t r0 = b * pb.Tq + t0;
      const int64_t limit = pb.pos.end(b);
      const int64_t chunk = ceil_div(limit, splits);
      const int64_t j0 = std::min(limit, sp * chunk), j1 = std::min(limit, j0 + chunk);
      load_queries(pb.q, r0, M, pb.Dk, w.q.data(), w.qrows.data());
      const ForwardMode mode = forward_mode<scalar_t>(M, j1 - j0, splits);
      acc_t* scores = nullptr;
      if (weights) {
        scores = splits == 1 ? own_scores.data() : shared_scores.data() + r0 * pb.S;
        const acc_t fill = mode.weights_from_probs ? acc_t(0) : neg_inf<acc_t>();
        for (int64_t m = 0; m < M; ++m)
          std::fill(scores + m * pb.S + j0, scores + m * pb.S + j1, fill);
      }
      const bool into_output = mode.update == ContextUpdate::kTileIntoOutput;
      if (into_output) {
        for (int64_t m = 0; m < M; ++m)
          w.outrows[m] = reinterpret_cast<acc_t*>(context + (r0 + m) * pb.Dv);
      }
      forward_range(pb, score, b, M, j0, j1, mode, scores,
                    into_output ? w.outrows.data() : nullptr, w);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t r = r0 + m;
        if (splits == 1) {
          lse[r] = softmax_lse(st[m]);
          if (!into_output)
            from_acc_scaled(w.accrows[m], softmax_inv_sum(st[m]), context + r * pb.Dv, pb.Dv);
          if (weights && mode.weights_from_probs) {
            from_acc_scaled(scores + m * pb.S, softmax_inv_sum(st[m]), weights + r * pb.S, limit);
            std::fill(weights + r * pb.S + limit, weights + (r + 1) * pb.S, scalar_t(0));
          } else if (weights) {
            write_weights(scores + m * pb.S, lse[r], limit, pb.S, weights + r * pb.S);
          }
        } else {
          part_state[r * splits + sp] = st[m];
          std::copy_n(w.accrows[m], pb.Dv, part_acc.begin() + (r * splits + sp) * pb.Dv);
        }
      }
    }
  };
  if (splits > 1) {
    at::parallel_for(0, tiles * splits, 1, run_tasks);
  } else {
    // A tile's work grows with its batch element's attending length.
    const int64_t rows = std::min(tile_rows, pb.Tq);
    balanced_parallel_for(
        tiles, [&](int64_t tile) { return rows * (pb.pos.end(tile / tiles_per_b) + 4); },
        run_tasks);
    return;
  }

  // Split-S merge: each row walks its splits in order (deterministic).
  at::parallel_for(0, pb.B * pb.Tq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pb.Dv);
    for (int64_t r = begin; r < end; ++r) {
      SoftmaxState<acc_t> st = part_state[r * splits];
      std::copy_n(part_acc.begin() + r * splits * pb.Dv, pb.Dv, acc.begin());
      for (int64_t sp = 1; sp < splits; ++sp) {
        acc_t scale_a, scale_b;
        softmax_merge(st, part_state[r * splits + sp], scale_a, scale_b);
        scale_inplace(acc.data(), scale_a, pb.Dv);
        axpy1(acc.data(), scale_b, part_acc.data() + (r * splits + sp) * pb.Dv, pb.Dv);
      }
      lse[r] = softmax_lse(st);
      from_acc_scaled(acc.data(), softmax_inv_sum(st), context + r * pb.Dv, pb.Dv);
      if (weights) {
        write_weights(shared_scores.data() + r * pb.S, lse[r], pb.pos.end(r / pb.Tq), pb.S,
                      weights + r * pb.S);
      }
    }
  });
}

// How both ops' backward spreads its work over the threads. Chosen in backward_schedule only.
enum class BackwardSchedule {
  // A thread takes whole batch elements and runs all phases of one back to back, while the
  // element's rows and its (Tq x S) P and dS are in that core's L2; scratch is per thread.
  kByElement,
  // Each phase in turn is spread over all threads, with (B x Tq x S) P and dS.
  kByPhase,
};

inline BackwardSchedule backward_schedule(int64_t B) {
  return B >= at::get_num_threads() ? BackwardSchedule::kByElement : BackwardSchedule::kByPhase;
}

// The softmax part of the backward for query tile `tile` (rows r0 .. r0 + M of batch b):
// P = exp(score - lse) recomputed, dP = <grad_context, value> + grad_weights, and
// dS = P (dP - sum_j P dP), written to P and dS (B x Tq x S, zero where nothing attends).
// Leaves w.qrows / w.grows pointing at the tile's query and gradient rows (converted into
// q_buf / g_buf when the input is not in the accumulation type).
template <typename scalar_t, typename Score>
void softmax_grad_tile(const Problem<scalar_t>& pb, const Score& score, int64_t tile,
                       const scalar_t* grad_ctx, const scalar_t* grad_w,
                       const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* P,
                       at::opmath_type<scalar_t>* dS, at::opmath_type<scalar_t>* q_buf,
                       at::opmath_type<scalar_t>* g_buf,
                       Scratch<at::opmath_type<scalar_t>>& w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_b = ceil_div(pb.Tq, kTile);
  const int64_t b = tile / tiles_per_b;
  const int64_t t0 = (tile % tiles_per_b) * kTile;
  const int64_t M = std::min(kTile, pb.Tq - t0);
  const int64_t r0 = b * pb.Tq + t0;
  const int64_t limit = pb.pos.end(b);
  // Readers only look at positions below the length; with a mask, those that do not
  // attend must read as 0.
  if (pb.pos.mask) {
    for (int64_t m = 0; m < M; ++m) {
      std::fill(P + (r0 + m) * pb.S, P + (r0 + m) * pb.S + limit, acc_t(0));
      std::fill(dS + (r0 + m) * pb.S, dS + (r0 + m) * pb.S + limit, acc_t(0));
    }
  }
  load_queries(pb.q, r0, M, pb.Dk, q_buf, w.qrows.data());
  load_queries(grad_ctx, r0, M, pb.Dv, g_buf, w.grows.data());
  acc_t delta[kTile] = {}, psum[kTile] = {};
  for (int64_t jb = 0; jb < limit; jb += kGradBlock) {
    const int64_t n = load_block(pb, b, jb, std::min(jb + kGradBlock, limit), true, w);
    if (n == 0) continue;
    score(w.qrows.data(), M, w.krows.data(), n, pb.Dk, w.s.data());
    nt_tile(w.grows.data(), M, w.vrows.data(), n, pb.Dv, w.dp.data(), kBlock);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r = r0 + m;
      acc_t* pm = w.s.data() + m * kBlock;  // scores, then probabilities
      if (lse[r] == neg_inf<acc_t>()) {
        std::fill(pm, pm + n, acc_t(0));
      } else {
        psum[m] += exp_shifted_sum(pm, lse[r], n);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = w.idx[i];
        const acc_t p = pm[i];
        acc_t dpi = w.dp[m * kBlock + i];
        if (grad_w) dpi += static_cast<acc_t>(grad_w[r * pb.S + j]);
        P[r * pb.S + j] = p;
        dS[r * pb.S + j] = dpi;  // dP until delta is known
        delta[m] += p * dpi;
      }
    }
  }
  // Positions that do not attend hold P = dP = 0, so they stay 0.
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = r0 + m;
    const acc_t d = softmax_grad_delta(delta[m], psum[m]);
    const acc_t scale = softmax_prob_scale(psum[m]);
    for (int64_t j = 0; j < limit; ++j) {
      P[r * pb.S + j] *= scale;
      dS[r * pb.S + j] = softmax_backward(P[r * pb.S + j], dS[r * pb.S + j], d);
    }
  }
}

// Source positions per product in source_grad_tiles: enough rows for nn_tile's panel path,
// while its buffers stay O(kSourceChunk x D) however long the source.
constexpr int64_t kSourceChunk = 64;

// Buffers of source_grad_rows, kept across calls.
template <typename acc_t>
struct SourceGradScratch {
  Buffer<acc_t> a2, gk, gv;
  acc_t* gkrows[kSourceChunk];
  acc_t* gvrows[kSourceChunk];
};

// Row pointers for M output rows of `width` starting at out, in the accumulation type: the
// rows themselves, or rows of buf when they need converting (store_rows converts them back).
template <typename scalar_t, typename acc_t>
inline void acc_rows(scalar_t* out, int64_t M, int64_t width, Buffer<acc_t>& buf, acc_t** rows) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) buf.resize(M * width);
  for (int64_t m = 0; m < M; ++m) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows[m] = out + m * width;
    } else {
      rows[m] = buf.data() + m * width;
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void store_rows(acc_t* const* rows, int64_t M, int64_t width, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t m = 0; m < M; ++m) from_acc_scaled(rows[m], acc_t(1), out + m * width, width);
  }
}

// The key/value gradients of M (<= kSourceChunk) consecutive source positions of one batch
// element, whose column in P/dS starts at `col` (row stride S). qg: the element's Tq query
// rows, then its Tq gradient rows. grad_k / grad_v: the positions' output rows.
template <typename scalar_t>
void source_grad_rows(const Problem<scalar_t>& pb, bool combined,
                      const at::opmath_type<scalar_t>* const* qg,
                      const at::opmath_type<scalar_t>* P, const at::opmath_type<scalar_t>* dS,
                      int64_t col, scalar_t* grad_k, scalar_t* grad_v, int64_t M,
                      SourceGradScratch<at::opmath_type<scalar_t>>& w) {
  if (grad_k) {
    acc_rows(grad_k, M, pb.Dk, w.gk, w.gkrows);
    if (combined) {
      // grad_k = [dS; P]^T [Q; G], one product over 2 Tq terms.
      const int64_t K2 = 2 * pb.Tq;
      w.a2.resize(M * K2);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t t = 0; t < pb.Tq; ++t) {
          w.a2[m * K2 + t] = dS[col + t * pb.S + m];
          w.a2[m * K2 + pb.Tq + t] = P[col + t * pb.S + m];
        }
      nn_tile(M, K2, w.a2.data(), K2, 1, qg, pb.Dk, w.gkrows, /*overwrite=*/true);
    } else {
      // A(m, t) = dS[b, t, j0 + m]: the transposed slice, read in place.
      nn_tile(M, pb.Tq, dS + col, 1, pb.S, qg, pb.Dk, w.gkrows, /*overwrite=*/true);
    }
    store_rows(w.gkrows, M, pb.Dk, grad_k);
  }
  if (grad_v) {
    acc_rows(grad_v, M, pb.Dv, w.gv, w.gvrows);
    nn_tile(M, pb.Tq, P + col, 1, pb.S, qg + pb.Tq, pb.Dv, w.gvrows, /*overwrite=*/true);
    store_rows(w.gvrows, M, pb.Dv, grad_v);
  }
}

// grad_values[b, j] = sum_t P[b, t, j] g[b, t] for tiles of kTile source positions; with
// dS, q_rows and grad_k also grad_k[b, j] = sum_t dS[b, t, j] q[b, t] (the dot op's key
// gradient, dS already scaled; grad_v == nullptr and pb.v_is_k: the keys are the values and
// grad_k gets both). The tiles of [begin, end) that belong to one batch element are taken
// kSourceChunk positions at a time, so their products take nn_tile's panel path.
template <typename scalar_t>
void source_grad_tiles(const Problem<scalar_t>& pb, const at::opmath_type<scalar_t>* q_rows,
                       const at::opmath_type<scalar_t>* g_rows,
                       const at::opmath_type<scalar_t>* P, const at::opmath_type<scalar_t>* dS,
                       scalar_t* grad_k, scalar_t* grad_v, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_b = ceil_div(pb.S, kTile);
  const bool combined = grad_k && !grad_v && pb.v_is_k;
  Buffer<const acc_t*> qg(2 * pb.Tq);
  SourceGradScratch<acc_t> w;
  for (int64_t tile = begin; tile < end;) {
    const int64_t b = tile / tiles_per_b;
    const int64_t run_end = std::min(end, (b + 1) * tiles_per_b);
    const int64_t j0 = (tile % tiles_per_b) * kTile;
    const int64_t j1 = std::min(pb.S, (run_end - b * tiles_per_b) * kTile);
    tile = run_end;
    // Positions past the length are never attended: zero gradient, nothing to read.
    const int64_t M = std::max<int64_t>(0, std::min(j1, pb.pos.end(b)) - j0);
    if (grad_k) {
      std::fill(grad_k + (b * pb.S + j0 + M) * pb.Dk, grad_k + (b * pb.S + j1) * pb.Dk,
                scalar_t(0));
    }
    if (grad_v) {
      std::fill(grad_v + (b * pb.S + j0 + M) * pb.Dv, grad_v + (b * pb.S + j1) * pb.Dv,
                scalar_t(0));
    }
    if (M == 0) continue;
    for (int64_t t = 0; t < pb.Tq; ++t) {
      qg[t] = grad_k ? q_rows + (b * pb.Tq + t) * pb.Dk : nullptr;
      qg[pb.Tq + t] = g_rows + (b * pb.Tq + t) * pb.Dv;
    }
    for (int64_t c0 = 0; c0 < M; c0 += kSourceChunk) {
      const int64_t j = j0 + c0;
      source_grad_rows(pb, combined, qg.data(), P, dS, b * pb.Tq * pb.S + j,
                       grad_k ? grad_k + (b * pb.S + j) * pb.Dk : nullptr,
                       grad_v ? grad_v + (b * pb.S + j) * pb.Dv : nullptr,
                       std::min(kSourceChunk, M - c0), w);
    }
  }
}

}  // namespace cpu
}  // namespace attention_ext
