// CPU kernels of attention_ext::dot_attention and its backward.
//
// Forward: one pass per (batch, query) row with a blocked online softmax: scores of a block
// of keys, one rescale of the running context per block, then the block's context updates
// while its rows are still in L1 (PERF_NOTES item 4). Positions past `lengths` are never
// read. Rows are spread over threads; when there are fewer rows than threads the source is
// split and the partial states merged by log-sum-exp in a fixed order.
//
// Backward (deterministic, no atomics): phase 1, per row, recomputes the probabilities from
// the saved log-sum-exp, writes P and dS (B x Tq x S) and grad_query; phase 2, per source
// position, sums over the queries for grad_keys and grad_values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_ext/checks.h"
#include "attention_ext/math.h"
#include "attention_ext/tuning.h"
#include "vec_ops.h"

namespace attention_ext {
namespace cpu {
namespace {

// Keys per online-softmax block: 16 rows of D=512 floats (32 KB) stay in L1 between the
// score and the context pass.
constexpr int64_t kBlock = 16;
// Fewest keys worth a split of their own when rows are too few to fill the threads.
constexpr int64_t kMinKeysPerSplit = 32;

// Which source positions attend: j < lengths[b], or mask[b, j], or all.
struct Positions {
  const int64_t* lengths;
  const bool* mask;
  int64_t S;

  int64_t limit(int64_t b) const { return lengths ? lengths[b] : S; }

  // Attending positions in [j0, j1), compacted into idx; returns how many.
  int64_t gather(int64_t b, int64_t j0, int64_t j1, int64_t* idx) const {
    int64_t n = 0;
    if (mask) {
      const bool* m = mask + b * S;
      for (int64_t j = j0; j < j1; ++j)
        if (m[j]) idx[n++] = j;
    } else {
      for (int64_t j = j0; j < j1; ++j) idx[n++] = j;
    }
    return n;
  }
};

template <typename scalar_t>
struct Problem {
  const scalar_t* q;  // (B, Tq, D)
  const scalar_t* k;  // (B, S, D)
  const scalar_t* v;  // (B, S, Dv)
  bool v_is_k;
  int64_t B, Tq, S, D, Dv;
  Positions pos;
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

template <typename acc_t>
inline void dots(const acc_t* q, const acc_t* const* rows, int64_t n, int64_t D, acc_t* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot4(q, rows[i], rows[i + 1], rows[i + 2], rows[i + 3], D, out + i);
  for (; i < n; ++i) out[i] = dot1(q, rows[i], D);
}

template <typename acc_t>
inline void axpys(acc_t* acc, const acc_t* w, const acc_t* const* rows, int64_t n, int64_t Dv) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) axpy4(acc, w + i, rows[i], rows[i + 1], rows[i + 2], rows[i + 3], Dv);
  for (; i < n; ++i) axpy1(acc, w[i], rows[i], Dv);
}

// Per-thread working memory, sized once per parallel chunk.
template <typename acc_t>
struct Scratch {
  std::vector<int64_t> idx;
  std::vector<acc_t> s, p, kbuf, vbuf, q, g, acc;
  std::vector<const acc_t*> krows, vrows;
  Scratch(int64_t D, int64_t Dv)
      : idx(kBlock), s(kBlock), p(kBlock), kbuf(kBlock * D), vbuf(kBlock * Dv), q(D), g(Dv),
        acc(Dv), krows(kBlock), vrows(kBlock) {}
};

// The query row in the accumulation type (a pointer into the input when no conversion).
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    to_acc(src, buf, n);
    return buf;
  }
}

