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
PY="${PY:-$ROOT/.venv/bin/python}"
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
test -x "$PY" || { echo "test_emulated: no python at $PY (run make install first)" >&2; exit 1; }

# 1. A copy of the source tree: tracked files plus untracked ones git does not ignore.
WORK="$(bash "$ROOT/.ci/copy_tree.sh" emulated)"
if [ "${KEEP_BUILD:-0}" = 1 ]; then echo "== build directory: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# 2. Build with the emulated CUDA ops.
echo "== test_emulated: building with ATTENTION_EXT_EMULATE_CUDA=1"
start=$(date +%s)
(cd "$WORK" && ATTENTION_EXT_EMULATE_CUDA=1 "$PY" setup.py -q build_ext --inplace) \
  > "$WORK/build.log" 2>&1 || {
  tail -n 80 "$WORK/build.log" >&2
  echo "test_emulated: FAILED to build the emulated extension" >&2
  exit 1
}
echo "== built in $(( $(date +%s) - start )) s"

# 3. The tests, against the copy (its module must be the one imported, or they would skip).
cd "$WORK"
export PYTHONPATH="$WORK"
"$PY" -c 'import sys, attention_ext as ae
sys.exit(0 if ae.build_info()["emulated_cuda"] else
         "test_emulated: imported a build without the emulated ops: " + ae.__file__)'
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py \
  tests/test_additive_cuda_emulation.py "$@"
