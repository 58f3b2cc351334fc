#!/usr/bin/env bash
# The test suite with the CUDA kernels in place of the CPU kernels: csrc/cuda compiled as
# C++ against the CPU emulation of CUDA's execution model (csrc/emulated/emulation.h,
# ATTENTION_EXT_EMULATE_CUDA=1), registered as the ops' CPU kernels. No GPU, no CUDA
# toolkit needed. Tests marked cpu_kernels skip themselves in this build.
# The build happens in a temporary copy of the source tree, so the normal build in the
# repo (attention_ext/_C*.so, build/) is left alone; it uses the repo's .venv.
#
# Environment: PY (default .venv/bin/python), KEEP_BUILD=1 keeps the temporary directory.
# Arguments go to pytest (default: the whole suite but the slow tests and the demo's, which
# call the ops as the rest of the suite does; about 2 minutes on 2 cores).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/.ci/build_copy.sh"
build_in_copy emulated ATTENTION_EXT_EMULATE_CUDA=1

# The tests, against the copy (its module must be the one imported).
"$PY" -c 'import sys, attention_ext as ae
sys.exit(0 if ae.build_info()["emulated_cuda"] else
         "test_emulated: imported a build without the emulated CUDA code: " + ae.__file__)'
if [ "$#" -eq 0 ]; then set -- -m "not slow and not demo" tests; fi
"$PY" -m pytest -q -n auto -p no:cacheprovider "$@"
