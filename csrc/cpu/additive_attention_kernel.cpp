// CPU kernels of attention_ext::additive_attention and its backward.
//
// Forward: the blocked online softmax of blocked_softmax.h with v . tanh(q + k) as its
// score (TanhScore, scores.h): per tile of up to kTile queries and block of keys, each key vector is
// loaded once for the whole tile. No B x Tq x S x A tensor exists: tanh is consumed where
// it is computed.
//
// Backward (deterministic, no atomics), tanh recomputed from the inputs:
//   1. per query tile: P from the saved log-sum-exp and dS (Tq x S), as the dot op;
//   2. per (batch element, column block of A): grad_query_proj and grad_keys_proj of those
//      columns, and that batch element's partial of grad_v; one task owns each output
//      element, and the partials of grad_v are summed over the batch in a fixed order;
//   3. per tile of source positions: grad_values = P^T grad_context.
// With B >= threads a thread runs all three for whole batch elements (float16/bfloat16
// rows converted per element); with fewer, each phase is spread over the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_ext/checks.h"
#include "attention_ext/forward_outputs.h"
#include "attention_ext/inputs.h"
#include "attention_ext/test_hooks.h"
#include "blocked_softmax.h"
#include "scores.h"
#include "vec_tanh.h"

namespace attention_ext {
namespace cpu {
namespace {

// Columns of A per backward task: several vectors, so a task amortises its setup, and
// B x A / kGradColumns tasks balance the threads.
constexpr int64_t kGradColumns = 64;

template <typename scalar_t>
Problem<scalar_t> make_problem(const AdditiveInputs& in, const AdditiveShapes& s) {
  return Problem<scalar_t>{in.query_proj.data_ptr<scalar_t>(),
                           in.keys_proj.data_ptr<scalar_t>(),
                           in.values.data_ptr<scalar_t>(),
                           false,
                           s.B,
                           s.Tq,
                           s.S,
                           s.A,
                           s.Dv,
                           key_positions(in.lengths, in.mask, s.S, in.memory_index, s.M)};
}

// Phase 2 for batch element b and columns [c0, c1) of A, h = tanh(q[t, a] + k[j, a]):
//   grad_k[b, j, a] = sum_t dS[t, j] v[a] (1 - h^2)  (summed in registers, written once)
//   grad_q[b, t, a] = sum_j dS[t, j] v[a] (1 - h^2)  (gq_buf: Tq x kGradColumns, in L1)
//   gv_part[a]      = sum_j sum_t dS[t, j] h
// Keys are walked in order, each row segment read once; keys that do not attend get a
// zero gradient without being read.
template <typename T>
void tanh_grad_task(const Problem<T>& pb, const T* v, const T* dS, int64_t b, int64_t c0,
                    int64_t c1, T* grad_q, T* grad_k, T* gv_part, T* gq_buf, T* gv_buf) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t A = pb.Dk, S = pb.S, Tq = pb.Tq;
  const int64_t width = c1 - c0, limit = pb.pos.end(b);
  const T* q = pb.q + b * Tq * A + c0;
  const T* dSb = dS + b * Tq * S;
  std::fill(gq_buf, gq_buf + Tq * kGradColumns, T(0));
  std::fill(gv_buf, gv_buf + kGradColumns, T(0));
  for (int64_t j = 0; j < S; ++j) {
    T* gk_row = grad_k + (b * S + j) * A + c0;
    if (j >= limit || !pb.pos.attends(b, j)) {
      std::fill(gk_row, gk_row + width, T(0));
      continue;
    }
    const T* k_row = pb.k + (pb.pos.row(b) * S + j) * A + c0;
    for (int64_t c = 0; c < width; c += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, width - c));
      const V kv = V::loadu(k_row + c, lanes), vv = V::loadu(v + c0 + c, lanes);
      V gk(T(0)), gv(T(0));
      for (int64_t t = 0; t < Tq; ++t) {
        const V d(dSb[t * S + j]);
        const V h = vec_tanh(V::loadu(q + t * A + c, lanes) + kv);
        gv = at::vec::fmadd(d, h, gv);
        const V u = d * vv;
        const V g = at::vec::fnmadd(u * h, h, u);  // dS v (1 - h^2)
        gk = gk + g;
        T* gq = gq_buf + t * kGradColumns + c;
        (V::loadu(gq) + g).store(gq);
      }
      gk.store(gk_row + c, lanes);
      (V::loadu(gv_buf + c) + gv).store(gv_buf + c);
    }
  }
  for (int64_t t = 0; t < Tq; ++t)
    std::copy_n(gq_buf + t * kGradColumns, width, grad_q + (b * Tq + t) * A + c0);
  std::copy_n(gv_buf, width, gv_part + c0);
}

