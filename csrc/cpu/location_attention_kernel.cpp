// CPU kernels of attention_ext::location_attention and its backward.
//
// A thread takes whole query rows (balanced by the positions they attend) and computes each
// in its own scratch, so no B x S x A or B x S x F tensor exists. Only the n positions of
// [window start, min(window end, length)) are computed: the location features there read
// prev around them, not the features elsewhere. Per row, small matrix products
// (gemm_tiles.h) on prev_c, channel c of the row's prev with P zeros either side:
//   L = sum_c X_c W_c^T        n x F, X_c[r, k] = prev_c[lo + r + k]: a strided view of
//                              prev_c (row stride 1), so no im2col is written
//   Z = q + kp + L U^T         n x A, then h = tanh(Z) in place and e = scale h v + bias.
// The backward recomputes L and h, then, with de the scores' gradient:
//   dZ = de scale v (1 - h^2) in place of h;  gL = dZ U;  grad_U_b = dZ^T L;
//   grad_W_b[:, c] = gL^T X_c;  gX = gL W (n x C K), added up along its diagonals into
//   grad_prev_b (the transposed convolution).
// grad_U, grad_W, grad_v and grad_score_bias are summed from per-row partials in row order:
// the same bits for any thread count, and no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "attention_ext/key_positions.h"
#include "attention_ext/math.h"
#include "balanced_for.h"
#include "gemm_tiles.h"
#include "vec_ops.h"
#include "vec_tanh.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace attention_ext {
namespace cpu {
namespace {

// Elements per task of the ordered sums over rows: a few vectors, so a task amortises its
// setup while the tasks still spread over the threads.
constexpr int64_t kSumChunk = 256;

// Pointers to `count` rows `stride` elements apart, as gemm_tiles.h takes its operands.
template <typename T, typename P>
void row_pointers(T* base, int64_t count, int64_t stride, std::vector<P>& rows) {
  rows.resize(count);
  for (int64_t i = 0; i < count; ++i) rows[i] = base + i * stride;
}

// The parameters in the accumulation type T, each also laid out as gemm_tiles.h reads the
// right operand of a product (rows of the columns it produces).
template <typename T>
struct LocationParams {
  int64_t A, F, C, K, CK, P;
  at::Tensor W, Wt, U, Ut, v;  // (F, CK), (CK, F), (A, F), (F, A), (A,)
  T scale, bias;
  bool sigmoid;
  std::vector<const T*> W_rows, Wt_rows, U_rows, Ut_rows;

  LocationParams(const LocationInputs& in, const LocationShapes& s, double scale_,
                 bool sigmoid_)
      : A(s.A), F(s.F), C(s.C), K(s.K), CK(s.C * s.K), P((s.K - 1) / 2),
        scale(static_cast<T>(scale_)), sigmoid(sigmoid_) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    W = in.conv_weight.to(acc).reshape({F, CK}).contiguous();
    Wt = W.t().contiguous();
    U = in.location_weight.to(acc).contiguous();
    Ut = U.t().contiguous();
    v = in.v.to(acc).contiguous();
    bias = in.score_bias ? in.score_bias->to(acc).template item<T>() : T(0);
    row_pointers(W.data_ptr<T>(), F, CK, W_rows);
    row_pointers(Wt.data_ptr<T>(), CK, F, Wt_rows);
    row_pointers(U.data_ptr<T>(), A, F, U_rows);
    row_pointers(Ut.data_ptr<T>(), F, A, Ut_rows);
  }
};

// The per-row inputs as the kernels read them (input dtype).
template <typename scalar_t>
struct LocationProblem {
  const scalar_t* q;       // (B, A)
  const scalar_t* kp;      // (M, S, A)
  const scalar_t* prev;    // (B, C, S)
  const scalar_t* values;  // (M, S, Dv)
  int64_t B, S, Dv;
  KeyPositions pos;
  AttendedWindow window;

