#!/usr/bin/env bash
# The CUDA kernels compiled as C++ against the CPU emulation of CUDA's execution model
# (csrc/cuda/emulation.h, ATTENTION_EXT_EMULATE_CUDA=1) and tested against reference.py
# (tests/test_cuda_emulation.py: dot; tests/test_additive_cuda_emulation.py: additive).
# No GPU, no CUDA toolkit needed.
# The build happens in a temporary copy of the source tree, so the normal build in the
# repo (attention_ext/_C*.so, build/) is left alone; it uses the repo's .venv.
#
# Environment: PY (default .venv/bin/python), KEEP_BUILD=1 keeps the temporary directory.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/.ci/build_copy.sh"
build_in_copy emulated ATTENTION_EXT_EMULATE_CUDA=1

# The tests, against the copy (its module must be the one imported, or they would skip).
"$PY" -c 'import sys, attention_ext as ae
sys.exit(0 if ae.build_info()["emulated_cuda"] else
         "test_emulated: imported a build without the emulated ops: " + ae.__file__)'
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py \
  tests/test_additive_cuda_emulation.py "$@"
