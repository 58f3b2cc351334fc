// Test build only: tiny kernels that check the emulation layer itself (emulation.h), apart
// from the attention kernels: __shared__ and __syncthreads() (a wrong barrier gives a wrong
// sum), __shfl_down_sync, the refusal of a shuffle whose mask names a lane that has
// already returned, and the report of a block whose threads wait for each other forever.
#define ATTENTION_EXT_CUDA_EMULATION 1

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "emulation.h"
#include "attention_ext/math.h"
#include "../cuda/runtime.cuh"

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
  m.def("_emulation_early_exit_shuffle() -> ()");
  m.def("_emulation_divergent_wait() -> ()");
}

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("_emulation_block_sum", &attention_ext::block_sum);
}

// No tensor argument, so no dispatch key to pick a CPU kernel by.
TORCH_LIBRARY_IMPL(attention_ext, CompositeExplicitAutograd, m) {
  m.impl("_emulation_early_exit_shuffle", &attention_ext::early_exit_shuffle);
  m.impl("_emulation_divergent_wait", &attention_ext::divergent_wait);
}
