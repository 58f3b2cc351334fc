"""Bad input raises ValueError/RuntimeError naming the argument (issue 2, "Bad input"),
through the functional API and through torch.ops directly; nothing crashes or hangs."""
import math

import pytest
import torch

import attention_ext
from conftest import DEVICES, HAS_CUDA, on_device

OPS = torch.ops.attention_ext
ERRORS = (ValueError, RuntimeError)

B, Tq, S, D, Dv = 3, 2, 5, 4, 6


def good(**over):
    kw = dict(
        query=torch.randn(B, Tq, D),
        keys=torch.randn(B, S, D),
        values=torch.randn(B, S, Dv),
        lengths=None,
        mask=None,
        scale=None,
    )
    kw.update(over)
    return kw


def call_functional(kw):
    return attention_ext.dot_attention(kw["query"], kw["keys"], kw["values"],
                                       lengths=kw["lengths"], mask=kw["mask"],
                                       scale=kw["scale"])


def call_op(kw):
    scale = 1.0 if kw["scale"] is None else kw["scale"]
    return OPS.dot_attention(kw["query"], kw["keys"], kw["values"], kw["lengths"], kw["mask"],
                             scale, True)


CALLERS = [pytest.param(call_functional, id="functional"), pytest.param(call_op, id="op")]

