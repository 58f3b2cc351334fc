"""Which x86 vector ISA the CPU kernels are compiled for, shared by setup.py and import.

at::vec::Vectorized is scalar unless its translation unit is compiled for a capability
(docs/performance.md, "Build"), so the build picks the build machine's best and import
refuses to load a binary whose instructions this CPU lacks (it would die with SIGILL
instead).
"""
from __future__ import annotations

import platform

# Compiler flags per capability, matching what ATen uses for its own per-ISA kernels.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "DEFAULT": [],
}

_REQUIRED_CPU_FLAGS = {
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "AVX2": {"avx2", "fma", "f16c", "bmi1", "bmi2"},
    "DEFAULT": set(),
}


def host_cpu_flags() -> set[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported(capability: str, flags: set[str] | None = None) -> bool:
    flags = host_cpu_flags() if flags is None else flags
    return _REQUIRED_CPU_FLAGS[capability] <= flags


def best_host_capability() -> str:
    flags = host_cpu_flags()
    for cap in ("AVX512", "AVX2"):
        if supported(cap, flags):
            return cap
    return "DEFAULT"
