#!/usr/bin/env bash
# Copies the source tree (tracked files plus untracked ones git does not ignore) into a
# new temporary directory named after $1 and prints its path; the CI builds that must
# not touch the repo's own build (CUDA build check, emulated CUDA tests) build there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/attention_ext_${1:?name}.XXXXXX")"
(cd "$ROOT" && git ls-files -co --exclude-standard -z \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$WORK"
echo "$WORK"
