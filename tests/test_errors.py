"""Every op (dot, additive, location): bad input raises ValueError/RuntimeError naming the
argument, through the functional API and through torch.ops directly (real kernels), and
through the fake kernels (meta tensors, what torch.compile traces) for structural errors;
nothing crashes or hangs."""
import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import DEVICES, HAS_CUDA, on_device
from harness import ADDITIVE, DOT, LOCATION, OPS, call

ERRORS = (ValueError, RuntimeError)

B, Tq, S, F, Dv = 3, 2, 5, 4, 6  # F: the query's and keys' width (D or A)
C, FILTERS, K = 2, 3, 3  # location: prev's channels, the convolution's filters and taps

ALL_OPS = OPS + [pytest.param(LOCATION, id="location")]


def shapes(op) -> dict:
    """Every input's shape in a valid call of op (location: one decoder step, with a
    score_bias)."""
    if op is LOCATION:
        return LOCATION.shapes(B, S, F, Dv, C=C, F=FILTERS, K=K)
    return op.shapes(B, Tq, S, F, Dv)


def good(op, **over):
    """A valid case (lengths, mask and window None), then over (inputs by name, lengths,
    mask, scale, window) on top."""
    inputs = {n: torch.randn(shape) for n, shape in shapes(op).items()}
    return op.case(**inputs).replace(**over)


def call_functional(case):
    return call(case.op.functional, case)


def call_op(case):
    return case.op.raw(*case.op.op_args(case))


CALLERS = [pytest.param(call_functional, id="functional"), pytest.param(call_op, id="op")]


def _bad_query(op):
    """(id, overrides, regex the message must match) for the query checks of the ops that
    take a (B, F) or (B, Tq, F) query (dot, additive), in op's names: {q} the query, {k}
    the keys, {W} their width's name."""
    q, k, W = op.query, op.keys, op.feature
    return [
        ("query_1d", {q: torch.randn(F)},
         rf"{q} must have shape \(B, {W}\) for one decoder step or \(B, Tq, {W}\), got \[4\]"),
        ("query_4d", {q: torch.randn(B, Tq, 1, F)},
         rf"{q} must have shape \(B, {W}\) for one decoder step or \(B, Tq, {W}\)"),
        ("query_batch", {q: torch.randn(B - 1, Tq, F)}, rf"{k} must have batch size B = 2"),
        ("query_dtype", {q: torch.randn(B, Tq, F, dtype=torch.float64)},
         rf"{k} must have the same dtype as {q}"),
    ]


