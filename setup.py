"""Builds attention_ext._C.

CppExtension by default. CUDAExtension when torch is a CUDA build, nvcc is found and
either a GPU is visible or FORCE_CUDA=1 (so CI can compile the .cu files without a GPU).

Environment:
  FORCE_CUDA=1                     build the CUDA kernels without a visible GPU
  TORCH_CUDA_ARCH_LIST="8.0;9.0"   CUDA architectures (read by torch's build helpers)
  MAX_JOBS=N                       parallel compile jobs (read by ninja via torch)
  DEBUG=1                          -O0 -g, no NDEBUG
  ATTENTION_EXT_CPU_CAPABILITY     AVX512 | AVX2 | DEFAULT; default: the build machine's best.
                                   DEFAULT is the portable build (scalar at::vec).
  ATTENTION_EXT_EMULATE_CUDA=1     test build: the ops' CPU kernels are csrc/cuda/*.cu compiled
                                   as C++ against the CPU emulation of CUDA (csrc/emulated/)
                                   instead of csrc/cpu, so the suite runs the CUDA code
                                   (make test-emulated)
  ATTENTION_EXT_SANITIZE=address,undefined
                                   test build (-O2): compile and link with -fsanitize=... (UB aborts
                                   instead of recovering); run with the sanitizer runtime
                                   preloaded (make test-sanitized)
"""
import os
import sys
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "attention_ext"))
from _cpu_capability import CAPABILITY_FLAGS, best_host_capability  # noqa: E402

sys.path.pop(0)

DEBUG = os.environ.get("DEBUG", "0") == "1"


def want_cuda() -> bool:
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def want_emulated_cuda() -> bool:
    return os.environ.get("ATTENTION_EXT_EMULATE_CUDA", "0") == "1"


def sanitizer_flags() -> list:
    sanitize = os.environ.get("ATTENTION_EXT_SANITIZE", "")
    if not sanitize:
        return []
    return [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def cpu_capability() -> str:
    forced = os.environ.get("ATTENTION_EXT_CPU_CAPABILITY")
    if forced:
        cap = forced.upper()
        if cap not in CAPABILITY_FLAGS:
            raise SystemExit(
                f"ATTENTION_EXT_CPU_CAPABILITY={forced!r}: expected one of {sorted(CAPABILITY_FLAGS)}"
            )
        return cap
    return best_host_capability()


def extension():
    with_cuda = want_cuda()
    cap = cpu_capability()
    emulated = want_emulated_cuda()
    if emulated and with_cuda:
        # The same kernel templates would be compiled twice, once per meaning of __global__.
        raise SystemExit("ATTENTION_EXT_EMULATE_CUDA=1 is for CPU builds; unset FORCE_CUDA")

    def files(folder, pattern):
        return [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).glob(pattern))]

    sources = files("csrc", "*.cpp")
    # The emulated CUDA code takes the CPU kernels' place (csrc/cuda/runtime.cuh).
    sources += files("csrc/emulated", "*.cpp") if emulated else files("csrc/cpu", "*.cpp")
    if with_cuda:
        sources += files("csrc/cuda", "*.cu")

    sanitize = sanitizer_flags()
    # Sanitized builds (CI) at -O2: they catch the same errors, and the instrumented -O3
    # build is the slowest compile of CI. Not -O1: GCC contracts a*b+c into an FMA only
    # from -O2 on (as nvcc does by default), so at -O1 the emulated CUDA kernels would
    # round differently from every other build of them.
    opt = ["-O0", "-g"] if DEBUG else ["-O2", "-DNDEBUG"] if sanitize else ["-O3", "-DNDEBUG"]
    defines = [
        f"-DCPU_CAPABILITY={cap}",
        f"-DCPU_CAPABILITY_{cap}",
        f'-DATTENTION_EXT_CPU_CAPABILITY_NAME="{cap}"',
    ]
    if emulated:
        defines.append("-DATTENTION_EXT_WITH_EMULATED_CUDA")  # build_info()["emulated_cuda"]
    # -fopenmp in both compile and link flags, or at::parallel_for runs serially
    # (docs/performance.md, "Build").
    # No -std flag: torch's build helpers add the standard its headers need (C++20 since
    # torch 2.14, whose ATen.h rejects C++17).
    cxx = opt + ["-fopenmp", "-fno-math-errno"] + CAPABILITY_FLAGS[cap] + defines + sanitize
    # libstdc++ is named by its shared object's file name: a toolchain whose own library
    # directory holds only libstdc++.a (the H100 machines' /opt/gcc) resolves -lstdc++ to the
    # archive and gives the extension a private copy, whose std::num_put<char>::id the
    # locale of the process's libstdc++ does not know, so every integer in an error message
    # crashes the process.
    link = ["-fopenmp", "-l:libstdc++.so.6"] + sanitize
    kwargs = dict(
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_link_args=link,
    )
    if with_cuda:
        nvcc = (["-O0", "-g", "-G"] if DEBUG else ["-O3", "-DNDEBUG", "-lineinfo"]) + [
            "--expt-relaxed-constexpr",
            "-DATTENTION_EXT_WITH_CUDA",
        ]
        return CUDAExtension(
            "attention_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DATTENTION_EXT_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension("attention_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


class BuildWithVersion(BuildExtension.with_options(use_ninja=True)):
    """Compiles the package's version (pyproject.toml's, its one source, as setuptools read
    it) into _C.__version__."""

    def build_extensions(self):
        version = self.distribution.get_version()
        for ext in self.extensions:
            ext.extra_compile_args["cxx"].append(f'-DATTENTION_EXT_VERSION="{version}"')
        super().build_extensions()


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildWithVersion})
