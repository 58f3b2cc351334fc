# Sourced by the CI test builds (test_emulated.sh, test_sanitized.sh). build_in_copy NAME
# VAR=VALUE... resolves the python (PY, default the repo's .venv), copies the source tree
# into a temporary directory (tracked files plus untracked ones git does not ignore) and
# builds the extension there with the given environment, so the repo's own build is left
# alone. It leaves the shell in that directory with PYTHONPATH pointing at it, and sets PY
# and WORK. KEEP_BUILD=1 keeps the directory; otherwise it goes when the script exits.
build_in_copy() {
  local name="$1"
  shift
  PY="${PY:-$ROOT/.venv/bin/python}"
  case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
  test -x "$PY" || { echo "$name: no python at $PY (run make install first)" >&2; exit 1; }
  WORK="$(bash "$ROOT/.ci/copy_tree.sh" "$name")"
  if [ "${KEEP_BUILD:-0}" = 1 ]; then echo "== build directory: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
  echo "== $name: building with $*"
  local start
  start=$(date +%s)
  (cd "$WORK" && env "$@" "$PY" setup.py -q build_ext --inplace) > "$WORK/build.log" 2>&1 || {
    tail -n 80 "$WORK/build.log" >&2
    echo "$name: FAILED to build the extension with $*" >&2
    exit 1
  }
  echo "== built in $(( $(date +%s) - start )) s"
  cd "$WORK"
  export PYTHONPATH="$WORK"
}
