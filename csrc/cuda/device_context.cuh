// The host code's only contact with the CUDA runtime: the dispatch key its entry points
// serve, device guard, current stream and multiprocessor count. Kept in one header so a
// CPU emulation of the execution model (tests) has one small thing to replace.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

#if defined(ATTENTION_EXT_CUDA_EMULATION)

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

// A small fixed "GPU" so that the split-S heuristic splits the tests' tiny problems
// (rows < 4 SMs x 32 warps) just as a real GPU splits decoding-sized ones.
constexpr int64_t kEmulatedMultiprocessors = 4;
inline int64_t multiprocessor_count(c10::DeviceIndex) { return kEmulatedMultiprocessors; }

}  // namespace attention_ext

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define ATTENTION_EXT_KERNEL_DISPATCH_KEY CUDA

namespace attention_ext {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A plain runtime query: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (the CI build machine's) lacks.
inline int64_t multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace attention_ext

#endif  // ATTENTION_EXT_CUDA_EMULATION
