// Block-level matrix products for many query rows at once (teacher forcing and the
// backward, Tq >= kQueryTileMinRows): a block computes a 32 x 32 tile of C = A B, walking
// the contraction in steps staged in shared memory, so each input row is read once per
// tile instead of once per query row or key. A step waits on one memory latency, so the
// steps are long (kPairStep) and the next step's loads are issued before this step's
// products (pair_product_kernel), and a thread issues all its loads of a step, lines and
// coefficients, before storing any.
//  - 16-bit dtypes multiply on the tensor cores (nvcuda::wmma 16 x 16 x 16, float
//    accumulators; each of the 4 warps owns one 16 x 16 quarter of the tile);
//  - float32 and float64 multiply exactly with FMAs (each thread owns 2 x 4 outputs), as
//    matmul does without allow_tf32; with it, float32 multiplies on the TF32 tensor cores
//    (16 x 16 x 8, inputs rounded to TF32, float accumulators), as matmul does then;
//  - the additive score's terms v[k] tanh(a + b) are FMAs and tanh in the accumulation
//    type, whatever the dtype.
// Two kernels use it: pair_product_kernel (scores-like products of two row sets,
// C[t, j] = <x_t, y_j>, up to two at once) and weighted_rows_kernel (C[m, :] =
// sum_k coef(m, k) row_k, the context and the gradients). Both end in the caller's
// epilogue, element by element, from a tile of C in shared memory. No atomics: every
// output element is summed by one block in a fixed order.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_ext/math.h"
#include "device_primitives.cuh"

#if !defined(ATTENTION_EXT_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace attention_ext {

// The one choice between the row kernels and the tile kernels: tiles from this many query
// rows per batch element up (fewer rows leave most of a 32-row tile empty).
constexpr int64_t kQueryTileMinRows = 16;
inline bool uses_query_tiles(int64_t Tq) { return Tq >= kQueryTileMinRows; }

constexpr int kTile = 32;  // a block's output rows and columns; the row sums' step over rows
constexpr int kTileThreads = 128;

// Whether this compilation has TF32 tensor cores (sm_80 and later; the emulation has
// them): where it does not, the TF32 choice runs FMAs.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kTf32Available = true;
#else
constexpr bool kTf32Available = false;
#endif

// The tensor cores' input type for a dtype, or void where the product runs on FMAs
// (float32, float64; bfloat16 before sm_80, which lacks bfloat16 tensor cores).
template <typename scalar_t>
struct TensorCoreInput {
  using type = void;
};
template <>
struct TensorCoreInput<c10::Half> {
  using type = __half;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TensorCoreInput<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif

// What a tile product of scalar_t inputs stages and multiplies: the staged element type
// (the dtype itself for the tensor cores, else the accumulation type) and the row length
// of the finished tile of C, padded by 16 bytes (see TileShared).
template <typename scalar_t, typename acc_t>
struct TileTypes {
  using mma_t = typename TensorCoreInput<scalar_t>::type;
  static constexpr bool kTensorCores = !std::is_void_v<mma_t>;
  using in_t = std::conditional_t<kTensorCores, scalar_t, acc_t>;
  static constexpr int kCLd = kTile + 16 / static_cast<int>(sizeof(acc_t));
};

// Contraction elements per step of a pair product (its rows' features): 256 bytes of
// every line, so that each thread has 4 16-byte loads of each operand in flight a step,
// and D = 1024 bfloat16 takes 8 steps, each waiting on one memory latency, instead of 32.
template <typename in_t>
constexpr int kPairStep = 256 / static_cast<int>(sizeof(in_t));

// The shared memory of one tile product with contraction steps of kK: the staged step of
// A (rows m, columns k) and of B (kBLinesAreN: rows n, columns k, as keys are stored; else
// rows k, columns n, with kK == kTile), the step of v (additive scores only), and the
// finished tile of C. Rows are padded by 16 bytes, so that they keep 16-byte alignment
// (wmma needs it) without all starting in the same bank.
template <typename scalar_t, typename acc_t, int kK = kTile>
struct TileShared {
  using T = TileTypes<scalar_t, acc_t>;
  using in_t = typename T::in_t;
  static constexpr int kLd = kK + 16 / static_cast<int>(sizeof(in_t));
  alignas(32) in_t a[kTile][kLd];
  alignas(32) in_t b[kTile][kLd];
  acc_t v[kK];
  alignas(32) acc_t c[kTile][T::kCLd];
};

// One thread's share of staging elements [e0, e0 + kElems) of 32 lines: line l's data
// starts at line_of(l) (nullptr: a line of zeros) and has `len` elements, zeros past len.
// Four threads a line, each kElems / 4 consecutive elements in chunks of VEC (VEC divides
// len, or is 1). fetch() issues the loads into registers and put() converts and stores
// them, so the loads of several operands, or of the next step, are in flight together.
template <int VEC, typename scalar_t, int kElems>
class LineShare {
  static_assert(kTileThreads == 4 * kTile, "four threads a line");
  static constexpr int kPerThread = kElems / 4;
  static_assert(kPerThread % VEC == 0, "whole chunks per thread");
  static constexpr int kChunks = kPerThread / VEC;

