"""Additive op: bad input raises ValueError/RuntimeError naming the argument, through the
functional API and through torch.ops directly (real kernels), and through the fake kernels
(meta tensors, what torch.compile traces) for structural errors."""
import pytest
import torch

import attention_ext
from conftest import DEVICES, HAS_CUDA, on_device

OPS = torch.ops.attention_ext
ERRORS = (ValueError, RuntimeError)

B, Tq, S, A, Dv = 3, 2, 5, 4, 6


def good(**over):
    kw = dict(
        query_proj=torch.randn(B, Tq, A),
        keys_proj=torch.randn(B, S, A),
        v=torch.randn(A),
        values=torch.randn(B, S, Dv),
        lengths=None,
        mask=None,
    )
    kw.update(over)
    return kw


def call_functional(kw):
    return attention_ext.additive_attention(kw["query_proj"], kw["keys_proj"], kw["v"],
                                            kw["values"], lengths=kw["lengths"],
                                            mask=kw["mask"])


def call_op(kw):
    return OPS.additive_attention(kw["query_proj"], kw["keys_proj"], kw["v"], kw["values"],
                                  kw["lengths"], kw["mask"], True)


CALLERS = [pytest.param(call_functional, id="functional"), pytest.param(call_op, id="op")]

# (id, overrides, regex the message must match)
BAD = [
    # wrong ranks
    ("query_proj_1d", dict(query_proj=torch.randn(A)),
     r"query_proj must have shape \(B, A\) for one decoder step or \(B, Tq, A\), got \[4\]"),
    ("query_proj_4d", dict(query_proj=torch.randn(B, Tq, 1, A)),
     r"query_proj must have shape \(B, A\) for one decoder step or \(B, Tq, A\)"),
    ("keys_proj_2d", dict(keys_proj=torch.randn(B, A)),
     r"keys_proj must have shape \(B, S, A\)"),
    ("keys_proj_4d", dict(keys_proj=torch.randn(B, S, A, 1)),
     r"keys_proj must have shape \(B, S, A\)"),
    ("values_2d", dict(values=torch.randn(B, S)), r"values must have shape \(B, S, Dv\)"),
    ("values_4d", dict(values=torch.randn(B, S, Dv, 1)), r"values must have shape \(B, S, Dv\)"),
    ("v_0d", dict(v=torch.tensor(1.0)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_2d", dict(v=torch.randn(1, A)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_2d_A1", dict(v=torch.randn(A, 1)), r"v must have shape \(A,\) = \(4,\)"),
    # v of the wrong size
    ("v_size", dict(v=torch.randn(A + 1)), r"v must have shape \(A,\) = \(4,\)"),
    ("v_empty", dict(v=torch.randn(0)), r"v must have shape \(A,\) = \(4,\)"),
    # batch mismatch: each input in turn is the odd one out
    ("keys_proj_batch", dict(keys_proj=torch.randn(B + 1, S, A)),
     r"keys_proj must have batch size B = 3"),
    ("values_batch", dict(values=torch.randn(B + 1, S, Dv)),
     r"values must have batch size B = 3"),
    ("query_proj_batch", dict(query_proj=torch.randn(B - 1, Tq, A)),
     r"keys_proj must have batch size B = 2"),
    ("lengths_batch", dict(lengths=torch.tensor([1, 2])), r"lengths must have shape \(B,\)"),
    ("mask_batch", dict(mask=torch.ones(B + 1, S, dtype=torch.bool)),
     r"mask must have shape \(B, S\)"),
    # query_proj and keys_proj of different A; values of a different S
    ("A_mismatch", dict(keys_proj=torch.randn(B, S, A + 1)), r"keys_proj must have size A = 4"),
    ("A_mismatch_query", dict(query_proj=torch.randn(B, Tq, A + 1), v=torch.randn(A + 1)),
     r"keys_proj must have size A = 5"),
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
    ("lengths_negative", dict(lengths=torch.tensor([1, -1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S", dict(lengths=torch.tensor([1, S + 1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S_int32", dict(lengths=torch.tensor([S + 1, 0, 0], dtype=torch.int32)),
     r"lengths must lie in \[0, S\]"),
    ("lengths_negative_int32", dict(lengths=torch.tensor([0, 0, -3], dtype=torch.int32)),
     r"lengths must lie in \[0, S\]"),
    # mask
    ("mask_int", dict(mask=torch.ones(B, S, dtype=torch.long)), r"mask must be a bool tensor"),
    ("mask_uint8", dict(mask=torch.ones(B, S, dtype=torch.uint8)), r"mask must be a bool tensor"),
    ("mask_float", dict(mask=torch.ones(B, S)), r"mask must be a bool tensor"),
    ("mask_S", dict(mask=torch.ones(B, S + 1, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
    ("mask_3d", dict(mask=torch.ones(B, 1, S, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
    ("mask_1d", dict(mask=torch.ones(S, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
    ("lengths_and_mask", dict(lengths=torch.tensor([1, 2, 3]),
                              mask=torch.ones(B, S, dtype=torch.bool)),
     r"either lengths or mask"),
    # mixed dtypes: each input in turn differs from query_proj
    ("keys_proj_dtype", dict(keys_proj=torch.randn(B, S, A, dtype=torch.float64)),
     r"keys_proj must have the same dtype as query_proj"),
    ("v_dtype", dict(v=torch.randn(A, dtype=torch.float16)),
     r"v must have the same dtype as query_proj"),
    ("values_dtype", dict(values=torch.randn(B, S, Dv, dtype=torch.bfloat16)),
     r"values must have the same dtype as query_proj"),
    ("query_proj_dtype", dict(query_proj=torch.randn(B, Tq, A, dtype=torch.float64)),
     r"keys_proj must have the same dtype as query_proj"),
    ("all_int", dict(query_proj=torch.ones(B, Tq, A, dtype=torch.long),
                     keys_proj=torch.ones(B, S, A, dtype=torch.long),
                     v=torch.ones(A, dtype=torch.long),
                     values=torch.ones(B, S, Dv, dtype=torch.long)),
     r"query_proj must be float32, float64, float16 or bfloat16"),
    ("all_complex", dict(query_proj=torch.ones(B, Tq, A, dtype=torch.complex64),
                         keys_proj=torch.ones(B, S, A, dtype=torch.complex64),
                         v=torch.ones(A, dtype=torch.complex64),
                         values=torch.ones(B, S, Dv, dtype=torch.complex64)),
     r"query_proj must be float32, float64, float16 or bfloat16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("over,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(over, match, caller, device):
    kw = on_device(good(**over), device)
    with pytest.raises(ERRORS, match=match):
        caller(kw)


def test_bad_input_2d_query_proj():
    """A 2-D query_proj (one decoder step) is checked like a 3-D one."""
    with pytest.raises(ERRORS, match=r"keys_proj must have batch size B = 2"):
        attention_ext.additive_attention(torch.randn(2, A), torch.randn(3, S, A),
                                         torch.randn(A), torch.randn(3, S, Dv))
    with pytest.raises(ERRORS, match=r"keys_proj must have size A = 3"):
        attention_ext.additive_attention(torch.randn(B, 3), torch.randn(B, S, A),
                                         torch.randn(3), torch.randn(B, S, Dv))


def test_shape_errors_are_value_errors():
    """DESIGN: shape and value errors raise ValueError (dtype/device ones RuntimeError)."""
    for over in (dict(v=torch.randn(A + 1)), dict(values=torch.randn(B, S + 1, Dv)),
                 dict(lengths=torch.tensor([1, S + 1, 2]))):
        with pytest.raises(ValueError):
            call_op(good(**over))


def test_not_a_tensor():
    with pytest.raises((TypeError, ValueError, RuntimeError), match="query_proj"):
        attention_ext.additive_attention([[1.0]], torch.randn(B, S, A), torch.randn(A),
                                         torch.randn(B, S, Dv))


def test_errors_leave_no_state():
    """After a failing call the op still works (no poisoned state)."""
    with pytest.raises(ERRORS):
        call_functional(good(lengths=torch.tensor([1, 9, 2])))
    ctx, w = call_functional(good(lengths=torch.tensor([1, 5, 2])))
    assert torch.isfinite(ctx).all() and torch.isfinite(w).all()
    assert ctx.shape == (B, Tq, Dv) and w.shape == (B, Tq, S)


# ------------------------------------------------------------------------- backward op

def _backward_args(**over):
    kw = good(lengths=torch.tensor([0, 3, S]))
    ctx, w, lse = call_op(kw)
    args = dict(grad_context=torch.randn_like(ctx), grad_weights=torch.randn_like(w),
                query_proj=kw["query_proj"], keys_proj=kw["keys_proj"], v=kw["v"],
                values=kw["values"], lengths=kw["lengths"], mask=None, lse=lse)
    args.update(over)
    return args


def _call_backward(kw):
    return OPS._additive_attention_backward(
        kw["grad_context"], kw["grad_weights"], kw["query_proj"], kw["keys_proj"], kw["v"],
        kw["values"], kw["lengths"], kw["mask"], kw["lse"])


BAD_BACKWARD = [
    ("grad_context_shape", dict(grad_context=torch.randn(B, Tq, Dv + 1)), r"grad_context"),
    ("grad_context_rank", dict(grad_context=torch.randn(B, Dv)), r"grad_context"),
    ("grad_context_dtype", dict(grad_context=torch.randn(B, Tq, Dv, dtype=torch.float64)),
     r"grad_context"),
    ("grad_weights_shape", dict(grad_weights=torch.randn(B, Tq, S + 1)), r"grad_weights"),
    ("grad_weights_dtype", dict(grad_weights=torch.randn(B, Tq, S, dtype=torch.float16)),
     r"grad_weights"),
    ("lse_shape", dict(lse=torch.zeros(B, Tq + 1)), r"lse"),
    ("lse_dtype", dict(lse=torch.zeros(B, Tq, dtype=torch.float64)), r"lse"),
    ("keys_proj_A", dict(keys_proj=torch.randn(B, S, A + 1)), r"keys_proj"),
    ("v_size", dict(v=torch.randn(A + 2)), r"\bv must have shape"),
    ("values_S", dict(values=torch.randn(B, S + 1, Dv)), r"values"),
    ("lengths_gt_S", dict(lengths=torch.tensor([0, 3, S + 2])), r"lengths"),
    ("lengths_and_mask", dict(mask=torch.ones(B, S, dtype=torch.bool)),
     r"either lengths or mask"),
]


@pytest.mark.parametrize("over,match", [b[1:] for b in BAD_BACKWARD],
                         ids=[b[0] for b in BAD_BACKWARD])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_backward_op(device, over, match):
    with pytest.raises(ERRORS, match=match):
        _call_backward(on_device(_backward_args(**over), device))


# ----------------------------------------------------------------------------- devices

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("name", ["keys_proj", "v", "values", "mask", "query_proj"])
def test_mixed_devices_cuda(name, caller):
    kw = good()
    kw["lengths"] = None  # lengths on the CPU are accepted (test_decode_loop.py)
    kw["mask"] = torch.ones(B, S, dtype=torch.bool) if name == "mask" else None
    for key in ("query_proj", "keys_proj", "v", "values", "lengths", "mask"):
        if kw[key] is not None and key != name:
            kw[key] = kw[key].cuda()
    # A CPU query_proj: keys_proj is the first input checked against it.
    expect = "keys_proj" if name == "query_proj" else name
    with pytest.raises(ERRORS, match=rf"\b{expect} must be on the same device"):
        caller(kw)


# A meta tensor in the mix dispatches to the fake kernel (the one torch.compile traces):
# it must refuse what the real kernels refuse instead of returning outputs.
@pytest.mark.parametrize("name", ["keys_proj", "v", "values", "lengths", "mask"])
def test_mixed_devices_meta(name):
    kw = good()
    kw["lengths"] = torch.tensor([1, 2, 3]) if name == "lengths" else None
    kw["mask"] = torch.ones(B, S, dtype=torch.bool) if name == "mask" else None
    kw[name] = kw[name].to("meta")
    with pytest.raises(ERRORS, match=rf"\b{name} must"):
        call_op(kw)


FAKE_BAD = [
    ("keys_proj_A", dict(keys_proj=torch.randn(B, S, A + 1)), r"keys_proj must have shape"),
    ("keys_proj_batch", dict(keys_proj=torch.randn(B + 1, S, A)), r"keys_proj must have shape"),
    ("keys_proj_rank", dict(keys_proj=torch.randn(B, A)), r"keys_proj must have shape"),
    ("query_proj_1d", dict(query_proj=torch.randn(A)),
     r"query_proj must have shape \(B, A\) for one decoder step"),
    ("query_proj_4d", dict(query_proj=torch.randn(B, Tq, 1, A)),
     r"query_proj must have shape \(B, A\)"),
    ("v_size", dict(v=torch.randn(A + 1)), r"\bv must have shape \(A,\)"),
    ("v_rank", dict(v=torch.randn(1, A)), r"\bv must have shape \(A,\)"),
    ("values_S", dict(values=torch.randn(B, S + 1, Dv)), r"values must have shape"),
    ("values_batch", dict(values=torch.randn(B + 1, S, Dv)), r"values must have shape"),
    ("values_rank", dict(values=torch.randn(B, S)), r"values must have shape"),
    ("values_dtype", dict(values=torch.randn(B, S, Dv, dtype=torch.float64)), r"values must"),
    ("v_dtype", dict(v=torch.randn(A, dtype=torch.bfloat16)), r"\bv must"),
    ("lengths_and_mask", dict(lengths=torch.tensor([1, 2, 3]),
                              mask=torch.ones(B, S, dtype=torch.bool)),
     r"either lengths or mask"),
]


@pytest.mark.parametrize("over,match", [b[1:] for b in FAKE_BAD], ids=[b[0] for b in FAKE_BAD])
def test_fake_kernel_checks(over, match):
    kw = {k: (t.to("meta") if isinstance(t, torch.Tensor) else t) for k, t in good(**over).items()}
    with pytest.raises(ERRORS, match=match):
        call_op(kw)


def test_fake_kernel_good_shapes():
    """The fake kernels give the real kernels' output shapes and dtypes (lse in float32)."""
    kw = {k: (t.to("meta") if isinstance(t, torch.Tensor) else t) for k, t in good().items()}
    ctx, w, lse = call_op(kw)
    assert ctx.shape == (B, Tq, Dv) and w.shape == (B, Tq, S) and lse.shape == (B, Tq)
    assert lse.dtype == torch.float32 and ctx.device.type == "meta"
    grads = OPS._additive_attention_backward(
        torch.empty(B, Tq, Dv, device="meta"), None, kw["query_proj"], kw["keys_proj"],
        kw["v"], kw["values"], None, None, lse)
    assert [tuple(g.shape) for g in grads] == [(B, Tq, A), (B, S, A), (A,), (B, S, Dv)]


@pytest.mark.parametrize("over,match", [
    (dict(keys_proj=torch.randn(B, S, A + 1)), r"keys_proj must have shape"),
    (dict(v=torch.randn(A + 1)), r"\bv must have shape"),
    (dict(values=torch.randn(B, S + 1, Dv)), r"values must have shape"),
], ids=["keys_proj_A", "v_size", "values_S"])
def test_fake_backward_checks(over, match):
    kw = {k: (t.to("meta") if isinstance(t, torch.Tensor) else t) for k, t in good(**over).items()}
    with pytest.raises(ERRORS, match=match):
        OPS._additive_attention_backward(
            torch.empty(B, Tq, Dv, device="meta"), None, kw["query_proj"], kw["keys_proj"],
            kw["v"], kw["values"], None, None, torch.empty(B, Tq, device="meta"))
