// Vectorised tanh for the additive kernels, and the tanh score of query rows against key
// rows built on it.
//
// float: the rational approximation of math.h (fast_tanh), one division per vector;
// Vectorized<float>::tanh falls back to scalar std::tanh inside an extension (about 0.5
// G floats/s on 2 threads, a fifth of the rational one). double: the exact std::tanh,
// lane by lane.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention_ext/math.h"
#include "blocked_softmax.h"
#include "vec_ops.h"

namespace attention_ext {
namespace cpu {

inline Vectorized<float> vec_tanh(const Vectorized<float>& x_in) {
  using V = Vectorized<float>;
  // clamp keeps NaN (max/min return their second operand when one is NaN).
  const V x = at::vec::clamp(x_in, V(-kTanhClamp), V(kTanhClamp));
  const V z = x * x;
  V p = at::vec::fmadd(V(kTanhP4), z, V(kTanhP3));
  p = at::vec::fmadd(p, z, V(kTanhP2));
  p = at::vec::fmadd(p, z, V(kTanhP1));
  p = at::vec::fmadd(p, z, V(kTanhP0));
  V q = at::vec::fmadd(V(kTanhQ4), z, V(kTanhQ3));
  q = at::vec::fmadd(q, z, V(kTanhQ2));
  q = at::vec::fmadd(q, z, V(kTanhQ1));
  q = at::vec::fmadd(q, z, V(1.0f));
  return x * p / q;
}

inline Vectorized<double> vec_tanh(const Vectorized<double>& x) {
  return x.map(static_cast<double (*)(double)>(std::tanh));
}

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