 public:
  __device__ __forceinline__ LineShare()
      : line_(static_cast<int>(threadIdx.x) / 4),
        first_((static_cast<int>(threadIdx.x) % 4) * kPerThread) {}

  template <typename LineOf>
  __device__ __forceinline__ void fetch(int64_t e0, int64_t len, LineOf line_of) {
    const scalar_t* src = line_of(line_);
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int64_t at = e0 + first_ + u * VEC;
      if (src != nullptr && at + VEC <= len) {
        x_[u] = load_pack<VEC>(src, at / VEC);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x_[u].v[i] = scalar_t(0);
      }
    }
  }

  template <typename in_t, int LD>
  __device__ __forceinline__ void put(in_t (*dst)[LD]) const {
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dst[line_][first_ + u * VEC + i] = static_cast<in_t>(x_[u].v[i]);
      }
    }
  }

 private:
  Pack<scalar_t, VEC> x_[kChunks];
  int line_, first_;
};

// Stages a 32 x 32 step of A from coef(m, k) (relative to the step), which the caller makes
// 0 past its ends: every thread computes its 8 coefficients, their loads all in flight,
// before it stores any.
template <typename in_t, int LD, typename CoefOf>
__device__ __forceinline__ void stage_coefficients(in_t (*dst)[LD], CoefOf coef) {
  constexpr int kPerThread = kTile * kTile / kTileThreads;
  using coef_t = decltype(coef(0, 0));
  coef_t c[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = static_cast<int>(threadIdx.x) + u * kTileThreads;
    c[u] = coef(i / kTile, i % kTile);
  }
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = static_cast<int>(threadIdx.x) + u * kTileThreads;
    dst[i / kTile][i % kTile] = static_cast<in_t>(c[u]);
  }
}

// How a tile's terms are formed: C[m, n] += A[m, k] B[k, n] on the tensor cores (16-bit
// inputs), on the TF32 tensor cores (float32 inputs, when allowed) or with FMAs, or the
// additive score C[m, n] += v[k] tanh(A[m, k] + B[k, n]) (FMAs and tanh in the
// accumulation type, whatever the dtype).
enum class TileTerms { kTensorCores, kTf32, kFma, kTanhScore };

// The products' terms of a dtype; kTf32: float32 may run on TF32 (the host's choice,
// query_tiles.cuh).
template <typename scalar_t, typename acc_t, bool kTf32 = false>
constexpr TileTerms kProductTerms =
    TileTypes<scalar_t, acc_t>::kTensorCores ? TileTerms::kTensorCores
    : kTf32 && kTf32Available                ? TileTerms::kTf32
                                             : TileTerms::kFma;

// The block's accumulators for one 32 x 32 tile of C and the multiplication of one staged
// step. kBLinesAreN says how B was staged (see TileShared).
template <typename scalar_t, typename acc_t, bool kBLinesAreN,
          TileTerms kTerms = kProductTerms<scalar_t, acc_t>>
class TileAccumulator;

