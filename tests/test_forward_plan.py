"""The CUDA forward's launch plan (csrc/include/attention_ext/forward_plan.h): host code
that every build carries, exposed as attention_ext._C._testing.forward_plan, so it is
checked here whatever the machine. The decode shapes of benchmarks/bench_cuda.py must give
an H100 (132 SMs) enough warps and enough 16-byte loads in flight to run at its memory
bandwidth; every plan must cover the keys and the values exactly once."""
import math

import pytest

import attention_ext

plan_of = attention_ext._C._testing.forward_plan

H100_SMS = 132
# Bytes in flight that keep an H100's memory busy: about 3 TB/s x 0.6 us of latency.
H100_BYTES_IN_FLIGHT = 1.8e6
MAX_WARPS_PER_SM = 64


def chunks(width, itemsize):
    """A row's length in 16-byte chunks."""
    return width * itemsize // 16


# (id, rows, S, D, Dv, itemsize, values_are_keys): the decode cases of bench_cuda.py (one
# query row per batch element; the dot op's values are its keys).
DECODE = [
    ("dot_B64_S100_D512_fp32", 64, 100, 512, 512, 4, True),
    ("dot_B64_S100_D512_bf16", 64, 100, 512, 512, 2, True),
    ("dot_B1280_S66_D1024_fp32", 1280, 66, 1024, 1024, 4, True),
    ("dot_B8_S4096_D128_fp32", 8, 4096, 128, 128, 4, True),
    ("additive_B64_S100_A512_fp32", 64, 100, 512, 512, 4, False),
]

STAGE_CHUNKS = 32 * 1024 // 16


def round_bytes_in_flight(plan, d_chunks, v_chunks):
    """The bytes of one block's staged copies in flight at once: all of a round's rows, or
    two rounds' with two buffers."""
    row_chunks = d_chunks + (v_chunks if plan["stage_values"] else 0)
    return plan["stage_buffers"] * plan["round_keys"] * row_chunks * 16


@pytest.mark.parametrize("rows,S,D,Dv,itemsize,values_are_keys", [c[1:] for c in DECODE],
                         ids=[c[0] for c in DECODE])
def test_decode_shapes_fill_an_h100(rows, S, D, Dv, itemsize, values_are_keys):
    d_chunks, v_chunks = chunks(D, itemsize), chunks(Dv, itemsize)
    plan = plan_of(rows, S, d_chunks, v_chunks, values_are_keys, H100_SMS)
    warps = plan["blocks"] * plan["warps"]
    # At least 8 warps per SM, and no more than the SMs can hold in one or two waves.
    assert warps >= 8 * H100_SMS
    assert warps <= 2 * MAX_WARPS_PER_SM * H100_SMS or plan["splits"] == 1
    # Staged: the resident blocks' round copies, all issued before any is waited on, keep
    # the memory busy; the values that are not the keys come through the stage too.
    assert plan["stage_buffers"] > 0
    assert plan["stage_values"] == (not values_are_keys)
    resident = min(plan["blocks"], 4 * H100_SMS)
    assert resident * round_bytes_in_flight(plan, d_chunks, v_chunks) >= H100_BYTES_IN_FLIGHT


def test_a_long_sources_weights_are_written_by_many_blocks():
    """8 rows over 4096 keys: the merge writes each row's weights with 8 blocks of 128
    threads, 4 weights a thread, beside its one context block per row."""
    plan = plan_of(8, 4096, 32, 32, True, H100_SMS)
    assert plan["splits"] > 1 and plan["warps"] == 4
    assert plan["weight_parts"] == 8
    # 64 keys a split: two buffers of 32 keys, the second round's copies in flight while
    # the first computes.
    assert (plan["split_len"], plan["stage_buffers"], plan["round_keys"]) == (64, 2, 32)


def test_many_rows_need_no_split():
    """A beam batch (1280 rows) fills the GPU with one block per row: no merge pass."""
    plan = plan_of(1280, 66, 256, 256, True, H100_SMS)
    assert (plan["splits"], plan["split_len"], plan["blocks"]) == (1, 66, 1280)


def test_few_rows_split_the_keys():
    """B = 64 rows over 100 keys: as many splits as fit 4 blocks per SM in one wave (8, of
    13 keys: 512 blocks of the 528 an H100 holds at once; 9 would leave 48 blocks to a
    second wave), never fewer than 8 keys per split."""
    plan = plan_of(64, 100, 128, 128, True, H100_SMS)
    assert (plan["splits"], plan["split_len"], plan["blocks"]) == (8, 13, 512)
    assert (plan["warps"], plan["key_lanes"]) == (4, 32)
    # A split's 13 key rows (26 KB in float32) fit the stage: one round, one wait.
    assert (plan["stage_buffers"], plan["round_keys"], plan["stage_values"]) == (1, 13, False)