# (id, overrides, regex the message must match)
BAD = [
    # wrong ranks
    ("query_1d", dict(query=torch.randn(D)),
     r"query must have shape \(B, D\) for one decoder step or \(B, Tq, D\), got \[4\]"),
    ("query_4d", dict(query=torch.randn(B, Tq, 1, D)),
     r"query must have shape \(B, D\) for one decoder step or \(B, Tq, D\)"),
    ("keys_2d", dict(keys=torch.randn(B, D)), r"keys must have shape \(B, S, D\)"),
    ("keys_4d", dict(keys=torch.randn(B, S, D, 1)), r"keys must have shape \(B, S, D\)"),
    ("values_2d", dict(values=torch.randn(B, S)), r"values must have shape \(B, S, Dv\)"),
    # batch mismatch between any two inputs
    ("keys_batch", dict(keys=torch.randn(B + 1, S, D)), r"keys must have batch size B = 3"),
    ("values_batch", dict(values=torch.randn(B + 1, S, Dv)),
     r"values must have batch size B = 3"),
    ("query_batch", dict(query=torch.randn(B - 1, Tq, D)), r"keys must have batch size B = 2"),
    ("lengths_batch", dict(lengths=torch.tensor([1, 2])), r"lengths must have shape \(B,\)"),
    ("mask_batch", dict(mask=torch.ones(B + 1, S, dtype=torch.bool)),
     r"mask must have shape \(B, S\)"),
    # feature and source sizes
    ("D_mismatch", dict(keys=torch.randn(B, S, D + 1)), r"keys must have feature size D = 4"),
    ("S_mismatch", dict(values=torch.randn(B, S + 1, Dv)),
     r"values must have source length S = 5"),
    # lengths
    ("lengths_2d", dict(lengths=torch.ones(B, 1, dtype=torch.long)),
     r"lengths must have shape \(B,\)"),
    ("lengths_0d", dict(lengths=torch.tensor(2)), r"lengths must have shape \(B,\)"),
    ("lengths_float", dict(lengths=torch.tensor([1.0, 2.0, 3.0])),
     r"lengths must be an int64 or int32"),
    ("lengths_bool", dict(lengths=torch.tensor([True, False, True])),
     r"lengths must be an int64 or int32"),
    ("lengths_negative", dict(lengths=torch.tensor([1, -1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S", dict(lengths=torch.tensor([1, S + 1, 2])), r"lengths must lie in \[0, S\]"),
    ("lengths_gt_S_int32", dict(lengths=torch.tensor([S + 1, 0, 0], dtype=torch.int32)),
     r"lengths must lie in \[0, S\]"),
    # mask
    ("mask_int", dict(mask=torch.ones(B, S, dtype=torch.long)), r"mask must be a bool tensor"),
    ("mask_float", dict(mask=torch.ones(B, S)), r"mask must be a bool tensor"),
    ("mask_S", dict(mask=torch.ones(B, S + 1, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
    ("mask_3d", dict(mask=torch.ones(B, 1, S, dtype=torch.bool)), r"mask must have shape \(B, S\)"),
    ("lengths_and_mask", dict(lengths=torch.tensor([1, 2, 3]),
                              mask=torch.ones(B, S, dtype=torch.bool)),
     r"either lengths or mask"),
    # dtypes
    ("keys_dtype", dict(keys=torch.randn(B, S, D, dtype=torch.float64)),
     r"keys must have the same dtype as query"),
    ("values_dtype", dict(values=torch.randn(B, S, Dv, dtype=torch.bfloat16)),
     r"values must have the same dtype as query"),
    ("query_int", dict(query=torch.ones(B, Tq, D, dtype=torch.long),
                       keys=torch.ones(B, S, D, dtype=torch.long),
                       values=torch.ones(B, S, Dv, dtype=torch.long)),
     r"query must be float32, float64, float16 or bfloat16"),
    # scale
    ("scale_nan", dict(scale=math.nan), r"scale must be finite"),
    ("scale_inf", dict(scale=math.inf), r"scale must be finite"),
    ("scale_neg_inf", dict(scale=-math.inf), r"scale must be finite"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("over,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(over, match, caller, device):
    kw = on_device(good(**over), device)
    with pytest.raises(ERRORS, match=match):
        caller(kw)


def test_bad_input_2d_query_batch():
    with pytest.raises(ERRORS, match=r"keys must have batch size B = 2"):
        attention_ext.dot_attention(torch.randn(2, D), torch.randn(3, S, D))


def test_scale_tensor_rejected():
    with pytest.raises(ERRORS, match="scale"):
        attention_ext.dot_attention(torch.randn(B, Tq, D), torch.randn(B, S, D),
                                    scale=torch.tensor(0.5))


def test_not_a_tensor():
    with pytest.raises((TypeError, ValueError, RuntimeError), match="query"):
        attention_ext.dot_attention([[1.0]], torch.randn(B, S, D))


def test_errors_leave_no_state():
    """After a failing call the op still works (no poisoned state)."""
    kw = good(lengths=torch.tensor([1, 9, 2]))
    with pytest.raises(ERRORS):
        call_functional(kw)
    ctx, w = call_functional(good(lengths=torch.tensor([1, 5, 2])))
    assert torch.isfinite(ctx).all() and torch.isfinite(w).all()


# ------------------------------------------------------------------------- backward op

def _backward_args(**over):
    q, k, v = torch.randn(B, Tq, D), torch.randn(B, S, D), torch.randn(B, S, Dv)
    lengths = torch.tensor([0, 3, S])
    ctx, w, lse = OPS.dot_attention(q, k, v, lengths, None, 1.0, True)
    kw = dict(grad_context=torch.randn_like(ctx), grad_weights=torch.randn_like(w), query=q,
              keys=k, values=v, lengths=lengths, mask=None, scale=1.0, lse=lse)
    kw.update(over)
    return kw


BAD_BACKWARD = [
    ("grad_context_shape", dict(grad_context=torch.randn(B, Tq, Dv + 1)), r"grad_context"),
    ("grad_context_dtype", dict(grad_context=torch.randn(B, Tq, Dv, dtype=torch.float64)),
     r"grad_context"),
    ("grad_weights_shape", dict(grad_weights=torch.randn(B, Tq, S + 1)), r"grad_weights"),
    ("lse_shape", dict(lse=torch.zeros(B, Tq + 1)), r"lse"),
    ("keys_D", dict(keys=torch.randn(B, S, D + 1)), r"keys"),
    ("lengths_gt_S", dict(lengths=torch.tensor([0, 3, S + 2])), r"lengths"),
    ("scale_nan", dict(scale=math.nan), r"scale"),
]


@pytest.mark.parametrize("over,match", [b[1:] for b in BAD_BACKWARD],
                         ids=[b[0] for b in BAD_BACKWARD])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_backward_op(device, over, match):
    kw = on_device(_backward_args(**over), device)
    with pytest.raises(ERRORS, match=match):
        OPS._dot_attention_backward(**kw)


# ----------------------------------------------------------------------------- devices

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize("name", ["keys", "values", "mask", "query"])
def test_mixed_devices_cuda(name):
    kw = good()
    kw["lengths"] = None  # lengths on the CPU are accepted (test_decode_loop.py)
    kw["mask"] = torch.ones(B, S, dtype=torch.bool) if name == "mask" else None
    for key in ("query", "keys", "values", "lengths", "mask"):
        if kw[key] is not None and key != name:
            kw[key] = kw[key].cuda()
    expect = "keys" if name == "query" else name  # a CPU query: keys is the odd one out
    with pytest.raises(ERRORS, match=rf"{expect} must be on the same device"):
        call_functional(kw)


# A meta tensor in the mix dispatches to the fake kernel (the one torch.compile traces):
# it must refuse what the real kernels refuse instead of returning outputs.
@pytest.mark.parametrize("name", ["keys", "values", "lengths", "mask"])
def test_mixed_devices_meta(name):
    kw = good()
    kw["lengths"] = torch.tensor([1, 2, 3]) if name == "lengths" else None
    kw["mask"] = torch.ones(B, S, dtype=torch.bool) if name == "mask" else None
    kw[name] = kw[name].to("meta")
    with pytest.raises(ERRORS, match=rf"{name} must"):
        call_op(kw)


@pytest.mark.parametrize("over,match", [
    (dict(keys=torch.randn(B, S, D + 1)), "keys must have shape"),
    (dict(values=torch.randn(B, S + 1, Dv)), "values must have shape"),
    (dict(query=torch.randn(D)), r"query must have shape \(B, D\) for one decoder step"),
    (dict(query=torch.randn(B, Tq, 1, D)), r"query must have shape \(B, D\)"),
], ids=["keys_D", "values_S", "query_1d", "query_4d"])
def test_fake_kernel_shape_checks(over, match):
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in good(**over).items()}
    with pytest.raises(ERRORS, match=match):
        call_op(kw)
