#!/usr/bin/env bash
# make gpu-check: on a machine with a CUDA GPU, builds the extension in place for the GPU
# it finds, runs the CUDA tests (pytest -m cuda), then the CUDA benchmark, the beam
# search benchmark, the end-to-end seq2seq benchmark (quick), the location op's benchmark
# and the whole Tacotron 2 step. Logs and the benchmarks'
# tables go to $LOG_DIR, the tables named as in benchmarks/results:
# <benchmark>-<machine>-<date>.md (e.g. cuda-h100-2026-11-27.md). Fits a few minutes on an
# H100 (build about 45 s with 16 jobs).
#
# Environment: PY (default python3, the interpreter with a CUDA build of torch), LOG_DIR
# (default gpu-check-logs), TEST_WORKERS (pytest-xdist workers when installed, default 8),
# BENCH_ARGS (default --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for the benchmark
LOG_DIR="${LOG_DIR:-gpu-check-logs}"
mkdir -p "$LOG_DIR"

arch=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "== gpu-check: building for compute capability $TORCH_CUDA_ARCH_LIST ($MAX_JOBS jobs)"
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace > "$LOG_DIR/build.log" 2>&1 || {
  tail -n 60 "$LOG_DIR/build.log"
  echo "gpu-check: FAILED to build" >&2
  exit 1
}
echo "== built in $(( $(date +%s) - start )) s"
"$PY" -c 'import attention_ext as ae, sys; info = ae.build_info(); print(info)
sys.exit(0 if info["with_cuda"] else "gpu-check: the build has no CUDA kernels")' || exit 1

# The file of a benchmark's tables in $LOG_DIR (benchmarks/_common.py: result_stem).
result_file() {
  "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import _common as C
print(C.result_stem(sys.argv[1], sys.argv[2], "cuda") + ".md")' "$LOG_DIR" "$1"
}

# One intra-op thread per worker: the CUDA tests also train small models on the CPU, and
# workers of all-core thread pools stall each other at every parallel op's barrier.
workers=()
if "$PY" -c 'import xdist' 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
echo "== gpu-check: pytest -m cuda ${workers[*]}"
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -m cuda "${workers[@]}" tests 2>&1 \
  | tee "$LOG_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== gpu-check: benchmarks/bench_cuda.py ${BENCH_ARGS:---quick}"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_cuda.py ${BENCH_ARGS:---quick} --output "$(result_file cuda)" 2>&1 \
  | tee "$LOG_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== gpu-check: benchmarks/bench_beam_search.py --quick --device cuda --models bahdanau"
"$PY" benchmarks/bench_beam_search.py --quick --device cuda --models bahdanau \
  --output "$(result_file beam-search)" 2>&1 | tee "$LOG_DIR/bench_beam_search.log"
(( bench_rc = bench_rc || PIPESTATUS[0] ))

echo "== gpu-check: benchmarks/bench_seq2seq.py --quick --device cuda"
"$PY" benchmarks/bench_seq2seq.py --quick --device cuda \
  --output "$(result_file seq2seq)" 2>&1 | tee "$LOG_DIR/bench_seq2seq.log"
(( bench_rc = bench_rc || PIPESTATUS[0] ))
echo "== gpu-check: benchmarks/bench_location.py --device cuda"
"$PY" benchmarks/bench_location.py --device cuda --repeats 20 --budget 10 \
  --output "$(result_file location)" 2>&1 | tee "$LOG_DIR/bench_location.log"
(( bench_rc = bench_rc || PIPESTATUS[0] ))

echo "== gpu-check: benchmarks/bench_tacotron2.py --device cuda --steps 3"
"$PY" benchmarks/bench_tacotron2.py --device cuda --steps 3 \
  --output "$(result_file tacotron2)" 2>&1 | tee "$LOG_DIR/bench_tacotron2.log"
(( bench_rc = bench_rc || PIPESTATUS[0] ))
echo "== gpu-check: benchmarks/bench_tacotron2.py --device cuda --steps 3 --attention-alone"
"$PY" benchmarks/bench_tacotron2.py --device cuda --steps 3 --attention-alone \
  --output "$(result_file tacotron2-attention)" 2>&1 | tee "$LOG_DIR/bench_tacotron2_attention.log"
(( bench_rc = bench_rc || PIPESTATUS[0] ))
echo "== gpu-check: tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