def test_separate_values_share_the_stage():
    """The additive decode: keys and values of 512 float32 each, 4 KB a key; a split's 13
    keys do not fit the 32 KB stage, so two buffers of 4 keys alternate."""
    plan = plan_of(64, 100, 128, 128, False, H100_SMS)
    assert (plan["stage_buffers"], plan["round_keys"], plan["stage_values"]) == (2, 4, True)


def test_rows_too_wide_for_the_stage_are_read_in_place():
    """Keys of 8192 float32 (32 KB a row): not even 4 keys a round fit the stage."""
    plan = plan_of(64, 100, 2048, 2048, True, H100_SMS)
    assert plan["stage_buffers"] == 0 and not plan["stage_values"]
    assert plan["round_keys"] == 8


# (d_chunks, v_chunks, values_are_keys): the values are the keys only where the rows match.
ROW_SHAPES = [(0, 0, False), (0, 0, True), (1, 1, False), (1, 1, True), (3, 1031, False),
              (32, 32, False), (32, 32, True), (128, 128, False), (128, 128, True),
              (256, 2048, False), (513, 4, False), (2048, 2048, True)]


@pytest.mark.parametrize("rows", [1, 3, 64, 5000])
@pytest.mark.parametrize("S", [1, 7, 8, 33, 100, 4096, 100_000])
@pytest.mark.parametrize("d_chunks,v_chunks,values_are_keys", ROW_SHAPES)
@pytest.mark.parametrize("sms", [1, 4, 132])
def test_plan_covers_keys_and_values_once(rows, S, d_chunks, v_chunks, values_are_keys, sms):
    plan = plan_of(rows, S, d_chunks, v_chunks, values_are_keys, sms)
    splits, split_len = plan["splits"], plan["split_len"]
    assert 1 <= splits <= 64
    # Every key in exactly one split, no split empty.
    assert splits * split_len >= S > (splits - 1) * split_len
    # Every context chunk in exactly one slice, no slice empty; a slice fits the block's
    # registers (4 chunks per thread).
    slices, slice_chunks = plan["slices"], plan["slice_chunks"]
    assert slices * slice_chunks >= v_chunks
    assert slices == 1 or (slices - 1) * slice_chunks < v_chunks
    assert slice_chunks == plan["warps"] * 32 * 4
    assert plan["warps"] in (1, 2, 4)  # threads tile the block's row sums by powers of 2
    lanes = plan["key_lanes"]
    assert 1 <= lanes <= 32 and lanes & (lanes - 1) == 0
    assert plan["blocks"] == rows * splits * slices
    # The merge's weight parts cover the row, 4 weights a thread at most, none empty.
    parts, threads = plan["weight_parts"], plan["warps"] * 32
    assert parts * threads * 4 >= S > (parts - 1) * threads * 4
    rk, buffers = plan["round_keys"], plan["stage_buffers"]
    if buffers:
        # Staged rounds fit the 32 KB stage: the whole split in one buffer, or two buffers
        # of at least 4 keys; value rows are staged unless they are the keys or are sliced.
        row_chunks = max(1, d_chunks + (v_chunks if plan["stage_values"] else 0))
        assert 1 <= rk <= 32 and buffers * rk * row_chunks <= STAGE_CHUNKS
        assert rk == split_len if buffers == 1 else (buffers == 2 and 4 <= rk < split_len)
        assert plan["stage_values"] == (not values_are_keys and slices == 1)
        # Two buffers only when one would not hold the split.
        assert buffers == 1 or split_len > min(32, STAGE_CHUNKS // row_chunks)
    else:
        # Read in place: rounds of 8 to 32 keys, at most 32 KB of key rows unless that is
        # under 8 keys; only rows too wide for two buffers of 4 keys.
        assert 8 <= rk <= 32
        assert rk * d_chunks * 16 <= 32 * 1024 or rk == 8
        assert not plan["stage_values"]
        row_chunks = max(1, d_chunks + (0 if values_are_keys or slices > 1 else v_chunks))
        fit = STAGE_CHUNKS // row_chunks
        assert fit // 2 < 4 and split_len > min(fit, 32)
    # No split below 8 keys but where S itself is shorter.
    assert split_len >= min(8, S)
    # Split plans run in one wave of 4 blocks per SM.
    assert splits == 1 or plan["blocks"] <= 4 * sms