  // The positions row b may attend: [window start, min(window end, length)).
  std::pair<int64_t, int64_t> span(int64_t b) const {
    const int64_t lo = window.start(b);
    return {lo, std::max(lo, std::min(window.end(b), pos.end(b)))};
  }
  // A row's work for balanced_parallel_for: its positions, plus what any row costs (an empty
  // row still writes its zeros).
  int64_t cost(int64_t b) const {
    const auto [lo, hi] = span(b);
    return hi - lo + 1;
  }
};

template <typename scalar_t>
LocationProblem<scalar_t> make_problem(const LocationInputs& in, const LocationShapes& s) {
  return LocationProblem<scalar_t>{in.query_proj.data_ptr<scalar_t>(),
                                   in.keys_proj.data_ptr<scalar_t>(),
                                   in.prev.data_ptr<scalar_t>(),
                                   in.values.data_ptr<scalar_t>(),
                                   s.B,
                                   s.S,
                                   s.Dv,
                                   key_positions(in.lengths, in.mask, s.S, in.memory_index, s.M),
                                   attended_window(in.window, s.S)};
}

// Writes n accumulation-type values to dst in its dtype.
template <typename T, typename scalar_t>
void store_row(const T* src, int64_t n, scalar_t* dst) {
  from_acc_scaled(src, T(1), dst, n);
}

template <typename scalar_t>
void zero_row(scalar_t* dst, int64_t n) {
  std::fill(dst, dst + n, scalar_t(0));
}

// dst = x + y.
template <typename T>
void add_rows(const T* x, const T* y, T* dst, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t d = 0;
  for (; d + W <= n; d += W) (V::loadu(x + d) + V::loadu(y + d)).store(dst + d);
  for (; d < n; ++d) dst[d] = x[d] + y[d];
}

// dst = a src, for the rows of grad_values (B x S x Dv a call, not read again by this
// kernel): non-temporal stores write them without first reading their cache lines, which
// saves about 6% of the backward at Tacotron 2's sizes. Other dtypes and builds store
// as from_acc_scaled does.
template <typename T, typename scalar_t>
void stream_scaled(const T* src, T a, scalar_t* dst, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    constexpr int64_t kLanes = 16;
    const __m512 av = _mm512_set1_ps(a);
    const auto store = [&](int64_t d) {
      _mm512_stream_ps(dst + d, _mm512_mul_ps(av, _mm512_loadu_ps(src + d)));
    };
#else
    constexpr int64_t kLanes = 8;
    const __m256 av = _mm256_set1_ps(a);
    const auto store = [&](int64_t d) {
      _mm256_stream_ps(dst + d, _mm256_mul_ps(av, _mm256_loadu_ps(src + d)));
    };
#endif
    constexpr std::uintptr_t kAlign = kLanes * sizeof(float);
    int64_t d = 0;
    for (; d < n && reinterpret_cast<std::uintptr_t>(dst + d) % kAlign != 0; ++d)
      dst[d] = a * src[d];
    for (; d + kLanes <= n; d += kLanes) store(d);
    for (; d < n; ++d) dst[d] = a * src[d];
    _mm_sfence();
    return;
  }
#endif
  from_acc_scaled(src, a, dst, n);
}

// ctx = sum_r p[r] rows[r] over n rows of length D, streamed eight rows at a time with the
// next eight prefetched: the rows come from memory once, in order.
template <typename T>
void weighted_rows(const T* p, const T* const* rows, int64_t n, int64_t D, T* ctx) {
  std::fill(ctx, ctx + D, T(0));
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    const int64_t next = std::min(n, r + 16);
    const char* pf = r + 8 < n ? reinterpret_cast<const char*>(rows[r + 8]) : nullptr;
    const char* pf_end = pf ? reinterpret_cast<const char*>(rows[next - 1] + D) : nullptr;
    axpy8(ctx, T(1), p + r, rows + r, D, pf, pf_end);
  }
  for (; r < n; ++r) axpy1(ctx, p[r], rows[r], D);
}

// One thread's scratch and the row computations shared by forward and backward. After
// scores(b), rows [0, n) of L and Z hold positions lo + r, Z holds h = tanh(Z), e the
// scores, and prev_pad the row's prev, zero-padded.
template <typename scalar_t>
struct RowScores {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, T>;

