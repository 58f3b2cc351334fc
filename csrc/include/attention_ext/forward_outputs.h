// What every forward returns, allocated alike by the CPU and CUDA kernels: context
// (rows, Dv), weights (rows, S) or an empty tensor when not needed, and the per-row
// log-sum-exp lse in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "attention_ext/checks.h"

namespace attention_ext {

// Every floating input accumulates in float32 but float64, which keeps float64: the dtype
// of lse, of the backward's saved probabilities and of every scratch buffer (the kernels'
// compile-time counterpart is at::opmath_type).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct ForwardOutputs {
  at::Tensor context, weights, lse;

  ForwardOutputs(const at::Tensor& like, const QueryRows& rows, int64_t S, int64_t Dv,
                 bool need_weights)
      : context(at::empty(rows.row_sizes(Dv), like.options())),
        weights(need_weights ? at::empty(rows.row_sizes(S), like.options())
                             : at::empty({0}, like.options())),
        lse(at::empty(rows.row_sizes(), like.options().dtype(acc_dtype(like.scalar_type())))) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {context, weights, lse};
  }
};

}  // namespace attention_ext
