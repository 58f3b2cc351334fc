// Vectorised tanh for the additive CPU kernels.
//
// float: tanh|x| = m / (m + 2) with m = expm1(2|x|), then the sign of x. expm1 as
// 2^n (1 + q) - 1 = fma(2^n, q, 2^n - 1), with 2|x| = n ln2 + r, |r| <= ln2 / 2, and
// q = expm1(r) by Taylor to r^7: accurate to about an ulp relative for every |x|, tiny
// ones included (no cancellation in e - 1), and m + 2 rounds to m where tanh rounds to 1.
// Within 9e-8 of tanh everywhere (tests/test_additive_tanh.py): a tanh a few ulp off near
// +-1, times a large v against saturated projections, would give scores and gradients well
// outside eager's error. One division per vector; Vectorized<float>::tanh falls back to
// scalar std::tanh inside an extension (docs/performance.md, "tanh"). double: the exact
// std::tanh, lane by lane.
#pragma once

#include <cmath>
#include <cstdint>

#include "vec_ops.h"

namespace attention_ext {
namespace cpu {

// tanh(10) rounds to 1 in float32; clamping there keeps 2^n and m finite.
constexpr float kTanhSaturated = 10.0f;
constexpr float kTwoLog2e = 2.8853900817779268f;  // 2 / ln 2
constexpr float kLn2Hi = 0.693145751953125f;       // ln 2 = kLn2Hi + kLn2Lo, n * kLn2Hi exact
constexpr float kLn2Lo = 1.4286068203094172e-06f;
// Added to a float in [-2^21, 2^21], rounds it to an integer n and leaves n + 127, the
// biased exponent of 2^n, in the low mantissa bits: 1.5 * 2^23 + 127.
constexpr float kRoundToExponent = 12583039.0f;

inline Vectorized<float> vec_tanh(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using Vi = Vectorized<int32_t>;
  // clamp_max keeps NaN (min returns its second operand when one is NaN), which then
  // flows through to the result.
  const V ax = at::vec::clamp_max(x.abs(), V(kTanhSaturated));
  const V biased = at::vec::fmadd(ax, V(kTwoLog2e), V(kRoundToExponent));
  const V n = biased - V(kRoundToExponent);
  const V y = ax + ax;
  const V r = at::vec::fmadd(n, V(-kLn2Lo), at::vec::fmadd(n, V(-kLn2Hi), y));
  V q = at::vec::fmadd(V(1.0f / 5040), r, V(1.0f / 720));
  q = at::vec::fmadd(q, r, V(1.0f / 120));
  q = at::vec::fmadd(q, r, V(1.0f / 24));
  q = at::vec::fmadd(q, r, V(1.0f / 6));
  q = at::vec::fmadd(q, r, V(0.5f));
  q = at::vec::fmadd(q, r, V(1.0f));
  q = q * r;
  // The shift moves n + 127 into the exponent field and drops everything above it.
  const V two_n = at::vec::cast<float>(at::vec::cast<int32_t>(biased) << Vi(23));
  const V m = at::vec::fmadd(two_n, q, two_n - V(1.0f));
  return (m / (m + V(2.0f))) | (x & V(-0.0f));
}

inline Vectorized<double> vec_tanh(const Vectorized<double>& x) {
  return x.map(static_cast<double (*)(double)>(std::tanh));
}

}  // namespace cpu
}  // namespace attention_ext
