#!/usr/bin/env bash
# The CUDA kernels in place of the CPU kernels: csrc/cuda compiled as C++ against the CPU
# emulation of CUDA's execution model (csrc/cuda/emulation.h, ATTENTION_EXT_EMULATE_CUDA=1),
# registered as the ops' CPU kernels, and tested against reference.py. No GPU, no CUDA
# toolkit needed. Tests marked cpu_kernels skip themselves in this build. By default the
# emulation's own tests, the decode-loop tests and the emulated kernels' matrix run: the
# emulation starts an OS thread per CUDA thread and meets at every shuffle, too slow yet
# for the whole suite (test_dot_parity.py alone runs past 5 minutes).
# The build happens in a temporary copy of the source tree, so the normal build in the
# repo (attention_ext/_C*.so, build/) is left alone; it uses the repo's .venv.
#
# Environment: PY (default .venv/bin/python), KEEP_BUILD=1 keeps the temporary directory.
# Arguments go to pytest (default: the files named below).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/.ci/build_copy.sh"
build_in_copy emulated ATTENTION_EXT_EMULATE_CUDA=1

# The tests, against the copy (its module must be the one imported).
"$PY" -c 'import sys, attention_ext as ae
sys.exit(0 if ae.build_info()["emulated_cuda"] else
         "test_emulated: imported a build without the emulated CUDA code: " + ae.__file__)'
if [ "$#" -eq 0 ]; then
  set -- tests/test_emulation.py tests/test_decode_loop.py tests/test_cuda_emulation.py \
    tests/test_additive_cuda_emulation.py
fi
"$PY" -m pytest -q -p no:cacheprovider "$@"
