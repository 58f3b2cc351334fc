#!/usr/bin/env bash
# The CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
# (ATTENTION_EXT_SANITIZE=address,undefined) and the op tests run under them: any report
# (out-of-bounds access, use after free, undefined behaviour) aborts and fails the run.
# The build happens in a temporary copy of the tree; it uses the repo's .venv.
#
# Python and torch are not instrumented, so the ASan runtime is preloaded (with libstdc++,
# or ASan cannot intercept C++ throws); leak detection is off because the interpreter's own
# allocations at exit are not leaks of ours. Reports go to files (pytest captures stderr,
# and an abort loses what it captured) and are printed when the run fails.
#
# Environment: PY (default .venv/bin/python), KEEP_BUILD=1 keeps the temporary directory.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
test -x "$PY" || { echo "test_sanitized: no python at $PY (run make install first)" >&2; exit 1; }

WORK="$(bash "$ROOT/.ci/copy_tree.sh" sanitized)"
if [ "${KEEP_BUILD:-0}" = 1 ]; then echo "== build directory: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

echo "== test_sanitized: building with ATTENTION_EXT_SANITIZE=address,undefined"
start=$(date +%s)
(cd "$WORK" && ATTENTION_EXT_SANITIZE=address,undefined "$PY" setup.py -q build_ext --inplace) \
  > "$WORK/build.log" 2>&1 || {
  tail -n 80 "$WORK/build.log" >&2
  echo "test_sanitized: FAILED to build the sanitized extension" >&2
  exit 1
}
echo "== built in $(( $(date +%s) - start )) s"

cd "$WORK"
export PYTHONPATH="$WORK"
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
# The suite but the slow tests (the 64-bit one needs 9 GB, more with ASan's shadow) and the
# torch.compile ones (they add only Python-side tracing and take long under ASan); the
# emulated-CUDA tests skip in this build.
"$PY" -m pytest -q -p no:cacheprovider -x -m "not slow" -k "not compile" "$@" tests
