#!/usr/bin/env bash
# A build with AddressSanitizer and UndefinedBehaviorSanitizer
# (ATTENTION_EXT_SANITIZE=address,undefined) and the op tests run under it: any report
# (out-of-bounds access, use after free, undefined behaviour) aborts and fails the run.
# $1 picks the ops' kernels: `cpu` (csrc/cpu, the default) or `emulated-cuda` (csrc/cuda
# under the CPU emulation, as make test-emulated). The build happens in a temporary copy of
# the tree; it uses the repo's .venv.
#
# Python and torch are not instrumented, so the ASan runtime is preloaded (with libstdc++,
# or ASan cannot intercept C++ throws); leak detection is off because the interpreter's own
# allocations at exit are not leaks of ours. Reports go to files (pytest captures stderr,
# and an abort loses what it captured) and are printed when the run fails.
#
# Environment: PY (default .venv/bin/python), KEEP_BUILD=1 keeps the temporary directory.
# Further arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/.ci/build_copy.sh"
kernels="${1:-cpu}"
[ "$#" -gt 0 ] && shift
case "$kernels" in
  cpu) build_in_copy sanitized ATTENTION_EXT_SANITIZE=address,undefined ;;
  emulated-cuda)
    build_in_copy sanitized_emulated ATTENTION_EXT_SANITIZE=address,undefined \
      ATTENTION_EXT_EMULATE_CUDA=1 ;;
  *) echo "test_sanitized: unknown kernels '$kernels' (cpu or emulated-cuda)" >&2; exit 2 ;;
esac

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$WORK/report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/report"
show_reports() {
  local rc=$?
  if compgen -G "$WORK/report*" > /dev/null; then
    echo "test_sanitized: sanitizer reports:" >&2
    cat "$WORK"/report* >&2
    rc=1
  fi
  [ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$WORK"
  exit $rc
}
trap show_reports EXIT
"$PY" -c 'import attention_ext, sys
sys.exit(0 if attention_ext.__file__.startswith(sys.argv[1]) else
         "test_sanitized: imported another build: " + attention_ext.__file__)' "$WORK"
# The op-level tests, less the slow ones (the 64-bit one needs 9 GB, more with ASan's
# shadow) and the torch.compile ones (they add only Python-side tracing and take long
# under ASan). The models built on the ops (seq2seq, the drop-ins, the demo) call the same
# kernels on shapes the op tests already cover, and take most of their time in PyTorch's
# own RNNs, which are not instrumented.
"$PY" -m pytest -q -n auto -p no:cacheprovider -x -m "not slow and not demo" -k "not compile" \
  --ignore=tests/test_seq2seq.py --ignore=tests/test_compat_opennmt.py \
  --ignore=tests/test_compat_tutorial.py --ignore=tests/test_compat_location.py \
  --ignore=tests/test_nn_location.py --ignore=tests/test_demo.py "$@" tests
