// Test build only: tiny kernels that check the emulation layer itself (emulation.h), apart
// from the attention kernels: __shared__ and __syncthreads() (a wrong barrier gives a wrong
// sum), __shfl_down_sync, the wmma tiles (a matrix product), cp.async's groups (what a wait
// lands), a race that the reverse thread order of odd blocks shows, the refusal of a
// shuffle whose mask names a lane that has already returned, of a misaligned wmma load and
// of a misaligned cp.async, and the report of a block whose threads wait for each other
// forever.
#define ATTENTION_EXT_CUDA_EMULATION 1

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "emulation.h"
#include "attention_ext/math.h"
#include "../cuda/runtime.cuh"
#include "../cuda/device_primitives.cuh"

namespace attention_ext {
namespace {

constexpr int kSelftestThreads = 128;

// out[i] = sum of x over i's block of 128 elements. Warp sums by __shfl_down_sync, then
// warp partials through shared memory: wrong without both barriers (thread 0 would read
// partials not yet written; others would read `total` before thread 0 wrote it).
__global__ void block_sum_kernel(const float* x, float* out, int64_t n) {
  __shared__ float partial[kSelftestThreads / 32];
  __shared__ float total;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  float v = i < n ? x[i] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (t % 32 == 0) partial[t / 32] = v;
  __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    total = s;
  }
  __syncthreads();
  if (i < n) out[i] = total;
}

// Undefined on a GPU: lane 0 returns, the others shuffle with a full mask. The emulation
// must stop the process with a message rather than return something.
__global__ void early_exit_shuffle_kernel(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Undefined on a GPU (it hangs there): lane 0 waits at the block barrier, the other lanes
// at a shuffle that needs lane 0. The emulation must report the deadlock and stop.
__global__ void divergent_wait_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
    return;
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// A race on purpose: thread 0 writes `value`, every thread reads it with no barrier between
// (out[block * 32 + t]: what thread t of the block read).
__global__ void unsynchronised_broadcast_kernel(const float* x, float* out) {
  __shared__ float value;
  if (threadIdx.x == 0) value = x[blockIdx.x];
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

at::Tensor unsynchronised_broadcast(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous() &&
                  x.numel() > 0,
              "x must be a non-empty contiguous float32 vector");
  at::Tensor out = at::empty({x.numel() * 32}, x.options());
  launch_kernel(unsynchronised_broadcast_kernel, dim3(static_cast<unsigned>(x.numel())),
                dim3(32), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

constexpr int kAsyncGroups = 2;
constexpr int kAsyncGroupFloats = 128;

// Copies x (kAsyncGroups x kAsyncGroupFloats floats) into shared memory in 16-byte chunks
// by cp.async, one commit group per row of kAsyncGroupFloats, then waits with the newest
// `in_flight` groups still in flight (0 or 1) and writes the stage to out after a barrier
// (and before another: a thread's return lands its copies still in flight).
__global__ void async_copy_kernel(const float* x, float* out, int in_flight) {
  __shared__ Pack<float, 4> stage[kAsyncGroups * kAsyncGroupFloats / 4];
  float* staged = reinterpret_cast<float*>(stage);
  const int t = static_cast<int>(threadIdx.x);
  for (int g = 0; g < kAsyncGroups; ++g) {
    for (int c = t; c < kAsyncGroupFloats / 4; c += static_cast<int>(blockDim.x)) {
      const int at = g * kAsyncGroupFloats + c * 4;
      copy_chunk_async<4>(staged + at, x + at);
    }
    commit_async_copies();
  }
  if (in_flight == 0) {
    wait_async_copies<0>();
  } else {
    wait_async_copies<1>();
  }
  __syncthreads();
  for (int i = t; i < kAsyncGroups * kAsyncGroupFloats; i += static_cast<int>(blockDim.x)) {
    out[i] = staged[i];
  }
  __syncthreads();
}

at::Tensor async_copy(const at::Tensor& x, int64_t in_flight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 &&
                  x.numel() == kAsyncGroups * kAsyncGroupFloats && x.is_contiguous(),
              "x must be a contiguous float32 vector of ", kAsyncGroups * kAsyncGroupFloats);
  TORCH_CHECK(in_flight == 0 || in_flight == 1, "in_flight must be 0 or 1");
  at::Tensor out = at::empty_like(x);
  // x's storage offset stays: a misaligned view reaches the kernel (the refusal test).
  launch_kernel(async_copy_kernel, dim3(1), dim3(32), 0, nullptr, x.data_ptr<float>(),
                out.data_ptr<float>(), static_cast<int>(in_flight));
  return out;
}

// out = a b^T + c for a (M, K), b (N, K) in a 16-bit type or float32 (on TF32 tiles, the
// inputs rounded by __float_to_tf32), c and out (M, N) float32, all dimensions multiples
// of 16: one warp per 16 x 16 tile of out, two warps per block (the last block's second
// warp may have no tile). b^T is read as a column-major matrix_b, the way attention reads
// K^T from rows of keys.
template <typename T>
__global__ void wmma_matmul_kernel(const T* a, const T* b, const float* c, float* out, int64_t M,
                                   int64_t N, int64_t K) {
  namespace wmma = nvcuda::wmma;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kK = kTf32 ? 8 : 16;
  using In = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * 2 + threadIdx.x / 32;
  const int64_t n_tiles = N / 16;
  if (tile >= M / 16 * n_tiles) return;  // the whole warp
  const int64_t m0 = tile / n_tiles * 16, n0 = tile % n_tiles * 16;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc;
  wmma::load_matrix_sync(acc, c + m0 * N + n0, static_cast<unsigned>(N), wmma::mem_row_major);
  for (int64_t k0 = 0; k0 < K; k0 += kK) {
    wmma::fragment<wmma::matrix_a, 16, 16, kK, In, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, kK, In, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, a + m0 * K + k0, static_cast<unsigned>(K));
    wmma::load_matrix_sync(fb, b + n0 * K + k0, static_cast<unsigned>(K));
    if constexpr (kTf32) {
      for (auto& x : fa.x) x = wmma::__float_to_tf32(x);
      for (auto& x : fb.x) x = wmma::__float_to_tf32(x);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + m0 * N + n0, acc, static_cast<unsigned>(N), wmma::mem_row_major);
}

at::Tensor wmma_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(1) &&
                  c.size(0) == a.size(0) && c.size(1) == b.size(0),
              "a (M, K), b (N, K), c (M, N)");
  TORCH_CHECK(a.size(0) % 16 == 0 && b.size(0) % 16 == 0 && a.size(1) % 16 == 0,
              "M, N, K must be multiples of 16");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && c.scalar_type() == at::kFloat,
              "a and b of one type, c float32");
  // Contiguous but not copied to a fresh allocation: a storage offset stays, so a
  // misaligned view reaches the kernel (the refusal test).
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), "contiguous inputs");
  at::Tensor out = at::empty_like(c);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const dim3 grid(static_cast<unsigned>(ceil_div(M / 16 * (N / 16), 2)));
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    launch_kernel(wmma_matmul_kernel<T>, grid, dim3(64), 0, nullptr,
                  static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()),
                  c.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  };
  if (a.scalar_type() == at::kHalf) {
    run(__half{});
  } else if (a.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16,
                "a and b must be float16, bfloat16 or float32");
    run(__nv_bfloat16{});
  }
  return out;
}