  const LocationProblem<scalar_t>& pb;
  const LocationParams<T>& w;
  const int64_t padded;  // S + 2 P, the length of a channel of prev_pad
  Buffer<T> L, Z, e, p, q, prev_pad, vals;
  std::vector<T*> L_rows, Z_rows;
  std::vector<const T*> val_rows;
  int64_t b = 0, lo = 0, hi = 0, n = 0, m = 0;

  RowScores(const LocationProblem<scalar_t>& pb_, const LocationParams<T>& w_)
      : pb(pb_), w(w_), padded(pb.S + 2 * w.P), L(pb.S * w.F), Z(pb.S * w.A), e(pb.S),
        p(pb.S), q(w.A), prev_pad(w.C * padded), vals(kConvert ? pb.S * pb.Dv : 0) {
    row_pointers(L.data(), pb.S, w.F, L_rows);
    row_pointers(Z.data(), pb.S, w.A, Z_rows);
    val_rows.resize(pb.S);
  }

  bool attends(int64_t r) const { return pb.pos.attends(b, lo + r); }

  // Channel c of prev_pad from the position under tap 0 of row r.
  const T* window_of(int64_t c, int64_t r) const { return prev_pad.data() + c * padded + lo + r; }

  void scores(int64_t row_b) {
    b = row_b;
    std::tie(lo, hi) = pb.span(b);
    n = hi - lo;
    m = pb.pos.row(b);
    if (n == 0) return;
    const int64_t S = pb.S, A = w.A, F = w.F, C = w.C, K = w.K, P = w.P;
    for (int64_t c = 0; c < C; ++c) {
      T* dst = prev_pad.data() + c * padded;
      std::fill(dst, dst + P, T(0));
      to_acc(pb.prev + (b * C + c) * S, dst + P, S);
      std::fill(dst + P + S, dst + padded, T(0));
    }
    for (int64_t c = 0; c < C; ++c)
      nn_tile(n, K, window_of(c, 0), 1, 1, w.Wt_rows.data() + c * K, F, L_rows.data(),
              /*overwrite=*/c == 0);
    to_acc(pb.q + b * A, q.data(), A);
    const scalar_t* kp = pb.kp + (m * S + lo) * A;
    for (int64_t r = 0; r < n; ++r) {
      T* z = Z.data() + r * A;
      if constexpr (kConvert) {
        to_acc(kp + r * A, z, A);
        axpy1(z, T(1), q.data(), A);
      } else {
        add_rows(kp + r * A, q.data(), z, A);
      }
    }
    nn_tile(n, F, L.data(), F, 1, w.Ut_rows.data(), A, Z_rows.data());
    const T* v = w.v.template data_ptr<T>();
    constexpr int64_t W = V::size();
    for (int64_t r = 0; r < n; ++r) {
      T* z = Z.data() + r * A;
      V acc(T(0));
      int64_t a = 0;
      for (; a + W <= A; a += W) {
        const V h = vec_tanh(V::loadu(z + a));
        h.store(z + a);
        acc = at::vec::fmadd(V::loadu(v + a), h, acc);
      }
      if (a < A) {
        const int rest = static_cast<int>(A - a);
        const V h = vec_tanh(V::loadu(z + a, rest));
        h.store(z + a, rest);
        acc = at::vec::fmadd(load_tail(v, a, A), h, acc);
      }
      e[r] = w.scale * hsum(acc) + w.bias;
    }
  }

  // Rows [lo, hi) of the row's values in the accumulation type.
  void value_rows() {
    const scalar_t* src = pb.values + (m * pb.S + lo) * pb.Dv;
    for (int64_t r = 0; r < n; ++r) {
      if constexpr (kConvert) {
        to_acc(src + r * pb.Dv, vals.data() + r * pb.Dv, pb.Dv);
        val_rows[r] = vals.data() + r * pb.Dv;
      } else {
        val_rows[r] = src + r * pb.Dv;
      }
    }
  }