// A TF32 fragment's elements rounded to TF32, after a load of float32 (CUDA declares the
// TF32 fragments from sm_80 on: kTf32Available).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <typename Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& f) {
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}
#endif

// The tensor cores' accumulators: each of the 4 warps owns one 16 x 16 quarter of the tile
// and multiplies fragments of In, kFragK of the contraction at a time: a 16-bit type, or
// (kTf32) precision::tf32 for float32 in 16 x 16 x 8 steps, each fragment's elements
// rounded to TF32 after the load (round_to_tf32).
template <typename scalar_t, typename acc_t, bool kBLinesAreN, typename In, int kFragK,
          bool kTf32>
class WmmaTileAccumulator {
  using T = TileTypes<scalar_t, acc_t>;
  using Stored = std::conditional_t<kTf32, float, In>;  // the elements' type in memory
  using BLayout = std::conditional_t<kBLinesAreN, nvcuda::wmma::col_major,
                                     nvcuda::wmma::row_major>;
  static_assert(std::is_same_v<acc_t, float>, "tensor cores accumulate in float");

 public:
  __device__ __forceinline__ WmmaTileAccumulator()
      : m0_((static_cast<int>(threadIdx.x) / kWarpSize / 2) * 16),
        n0_((static_cast<int>(threadIdx.x) / kWarpSize % 2) * 16) {
    nvcuda::wmma::fill_fragment(acc_, 0.0f);
  }

  template <int kK>
  __device__ __forceinline__ void multiply(const TileShared<scalar_t, acc_t, kK>& s) {
    using S = TileShared<scalar_t, acc_t, kK>;
    static_assert(kK % kFragK == 0, "whole fragment steps");
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kFragK, In, nvcuda::wmma::row_major>
        a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kFragK, In, BLayout> b;
#pragma unroll
    for (int k = 0; k < kK; k += kFragK) {
      nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const Stored*>(&s.a[m0_][k]), S::kLd);
      const auto* b_at = kBLinesAreN ? &s.b[n0_][k] : &s.b[k][n0_];
      nvcuda::wmma::load_matrix_sync(b, reinterpret_cast<const Stored*>(b_at), S::kLd);
      if constexpr (kTf32) {
        round_to_tf32(a);
        round_to_tf32(b);
      }
      nvcuda::wmma::mma_sync(acc_, a, b, acc_);
    }
  }

  template <int kK>
  __device__ __forceinline__ void store(TileShared<scalar_t, acc_t, kK>& s) const {
    nvcuda::wmma::store_matrix_sync(&s.c[m0_][n0_], acc_, T::kCLd, nvcuda::wmma::mem_row_major);
  }

 private:
  int m0_, n0_;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float> acc_;
};

template <typename scalar_t, typename acc_t, bool kBLinesAreN>
class TileAccumulator<scalar_t, acc_t, kBLinesAreN, TileTerms::kTensorCores>
    : public WmmaTileAccumulator<scalar_t, acc_t, kBLinesAreN,
                                 typename TileTypes<scalar_t, acc_t>::mma_t, 16, false> {};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <typename scalar_t, typename acc_t, bool kBLinesAreN>
class TileAccumulator<scalar_t, acc_t, kBLinesAreN, TileTerms::kTf32>
    : public WmmaTileAccumulator<scalar_t, acc_t, kBLinesAreN, nvcuda::wmma::precision::tf32, 8,
                                 true> {
  static_assert(std::is_same_v<scalar_t, float>, "TF32 tiles multiply float32");
};
#endif

// Thread (tm, tn) owns rows tm + 16 i and columns tn + 8 j: the 8 threads reading a B
// step's column group at once hit 8 different banks.
template <typename scalar_t, typename acc_t, bool kBLinesAreN, TileTerms kTerms>
class TileAccumulator {
  static_assert(kTerms == TileTerms::kFma || kTerms == TileTerms::kTanhScore,
                "the tensor-core terms are specialised above");
  static constexpr int kRows = 2, kCols = 4;
  static_assert(kTileThreads * kRows * kCols == kTile * kTile, "the threads cover the tile");