// Online softmax over the attending keys of [j0, j1) for one row. Accumulates the
// unnormalised context into w.acc (zeroed by the caller) and, when scores_row is given,
// stores each attending score at its position.
template <typename scalar_t, typename acc_t>
SoftmaxState<acc_t> forward_range(const Problem<scalar_t>& pb, int64_t b, const acc_t* q,
                                  acc_t scale, int64_t j0, int64_t j1, acc_t* scores_row,
                                  Scratch<acc_t>& w) {
  SoftmaxState<acc_t> st = softmax_init<acc_t>();
  const scalar_t* kb = pb.k + b * pb.S * pb.D;
  const scalar_t* vb = pb.v + b * pb.S * pb.Dv;
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t n = pb.pos.gather(b, jb, std::min(jb + kBlock, j1), w.idx.data());
    if (n == 0) continue;
    rows_as_acc(kb, w.idx.data(), n, pb.D, w.kbuf.data(), w.krows.data());
    if (pb.v_is_k) {
      std::copy(w.krows.begin(), w.krows.begin() + n, w.vrows.begin());
    } else {
      rows_as_acc(vb, w.idx.data(), n, pb.Dv, w.vbuf.data(), w.vrows.data());
    }
    dots(q, w.krows.data(), n, pb.D, w.s.data());
    acc_t block_max = neg_inf<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      w.s[i] *= scale;
      block_max = ae_max(block_max, w.s[i]);
      if (scores_row) scores_row[w.idx[i]] = w.s[i];
    }
    const acc_t alpha = softmax_raise_max(st, block_max);
    if (alpha != acc_t(1)) scale_inplace(w.acc.data(), alpha, pb.Dv);
    std::copy(w.s.begin(), w.s.begin() + n, w.p.begin());
    exp_shifted_inplace(w.p.data(), st.max, n);
    for (int64_t i = 0; i < n; ++i) st.sum += w.p[i];
    axpys(w.acc.data(), w.p.data(), w.vrows.data(), n, pb.Dv);
  }
  return st;
}

// weights[j] = exp(score_j - lse) for attending j, 0 elsewhere; scores_row holds -inf at
// positions that do not attend.
template <typename scalar_t, typename acc_t>
void write_weights(acc_t* scores_row, acc_t lse, int64_t limit, int64_t S, scalar_t* out) {
  if (lse == neg_inf<acc_t>()) {
    std::fill(out, out + S, scalar_t(0));
    return;
  }
  exp_shifted_inplace(scores_row, lse, limit);
  from_acc_scaled(scores_row, acc_t(1), out, limit);
  std::fill(out + limit, out + S, scalar_t(0));
}

template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& pb, double scale_d, scalar_t* context,
                  scalar_t* weights, at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t rows = pb.B * pb.Tq;
  const int64_t threads = at::get_num_threads();

  int64_t splits = forced_splits();
  if (splits == 0) {
    splits = rows >= threads ? 1
                             : std::min((threads + rows - 1) / rows,
                                        (pb.S + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  }
  splits = std::max<int64_t>(1, std::min(splits, pb.S));

  if (splits == 1) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> w(pb.D, pb.Dv);
      std::vector<acc_t> scores(weights ? pb.S : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / pb.Tq;
        const int64_t limit = pb.pos.limit(b);
        const acc_t* q = row_as_acc<scalar_t, acc_t>(pb.q + r * pb.D, pb.D, w.q.data());
        std::fill(w.acc.begin(), w.acc.end(), acc_t(0));
        if (weights) std::fill(scores.begin(), scores.begin() + limit, neg_inf<acc_t>());
        const SoftmaxState<acc_t> st =
            forward_range(pb, b, q, scale, 0, limit, weights ? scores.data() : nullptr, w);
        lse[r] = softmax_lse(st);
        from_acc_scaled(w.acc.data(), softmax_inv_sum(st), context + r * pb.Dv, pb.Dv);
        if (weights) write_weights(scores.data(), lse[r], limit, pb.S, weights + r * pb.S);
      }
    });
    return;
  }

  // Split-S: each (row, split) task reduces a contiguous chunk of the row's attending range
  // into a partial (max, sum, context); the merge walks the splits in order.
  std::vector<SoftmaxState<acc_t>> part_state(rows * splits);
  std::vector<acc_t> part_acc(rows * splits * pb.Dv);
  std::vector<acc_t> scores(weights ? rows * pb.S : 0);
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(pb.D, pb.Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / splits, sp = task % splits, b = r / pb.Tq;
      const int64_t limit = pb.pos.limit(b);
      const int64_t chunk = (limit + splits - 1) / splits;
      const int64_t j0 = std::min(limit, sp * chunk), j1 = std::min(limit, j0 + chunk);
      const acc_t* q = row_as_acc<scalar_t, acc_t>(pb.q + r * pb.D, pb.D, w.q.data());
      std::fill(w.acc.begin(), w.acc.end(), acc_t(0));
      acc_t* scores_row = weights ? scores.data() + r * pb.S : nullptr;
      if (scores_row) std::fill(scores_row + j0, scores_row + j1, neg_inf<acc_t>());
      part_state[task] = forward_range(pb, b, q, scale, j0, j1, scores_row, w);
      std::copy(w.acc.begin(), w.acc.end(), part_acc.begin() + task * pb.Dv);
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pb.Dv);
    for (int64_t r = begin; r < end; ++r) {
      SoftmaxState<acc_t> st = part_state[r * splits];
      std::copy_n(part_acc.begin() + r * splits * pb.Dv, pb.Dv, acc.begin());
      for (int64_t sp = 1; sp < splits; ++sp) {
        acc_t scale_a, scale_b;
        softmax_merge(st, part_state[r * splits + sp], scale_a, scale_b);
        const acc_t* other = part_acc.data() + (r * splits + sp) * pb.Dv;
        scale_inplace(acc.data(), scale_a, pb.Dv);
        axpy1(acc.data(), scale_b, other, pb.Dv);
      }
      lse[r] = softmax_lse(st);
      from_acc_scaled(acc.data(), softmax_inv_sum(st), context + r * pb.Dv, pb.Dv);
      if (weights) {
        write_weights(scores.data() + r * pb.S, lse[r], pb.pos.limit(r / pb.Tq), pb.S,
                      weights + r * pb.S);
      }
    }
  });
}

