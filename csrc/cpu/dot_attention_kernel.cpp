// CPU kernels of attention_ext::dot_attention and its backward.
//
// Forward: the blocked online softmax of blocked_softmax.h with the scaled dot product as
// its score (DotScore, scores.h: register-blocked query x key tiles, gemm_tiles.h).
//
// Backward (deterministic, no atomics): phase 1, per query tile, recomputes the
// probabilities from the saved log-sum-exp and writes P and dS (Tq x S per batch element),
// then grad_query = dS K per batch element; phase 2, per run of source positions, sums over
// the queries for grad_keys and grad_values.
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
#include "blocked_softmax.h"
#include "scores.h"

namespace attention_ext {
namespace cpu {
namespace {

// Phase 1 of backward for the query tiles [begin, end): P, dS (scaled by `scale`, so it is
// the gradient of the unscaled dot products) and grad_query. q_acc/g_acc receive the rows
// in the accumulation type when phase 2 needs converted copies. The tiles of one batch
// element share one grad_query product, so its rows take nn_tile's panel path.
template <typename scalar_t>
void backward_tiles(const Problem<scalar_t>& pb, at::opmath_type<scalar_t> scale,
                    const scalar_t* grad_ctx, const scalar_t* grad_w,
                    const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* P,
                    at::opmath_type<scalar_t>* dS, scalar_t* grad_q,
                    at::opmath_type<scalar_t>* q_acc, at::opmath_type<scalar_t>* g_acc,
                    int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_b = ceil_div(pb.Tq, kTile);
  const DotScore<acc_t> score{scale};
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  Scratch<acc_t> w(pb.Dk, pb.Dv, kTile, convert);
  Buffer<acc_t> dq, kconv, a;
  Buffer<int64_t> idx;
  std::vector<const acc_t*> krows;
  std::vector<acc_t*> out;
  for (int64_t tile = begin; tile < end;) {
    const int64_t b = tile / tiles_per_b;
    const int64_t run_end = std::min(end, (b + 1) * tiles_per_b);
    const int64_t t0 = (tile % tiles_per_b) * kTile;
    const int64_t M = std::min(pb.Tq, (run_end - b * tiles_per_b) * kTile) - t0;
    const int64_t r0 = b * pb.Tq + t0;
    for (; tile < run_end; ++tile) {
      const int64_t rt = b * pb.Tq + (tile % tiles_per_b) * kTile;
      softmax_grad_tile(pb, score, tile, grad_ctx, grad_w, lse, P, dS,
                        q_acc ? q_acc + rt * pb.Dk : w.q.data(),
                        g_acc ? g_acc + rt * pb.Dv : w.g.data(), w);
    }
    const int64_t limit = pb.pos.end(b);
    for (int64_t m = 0; m < M; ++m) scale_inplace(dS + (r0 + m) * pb.S, scale, limit);
    // grad_query = dS K over the attending keys (a mask's others may hold anything).
    idx.resize(limit);
    const int64_t n = pb.pos.gather(b, 0, limit, idx.data());
    const scalar_t* keys_b = pb.k + pb.pos.row(b) * pb.S * pb.Dk;
    krows.resize(n);
    if (convert) kconv.resize(n * pb.Dk);
    rows_as_acc(keys_b, idx.data(), n, pb.Dk, kconv.data(), krows.data());
    const acc_t* A = dS + r0 * pb.S;
    int64_t lda = pb.S;
    if (n < limit) {
      a.resize(M * n);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < n; ++i) a[m * n + i] = dS[(r0 + m) * pb.S + idx[i]];
      A = a.data();
      lda = n;
    }
    out.resize(M);
    acc_rows(grad_q + r0 * pb.Dk, M, pb.Dk, dq, out.data());
    nn_tile(M, n, A, lda, 1, krows.data(), pb.Dk, out.data(), /*overwrite=*/true);
    store_rows(out.data(), M, pb.Dk, grad_q + r0 * pb.Dk);
  }
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const DotInputs& in, const DotShapes& s) {
  return Problem<scalar_t>{in.query.data_ptr<scalar_t>(),
                           in.keys.data_ptr<scalar_t>(),
                           in.values.data_ptr<scalar_t>(),
                           in.values_are_keys,
                           s.B,
                           s.Tq,
                           s.S,
                           s.D,
                           s.Dv,
                           key_positions(in.lengths, in.mask, s.S, in.memory_index, s.M)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_cpu(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& lengths_in, const std::optional<at::Tensor>& mask_in,
    double scale, bool need_weights, const std::optional<at::Tensor>& memory_index) {
  const DotShapes s =
      check_dot_inputs(query, keys, values, lengths_in, mask_in, scale, memory_index);
  const ForwardOutputs out(query, s, s.S, s.Dv, need_weights);
  if (s.B * s.Tq == 0) return out.as_tuple();

  const DotInputs in = contiguous_dot_inputs(query, keys, values, lengths_in, mask_in,
                                             memory_index, DeviceLengths::kHostChecks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pb = make_problem<scalar_t>(in, s);
    blocked_softmax_forward(pb, DotScore<acc_t>{static_cast<acc_t>(scale)},
                            out.context.data_ptr<scalar_t>(),
                            need_weights ? out.weights.data_ptr<scalar_t>() : nullptr,
                            out.lse.data_ptr<acc_t>());
  });
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_attention_backward_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& lengths_in, const std::optional<at::Tensor>& mask_in,
    double scale, const at::Tensor& lse, const std::optional<at::Tensor>& memory_index) {
  const DotShapes s =
      check_dot_inputs(query, keys, values, lengths_in, mask_in, scale, memory_index);
  check_dot_backward_extras(grad_context, grad_weights, lse, query, s);
  at::Tensor grad_q = at::empty(s.row_sizes(s.D), query.options());
  const bool combined = !values.has_value();
  if (s.B * s.Tq == 0) {
    return {grad_q, at::zeros_like(keys, at::MemoryFormat::Contiguous),
            combined ? at::empty({0}, keys.options())
                     : at::zeros_like(*values, at::MemoryFormat::Contiguous)};
  }

  const DotInputs in = contiguous_dot_inputs(query, keys, values, lengths_in, mask_in,
                                             memory_index, DeviceLengths::kHostChecks);
  const MemoryGradient grad_keys(keys, in.memory_index, s.B, s.M, s.S, s.D);
  const MemoryGradient grad_values(keys, in.memory_index, s.B, s.M, s.S, combined ? 0 : s.Dv);
  const at::Tensor& grad_k = grad_keys.rows();
  const at::Tensor& grad_v = grad_values.rows();
  const at::Tensor gc = grad_context.contiguous();
  const auto gw = contiguous_opt(grad_weights);
  const at::Tensor lse_c = lse.contiguous();
  const int64_t rows = s.B * s.Tq;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(),
                                  "dot_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
    const auto pb = make_problem<scalar_t>(in, s);
    const acc_t sc = static_cast<acc_t>(scale);
    // Phase 2 reads every query and gradient row once per source position: keep
    // converted copies when the input is not already in the accumulation type.
    Buffer<acc_t> q_acc(convert ? rows * s.D : 0), g_acc(convert ? rows * s.Dv : 0);
    const scalar_t* gc_ptr = gc.data_ptr<scalar_t>();
    const scalar_t* gw_ptr = gw ? gw->data_ptr<scalar_t>() : nullptr;
    const acc_t* lse_ptr = lse_c.data_ptr<acc_t>();
    scalar_t* gq_ptr = grad_q.data_ptr<scalar_t>();
    scalar_t* gk_ptr = grad_k.data_ptr<scalar_t>();
    scalar_t* gv_ptr = combined ? nullptr : grad_v.data_ptr<scalar_t>();
    const acc_t* q_rows = convert ? q_acc.data() : reinterpret_cast<const acc_t*>(pb.q);
    const acc_t* g_rows = convert ? g_acc.data() : reinterpret_cast<const acc_t*>(gc_ptr);
    const int64_t q_tiles_per_b = ceil_div(s.Tq, kTile);
    const int64_t src_tiles_per_b = ceil_div(s.S, kTile);
    if (backward_schedule(s.B) == BackwardSchedule::kByElement) {
      // Each element is a one-element problem with the thread's own P and dS.
      const int64_t Tq = s.Tq, S = s.S, D = s.D, Dv = s.Dv;
      balanced_parallel_for(
          s.B, [&](int64_t b) { return (pb.pos.end(b) + 2) * Tq; },
          [&](int64_t b0, int64_t b1) {
            Buffer<acc_t> P(Tq * S), dS(Tq * S);
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t m = pb.pos.row(b);
              const Problem<scalar_t> one{pb.q + b * Tq * D, pb.k + m * S * D,
                                          pb.v + m * S * Dv, pb.v_is_k, 1, Tq, S, D, Dv,
                                          pb.pos.element(b)};
              backward_tiles<scalar_t>(one, sc, gc_ptr + b * Tq * Dv,
                                      gw_ptr ? gw_ptr + b * Tq * S : nullptr, lse_ptr + b * Tq,
                                      P.data(), dS.data(), gq_ptr + b * Tq * D,
                                      convert ? q_acc.data() + b * Tq * D : nullptr,
                                      convert ? g_acc.data() + b * Tq * Dv : nullptr, 0,
                                      q_tiles_per_b);
              source_grad_tiles<scalar_t>(one, q_rows + b * Tq * D, g_rows + b * Tq * Dv,
                                         P.data(), dS.data(), gk_ptr + b * S * D,
                                         gv_ptr ? gv_ptr + b * S * Dv : nullptr, 0,
                                         src_tiles_per_b);
            }
          });
      return;
    }
    Buffer<acc_t> P(rows * s.S), dS(rows * s.S);
    at::parallel_for(0, s.B * q_tiles_per_b, 1, [&](int64_t begin, int64_t end) {
      backward_tiles<scalar_t>(pb, sc, gc_ptr, gw_ptr, lse_ptr, P.data(), dS.data(), gq_ptr,
                              convert ? q_acc.data() : nullptr, convert ? g_acc.data() : nullptr,
                              begin, end);
    });
    at::parallel_for(0, s.B * src_tiles_per_b, 1, [&](int64_t begin, int64_t end) {
      source_grad_tiles<scalar_t>(pb, q_rows, g_rows, P.data(), dS.data(), gk_ptr, gv_ptr,
                                 begin, end);
    });
  });
  return {grad_q, grad_keys.sum(),
          combined ? at::empty({0}, keys.options()) : grad_values.sum()};
}

}  // namespace
}  // namespace cpu
}  // namespace attention_ext

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("dot_attention", &attention_ext::cpu::dot_attention_cpu);
  m.impl("_dot_attention_backward", &attention_ext::cpu::dot_attention_backward_cpu);
}
