// ATTENTION_EXT_DEVICE_CHECK(cond, msg): a check of data that only the kernels read.
// - nvcc: a device-side assertion. The kernel stops and the error surfaces at the stream's
//   next synchronisation, as with torch._assert_async, with `msg` printed; no host wait.
// - The CPU emulation of CUDA (test builds): the launch raises `msg` once its grid has run.
// - The CPU kernels: nothing, since their host code checks such data before the call
//   (inputs.h).
#pragma once

#if defined(__CUDACC__)

#include <c10/macros/Macros.h>

#define ATTENTION_EXT_DEVICE_CHECK(cond, msg) \
  do {                                        \
    CUDA_KERNEL_ASSERT_MSG(cond, msg);        \
  } while (0)

#elif defined(ATTENTION_EXT_CUDA_EMULATION)

#include <atomic>

namespace attention_ext::emu {

// The first failed check of the launch in progress (the emulation serialises launches);
// the emulated launch (emulated/emulation.h) takes it once the grid has run.
inline std::atomic<const char*>& failed_device_check() {
  static std::atomic<const char*> msg{nullptr};
  return msg;
}

inline void device_check_failed(const char* msg) {
  const char* none = nullptr;
  failed_device_check().compare_exchange_strong(none, msg);
}

}  // namespace attention_ext::emu

#define ATTENTION_EXT_DEVICE_CHECK(cond, msg)                      \
  do {                                                             \
    if (!(cond)) ::attention_ext::emu::device_check_failed(msg);   \
  } while (0)

#else

// cond is not evaluated; naming it keeps variables that only the check reads from being
// reported as unused.
#define ATTENTION_EXT_DEVICE_CHECK(cond, msg) \
  do {                                        \
    (void)sizeof(cond);                       \
  } while (0)

#endif