  // The weights p (0 where not attended) from the scores; returns lse: log-sum-exp of the
  // scores (softmax) or log of the sum of their sigmoids, -inf when nothing attends.
  T normalise() {
    if (w.sigmoid) {
      T sum = 0;
      for (int64_t r = 0; r < n; ++r) {
        p[r] = attends(r) ? T(1) / (T(1) + ae_exp(-e[r])) : T(0);
        sum += p[r];
      }
      const T inv = sum > T(0) || sum != sum ? T(1) / sum : T(0);
      for (int64_t r = 0; r < n; ++r) p[r] *= inv;
      return sum > T(0) || sum != sum ? ae_log(sum) : neg_inf<T>();
    }
    SoftmaxState<T> st = softmax_init<T>();
    for (int64_t r = 0; r < n; ++r)
      if (attends(r)) st.max = ae_max(st.max, e[r]);
    for (int64_t r = 0; r < n; ++r) {
      p[r] = attends(r) ? ae_exp(e[r] - st.max) : T(0);
      st.sum += p[r];
    }
    const T inv = softmax_inv_sum(st);
    for (int64_t r = 0; r < n; ++r) p[r] *= inv;
    return softmax_lse(st);
  }
};

template <typename scalar_t>
void location_forward(const LocationProblem<scalar_t>& pb,
                      const LocationParams<at::opmath_type<scalar_t>>& w, scalar_t* context,
                      scalar_t* weights, at::opmath_type<scalar_t>* lse) {
  using T = at::opmath_type<scalar_t>;
  const int64_t S = pb.S, Dv = pb.Dv;
  balanced_parallel_for(pb.B, [&](int64_t b) { return pb.cost(b); }, [&](int64_t b0, int64_t b1) {
    RowScores<scalar_t> row(pb, w);
    Buffer<T> ctx(Dv);
    for (int64_t b = b0; b < b1; ++b) {
      row.scores(b);
      lse[b] = row.n == 0 ? neg_inf<T>() : row.normalise();
      if (row.n == 0) {
        zero_row(context + b * Dv, Dv);
      } else {
        row.value_rows();
        weighted_rows(row.p.data(), row.val_rows.data(), row.n, Dv, ctx.data());
        store_row(ctx.data(), Dv, context + b * Dv);
      }
      if (weights) {
        scalar_t* wb = weights + b * S;
        zero_row(wb, row.lo);
        store_row(row.p.data(), row.n, wb + row.lo);
        zero_row(wb + row.hi, S - row.hi);
      }
    }
  });
}

// Per-row partials of the parameters' gradients, (B, ...) each, in the accumulation type.
template <typename T>
struct ParamPartials {
  T* U;     // (B, A, F)
  T* W;     // (B, F, CK)
  T* v;     // (B, A)
  T* bias;  // (B,)
};

template <typename scalar_t>
struct RowGradients {
  scalar_t* q;       // (B, A)
  scalar_t* kp;      // (B, S, A): MemoryGradient rows
  scalar_t* prev;    // (B, C, S)
  scalar_t* values;  // (B, S, Dv): MemoryGradient rows
};