 public:
  __device__ __forceinline__ TileAccumulator()
      : tm_(static_cast<int>(threadIdx.x) / 8), tn_(static_cast<int>(threadIdx.x) % 8) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc_[i][j] = acc_t(0);
    }
  }

  template <int kK>
  __device__ __forceinline__ void multiply(const TileShared<scalar_t, acc_t, kK>& s) {
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      acc_t a[kRows], b[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = static_cast<acc_t>(s.a[tm_ + 16 * i][k]);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        b[j] = static_cast<acc_t>(kBLinesAreN ? s.b[tn_ + 8 * j][k] : s.b[k][tn_ + 8 * j]);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          if constexpr (kTerms == TileTerms::kTanhScore) {
            acc_[i][j] += s.v[k] * score_tanh(a[i] + b[j]);
          } else {
            acc_[i][j] += a[i] * b[j];
          }
        }
      }
    }
  }

  template <int kK>
  __device__ __forceinline__ void store(TileShared<scalar_t, acc_t, kK>& s) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) s.c[tm_ + 16 * i][tn_ + 8 * j] = acc_[i][j];
    }
  }

 private:
  int tm_, tn_;
  acc_t acc_[kRows][kCols];
};

// The tiles of a batched product: blocks of one launch cover batch x m_tiles x n_tiles,
// n fastest.
struct TileIndex {
  int64_t b, m0, n0;
};

__device__ __forceinline__ TileIndex tile_index(int64_t m_tiles, int64_t n_tiles) {
  const int64_t block = blockIdx.x;
  const int64_t n_tile = block % n_tiles;
  const int64_t rest = block / n_tiles;
  return TileIndex{rest / m_tiles, (rest % m_tiles) * kTile, n_tile * kTile};
}

// A Pairs type (dot_attention_tiles.cuh, additive_attention_tiles.cuh) gives its scalar_t,
// acc_t, kVec, kProducts (1 or 2) and kTanhScore, sizes B, M (query rows t) and N (keys j),
// and for product i: len(i) features and rows x(i, b, t) and y(i, b, j) (nullptr: a row of
// zeros, e.g. a key that does not attend). Product i is C_i[t, j] = <x_t, y_j>, except
// with kTanhScore product 0, the additive score sum_k v[k] tanh(x_t[k] + y_j[k]) (v(), of
// len(0) elements). finish(b, t, j, c) is called once per element of the tile within
// M x N, with c[i] = C_i[t, j]. kTf32: float32 products run on TF32 (kProductTerms).
template <typename Pairs, bool kTf32>
__global__ void __launch_bounds__(kTileThreads) pair_product_kernel(const Pairs pairs) {
  using scalar_t = typename Pairs::scalar_t;
  using acc_t = typename Pairs::acc_t;
  using In = typename TileTypes<scalar_t, acc_t>::in_t;
  constexpr int kK = kPairStep<In>;
  static_assert(kK <= kTileThreads, "a thread stages v[k] of a step");
  __shared__ TileShared<scalar_t, acc_t, kK> s;
  __shared__ acc_t first[kTile][kTile];  // the first product while the second runs
  const TileIndex at = tile_index(ceil_div(pairs.M, kTile), ceil_div(pairs.N, kTile));

  auto run = [&](int i, auto& acc) {
    const int64_t len = pairs.len(i);
    LineShare<Pairs::kVec, scalar_t, kK> xs, ys;
    const auto fetch = [&](int64_t k0) {
      xs.fetch(k0, len, [&](int l) {
        return at.m0 + l < pairs.M ? pairs.x(i, at.b, at.m0 + l) : nullptr;
      });
      ys.fetch(k0, len, [&](int l) {
        return at.n0 + l < pairs.N ? pairs.y(i, at.b, at.n0 + l) : nullptr;
      });
    };
    if (len > 0) fetch(0);
    for (int64_t k0 = 0; k0 < len; k0 += kK) {
      xs.put(s.a);
      ys.put(s.b);
      if constexpr (Pairs::kTanhScore) {
        if (i == 0 && threadIdx.x < kK) {
          const int64_t k = k0 + threadIdx.x;
          s.v[threadIdx.x] = k < len ? static_cast<acc_t>(pairs.v()[k]) : acc_t(0);
        }
      }
      __syncthreads();
      if (k0 + kK < len) fetch(k0 + kK);  // in flight during this step's products
      acc.multiply(s);
      __syncthreads();
    }
    acc.store(s);
    __syncthreads();
  };

  {
    constexpr TileTerms kFirst =
        Pairs::kTanhScore ? TileTerms::kTanhScore : kProductTerms<scalar_t, acc_t, kTf32>;
    TileAccumulator<scalar_t, acc_t, /*kBLinesAreN=*/true, kFirst> acc;
    run(0, acc);
  }
  if constexpr (Pairs::kProducts == 2) {
    for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kTileThreads) {
      first[e / kTile][e % kTile] = s.c[e / kTile][e % kTile];
    }
    __syncthreads();  // before the second product's store, which comes at once for len 0
    TileAccumulator<scalar_t, acc_t, /*kBLinesAreN=*/true, kProductTerms<scalar_t, acc_t, kTf32>>
        acc;
    run(1, acc);
  }
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kTileThreads) {
    const int m = e / kTile, n = e % kTile;
    if (at.m0 + m >= pairs.M || at.n0 + n >= pairs.N) continue;
    acc_t c[2] = {s.c[m][n], acc_t(0)};
    if (Pairs::kProducts == 2) {
      c[0] = first[m][n];
      c[1] = s.c[m][n];
    }
    pairs.finish(at.b, at.m0 + m, at.n0 + n, c);
  }
}

