// Vectorised row primitives for the CPU kernels (at::vec, compiled for the capability
// setup.py picked). Rows are contiguous arrays of the accumulation type (float or double);
// low-precision inputs are converted into such rows first (to_acc).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace attention_ext {
namespace cpu {

using at::vec::Vectorized;

// An allocator that leaves trivially constructible elements uninitialised: scratch buffers
// are written before they are read, and zero-filling them would cost a short decode step
// dearly (docs/performance.md, "Scratch").
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A std::vector whose elements start uninitialised.
template <typename T>
using Buffer = std::vector<T, UninitAllocator<T>>;

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// Loads the tail [d, n) zero-filled so tails need no scalar loop.
template <typename T>
inline Vectorized<T> load_tail(const T* p, int64_t d, int64_t n) {
  return Vectorized<T>::loadu(p + d, static_cast<int>(n - d));
}

// acc = acc_scale acc + sum_{i<8} w[i] r[i]: one read-modify-write of acc per eight rows,
// in two FMA chains so consecutive columns overlap; acc_scale is the online softmax's
// rescale, folded in rather than a pass of its own. [pf, pf_end) is prefetched meanwhile
// (8 cache lines per 4 vectors): the rows come from L1, so without it the memory system
// idles during this pass.
template <typename T>
inline void axpy8(T* acc, T acc_scale, const T w[8], const T* const* r, int64_t n,
                  const char* pf = nullptr, const char* pf_end = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V as(acc_scale);
  const V w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]), w4(w[4]), w5(w[5]), w6(w[6]), w7(w[7]);
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6],
          *r7 = r[7];
  std::uintptr_t pf_next = reinterpret_cast<std::uintptr_t>(pf);
  const std::uintptr_t pf_stop = reinterpret_cast<std::uintptr_t>(pf_end);
  int64_t d = 0;
  for (; d + W <= n; d += W) {
    if (d % (4 * W) == 0) {
      // Integer addresses: the cursor may step past pf_end, which a pointer may not.
      for (int line = 0; line < 8 && pf_next < pf_stop; ++line, pf_next += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(pf_next));
    }
    V a = at::vec::fmadd(w0, V::loadu(r0 + d), V::loadu(acc + d) * as);
    V b = w1 * V::loadu(r1 + d);
    a = at::vec::fmadd(w2, V::loadu(r2 + d), a);
    b = at::vec::fmadd(w3, V::loadu(r3 + d), b);
    a = at::vec::fmadd(w4, V::loadu(r4 + d), a);
    b = at::vec::fmadd(w5, V::loadu(r5 + d), b);
    a = at::vec::fmadd(w6, V::loadu(r6 + d), a);
    b = at::vec::fmadd(w7, V::loadu(r7 + d), b);
    (a + b).store(acc + d);
  }
  for (; d < n; ++d)
    acc[d] = acc[d] * acc_scale + (w[0] * r0[d] + w[1] * r1[d] + w[2] * r2[d] + w[3] * r3[d] +
                                   w[4] * r4[d] + w[5] * r5[d] + w[6] * r6[d] + w[7] * r7[d]);
}

template <typename T>
inline void axpy1(T* acc, T w, const T* r, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V wv(w);
  int64_t d = 0;
  for (; d + W <= n; d += W) at::vec::fmadd(wv, V::loadu(r + d), V::loadu(acc + d)).store(acc + d);
  for (; d < n; ++d) acc[d] += w * r[d];
}

template <typename T>
inline void scale_inplace(T* x, T a, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V av(a);
  int64_t d = 0;
  for (; d + W <= n; d += W) (V::loadu(x + d) * av).store(x + d);
  for (; d < n; ++d) x[d] *= a;
}

// src (input dtype) -> dst (accumulation dtype).
template <typename scalar_t, typename acc_t>
inline void to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // An empty row may come with null pointers, which memcpy must not see even for n = 0.
    if (n > 0) std::memcpy(dst, src, sizeof(acc_t) * n);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced precision accumulates in float");
    using Vs = Vectorized<scalar_t>;
    using Vf = Vectorized<float>;
    int64_t d = 0;
    for (; d + Vs::size() <= n; d += Vs::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vs::loadu(src + d));
      lo.store(dst + d);
      hi.store(dst + d + Vf::size());
    }
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  }
}

// dst = src * a, converted to the output dtype.
template <typename acc_t, typename scalar_t>
inline void from_acc_scaled(const acc_t* src, acc_t a, scalar_t* dst, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const V av(a);
    int64_t d = 0;
    for (; d + W <= n; d += W) (V::loadu(src + d) * av).store(dst + d);
    for (; d < n; ++d) dst[d] = src[d] * a;
  } else {
    using Vs = Vectorized<scalar_t>;
    const V av(a);
    int64_t d = 0;
    for (; d + Vs::size() <= n; d += Vs::size()) {
      const V lo = V::loadu(src + d) * av;
      const V hi = V::loadu(src + d + W) * av;
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + d);
    }
    for (; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d] * a);
  }
}

}  // namespace cpu
}  // namespace attention_ext

namespace attention_ext {
namespace cpu {

// x[i] = exp(x[i] - shift), returning their sum. float uses ATen's polynomial exp_u20 (the
// one ATen's own CPU flash attention uses; ~1e-6 relative error) because glibc's scalar
// expf would cost as much as the dot products at decode sizes, and sums by vector lanes (a
// scalar running sum is one long chain of dependent adds); double keeps the exact std::exp.
template <typename T>
inline T exp_shifted_sum(T* x, T shift, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    using V = Vectorized<float>;
    constexpr int64_t W = V::size();
    const V s(shift);
    V acc(0.f);
    int64_t d = 0;
    for (; d + W <= n; d += W) {
      const V e = (V::loadu(x + d) - s).exp_u20();
      e.store(x + d);
      acc = acc + e;
    }
    if (d < n) {
      const int rest = static_cast<int>(n - d);
      const V e = (V::loadu(x + d, rest) - s).exp_u20();
      e.store(x + d, rest);
      acc = acc + V::set(V(0.f), e, rest);  // the lanes past n hold exp(-shift)
    }
    return hsum(acc);
  } else {
    T sum = 0;
    for (int64_t d = 0; d < n; ++d) {
      x[d] = std::exp(x[d] - shift);
      sum += x[d];
    }
    return sum;
  }
}

}  // namespace cpu
}  // namespace attention_ext
