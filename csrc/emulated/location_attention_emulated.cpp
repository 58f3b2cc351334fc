// Test build only (ATTENTION_EXT_EMULATE_CUDA=1, see setup.py): the CUDA location-sensitive
// attention source compiled as C++ against the CPU emulation of the CUDA execution model
// (csrc/emulated/emulation.h). Its entry points register as the ops' CPU kernels
// (runtime.cuh), so the whole test suite runs the very host code and kernels the
// GPU runs. Never part of a normal build.
#define ATTENTION_EXT_CUDA_EMULATION 1

// Torch's headers first, so they are parsed without the emulation's CUDA keywords.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include "emulation.h"
#include "../cuda/location_attention_kernel.cu"