// A WeightedRows type (dot_attention_tiles.cuh) gives its scalar_t, acc_t and kVec, sizes
// B, M (output rows), K (rows summed) and N (row length), and
//  - coef(b, m, k): the weight of row k in output row m, for m < M and k < K;
//  - row(b, k): input row k (nullptr: a row of zeros);
//  - out(b, m): output row m, and live(b, m): whether it is a sum at all (a key that does
//    not attend gets zeros, whatever the inputs hold);
//  - alpha: the factor applied to every sum.
// out(b, m)[n] = alpha * sum_k coef(b, m, k) row(b, k)[n], k in steps of 32. kTf32: float32
// products run on TF32 (kProductTerms).
template <typename WeightedRows, bool kTf32>
__global__ void __launch_bounds__(kTileThreads)
    weighted_rows_kernel(const WeightedRows w) {
  using scalar_t = typename WeightedRows::scalar_t;
  using acc_t = typename WeightedRows::acc_t;
  using In = typename TileTypes<scalar_t, acc_t>::in_t;
  __shared__ TileShared<scalar_t, acc_t> s;
  const TileIndex at = tile_index(ceil_div(w.M, kTile), ceil_div(w.N, kTile));

  TileAccumulator<scalar_t, acc_t, /*kBLinesAreN=*/false, kProductTerms<scalar_t, acc_t, kTf32>>
      acc;
  LineShare<WeightedRows::kVec, scalar_t, kTile> rows;
  for (int64_t k0 = 0; k0 < w.K; k0 += kTile) {
    // The rows' loads fly while the coefficients are computed.
    rows.fetch(at.n0, w.N, [&](int l) { return k0 + l < w.K ? w.row(at.b, k0 + l) : nullptr; });
    stage_coefficients<In>(s.a, [&](int m, int k) {
      const int64_t mm = at.m0 + m, kk = k0 + k;
      return mm < w.M && kk < w.K ? w.coef(at.b, mm, kk) : acc_t(0);
    });
    rows.put(s.b);
    __syncthreads();
    acc.multiply(s);
    __syncthreads();
  }
  acc.store(s);
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < kTile * kTile; i += kTileThreads) {
    const int m = i / kTile, n = i % kTile;
    const int64_t mm = at.m0 + m, nn = at.n0 + n;
    if (mm >= w.M || nn >= w.N) continue;
    w.out(at.b, mm)[nn] =
        w.live(at.b, mm) ? static_cast<scalar_t>(w.alpha * s.c[m][n]) : scalar_t(0);
  }
}

}  // namespace attention_ext