// Phase 1 of backward for rows [begin, end): P, dS and grad_query. q_acc/g_acc receive the
// rows in the accumulation type when phase 2 needs converted copies (else null).
template <typename scalar_t>
void backward_rows(const Problem<scalar_t>& pb, at::opmath_type<scalar_t> scale,
                   const scalar_t* grad_ctx, const scalar_t* grad_w,
                   const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* P,
                   at::opmath_type<scalar_t>* dS, scalar_t* grad_q,
                   at::opmath_type<scalar_t>* q_acc, at::opmath_type<scalar_t>* g_acc,
                   int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  Scratch<acc_t> w(pb.D, pb.Dv);
  std::vector<acc_t> dq(pb.D), dp(kBlock);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / pb.Tq;
    const int64_t limit = pb.pos.limit(b);
    const scalar_t* kb = pb.k + b * pb.S * pb.D;
    const scalar_t* vb = pb.v + b * pb.S * pb.Dv;
    acc_t* P_row = P + r * pb.S;
    acc_t* dS_row = dS + r * pb.S;
    std::fill(P_row, P_row + pb.S, acc_t(0));
    std::fill(dS_row, dS_row + pb.S, acc_t(0));
    const acc_t* q = row_as_acc<scalar_t, acc_t>(pb.q + r * pb.D, pb.D,
                                                 q_acc ? q_acc + r * pb.D : w.q.data());
    const acc_t* g = row_as_acc<scalar_t, acc_t>(grad_ctx + r * pb.Dv, pb.Dv,
                                                 g_acc ? g_acc + r * pb.Dv : w.g.data());
    const acc_t row_lse = lse[r];
    acc_t delta = 0;
    for (int64_t jb = 0; jb < limit; jb += kBlock) {
      const int64_t n = pb.pos.gather(b, jb, std::min(jb + kBlock, limit), w.idx.data());
      if (n == 0) continue;
      rows_as_acc(kb, w.idx.data(), n, pb.D, w.kbuf.data(), w.krows.data());
      rows_as_acc(vb, w.idx.data(), n, pb.Dv, w.vbuf.data(), w.vrows.data());
      dots(q, w.krows.data(), n, pb.D, w.s.data());
      dots(g, w.vrows.data(), n, pb.Dv, dp.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = w.idx[i];
        const acc_t p = prob_from_lse(w.s[i] * scale, row_lse);
        acc_t dpi = dp[i];
        if (grad_w) dpi += static_cast<acc_t>(grad_w[r * pb.S + j]);
        P_row[j] = p;
        dS_row[j] = dpi;  // becomes dS once delta is known
        delta += p * dpi;
      }
    }
    std::fill(dq.begin(), dq.end(), acc_t(0));
    for (int64_t jb = 0; jb < limit; jb += kBlock) {
      const int64_t n = pb.pos.gather(b, jb, std::min(jb + kBlock, limit), w.idx.data());
      if (n == 0) continue;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = w.idx[i];
        dS_row[j] = softmax_backward(P_row[j], dS_row[j], delta);
        w.p[i] = dS_row[j];
      }
      rows_as_acc(kb, w.idx.data(), n, pb.D, w.kbuf.data(), w.krows.data());
      axpys(dq.data(), w.p.data(), w.krows.data(), n, pb.D);
    }
    from_acc_scaled(dq.data(), scale, grad_q + r * pb.D, pb.D);
  }
}