def _bad_inputs(op):
    """(id, overrides, regex the message must match) for checks every op makes, in op's
    names: {q} the query, {k} the keys, {W} their width's name."""
    q, k, W = op.query, op.keys, op.feature
    every = lambda dtype: {n: torch.ones(shape, dtype=dtype)  # noqa: E731
                           for n, shape in shapes(op).items()}
    return [
        # wrong ranks
        ("keys_2d", {k: torch.randn(B, F)}, rf"{k} must have shape \(B, S, {W}\)"),
        ("keys_4d", {k: torch.randn(B, S, F, 1)}, rf"{k} must have shape \(B, S, {W}\)"),
        ("values_2d", dict(values=torch.randn(B, S)), r"values must have shape \(B, S, Dv\)"),
        ("values_4d", dict(values=torch.randn(B, S, Dv, 1)),
         r"values must have shape \(B, S, Dv\)"),
        # batch mismatch: each input in turn is the odd one out
        ("keys_batch", {k: torch.randn(B + 1, S, F)}, rf"{k} must have batch size B = 3"),
        ("values_batch", dict(values=torch.randn(B + 1, S, Dv)),
         rf"values must have batch size 3 like {k}"),
        ("lengths_batch", dict(lengths=torch.tensor([1, 2])), r"lengths must have shape \(B,\)"),
        ("mask_batch", dict(mask=torch.ones(B + 1, S, dtype=torch.bool)),
         r"mask must have shape \(B, S\)"),
        # values of a different S
        ("S_mismatch", dict(values=torch.randn(B, S + 1, Dv)),
         r"values must have source length S = 5"),
        ("S_mismatch_short", dict(values=torch.randn(B, S - 1, Dv)),
         r"values must have source length S = 5"),
        # lengths
        ("lengths_2d", dict(lengths=torch.ones(B, 1, dtype=torch.long)),
         r"lengths must have shape \(B,\)"),
        ("lengths_0d", dict(lengths=torch.tensor(2)), r"lengths must have shape \(B,\)"),
        ("lengths_float", dict(lengths=torch.tensor([1.0, 2.0, 3.0])),
         r"lengths must be an int64 or int32"),
        ("lengths_half", dict(lengths=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)),
         r"lengths must be an int64 or int32"),
        ("lengths_bool", dict(lengths=torch.tensor([True, False, True])),
         r"lengths must be an int64 or int32"),
        # mask
        ("mask_int", dict(mask=torch.ones(B, S, dtype=torch.long)),
         r"mask must be a bool tensor"),
        ("mask_uint8", dict(mask=torch.ones(B, S, dtype=torch.uint8)),
         r"mask must be a bool tensor"),
        ("mask_float", dict(mask=torch.ones(B, S)), r"mask must be a bool tensor"),
        ("mask_S", dict(mask=torch.ones(B, S + 1, dtype=torch.bool)),
         r"mask must have shape \(B, S\)"),
        ("mask_3d", dict(mask=torch.ones(B, 1, S, dtype=torch.bool)),
         r"mask must have shape \(B, S\)"),
        ("mask_1d", dict(mask=torch.ones(S, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
        ("lengths_and_mask", dict(lengths=torch.tensor([1, 2, 3]),
                                  mask=torch.ones(B, S, dtype=torch.bool)),
         r"either lengths or mask"),
        # mixed dtypes: each input in turn differs from the query
        ("keys_dtype", {k: torch.randn(B, S, F, dtype=torch.float64)},
         rf"{k} must have the same dtype as {q}"),
        ("values_dtype", dict(values=torch.randn(B, S, Dv, dtype=torch.bfloat16)),
         rf"values must have the same dtype as {q}"),
        ("all_int", every(torch.long), rf"{q} must be float32, float64, float16 or bfloat16"),
        # memory_index: query row b reads memory row memory_index[b] of the B = 3 here
        ("memory_index_float", dict(memory_index=torch.tensor([0.0, 1.0, 2.0])),
         r"memory_index must be an int64 or int32 tensor of shape \(B,\) = \(3,\)"),
        ("memory_index_bool", dict(memory_index=torch.tensor([True, False, True])),
         r"memory_index must be an int64 or int32"),
        ("memory_index_short", dict(memory_index=torch.tensor([0, 1])),
         r"memory_index must have shape \(B,\) = \(3,\), one memory row per query row"),
        ("memory_index_2d", dict(memory_index=torch.zeros(B, 1, dtype=torch.long)),
         r"memory_index must have shape \(B,\) = \(3,\)"),
        ("memory_index_and_values_batch", {"memory_index": torch.tensor([0, 1, 1]),
                                           "values": torch.randn(B - 1, S, Dv)},
         rf"values must have batch size 3 like {k}"),
        ("memory_index_no_memory", {k: torch.randn(0, S, F), "values": torch.randn(0, S, Dv),
                                    "memory_index": torch.tensor([0, 0, 0])},
         rf"memory_index must lie in \[0, M\), but {k} has no memory rows"),
        ("memory_lengths_batch", {k: torch.randn(2, S, F), "values": torch.randn(2, S, Dv),
                                  "memory_index": torch.tensor([0, 0, 1]),
                                  "lengths": torch.tensor([1, 2, 3])},
         r"lengths must have shape \(B,\) = \(2,\)"),
        ("all_complex", every(torch.complex64),
         rf"{q} must be float32, float64, float16 or bfloat16"),
    ]


# Bad values of lengths: the kernels check them as they read them, so the fake kernels, which
# have no data, cannot.
BAD_LENGTHS_VALUES = [
    ("lengths_negative", dict(lengths=torch.tensor([1, -1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S", dict(lengths=torch.tensor([1, S + 1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S_int32", dict(lengths=torch.tensor([S + 1, 0, 0], dtype=torch.int32)),
     r"lengths must lie in \[0, S\]"),
    ("lengths_negative_int32", dict(lengths=torch.tensor([0, 0, -3], dtype=torch.int32)),
     r"lengths must lie in \[0, S\]"),
]

BAD_DOT = [
    # keys of another width than the query
    ("D_mismatch", dict(keys=torch.randn(B, S, F + 1)), r"keys must have feature size D = 4"),
    # scale
    ("scale_nan", dict(scale=math.nan), r"scale must be finite"),
    ("scale_inf", dict(scale=math.inf), r"scale must be finite"),
    ("scale_neg_inf", dict(scale=-math.inf), r"scale must be finite"),
]

BAD_ADDITIVE = [
    # v of the wrong rank or size
    ("v_0d", dict(v=torch.tensor(1.0)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_2d", dict(v=torch.randn(1, F)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_2d_A1", dict(v=torch.randn(F, 1)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_size", dict(v=torch.randn(F + 1)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_empty", dict(v=torch.randn(0)), r"v must have shape \(A,\) = \(4,\)"),
    # query_proj and keys_proj of different A
    ("A_mismatch", dict(keys_proj=torch.randn(B, S, F + 1)),
     r"keys_proj must have feature size A = 4"),
    ("A_mismatch_query", dict(query_proj=torch.randn(B, Tq, F + 1), v=torch.randn(F + 1)),
     r"keys_proj must have feature size A = 5"),
    ("v_dtype", dict(v=torch.randn(F, dtype=torch.float16)),
     r"v must have the same dtype as query_proj"),
]

# Location-sensitive attention's own: its (B, A) query_proj, prev (B, C, S), conv_weight
# (F, C, K) with K odd, location_weight (A, F), v (A,), score_bias (1,), window (B, 2).
BAD_LOCATION = [
    ("query_proj_3d", dict(query_proj=torch.randn(B, 1, F)),
     r"query_proj must have shape \(B, A\): location-sensitive attention takes one decoder "
     r"step a call .*, got \[3, 1, 4\]"),
    ("query_proj_1d", dict(query_proj=torch.randn(F)), r"query_proj must have shape \(B, A\)"),
    ("query_proj_batch", dict(query_proj=torch.randn(B - 1, F)),
     r"keys_proj must have batch size B = 2"),
    ("query_proj_dtype", dict(query_proj=torch.randn(B, F, dtype=torch.float64)),
     r"keys_proj must have the same dtype as query_proj"),
    ("A_mismatch", dict(keys_proj=torch.randn(B, S, F + 1)),
     r"keys_proj must have feature size A = 4"),
    # the convolution's taps, channels and filters
    ("K_even", dict(conv_weight=torch.randn(FILTERS, C, 4)),
     r"conv_weight must have an odd number of taps K .*, got K = 4"),
    ("K_zero", dict(conv_weight=torch.randn(FILTERS, C, 0)),
     r"conv_weight must have an odd number of taps K .*, got K = 0"),
    ("conv_weight_C", dict(conv_weight=torch.randn(FILTERS, C + 1, K)),
     r"conv_weight must have shape \(F, C, K\) with C = 2 like prev's channels, "
     r"got \[3, 3, 3\]"),
    ("prev_C", dict(prev=torch.randn(B, 1, S)),
     r"conv_weight must have shape \(F, C, K\) with C = 1 like prev's channels"),
    ("conv_weight_2d", dict(conv_weight=torch.randn(FILTERS, K)),
     r"conv_weight must have shape \(F, C, K\)"),
    ("prev_S", dict(prev=torch.randn(B, C, S + 1)),
     r"prev must have shape \(B, C, S\) = \(3, C, 5\)"),
    ("prev_batch", dict(prev=torch.randn(B + 1, C, S)),
     r"prev must have shape \(B, C, S\) = \(3, C, 5\)"),
    ("prev_2d", dict(prev=torch.randn(B, S)), r"prev must have shape \(B, C, S\)"),
    ("location_weight_F", dict(location_weight=torch.randn(F, FILTERS + 1)),
     r"location_weight must have shape \(A, F\) = \(4, 3\)"),
    ("location_weight_A", dict(location_weight=torch.randn(F + 1, FILTERS)),
     r"location_weight must have shape \(A, F\) = \(4, 3\)"),
    ("location_weight_1d", dict(location_weight=torch.randn(F)),
     r"location_weight must have shape \(A, F\)"),
    ("v_size", dict(v=torch.randn(F + 1)), r"\bv must have shape \(A,\) = \(4,\)"),
    ("v_2d", dict(v=torch.randn(1, F)), r"\bv must have shape \(A,\) = \(4,\)"),
    # dtypes: each in turn differs from query_proj
    ("prev_dtype", dict(prev=torch.randn(B, C, S, dtype=torch.float64)),
     r"prev must have the same dtype as query_proj"),
    ("conv_weight_dtype", dict(conv_weight=torch.randn(FILTERS, C, K, dtype=torch.bfloat16)),
     r"conv_weight must have the same dtype as query_proj"),
    ("location_weight_dtype", dict(location_weight=torch.randn(F, FILTERS, dtype=torch.float16)),
     r"location_weight must have the same dtype as query_proj"),
    ("v_dtype", dict(v=torch.randn(F, dtype=torch.float64)),
     r"\bv must have the same dtype as query_proj"),
    ("score_bias_dtype", dict(score_bias=torch.randn(1, dtype=torch.float64)),
     r"score_bias must have the same dtype as query_proj"),
    ("score_bias_2", dict(score_bias=torch.randn(2)),
     r"score_bias must have shape \(1,\), got \[2\]"),
    ("score_bias_0d", dict(score_bias=torch.tensor(1.0)), r"score_bias must have shape \(1,\)"),
    ("score_bias_2d", dict(score_bias=torch.randn(1, 1)), r"score_bias must have shape \(1,\)"),
    ("scale_nan", dict(scale=math.nan), r"scale must be finite"),
    ("scale_inf", dict(scale=-math.inf), r"scale must be finite"),
    # the window's shape and dtype
    ("window_3_wide", dict(window=torch.zeros(B, 3, dtype=torch.long)),
     r"window must have shape \(B, 2\) = \(3, 2\), \[start, end\) per query row, got \[3, 3\]"),
    ("window_1d", dict(window=torch.zeros(2, dtype=torch.long)),
     r"window must have shape \(B, 2\) = \(3, 2\)"),
    ("window_batch", dict(window=torch.zeros(B + 1, 2, dtype=torch.long)),
     r"window must have shape \(B, 2\) = \(3, 2\)"),
    ("window_float", dict(window=torch.zeros(B, 2)),
     r"window must be an int64 or int32 tensor of shape \(B, 2\) = \(3, 2\), got dtype Float"),
    ("window_bool", dict(window=torch.zeros(B, 2, dtype=torch.bool)),
     r"window must be an int64 or int32 tensor"),
    ("window_int16", dict(window=torch.zeros(B, 2, dtype=torch.int16)),
     r"window must be an int64 or int32 tensor"),
]

# Windows outside 0 <= start <= end <= S (S = 5): the kernels check them as they read
# them (on the host for the CPU kernels; on a GPU, test_location's subprocess test), so the
# fake kernels cannot.
BAD_WINDOW_VALUES = [
    ("window_end_gt_S", dict(window=torch.tensor([[0, 5], [2, 6], [0, 1]])),
     r"window must hold rows \[start, end\) with 0 <= start <= end <= S"),
    ("window_start_gt_end", dict(window=torch.tensor([[3, 2], [0, 5], [0, 1]])),
     r"window must hold rows \[start, end\) with 0 <= start <= end <= S"),
    ("window_negative", dict(window=torch.tensor([[0, 5], [0, 5], [-1, 2]])),
     r"window must hold rows \[start, end\) with 0 <= start <= end <= S"),
    ("window_gt_S_int32", dict(window=torch.tensor([[7, 9], [0, 5], [0, 1]], dtype=torch.int32)),
     r"window must hold rows \[start, end\) with 0 <= start <= end <= S"),
]

# memory_index values outside [0, M): checked on the host for the CPU kernels, by the
# kernels as they read them on a GPU (under the emulation, at the launch's end; on a real GPU
# a device-side assertion, test_decode_loop's subprocess test).
BAD_MEMORY_INDEX_VALUES = [
    pytest.param(op, over, match, id=f"{op.name}-{id_}") for op in (DOT, ADDITIVE, LOCATION)
    for id_, over, match in [
        ("memory_index_negative", dict(memory_index=torch.tensor([0, -1, 2])),
         r"memory_index must lie in \[0, M\)"),
        ("memory_index_ge_M", dict(memory_index=torch.tensor([0, 3, 2])),
         r"memory_index must lie in \[0, M\)"),
        ("memory_index_ge_M_int32", dict(memory_index=torch.tensor([5, 0, 0], dtype=torch.int32)),
         r"memory_index must lie in \[0, M\)"),
    ]]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("op,over,match", BAD_MEMORY_INDEX_VALUES)
def test_bad_memory_index_values(op, over, match, caller):
    with pytest.raises(ERRORS, match=match):
        caller(good(op, **over))


# Structural mistakes (shapes, dtypes, devices, scale): the fake kernels refuse them too.
BAD = [pytest.param(op, over, match, id=f"{op.name}-{id_}")
       for op, own in ((DOT, _bad_query(DOT) + BAD_DOT),
                       (ADDITIVE, _bad_query(ADDITIVE) + BAD_ADDITIVE),
                       (LOCATION, BAD_LOCATION))
       for id_, over, match in _bad_inputs(op) + own]
BAD_VALUES = [pytest.param(op, over, match, id=f"{op.name}-{id_}")
              for op in (DOT, ADDITIVE, LOCATION) for id_, over, match in BAD_LENGTHS_VALUES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("op,over,match", BAD + BAD_VALUES)
def test_bad_input(op, over, match, caller, device):
    case = good(op, **over).on_device(device)
    with pytest.raises(ERRORS, match=match):
        caller(case)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("over,match", [pytest.param(over, match, id=id_)
                                        for id_, over, match in BAD_WINDOW_VALUES])
def test_bad_window_values(over, match, caller):
    """On the CPU (the emulated build: by its kernels, as on a GPU)."""
    with pytest.raises(ERRORS, match=match):
        caller(good(LOCATION, **over))


@pytest.mark.parametrize("op", OPS)
def test_bad_input_2d_query(op):
    """A 2-D query (one decoder step) is checked like a 3-D one."""
    with pytest.raises(ERRORS, match=rf"{op.keys} must have batch size B = 2"):
        call_functional(good(op, **{op.query: torch.randn(2, F)}))
    narrow = {op.query: torch.randn(B, 3)}
    if "v" in op.inputs:
        narrow["v"] = torch.randn(3)  # so the keys are the odd one out
    with pytest.raises(ERRORS, match=op.pick(dot=r"keys must have feature size D = 3",
                                             additive=r"keys_proj must have feature size A = 3")):
        call_functional(good(op, **narrow))


@pytest.mark.parametrize("op", ALL_OPS)
def test_shape_errors_are_value_errors(op):
    """Shape and value errors raise ValueError (dtype and device errors RuntimeError)."""
    overs = [dict(values=torch.randn(B, S + 1, Dv)), dict(lengths=torch.tensor([1, S + 1, 2]))]
    overs += op.pick(dot=[dict(keys=torch.randn(B, S, F + 1))],
                     additive=[dict(v=torch.randn(F + 1))],
                     location=[dict(conv_weight=torch.randn(FILTERS, C, 2)),
                               dict(window=torch.zeros(B, 3, dtype=torch.long)),
                               dict(window=torch.tensor([[0, 9], [0, 1], [0, 1]]))])
    for over in overs:
        with pytest.raises(ValueError):
            call_op(good(op, **over))


def test_dot_scale_tensor_rejected():
    with pytest.raises(ERRORS, match="scale"):
        call_functional(good(DOT, scale=torch.tensor(0.5)))


@pytest.mark.parametrize("op", ALL_OPS)
def test_not_a_tensor(op):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=op.query):
        call_functional(good(op, **{op.query: [[1.0]]}))


@pytest.mark.parametrize("op", ALL_OPS)
def test_errors_leave_no_state(op):
    """After a failing call the op still works (no poisoned state)."""
    with pytest.raises(ERRORS):
        call_functional(good(op, lengths=torch.tensor([1, 9, 2])))
    ctx, w = call_functional(good(op, lengths=torch.tensor([1, 5, 2])))
    assert torch.isfinite(ctx).all() and torch.isfinite(w).all()
    rows = (B,) if op is LOCATION else (B, Tq)
    assert ctx.shape == (*rows, Dv) and w.shape == (*rows, S)


# ------------------------------------------------------------------------- backward op

UPSTREAM = ("grad_context", "grad_weights", "lse")


def backward_args(op, over, device="cpu") -> tuple:
    """The backward op's arguments on a valid forward's outputs (lengths [0, 3, S]), with
    over (upstream gradients, lse, inputs, lengths, mask, scale) on top, everything on device
    but lengths."""
    case = good(op, lengths=torch.tensor([0, 3, S]))
    ctx, w, lse = call_op(case)
    upstream = dict(grad_context=torch.randn_like(ctx), grad_weights=torch.randn_like(w), lse=lse)
    upstream.update({n: t for n, t in over.items() if n in UPSTREAM})
    case = case.replace(**{n: t for n, t in over.items() if n not in UPSTREAM})
    case, upstream = case.on_device(device), on_device(upstream, device)
    return op.backward_args(upstream["grad_context"], upstream["grad_weights"],
                            op.op_args(case), upstream["lse"])


def call_backward(op, device, over):
    return op.raw_backward(*backward_args(op, over, device))


def _bad_backward(op):
    """(id, overrides, regex) for checks every backward op makes, with the upstream
    gradients and lse of the forward's rows: (B, Tq), or (B,) for location's one step."""
    rows = (B,) if op is LOCATION else (B, Tq)
    other_rank = (B, 1) if op is LOCATION else (B,)
    return [
        ("grad_context_shape", dict(grad_context=torch.randn(*rows, Dv + 1)), r"grad_context"),
        ("grad_context_rank", dict(grad_context=torch.randn(*other_rank, Dv)), r"grad_context"),
        ("grad_context_dtype", dict(grad_context=torch.randn(*rows, Dv, dtype=torch.float64)),
         r"grad_context"),
        ("grad_weights_shape", dict(grad_weights=torch.randn(*rows, S + 1)), r"grad_weights"),
        ("grad_weights_dtype", dict(grad_weights=torch.randn(*rows, S, dtype=torch.float16)),
         r"grad_weights"),
        ("lse_shape", dict(lse=torch.zeros(*rows[:-1], rows[-1] + 1)), r"lse"),
        ("lse_dtype", dict(lse=torch.zeros(*rows, dtype=torch.float64)), r"lse"),
        ("keys_F", {op.keys: torch.randn(B, S, F + 1)}, op.keys),
        ("values_S", dict(values=torch.randn(B, S + 1, Dv)), r"values"),
        ("lengths_and_mask", dict(mask=torch.ones(B, S, dtype=torch.bool)),
         r"either lengths or mask"),
    ]


# Structural mistakes, which the fake kernels refuse too.
BAD_LOCATION_BACKWARD = [
    ("K_even", dict(conv_weight=torch.randn(FILTERS, C, 2)),
     r"conv_weight must have an odd number of taps"),
    ("prev_S", dict(prev=torch.randn(B, C, S - 1)), r"prev must have shape"),
    ("location_weight_F", dict(location_weight=torch.randn(F, FILTERS + 2)),
     r"location_weight must have shape"),
    ("window_shape", dict(window=torch.zeros(B, 1, dtype=torch.long)), r"window must have shape"),
    ("score_bias_shape", dict(score_bias=torch.randn(3)), r"score_bias must have shape"),
    ("lse_rank", dict(lse=torch.zeros(B, Tq)), r"lse"),
]
BAD_BACKWARD = [pytest.param(op, over, match, id=f"{op.name}-{id_}")
                for op, own in ((DOT, [("scale_nan", dict(scale=math.nan), r"scale")]),
                                (ADDITIVE, [("v_size", dict(v=torch.randn(F + 2)),
                                             r"\bv must have shape")]),
                                (LOCATION, BAD_LOCATION_BACKWARD))
                for id_, over, match in _bad_backward(op) + own]
BAD_BACKWARD_VALUES = [
    pytest.param(op, dict(lengths=torch.tensor([0, 3, S + 2])), r"lengths",
                 id=f"{op.name}-lengths_gt_S") for op in (DOT, ADDITIVE, LOCATION)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,over,match", BAD_BACKWARD + BAD_BACKWARD_VALUES)
def test_bad_input_backward_op(op, over, match, device):
    with pytest.raises(ERRORS, match=match):
        call_backward(op, device, over)


@pytest.mark.parametrize("over,match", [pytest.param(over, match, id=id_)
                                        for id_, over, match in BAD_WINDOW_VALUES])
def test_bad_window_values_backward_op(over, match):
    with pytest.raises(ERRORS, match=match):
        call_backward(LOCATION, "cpu", over)


# ----------------------------------------------------------------------------- devices

def with_arg(op, name):
    """A valid case of op that has the argument `name` (a mask, a window)."""
    extra = {"mask": dict(mask=torch.ones(B, S, dtype=torch.bool)),
             "lengths": dict(lengths=torch.tensor([1, 2, 3])),
             "window": dict(window=torch.tensor([[0, S], [1, 2], [0, 0]]))}
    return good(op, **extra.get(name, {}))


def _location_args(*names):
    return [pytest.param(LOCATION, name, id=f"location-{name}") for name in names]


MIXED = [pytest.param(op, name, id=f"{op.name}-{name}")
         for op in (DOT, ADDITIVE, LOCATION) for name in (*op.inputs[1:], "mask", op.query)
         ] + _location_args("window")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("op,name", MIXED)
def test_mixed_devices_cuda(op, name, caller):
    """One input on the CPU, the rest on the GPU (lengths on the CPU are accepted:
    test_decode_loop.py)."""
    case = with_arg(op, name)
    case = case.replace(**{n: t.cuda() for n, t in case.tensor_args().items()
                           if t is not None and n != name})
    # A CPU query: the keys are the first input checked against it.
    expect = op.keys if name == op.query else name
    with pytest.raises(ERRORS, match=rf"\b{expect} must be on the same device"):
        caller(case)


# A meta tensor in the mix dispatches to the fake kernel (the one torch.compile traces):
# it must refuse what the real kernels refuse instead of returning outputs.
@pytest.mark.parametrize("op,name", [pytest.param(op, name, id=f"{op.name}-{name}")
                                     for op in (DOT, ADDITIVE, LOCATION)
                                     for name in (*op.inputs[1:], "lengths", "mask")]
                         + _location_args("window"))
def test_mixed_devices_meta(op, name):
    case = with_arg(op, name)
    with pytest.raises(ERRORS, match=rf"\b{name} must"):
        call_op(case.replace(**{name: case.tensor_args()[name].to("meta")}))


def to_meta(case):
    return case.replace(**{n: t.to("meta") for n, t in case.tensor_args().items()
                           if isinstance(t, torch.Tensor)})


def raised(fn, *args):
    """(type, message) of the exception fn(*args) raises."""
    with pytest.raises(ERRORS) as info:
        fn(*args)
    return info.type, str(info.value)


def faked(args):
    """A FakeTensorMode (what torch.compile traces with) and args' tensors made fake in it,
    on their own devices: the ops run their fake kernels on them."""
    mode = FakeTensorMode()
    return mode, tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def raised_faked(fn, args):
    mode, args = faked(args)
    with mode:
        return raised(fn, *args)


@pytest.mark.parametrize("fake", ["meta", "fake_mode"])
@pytest.mark.parametrize("op,over,match", BAD)
def test_fake_kernel_same_error(op, over, match, fake):
    """The fake kernels (on meta tensors, and under FakeTensorMode as torch.compile traces)
    refuse each structural mistake with the real kernels' exception type and message."""
    case = good(op, **over)
    real = raised(call_op, case)
    assert re.search(match, real[1]), real
    if fake == "meta":
        assert raised(call_op, to_meta(case)) == real
    else:
        assert raised_faked(op.raw, op.op_args(case)) == real


@pytest.mark.parametrize("op,over,match", BAD_BACKWARD)
def test_fake_backward_same_error(op, over, match):
    """The same for the backward ops, their incoming gradients and lse included."""
    args = backward_args(op, over)
    real = raised(op.raw_backward, *args)
    assert re.search(match, real[1]), real
    assert raised_faked(op.raw_backward, args) == real


@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_good_shapes(op):
    """The fake kernels give the real kernels' output shapes and dtypes (lse in float32)."""
    case = to_meta(good(op))
    ctx, w, lse = call_op(case)
    assert ctx.shape == (B, Tq, Dv) and w.shape == (B, Tq, S) and lse.shape == (B, Tq)
    assert lse.dtype == torch.float32 and ctx.device.type == "meta"
    grads = op.raw_backward(*op.backward_args(torch.empty(B, Tq, Dv, device="meta"), None,
                                              op.op_args(case), lse))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in case.tensors()]


@pytest.mark.parametrize("score_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [None, 2], ids=["own_memory", "memory_index"])
def test_fake_kernel_location_shapes(M, score_bias):
    """location's fake kernels: context (B, Dv), weights (B, S), lse (B,) in float32; a
    gradient per input, the memory's of its M rows, and grad_score_bias (1,) with a bias,
    empty (0,) without."""
    case = good(LOCATION, window=torch.tensor([[0, S], [1, 2], [0, 0]]))
    if not score_bias:
        case = case.replace(score_bias=None)
    if M is not None:
        case = case.replace(keys_proj=torch.randn(M, S, F), values=torch.randn(M, S, Dv),
                            memory_index=torch.tensor([1, 0, 1]))
    case = to_meta(case)
    ctx, w, lse = call_op(case)
    assert ctx.shape == (B, Dv) and w.shape == (B, S) and lse.shape == (B,)
    assert lse.dtype == torch.float32 and ctx.device.type == "meta"
    grads = LOCATION.raw_backward(*LOCATION.backward_args(
        torch.empty(B, Dv, device="meta"), None, LOCATION.op_args(case), lse))
    assert [tuple(g.shape) for g in grads[:7]] == [tuple(t.shape) for t in case.tensors()]
    assert tuple(grads[7].shape) == ((1,) if score_bias else (0,))


@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_memory_index_shapes(op):
    """With memory_index the outputs have the query's rows and the memory-side gradients the
    memory's rows (M = 2 here, B = 3)."""
    M = 2
    memory = {n: torch.randn(M, *t.shape[1:]) for n, t in good(op).inputs.items()
              if n in (op.keys, "values")}
    case = to_meta(good(op, **memory, memory_index=torch.tensor([1, 0, 1])))
    ctx, w, lse = call_op(case)
    assert ctx.shape == (B, Tq, Dv) and w.shape == (B, Tq, S) and lse.shape == (B, Tq)
    grads = op.raw_backward(*op.backward_args(torch.empty(B, Tq, Dv, device="meta"), None,
                                              op.op_args(case), lse))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in case.tensors()]
