#!/usr/bin/env bash
# CI: build the CUDA kernels against a CUDA build of torch on a machine with no GPU, then
# check that every attention operator in torch.ops.attention_ext has a CUDA kernel registered.
# The build happens in a temporary copy of the source tree, so the CPU build in the repo
# (attention_ext/_C*.so, build/) is left alone.
#
# Environment: TORCH_CUDA_SPEC (default torch==2.14.1, a CUDA 13 build), CUDA_HOME
# (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2),
# KEEP_BUILD=1 keeps the temporary build directory.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-cuda"
PY="$VENV/bin/python"
TORCH_CUDA_SPEC="${TORCH_CUDA_SPEC:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FORCE_CUDA=1

test -x "$CUDA_HOME/bin/nvcc" || { echo "cuda_build_check: no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }

# 1. The environment, reused while the stamp names the same torch.
STAMP="$VENV/.deps-installed"
if ! { test -x "$PY" && test -f "$STAMP" && grep -qxF "$TORCH_CUDA_SPEC" "$STAMP"; }; then
  echo "== cuda_build_check: creating $VENV with $TORCH_CUDA_SPEC"
  test -x "$PY" || python3 -m venv "$VENV"
  "$PY" -m pip install -q "$TORCH_CUDA_SPEC" numpy ninja pybind11 "setuptools>=64" wheel 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$TORCH_CUDA_SPEC" > "$STAMP"
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch in .venv-cuda is not a CUDA build")'

# 2. A copy of the source tree: tracked files plus untracked ones git does not ignore.
WORK="$(bash "$ROOT/.ci/copy_tree.sh" cuda_build)"
if [ "${KEEP_BUILD:-0}" = 1 ]; then echo "== build directory: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# 3. Build (nvcc for the .cu files, no GPU needed with FORCE_CUDA=1).
echo "== cuda_build_check: building with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
start=$(date +%s)
(cd "$WORK" && "$PY" setup.py -q build_ext --inplace) > "$WORK/build.log" 2>&1 || {
  tail -n 80 "$WORK/build.log" >&2
  echo "cuda_build_check: FAILED to build the CUDA extension" >&2
  exit 1
}
echo "== built in $(( $(date +%s) - start )) s"

# 4. Import and check the registrations.
cd "$WORK"
PYTHONPATH="$WORK" "$PY" - <<'PY'
import sys

import torch
import attention_ext

info = attention_ext.build_info()
names = sorted(n for n in torch._C._dispatch_get_all_op_names()
               if n.startswith("attention_ext::"))
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), attention_ext {info}")
for n in names:
    print(f"  {n}: CUDA kernel {'yes' if n not in missing else 'MISSING'}")
errors = []
if not info["with_cuda"]:
    errors.append("build_info()['with_cuda'] is False: the CUDA kernels were not compiled in")
if not names:
    errors.append("no operators registered under attention_ext::")
if missing:
    errors.append(f"operators without a CUDA kernel: {missing}")
if errors:
    sys.exit("cuda_build_check: FAILED\n  " + "\n  ".join(errors))
print(f"cuda_build_check: OK ({len(names)} operators, all with CUDA kernels)")
PY
