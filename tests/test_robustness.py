"""Robustness of both ops: fuzzed arguments never crash or hang the process, NaN/Inf stay
in the rows they touch, calls from several Python threads at once give the serial results,
and repeated calls give bitwise identical outputs and gradients."""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import DEVICES
from harness import ADDITIVE, DOT, OPS, call, run

FUZZER = Path(__file__).with_name("fuzz_ops.py")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzzed_arguments_return_or_raise(seed):
    # A subprocess: a segfault or abort must fail this test, not kill pytest; a hang hits
    # the timeout.
    proc = subprocess.run([sys.executable, str(FUZZER), str(seed), "1500"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (
        f"fuzzer seed {seed} exited with {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    assert "fuzz: 1500 calls" in proc.stdout


def _rows_equal_except(got, clean, bad_rows):
    """got == clean bitwise outside bad_rows (indices into the first two dims)."""
    keep = torch.ones(got.shape[:2], dtype=torch.bool)
    for r in bad_rows:
        keep[r] = False
    assert torch.equal(got[keep], clean[keep])


# Few query rows per batch element, and enough for the CUDA query tiles.
@pytest.mark.parametrize("Tq", [5, 20])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("op", OPS)
def test_non_finite_query_row_stays_in_its_row(op, value, Tq):
    B, S, F = 3, 9, 16
    case = op.make_case(B, Tq, S, F, mask_kind="lengths64", seed=3)
    case.lengths[1] = S  # row (1, 2) attends to every key
    query = case.inputs[op.query]
    clean_ctx, clean_w = call(op.functional, case)
    bad = query.clone()
    bad[1, 2, 3] = value
    ctx, w = call(op.functional, case.replace(**{op.query: bad}))
    _rows_equal_except(ctx, clean_ctx, [(1, 2)])
    _rows_equal_except(w, clean_w, [(1, 2)])
    if value != value:  # NaN in, NaN out for that row
        assert torch.isnan(ctx[1, 2]).all() and torch.isnan(w[1, 2]).all()


@pytest.mark.parametrize("Tq", [4, 20])
@pytest.mark.parametrize("op", OPS)
def test_nan_key_stays_in_its_batch_element(op, Tq):
    B, S, F = 3, 9, 16
    case = op.make_case(B, Tq, S, F, seed=4)
    clean_ctx, clean_w = call(op.functional, case)
    bad = case.inputs[op.keys].clone()
    bad[2, 5, 0] = float("nan")
    ctx, w = call(op.functional, case.replace(**{op.keys: bad}))
    assert torch.equal(ctx[:2], clean_ctx[:2]) and torch.equal(w[:2], clean_w[:2])
    assert torch.isnan(ctx[2]).all() and torch.isnan(w[2]).all()


def _cases(device="cpu"):
    """Forward + backward of both ops on a few different inputs, as callables; seed 3 with
    enough query rows for the CUDA query tiles."""
    jobs = []
    for seed in range(4):
        Tq = 20 if seed == 3 else 6
        dcase = DOT.make_case(4, Tq, 23, 32, mask_kind="mask", seed=seed, device=device)
        jobs.append(lambda c=dcase: run(c))
        acase = ADDITIVE.make_case(4, Tq, 23, 32, 12, mask_kind="lengths64", seed=seed,
                                   device=device)
        jobs.append(lambda c=acase: run(c))
    return jobs


def _assert_same(a, b):
    for name in a:
        if a[name] is None:
            assert b[name] is None
        else:
            assert torch.equal(a[name], b[name]), name


def test_eight_threads_give_the_serial_results():
    jobs = _cases()
    serial = [job() for job in jobs]
    results = {}
    errors = []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for rep in range(3):
                for j, job in enumerate(jobs):
                    results[(i, rep, j)] = job()
        except Exception as e:  # reported below; an exception in a thread is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 8 * 3 * len(jobs)
    for (i, rep, j), got in results.items():
        _assert_same(serial[j], got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [1, 2])
def test_ten_runs_are_bitwise_identical(threads, device):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        jobs = _cases(device)
        first = [job() for job in jobs]
        for _ in range(9):
            for job, ref in zip(jobs, first):
                _assert_same(ref, job())
    finally:
        torch.set_num_threads(before)