// The three phases of the backward over a Problem in the accumulation type T. Each phase
// takes a range of its tasks; tasks of one batch element are contiguous.
template <typename T>
struct TanhBackward {
  const Problem<T>& pb;
  const T* v;         // (A,)
  const T* grad_ctx;  // (B, Tq, Dv)
  const T* grad_w;    // (B, Tq, S) or nullptr
  const T* lse;       // (B, Tq)
  T* P;               // (B, Tq, S) scratch
  T* dS;              // (B, Tq, S) scratch
  T* grad_q;
  T* grad_k;
  T* grad_values;
  T* gv_part;  // (B, A): each batch element's share of grad_v

  int64_t query_tiles() const { return ceil_div(pb.Tq, kTile); }
  int64_t column_blocks() const { return ceil_div(pb.Dk, kGradColumns); }
  int64_t source_tiles() const { return ceil_div(pb.S, kTile); }

  // 1. P and dS per query tile.
  void softmax_part(int64_t begin, int64_t end) const {
    Scratch<T> w(pb.Dk, pb.Dv, kTile, /*convert=*/false);
    const TanhScore<T> score{v};
    for (int64_t tile = begin; tile < end; ++tile)
      softmax_grad_tile(pb, score, tile, grad_ctx, grad_w, lse, P, dS, w.q.data(), w.g.data(), w);
  }
  // 2. The tanh backward per (batch element, column block).
  void tanh_part(int64_t begin, int64_t end) const {
    std::vector<T> gq_buf(pb.Tq * kGradColumns), gv_buf(kGradColumns);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / column_blocks(), c0 = (task % column_blocks()) * kGradColumns;
      tanh_grad_task(pb, v, dS, b, c0, std::min(pb.Dk, c0 + kGradColumns), grad_q, grad_k,
                     gv_part + b * pb.Dk, gq_buf.data(), gv_buf.data());
    }
  }
  // 3. grad_values = P^T grad_context per tile of source positions.
  void values_part(int64_t begin, int64_t end) const {
    source_grad_tiles<T>(pb, nullptr, grad_ctx, P, nullptr, nullptr, grad_values, begin,
                         end);
  }
  void all_tasks_of_one_element() const {
    softmax_part(0, query_tiles());
    tanh_part(0, column_blocks());
    values_part(0, source_tiles());
  }
};

// grad_v = sum of the partials over b, in order: the same bits for any thread count.
template <typename T>
void reduce_grad_v(const T* gv_part, int64_t B, int64_t A, T* grad_v) {
  const int64_t blocks = ceil_div(A, kGradColumns);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t a0 = begin * kGradColumns, a1 = std::min(A, end * kGradColumns);
    std::fill(grad_v + a0, grad_v + a1, T(0));
    for (int64_t b = 0; b < B; ++b) axpy1(grad_v + a0, T(1), gv_part + b * A + a0, a1 - a0);
  });
}

// Few batch elements (B < threads): every phase is spread over all threads, on inputs
// converted to the accumulation type as a whole.
template <typename T>
void backward_by_phase(const Problem<T>& pb, const T* v, const T* grad_ctx, const T* grad_w,
                       const T* lse, T* grad_q, T* grad_k, T* grad_v, T* grad_values) {
  std::vector<T> P(pb.B * pb.Tq * pb.S), dS(P.size()), gv_part(pb.B * pb.Dk);
  const TanhBackward<T> bw{pb, v, grad_ctx, grad_w, lse, P.data(), dS.data(), grad_q, grad_k,
                           grad_values, gv_part.data()};
  at::parallel_for(0, pb.B * bw.query_tiles(), 1,
                   [&](int64_t b, int64_t e) { bw.softmax_part(b, e); });
  at::parallel_for(0, pb.B * bw.column_blocks(), 1,
                   [&](int64_t b, int64_t e) { bw.tanh_part(b, e); });
  at::parallel_for(0, pb.B * bw.source_tiles(), 1,
                   [&](int64_t b, int64_t e) { bw.values_part(b, e); });
  reduce_grad_v(gv_part.data(), pb.B, pb.Dk, grad_v);
}

