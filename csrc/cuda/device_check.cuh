// ATTENTION_EXT_DEVICE_CHECK(cond, msg): a check of data that only the device reads. Under
// nvcc a device-side assertion: the kernel stops and the error surfaces at the stream's
// next synchronisation, as with torch._assert_async, with `msg` printed; no host wait.
// Under the CPU emulation (tests) the launch raises `msg` once its grid has run.
#pragma once

#if defined(__CUDACC__)

#include <c10/macros/Macros.h>

#define ATTENTION_EXT_DEVICE_CHECK(cond, msg) \
  do {                                        \
    CUDA_KERNEL_ASSERT_MSG(cond, msg);        \
  } while (0)

#elif defined(ATTENTION_EXT_CUDA_EMULATION)

#include "emulation.h"

#define ATTENTION_EXT_DEVICE_CHECK(cond, msg)                      \
  do {                                                             \
    if (!(cond)) ::attention_ext::emu::device_check_failed(msg);   \
  } while (0)

#else
#error "device_check.cuh needs nvcc (or, in test builds, the CUDA emulation layer)"
#endif
