// Arithmetic shared by the CPU and CUDA kernels: online-softmax state and merge,
// log-sum-exp, softmax backward, the CUDA kernels' tanh. Everything here is
// HOST_DEVICE_INLINE so the CPU tests exercise the very code the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(ATTENTION_EXT_CUDA_EMULATION)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif

namespace attention_ext {

// Blocks of b that cover a (a >= 0, b > 0).
HOST_DEVICE_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= n, capped at `cap` (a power of two).
HOST_DEVICE_INLINE constexpr int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

template <typename T>
HOST_DEVICE_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

HOST_DEVICE_INLINE float ae_exp(float x) { return ::expf(x); }
HOST_DEVICE_INLINE double ae_exp(double x) { return ::exp(x); }
HOST_DEVICE_INLINE float ae_log(float x) { return ::logf(x); }
HOST_DEVICE_INLINE double ae_log(double x) { return ::log(x); }
HOST_DEVICE_INLINE float ae_log1p(float x) { return ::log1pf(x); }
HOST_DEVICE_INLINE double ae_log1p(double x) { return ::log1p(x); }

// sigmoid(x) without overflow: exp of a non-positive number only.
template <typename T>
HOST_DEVICE_INLINE T stable_sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + ae_exp(-x));
  const T ex = ae_exp(x);
  return ex / (T(1) + ex);
}

// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)): the location op's sigmoid normalisation
// recomputes alpha_j = exp(log sigmoid(e_j) - lse), lse = log sum_k sigmoid(e_k).
template <typename T>
HOST_DEVICE_INLINE T log_sigmoid(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x < T(0) ? x : T(0)) - ae_log1p(ae_exp(-ax));
}

// max that propagates a NaN from either side. Commutative, so a warp's butterfly
// (warp_max) leaves the same value in every lane and branches on it stay uniform;
// `a > b ? a : b` is not: after a NaN score some lanes would hold NaN and others a number.
HOST_DEVICE_INLINE float ae_max(float a, float b) { return (a > b || a != a) ? a : b; }
HOST_DEVICE_INLINE double ae_max(double a, double b) { return (a > b || a != a) ? a : b; }

// Running max and sum of exp(score - max) over the keys seen so far. A row that has
// seen no key has max = -inf and sum = 0; every function below keeps that case NaN-free.
template <typename T>
struct SoftmaxState {
  T max;
  T sum;
};

template <typename T>
HOST_DEVICE_INLINE SoftmaxState<T> softmax_init() {
  return SoftmaxState<T>{neg_inf<T>(), T(0)};
}

// exp(from - to) with -inf - -inf defined as 0 (nothing seen on the `from` side).
template <typename T>
HOST_DEVICE_INLINE T rescale_factor(T from, T to) {
  return from == neg_inf<T>() ? T(0) : ae_exp(from - to);
}

// Raises the running max to cover `block_max` and returns the factor by which
// everything accumulated so far (sum and context) must be multiplied.
template <typename T>
HOST_DEVICE_INLINE T softmax_raise_max(SoftmaxState<T>& s, T block_max) {
  const T new_max = ae_max(s.max, block_max);
  const T alpha = rescale_factor(s.max, new_max);
  s.sum *= alpha;
  s.max = new_max;
  return alpha;
}

// Merges partial state `b` into `a` (split-S); `scale_a`/`scale_b` rescale their contexts.
template <typename T>
HOST_DEVICE_INLINE void softmax_merge(SoftmaxState<T>& a, const SoftmaxState<T>& b, T& scale_a,
                                      T& scale_b) {
  const T new_max = ae_max(a.max, b.max);
  scale_a = rescale_factor(a.max, new_max);
  scale_b = rescale_factor(b.max, new_max);
  a.sum = a.sum * scale_a + b.sum * scale_b;
  a.max = new_max;
}

// Whether a row (or split) saw an attending key: its sum is then at least exp(0) = 1, or
// NaN after a NaN score, which must reach the row's outputs; only a row that saw no key
// has a sum of exactly 0.
template <typename T>
HOST_DEVICE_INLINE bool softmax_saw_keys(const SoftmaxState<T>& s) {
  return !(s.sum == T(0));
}

// log(sum_j exp(score_j)); -inf for a row with nothing to attend to, NaN after a NaN score
// (so its weights and gradients are NaN too, not hidden).
template <typename T>
HOST_DEVICE_INLINE T softmax_lse(const SoftmaxState<T>& s) {
  return softmax_saw_keys(s) ? s.max + ae_log(s.sum) : neg_inf<T>();
}

// 1 / sum, or 0 for an empty row so its context is 0, not NaN.
template <typename T>
HOST_DEVICE_INLINE T softmax_inv_sum(const SoftmaxState<T>& s) {
  return softmax_saw_keys(s) ? T(1) / s.sum : T(0);
}

// Probability of a score given the row's log-sum-exp (recomputation in backward).
template <typename T>
HOST_DEVICE_INLINE T prob_from_lse(T score, T lse) {
  return lse == neg_inf<T>() ? T(0) : ae_exp(score - lse);
}

// d score_j = p_j * (d p_j - delta), delta = sum_k p_k d p_k.
template <typename T>
HOST_DEVICE_INLINE T softmax_backward(T p, T dp, T delta) {
  return p * (dp - delta);
}

// delta from the row's sums of p_k d p_k and of p_k. Probabilities recomputed from the
// log-sum-exp sum to 1 only to within the rounding of lse, a few ulp of |lse| rather than of
// 1, and where one key takes nearly all the weight d p_j - delta is a small difference that
// this error swamps (docs/design.md, section 3). Dividing by their sum restores the
// cancellation: d p_j - delta = sum_k p_k (d p_j - d p_k) / sum_k p_k.
template <typename T>
HOST_DEVICE_INLINE T softmax_grad_delta(T sum_p_dp, T sum_p) {
  return sum_p > T(0) ? sum_p_dp / sum_p : T(0);
}

// The factor that makes the backward's probabilities sum to 1. Recomputed from scores that
// round unlike the forward's (a few ulp of a score of 100 is 1e-5), p_j = exp(s_j - lse)
// sum to 1 only within that rounding, and a row whose weight is nearly all on one key
// would pass its upstream gradient to grad_values that much too large or small; divided
// by their sum they are the forward's weights again, and softmax_grad_delta's delta is
// then sum_j p_j d p_j of these normalised p.
template <typename T>
HOST_DEVICE_INLINE T softmax_prob_scale(T sum_p) {
  return sum_p > T(0) ? T(1) / sum_p : T(0);
}

// The additive score's tanh in the CUDA kernels (and in their emulation): the platform's
// tanhf, within 2 ulp of tanh (CUDA's: an exp and a reciprocal beyond small |x|, an odd
// polynomial inside, no dearer than a rational with an IEEE division), so float32 scores
// of large v against saturated projections err no more than eager's torch.tanh. float64
// keeps the exact tanh. The CPU kernels' vectorised tanh is csrc/cpu/vec_tanh.h.
HOST_DEVICE_INLINE float score_tanh(float x) { return ::tanhf(x); }
HOST_DEVICE_INLINE double score_tanh(double x) { return ::tanh(x); }

}  // namespace attention_ext