template <typename scalar_t>
void location_backward(const LocationProblem<scalar_t>& pb,
                       const LocationParams<at::opmath_type<scalar_t>>& w,
                       const scalar_t* grad_ctx, const scalar_t* grad_w,
                       const at::opmath_type<scalar_t>* lse, const RowGradients<scalar_t>& g,
                       const ParamPartials<at::opmath_type<scalar_t>>& part) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t S = pb.S, Dv = pb.Dv, A = w.A, F = w.F, C = w.C, K = w.K, CK = w.CK;
  const T* v = w.v.template data_ptr<T>();
  balanced_parallel_for(pb.B, [&](int64_t b) { return pb.cost(b); }, [&](int64_t b0, int64_t b1) {
    RowScores<scalar_t> row(pb, w);
    Buffer<T> gc(Dv), dp(S), gL(S * F), gq(A), gv(A), gX(S * CK), gp(C * row.padded);
    std::vector<T*> gL_rows, gU_rows, gW_rows, gX_rows;
    std::vector<const T*> X_rows(S);
    row_pointers(gL.data(), S, F, gL_rows);
    row_pointers(gX.data(), S, CK, gX_rows);
    for (int64_t b = b0; b < b1; ++b) {
      T* gU_b = part.U + b * A * F;
      T* gW_b = part.W + b * F * CK;
      const auto [first, last] = pb.span(b);
      if (first == last || lse[b] == neg_inf<T>()) {
        zero_row(g.q + b * A, A);
        zero_row(g.kp + b * S * A, S * A);
        zero_row(g.prev + b * C * S, C * S);
        zero_row(g.values + b * S * Dv, S * Dv);
        std::fill(gU_b, gU_b + A * F, T(0));
        std::fill(gW_b, gW_b + F * CK, T(0));
        std::fill(part.v + b * A, part.v + (b + 1) * A, T(0));
        part.bias[b] = 0;
        continue;
      }
      row.scores(b);
      const int64_t lo = row.lo, hi = row.hi, n = row.n;
      // The weights again: p = exp(e - lse), or sigmoid(e) / exp(lse) with the sigmoids
      // kept in e for their derivative; renormalised by their sum (math.h).
      T* p = row.p.data();
      T* e = row.e.data();
      T psum = 0;
      for (int64_t r = 0; r < n; ++r) {
        if (!row.attends(r)) {
          p[r] = 0;
        } else if (w.sigmoid) {
          e[r] = T(1) / (T(1) + ae_exp(-e[r]));
          p[r] = e[r] * ae_exp(-lse[b]);
        } else {
          p[r] = prob_from_lse(e[r], lse[b]);
        }
        psum += p[r];
      }
      // dp_j = grad_context . values_j + grad_weights_j
      to_acc(grad_ctx + b * Dv, gc.data(), Dv);
      row.value_rows();
      const T* gc_row = gc.data();
      nt_tile(&gc_row, 1, row.val_rows.data(), n, Dv, dp.data(), n);
      if (grad_w)
        for (int64_t r = 0; r < n; ++r) dp[r] += static_cast<T>(grad_w[b * S + lo + r]);
      T sum_p_dp = 0;
      for (int64_t r = 0; r < n; ++r) sum_p_dp += p[r] * dp[r];
      const T delta = softmax_grad_delta(sum_p_dp, psum);
      const T prob_scale = softmax_prob_scale(psum);
      T bias_sum = 0;
      for (int64_t r = 0; r < n; ++r) {
        p[r] *= prob_scale;
        T de = row.attends(r) ? softmax_backward(p[r], dp[r], delta) : T(0);
        if (w.sigmoid) de *= T(1) - e[r];
        dp[r] = de;  // the scores' gradient from here on
        bias_sum += de;
      }
      part.bias[b] = bias_sum;
      // grad_values rows: p_j grad_context.
      scalar_t* gval = g.values + b * S * Dv;
      zero_row(gval, lo * Dv);
      for (int64_t r = 0; r < n; ++r) stream_scaled(gc.data(), p[r], gval + (lo + r) * Dv, Dv);
      zero_row(gval + hi * Dv, (S - hi) * Dv);
      // dZ = de scale v (1 - h^2) in place of h; grad_q = sum_j dZ_j; grad_v += de_j h_j.
      std::fill(gq.data(), gq.data() + A, T(0));
      std::fill(gv.data(), gv.data() + A, T(0));
      scalar_t* gkp = g.kp + b * S * A;
      zero_row(gkp, lo * A);
      for (int64_t r = 0; r < n; ++r) {
        T* z = row.Z.data() + r * A;
        const V de(dp[r]), u0(dp[r] * w.scale);
        const auto step = [&](int64_t a, int lanes) {
          const V h = lanes == W ? V::loadu(z + a) : V::loadu(z + a, lanes);
          const V u = u0 * (lanes == W ? V::loadu(v + a) : V::loadu(v + a, lanes));
          const V dz = at::vec::fnmadd(u * h, h, u);
          if (lanes == W) {
            dz.store(z + a);
            at::vec::fmadd(de, h, V::loadu(gv.data() + a)).store(gv.data() + a);
            (V::loadu(gq.data() + a) + dz).store(gq.data() + a);
          } else {
            dz.store(z + a, lanes);
            at::vec::fmadd(de, h, V::loadu(gv.data() + a, lanes)).store(gv.data() + a, lanes);
            (V::loadu(gq.data() + a, lanes) + dz).store(gq.data() + a, lanes);
          }
        };
        int64_t a = 0;
        for (; a + W <= A; a += W) step(a, W);
        if (a < A) step(a, static_cast<int>(A - a));
        store_row(z, A, gkp + (lo + r) * A);
      }
      zero_row(gkp + hi * A, (S - hi) * A);
      store_row(gq.data(), A, g.q + b * A);
      from_acc_scaled(gv.data(), w.scale, part.v + b * A, A);
      // gL = dZ U, grad_U_b = dZ^T L, grad_W_b[:, c] = gL^T X_c, gX = gL W.
      const T* dZ = row.Z.data();
      nn_tile(n, A, dZ, A, 1, w.U_rows.data(), F, gL_rows.data(), /*overwrite=*/true);
      row_pointers(gU_b, A, F, gU_rows);
      nn_tile(A, n, dZ, 1, A, row.L_rows.data(), F, gU_rows.data(), /*overwrite=*/true);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = 0; r < n; ++r) X_rows[r] = row.window_of(c, r);
        row_pointers(gW_b + c * K, F, CK, gW_rows);
        nn_tile(F, n, gL.data(), 1, F, X_rows.data(), K, gW_rows.data(), /*overwrite=*/true);
      }
      nn_tile(n, F, gL.data(), F, 1, w.W_rows.data(), CK, gX_rows.data(), /*overwrite=*/true);
      // grad_prev[c, lo + r + k - P] += gX[r, c K + k], in prev_pad's coordinates.
      std::fill(gp.data(), gp.data() + C * row.padded, T(0));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c)
          axpy1(gp.data() + c * row.padded + lo + r, T(1), gX.data() + r * CK + c * K, K);
      for (int64_t c = 0; c < C; ++c)
        store_row(gp.data() + c * row.padded + w.P, S, g.prev + (b * C + c) * S);
    }
  });
}