// Phase 2 of backward for source positions [begin, end) of the flattened (B, S):
// grad_keys[b, j] = scale * sum_t dS[b, t, j] q[b, t]; grad_values[b, j] = sum_t P g.
template <typename scalar_t>
void backward_sources(const Problem<scalar_t>& pb, at::opmath_type<scalar_t> scale,
                      const at::opmath_type<scalar_t>* q_rows,
                      const at::opmath_type<scalar_t>* g_rows,
                      const at::opmath_type<scalar_t>* P, const at::opmath_type<scalar_t>* dS,
                      scalar_t* grad_k, scalar_t* grad_v, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> gk(pb.D), gv(pb.Dv), wk(pb.Tq), wv(pb.Tq);
  std::vector<const acc_t*> qr(pb.Tq), gr(pb.Tq);
  int64_t current_b = -1;
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / pb.S, j = bj % pb.S;
    if (b != current_b) {
      current_b = b;
      for (int64_t t = 0; t < pb.Tq; ++t) {
        qr[t] = q_rows + (b * pb.Tq + t) * pb.D;
        gr[t] = g_rows + (b * pb.Tq + t) * pb.Dv;
      }
    }
    bool any = false;
    for (int64_t t = 0; t < pb.Tq; ++t) {
      const int64_t r = b * pb.Tq + t;
      wk[t] = dS[r * pb.S + j];
      wv[t] = P[r * pb.S + j];
      any = any || wk[t] != acc_t(0) || wv[t] != acc_t(0);
    }
    if (!any) {  // not attended by any query (padding, masked, or zero gradient)
      std::fill(grad_k + bj * pb.D, grad_k + (bj + 1) * pb.D, scalar_t(0));
      std::fill(grad_v + bj * pb.Dv, grad_v + (bj + 1) * pb.Dv, scalar_t(0));
      continue;
    }
    std::fill(gk.begin(), gk.end(), acc_t(0));
    std::fill(gv.begin(), gv.end(), acc_t(0));
    axpys(gk.data(), wk.data(), qr.data(), pb.Tq, pb.D);
    axpys(gv.data(), wv.data(), gr.data(), pb.Tq, pb.Dv);
    from_acc_scaled(gk.data(), scale, grad_k + bj * pb.D, pb.D);
    from_acc_scaled(gv.data(), acc_t(1), grad_v + bj * pb.Dv, pb.Dv);
  }
}

