// The host code's only contact with the CUDA runtime: the dispatch key its entry points
// serve, device guard, current stream, multiprocessor count, and launch_kernel, the one
// place kernels are launched. Kept in one header so the CPU emulation of the execution
// model (tests, csrc/emulated/emulation.h) has one small thing to replace: there the
// launcher runs the grid on CPU fibers, so the host code that plans, sizes grids and
// allocates workspaces is the same code in both builds.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#if defined(ATTENTION_EXT_CUDA_EMULATION)

#include <c10/util/Exception.h>

#include "../emulated/emulation.h"

// The test build's CPU ops are the CUDA entry points: every CPU call of the ops runs the
// CUDA host code and kernels under the emulation.
#define ATTENTION_EXT_KERNEL_DISPATCH_KEY CPU

namespace attention_ext {

// Emulated launches run synchronously on the CPU: no device to select, no stream.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline cudaStream_t current_stream() { return nullptr; }

// A small fixed "GPU" so that the launch plan splits the tests' tiny problems (fewer rows
// than 8 SMs x 4 blocks) just as a real GPU splits decoding-sized ones.
constexpr int64_t kEmulatedMultiprocessors = 8;
inline int64_t multiprocessor_count(c10::DeviceIndex) { return kEmulatedMultiprocessors; }

// Runs the grid on CPU fibers, synchronously. A failed device check
// (attention_ext/device_check.h) raises here, where a GPU would fail the launch.
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t /*stream*/, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (const char* msg = emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...)) {
    TORCH_CHECK_VALUE(false, msg, " (a device-side check of the emulated CUDA kernels)");
  }
}

}  // namespace attention_ext

#elif defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>

#define ATTENTION_EXT_KERNEL_DISPATCH_KEY CUDA

namespace attention_ext {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A plain runtime query, asked once per device (a decode step's host time counts):
// ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers, which a bare CUDA
// toolkit (the CI build machine's) lacks. Racing first calls store the same value.
inline int64_t multiprocessor_count(c10::DeviceIndex device) {
  static std::atomic<int> known[C10_COMPILE_TIME_MAX_GPUS] = {};
  std::atomic<int>& slot = known[device];
  int count = slot.load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    slot.store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  // A launch with an empty grid is an error in CUDA; an empty grid has nothing to do.
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention_ext

#else
#error "runtime.cuh needs nvcc (or, in test builds, the CUDA emulation layer)"
#endif