at::Tensor block_sum(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "x must be float32");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kSelftestThreads)));
  launch_kernel(block_sum_kernel, grid, dim3(kSelftestThreads), 0, nullptr,
                x.data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

void early_exit_shuffle() {
  at::Tensor out = at::zeros({32}, at::kFloat);
  launch_kernel(early_exit_shuffle_kernel, dim3(1), dim3(32), 0, nullptr, out.data_ptr<float>());
}

void divergent_wait() {
  at::Tensor out = at::zeros({32}, at::kFloat);
  launch_kernel(divergent_wait_kernel, dim3(1), dim3(32), 0, nullptr, out.data_ptr<float>());
}

}  // namespace
}  // namespace attention_ext

TORCH_LIBRARY_FRAGMENT(attention_ext, m) {
  m.def("_emulation_block_sum(Tensor x) -> Tensor");
  m.def("_emulation_wmma_matmul(Tensor a, Tensor b, Tensor c) -> Tensor");
  m.def("_emulation_async_copy(Tensor x, int in_flight) -> Tensor");
  m.def("_emulation_unsynchronised_broadcast(Tensor x) -> Tensor");
  m.def("_emulation_early_exit_shuffle() -> ()");
  m.def("_emulation_divergent_wait() -> ()");
}

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("_emulation_block_sum", &attention_ext::block_sum);
  m.impl("_emulation_wmma_matmul", &attention_ext::wmma_matmul);
  m.impl("_emulation_async_copy", &attention_ext::async_copy);
  m.impl("_emulation_unsynchronised_broadcast", &attention_ext::unsynchronised_broadcast);
}

// No tensor argument, so no dispatch key to pick a CPU kernel by.
TORCH_LIBRARY_IMPL(attention_ext, CompositeExplicitAutograd, m) {
  m.impl("_emulation_early_exit_shuffle", &attention_ext::early_exit_shuffle);
  m.impl("_emulation_divergent_wait", &attention_ext::divergent_wait);
}