// out[i] = sum_b parts[b n + i], b in order: the same bits for any thread count.
template <typename T>
void sum_partials(const T* parts, int64_t B, int64_t n, T* out) {
  at::parallel_for(0, ceil_div(n, kSumChunk), 1, [&](int64_t c0, int64_t c1) {
    const int64_t i0 = c0 * kSumChunk, i1 = std::min(n, c1 * kSumChunk);
    std::fill(out + i0, out + i1, T(0));
    for (int64_t b = 0; b < B; ++b) axpy1(out + i0, T(1), parts + b * n + i0, i1 - i0);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> location_attention_cpu(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale, bool sigmoid, bool need_weights,
    const std::optional<at::Tensor>& memory_index) {
  const LocationShapes s =
      check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight, v,
                            values, lengths, mask, window, score_bias, scale, memory_index);
  const ForwardOutputs out(query_proj, s, s.S, s.Dv, need_weights);
  if (s.B == 0) return out.as_tuple();
  const LocationInputs in = contiguous_location_inputs(
      query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
      window, score_bias, memory_index, DeviceLengths::kHostChecks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query_proj.scalar_type(),
                                  "location_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LocationParams<acc_t> params(in, s, scale, sigmoid);
    location_forward(make_problem<scalar_t>(in, s), params, out.context.data_ptr<scalar_t>(),
                     need_weights ? out.weights.data_ptr<scalar_t>() : nullptr,
                     out.lse.data_ptr<acc_t>());
  });
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
location_attention_backward_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& prev,
    const at::Tensor& conv_weight, const at::Tensor& location_weight, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& window,
    const std::optional<at::Tensor>& score_bias, double scale, bool sigmoid,
    const at::Tensor& lse, const std::optional<at::Tensor>& memory_index) {
  const LocationShapes s =
      check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight, v,
                            values, lengths, mask, window, score_bias, scale, memory_index);
  check_location_backward_extras(grad_context, grad_weights, lse, query_proj, s);
  const auto dtype = query_proj.scalar_type();
  const auto acc_opts = query_proj.options().dtype(acc_dtype(dtype));
  const int64_t CK = s.C * s.K;
  at::Tensor grad_bias = at::zeros({score_bias ? 1 : 0}, acc_opts);
  if (s.B == 0) {
    return {at::empty_like(query_proj, at::MemoryFormat::Contiguous),
            at::zeros_like(keys_proj, at::MemoryFormat::Contiguous),
            at::empty_like(prev, at::MemoryFormat::Contiguous),
            at::zeros_like(conv_weight, at::MemoryFormat::Contiguous),
            at::zeros_like(location_weight, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous),
            at::zeros_like(values, at::MemoryFormat::Contiguous),
            grad_bias.to(dtype)};
  }
  const LocationInputs in = contiguous_location_inputs(
      query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
      window, score_bias, memory_index, DeviceLengths::kHostChecks);
  const at::Tensor gc = grad_context.contiguous();
  const auto gw = contiguous_opt(grad_weights);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty({s.B, s.A}, query_proj.options());
  at::Tensor grad_prev = at::empty({s.B, s.C, s.S}, query_proj.options());
  const MemoryGradient grad_kp(query_proj, in.memory_index, s.B, s.M, s.S, s.A);
  const MemoryGradient grad_values(query_proj, in.memory_index, s.B, s.M, s.S, s.Dv);
  at::Tensor part_U = at::empty({s.B, s.A * s.F}, acc_opts);
  at::Tensor part_W = at::empty({s.B, s.F * CK}, acc_opts);
  at::Tensor part_v = at::empty({s.B, s.A}, acc_opts);
  at::Tensor part_bias = at::empty({s.B}, acc_opts);
  at::Tensor grad_U = at::empty({s.A, s.F}, acc_opts);
  at::Tensor grad_W = at::empty({s.F, s.C, s.K}, acc_opts);
  at::Tensor grad_v = at::empty({s.A}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "location_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LocationParams<acc_t> params(in, s, scale, sigmoid);
    const RowGradients<scalar_t> grads{grad_q.data_ptr<scalar_t>(),
                                       grad_kp.rows().data_ptr<scalar_t>(),
                                       grad_prev.data_ptr<scalar_t>(),
                                       grad_values.rows().data_ptr<scalar_t>()};
    const ParamPartials<acc_t> parts{part_U.data_ptr<acc_t>(), part_W.data_ptr<acc_t>(),
                                     part_v.data_ptr<acc_t>(), part_bias.data_ptr<acc_t>()};
    location_backward(make_problem<scalar_t>(in, s), params, gc.data_ptr<scalar_t>(),
                      gw ? gw->data_ptr<scalar_t>() : nullptr, lse_c.data_ptr<acc_t>(),
                      grads, parts);
    sum_partials(parts.U, s.B, s.A * s.F, grad_U.data_ptr<acc_t>());
    sum_partials(parts.W, s.B, s.F * CK, grad_W.data_ptr<acc_t>());
    sum_partials(parts.v, s.B, s.A, grad_v.data_ptr<acc_t>());
    if (score_bias) sum_partials(parts.bias, s.B, 1, grad_bias.data_ptr<acc_t>());
  });
  return {grad_q,          grad_kp.sum(),    grad_prev,           grad_W.to(dtype),
          grad_U.to(dtype), grad_v.to(dtype), grad_values.sum(), grad_bias.to(dtype)};
}

}  // namespace
}  // namespace cpu
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("location_attention", &attention_ext::cpu::location_attention_cpu);
  m.impl("_location_attention_backward", &attention_ext::cpu::location_attention_backward_cpu);
}
