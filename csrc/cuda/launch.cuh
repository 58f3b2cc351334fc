// The one place CUDA kernels are launched. Under nvcc it is the real
// kernel<<<grid, block, smem, stream>>> followed by the launch check. The CPU emulation
// of the CUDA execution model (tests, emulation.h) supplies its own launcher here, behind
// ATTENTION_EXT_CUDA_EMULATION, so the host code that sizes grids, plans splits and
// allocates workspaces is the same code in both builds.
#pragma once

#include <cstddef>
#include <utility>

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace attention_ext {

template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  // A launch with an empty grid is an error in CUDA; an empty grid has nothing to do.
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention_ext

#elif defined(ATTENTION_EXT_CUDA_EMULATION)

#include <c10/util/Exception.h>

#include "../emulated/emulation.h"

namespace attention_ext {

// Same signature as above; runs the grid on CPU threads, synchronously, so the stream
// has nothing to do. A failed device check (attention_ext/device_check.h) raises here, where a GPU
// would fail the launch.
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t /*stream*/, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (const char* msg = emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...)) {
    TORCH_CHECK_VALUE(false, msg, " (a device-side check of the emulated CUDA kernels)");
  }
}

}  // namespace attention_ext

#else
#error "launch.cuh needs nvcc (or, in test builds, the CUDA emulation layer)"
#endif