// A batch element's rows in the accumulation type: the input itself when no conversion is
// needed, else a converted copy of its first `rows` rows in buf.
template <typename scalar_t, typename acc_t>
const acc_t* element_rows(const scalar_t* src, int64_t rows, int64_t width, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    to_acc(src, buf.data(), rows * width);
    return buf.data();
  }
}

// Writes a batch element's gradient rows back in the input dtype (no-op without conversion).
template <typename scalar_t, typename acc_t>
void store_element_rows(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) from_acc_scaled(src, acc_t(1), dst, n);
}

// Many batch elements (B >= threads): a thread takes whole batch elements and runs their
// three phases back to back, while the element's rows are in its L2. P and dS are per
// thread (Tq x S), and low-precision rows are converted per element, so the only memory
// beyond the outputs is O(threads x element).
template <typename scalar_t>
void backward_by_element(const Problem<scalar_t>& pb, const at::opmath_type<scalar_t>* v,
                         const scalar_t* grad_ctx, const scalar_t* grad_w,
                         const at::opmath_type<scalar_t>* lse, scalar_t* grad_q,
                         scalar_t* grad_k, at::opmath_type<scalar_t>* grad_v,
                         scalar_t* grad_values) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t Tq = pb.Tq, S = pb.S, A = pb.Dk, Dv = pb.Dv;
  std::vector<acc_t> gv_part(pb.B * A);
  at::parallel_for(0, pb.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> P(Tq * S), dS(Tq * S);
    auto sized = [&](int64_t n) { return std::vector<acc_t>(convert ? n : 0); };
    std::vector<acc_t> q = sized(Tq * A), k = sized(S * A), val = sized(S * Dv),
                       g = sized(Tq * Dv), gw = sized(grad_w ? Tq * S : 0),
                       gq = sized(Tq * A), gk = sized(S * A), gval = sized(S * Dv);
    for (int64_t b = b0; b < b1; ++b) {
      // Rows past the length are never read (nor converted); their gradients are zeros.
      const int64_t limit = pb.pos.end(b), m = pb.pos.row(b);
      const Problem<acc_t> one{
          element_rows(pb.q + b * Tq * A, Tq, A, q),
          element_rows(pb.k + m * S * A, limit, A, k),
          element_rows(pb.v + m * S * Dv, limit, Dv, val),
          false, 1, Tq, S, A, Dv,
          pb.pos.element(b)};
      acc_t* gq_b = convert ? gq.data() : reinterpret_cast<acc_t*>(grad_q + b * Tq * A);
      acc_t* gk_b = convert ? gk.data() : reinterpret_cast<acc_t*>(grad_k + b * S * A);
      acc_t* gval_b = convert ? gval.data() : reinterpret_cast<acc_t*>(grad_values + b * S * Dv);
      const TanhBackward<acc_t> bw{
          one, v, element_rows(grad_ctx + b * Tq * Dv, Tq, Dv, g),
          grad_w ? element_rows(grad_w + b * Tq * S, Tq, S, gw) : nullptr, lse + b * Tq,
          P.data(), dS.data(), gq_b, gk_b, gval_b, gv_part.data() + b * A};
      bw.all_tasks_of_one_element();
      store_element_rows(gq_b, Tq * A, grad_q + b * Tq * A);
      store_element_rows(gk_b, S * A, grad_k + b * S * A);
      store_element_rows(gval_b, S * Dv, grad_values + b * S * Dv);
    }
  });
  reduce_grad_v(gv_part.data(), pb.B, A, grad_v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_cpu(
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, bool need_weights,
    const std::optional<at::Tensor>& memory_index) {
  const AdditiveShapes s =
      check_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index);
  const ForwardOutputs out(query_proj, s, s.S, s.Dv, need_weights);
  if (s.B * s.Tq == 0) return out.as_tuple();

  const AdditiveInputs in =
      contiguous_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index,
                                 DeviceLengths::kHostChecks);
  const at::Tensor v_acc = in.v.to(acc_dtype(query_proj.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query_proj.scalar_type(),
                                  "additive_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    blocked_softmax_forward(make_problem<scalar_t>(in, s), TanhScore<acc_t>{v_acc.data_ptr<acc_t>()},
                            out.context.data_ptr<scalar_t>(),
                            need_weights ? out.weights.data_ptr<scalar_t>() : nullptr,
                            out.lse.data_ptr<acc_t>());
  });
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query_proj, const at::Tensor& keys_proj, const at::Tensor& v,
    const at::Tensor& values, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse,
    const std::optional<at::Tensor>& memory_index) {
  const AdditiveShapes s =
      check_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index);
  check_additive_backward_extras(grad_context, grad_weights, lse, query_proj, s);
  const auto dtype = query_proj.scalar_type();
  const at::ScalarType acc_type = acc_dtype(dtype);
  const auto acc_opts = query_proj.options().dtype(acc_type);
  if (s.B * s.Tq == 0) {
    return {at::empty_like(query_proj, at::MemoryFormat::Contiguous), at::zeros_like(keys_proj),
            at::zeros_like(v), at::zeros_like(values)};
  }
  const AdditiveInputs in =
      contiguous_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index,
                                 DeviceLengths::kHostChecks);
  const at::Tensor gc = grad_context.contiguous();
  const auto gw = contiguous_opt(grad_weights);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor v_acc = in.v.to(acc_type);
  at::Tensor grad_v = at::empty({s.A}, acc_opts);
  if (backward_schedule(s.B) == BackwardSchedule::kByElement) {
    at::Tensor grad_q = at::empty(s.row_sizes(s.A), query_proj.options());
    const MemoryGradient grad_k(query_proj, in.memory_index, s.B, s.M, s.S, s.A);
    const MemoryGradient grad_values(query_proj, in.memory_index, s.B, s.M, s.S, s.Dv);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                    "additive_attention_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_by_element<scalar_t>(make_problem<scalar_t>(in, s), v_acc.data_ptr<acc_t>(),
                                    gc.data_ptr<scalar_t>(),
                                    gw ? gw->data_ptr<scalar_t>() : nullptr,
                                    lse_c.data_ptr<acc_t>(), grad_q.data_ptr<scalar_t>(),
                                    grad_k.rows().data_ptr<scalar_t>(), grad_v.data_ptr<acc_t>(),
                                    grad_values.rows().data_ptr<scalar_t>());
    });
    return {grad_q, grad_k.sum(), grad_v.to(dtype), grad_values.sum()};
  }
  // Few batch elements: convert as a whole (small B keeps this small).
  auto acc = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  const AdditiveInputs in_acc =
      contiguous_additive_inputs(acc(in.query_proj), acc(in.keys_proj), v_acc, acc(in.values),
                                 in.lengths, in.mask, in.memory_index,
                                 DeviceLengths::kHostChecks);
  const at::Tensor gc_acc = acc(gc);
  const auto gw_acc = gw ? std::optional<at::Tensor>(acc(*gw)) : std::nullopt;
  at::Tensor grad_q = at::empty(s.row_sizes(s.A), acc_opts);
  const MemoryGradient grad_k(grad_q, in.memory_index, s.B, s.M, s.S, s.A);
  const MemoryGradient grad_values(grad_q, in.memory_index, s.B, s.M, s.S, s.Dv);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "additive_attention_backward_cpu", [&] {
    backward_by_phase<scalar_t>(make_problem<scalar_t>(in_acc, s), v_acc.data_ptr<scalar_t>(),
                                gc_acc.data_ptr<scalar_t>(),
                                gw_acc ? gw_acc->data_ptr<scalar_t>() : nullptr,
                                lse_c.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(),
                                grad_k.rows().data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
                                grad_values.rows().data_ptr<scalar_t>());
  });
  return {grad_q.to(dtype), grad_k.sum().to(dtype), grad_v.to(dtype),
          grad_values.sum().to(dtype)};
}

}  // namespace

// The kernels' vectorised float32 tanh, elementwise (test_hooks.h).
at::Tensor tanh_float32(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  using V = Vectorized<float>;
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel();
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) vec_tanh(V::loadu(src + i)).store(dst + i);
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    vec_tanh(V::loadu(src + i, rest)).store(dst + i, rest);
  }
  return out;
}

}  // namespace cpu
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("additive_attention", &attention_ext::cpu::additive_attention_cpu);
  m.impl("_additive_attention_backward", &attention_ext::cpu::additive_attention_backward_cpu);
}