// Contiguous int64 lengths (int32 accepted at the boundary).
std::optional<at::Tensor> normalized_lengths(const std::optional<at::Tensor>& lengths) {
  if (!lengths.has_value()) return std::nullopt;
  return lengths->to(at::kLong).contiguous();
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool v_is_k, const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& mask, const DotShapes& s) {
  return Problem<scalar_t>{q.data_ptr<scalar_t>(),
                           k.data_ptr<scalar_t>(),
                           v.data_ptr<scalar_t>(),
                           v_is_k,
                           s.B,
                           s.Tq,
                           s.S,
                           s.D,
                           s.Dv,
                           Positions{lengths ? lengths->data_ptr<int64_t>() : nullptr,
                                     mask ? mask->data_ptr<bool>() : nullptr, s.S}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& lengths_in, const std::optional<at::Tensor>& mask_in,
    double scale, bool need_weights) {
  const DotShapes s = check_dot_inputs(query, keys, values, lengths_in, mask_in, scale);
  const auto lse_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor context = at::empty({s.B, s.Tq, s.Dv}, query.options());
  at::Tensor weights = need_weights ? at::empty({s.B, s.Tq, s.S}, query.options())
                                    : at::empty({0}, query.options());
  at::Tensor lse = at::empty({s.B, s.Tq}, query.options().dtype(lse_dtype));
  if (s.B * s.Tq == 0) return {context, weights, lse};

  const bool v_is_k = values.is_same(keys);
  const at::Tensor q = query.contiguous(), k = keys.contiguous();
  const at::Tensor v = v_is_k ? k : values.contiguous();
  const auto lengths = normalized_lengths(lengths_in);
  const auto mask = mask_in ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pb = make_problem<scalar_t>(q, k, v, v_is_k, lengths, mask, s);
    forward_impl<scalar_t>(pb, scale, context.data_ptr<scalar_t>(),
                           need_weights ? weights.data_ptr<scalar_t>() : nullptr,
                           lse.data_ptr<acc_t>());
  });
  return {context, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_backward_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& lengths_in, const std::optional<at::Tensor>& mask_in,
    double scale, const at::Tensor& lse) {
  const DotShapes s = check_dot_inputs(query, keys, values, lengths_in, mask_in, scale);
  check_dot_backward_extras(grad_context, grad_weights, lse, query, s);
  at::Tensor grad_q = at::empty({s.B, s.Tq, s.D}, query.options());
  at::Tensor grad_k = at::empty({s.B, s.S, s.D}, keys.options());
  at::Tensor grad_v = at::empty({s.B, s.S, s.Dv}, values.options());
  if (s.B == 0) return {grad_q, grad_k, grad_v};
  if (s.Tq == 0) {
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }

  const bool v_is_k = values.is_same(keys);
  const at::Tensor q = query.contiguous(), k = keys.contiguous();
  const at::Tensor v = v_is_k ? k : values.contiguous();
  const at::Tensor gc = grad_context.contiguous();
  const auto gw = grad_weights ? std::optional<at::Tensor>(grad_weights->contiguous())
                               : std::nullopt;
  const at::Tensor lse_c = lse.contiguous();
  const auto lengths = normalized_lengths(lengths_in);
  const auto mask = mask_in ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  const int64_t rows = s.B * s.Tq;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
    const auto pb = make_problem<scalar_t>(q, k, v, v_is_k, lengths, mask, s);
    const acc_t sc = static_cast<acc_t>(scale);
    std::vector<acc_t> P(rows * s.S), dS(rows * s.S);
    // Phase 2 reads every query and gradient row once per source position: keep
    // converted copies when the input is not already in the accumulation type.
    std::vector<acc_t> q_acc(convert ? rows * s.D : 0), g_acc(convert ? rows * s.Dv : 0);
    const scalar_t* gw_ptr = gw ? gw->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(pb, sc, gc.data_ptr<scalar_t>(), gw_ptr,
                              lse_c.data_ptr<acc_t>(), P.data(), dS.data(),
                              grad_q.data_ptr<scalar_t>(), convert ? q_acc.data() : nullptr,
                              convert ? g_acc.data() : nullptr, begin, end);
    });
    const acc_t* q_rows = convert ? q_acc.data() : reinterpret_cast<const acc_t*>(pb.q);
    const acc_t* g_rows =
        convert ? g_acc.data() : reinterpret_cast<const acc_t*>(gc.data_ptr<scalar_t>());
    at::parallel_for(0, s.B * s.S, 1, [&](int64_t begin, int64_t end) {
      backward_sources<scalar_t>(pb, sc, q_rows, g_rows, P.data(), dS.data(),
                                 grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
                                 begin, end);
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace cpu
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("dot_attention", &attention_ext::cpu::dot_attention_cpu);
  m.impl("_dot_attention_backward", &attention_ext::cpu::dot_attention_backward_cpu);
}
