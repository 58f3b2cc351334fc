"""attention_ext.compat.GlobalAttention against an eager OpenNMT-py GlobalAttention.

The oracle (eager_layers.EagerGlobalAttention) is written from OpenNMT-py's published
formulas and its code at commit 97111d9 (2024-06-27, batch-first outputs): coverage
replaces the encoder states by tanh(enc_out + linear_cover(coverage)) for scores and
context; padding is masked to -inf before softmax/sparsemax; attn_h = linear_out([c, q])
(+ tanh for dot/general). Parity runs with src_len >= 1 (OpenNMT-py gives NaN for an empty
row; ours gives 0).

Tolerances: float64 1e-10 absolute (sizes are small, values O(1)); float32 1e-5 absolute
(several matmuls and a fused softmax in a different summation order, values O(1);
the largest difference over these cases is 2.2e-6).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from attention_ext.compat import GlobalAttention
from eager_layers import EagerGlobalAttention as RefGlobalAttention
from attention_ext.compat.opennmt import sparsemax


TYPES = ["dot", "general", "mlp"]
FUNCS = ["softmax", "sparsemax"]
B, S, D = 3, 7, 8


def _pair(attn_type, attn_func, coverage, dtype, seed=0):
    torch.manual_seed(seed)
    ref = RefGlobalAttention(D, coverage, attn_type, attn_func).to(dtype)
    ours = GlobalAttention(D, coverage, attn_type, attn_func).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(T, coverage, lengths, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn((B, D) if T is None else (B, T, D), generator=g, dtype=dtype)
    enc = torch.randn(B, S, D, generator=g, dtype=dtype)
    cov = torch.rand(B, S, generator=g, dtype=dtype) * 2 if coverage else None
    ln = torch.tensor([S, 1, 4]) if lengths else None
    return src, enc, ln, cov


def _run(module, src, enc, ln, cov, seed=2):
    leaves = [t.detach().clone().requires_grad_(True) for t in (src, enc)]
    cov_leaf = None if cov is None else cov.detach().clone().requires_grad_(True)
    h, a = module(leaves[0], leaves[1], src_len=ln, coverage=cov_leaf)
    g = torch.Generator().manual_seed(seed)
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() \
        + (a * torch.randn(a.shape, generator=g, dtype=a.dtype)).sum()
    # A torch.compile wrapper names its parameters "_orig_mod.<name>".
    params = {n.removeprefix("_orig_mod."): p for n, p in module.named_parameters()}
    inputs = leaves + ([cov_leaf] if cov_leaf is not None else []) + list(params.values())
    grads = torch.autograd.grad(loss, inputs)
    names = ["src", "enc_out"] + (["coverage"] if cov is not None else []) + list(params)
    return h.detach(), a.detach(), dict(zip(names, grads))


CASES = list(itertools.product(TYPES, FUNCS, [False, True], [None, 5], [False, True]))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize(
    "attn_type,attn_func,coverage,T,lengths", CASES,
    ids=[f"{t}-{f}-{'cov' if c else 'nocov'}-{'T1step' if T is None else 'T5'}-"
         f"{'len' if ln else 'full'}" for t, f, c, T, ln in CASES])
def test_parity(attn_type, attn_func, coverage, T, lengths, dtype, tol):
    ref, ours = _pair(attn_type, attn_func, coverage, dtype)
    src, enc, ln, cov = _inputs(T, coverage, lengths, dtype)
    h_r, a_r, g_r = _run(ref, src, enc, ln, cov)
    h_o, a_o, g_o = _run(ours, src, enc, ln, cov)
    out_shape = (B, D) if T is None else (B, T, D)
    assert h_o.shape == h_r.shape == out_shape
    assert a_o.shape == a_r.shape == out_shape[:-1] + (S,)
    torch.testing.assert_close(h_o, h_r, rtol=0, atol=tol)
    torch.testing.assert_close(a_o, a_r, rtol=0, atol=tol)
    if lengths:  # padding gets exactly zero weight
        assert (a_o[1, ..., 1:] == 0).all() and (a_o[2, ..., 4:] == 0).all()
    if attn_func == "sparsemax":  # really sparse, and a distribution
        assert (a_o == 0).any()
        torch.testing.assert_close(a_o.sum(-1), torch.ones_like(a_o.sum(-1)))
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_o[name], g_r[name], rtol=0, atol=tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("attn_type", TYPES)
@pytest.mark.parametrize("coverage", [False, True])
def test_state_dict_keys_and_shapes(attn_type, coverage):
    ref = RefGlobalAttention(D, coverage, attn_type)
    ours = GlobalAttention(D, coverage, attn_type)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(so) == list(sr)
    assert {k: v.shape for k, v in so.items()} == {k: v.shape for k, v in sr.items()}
    ours.load_state_dict(sr)  # strict


def test_coverage_does_not_modify_enc_out():
    _, ours = _pair("mlp", "softmax", True, torch.float64)
    src, enc, ln, cov = _inputs(None, True, False, torch.float64)
    before = enc.clone()
    ours(src, enc, coverage=cov)
    assert torch.equal(enc, before)


@pytest.mark.parametrize("attn_type", TYPES)
@pytest.mark.parametrize("attn_func", FUNCS)
def test_empty_row_gives_zero_attention(attn_type, attn_func):
    _, ours = _pair(attn_type, attn_func, False, torch.float64)
    src, enc, _, _ = _inputs(4, False, False, torch.float64)
    src.requires_grad_(True)
    h, a = ours(src, enc, src_len=torch.tensor([0, 2, S]))
    assert (a[0] == 0).all()
    assert torch.isfinite(h).all()
    # The context of an empty row is 0, so attn_h is linear_out([0, q]) (+ tanh).
    expect = ours.linear_out(torch.cat([torch.zeros_like(src[0]), src[0]], -1))
    if attn_type != "mlp":
        expect = torch.tanh(expect)
    torch.testing.assert_close(h[0], expect, rtol=0, atol=1e-12)
    h.sum().backward()
    assert torch.isfinite(src.grad).all()


def test_sparsemax_values():
    # Martins & Astudillo: sparsemax([1, 0.5, -3]) -> tau = 0.25 -> [0.75, 0.25, 0].
    z = torch.tensor([[1.0, 0.5, -3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(sparsemax(z), torch.tensor(
        [[0.75, 0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    keep = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(sparsemax(z, keep), torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_sparsemax_gradient():
    # The sparsemax Jacobian (Martins & Astudillo, eq. 14): on the support the incoming
    # gradient minus its mean over the support, 0 elsewhere; masked positions get 0.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = torch.rand(6, 9, generator=gen) > 0.3
    keep[0] = False  # a row with nothing to attend
    g = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    p = sparsemax(z, keep)
    p.backward(g)
    support = p > 0
    mean = (g * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(z.grad, torch.where(support, g - mean, torch.zeros_like(g)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_type="luong"), "attn_type"),
    (dict(attn_func="entmax"), "attn_func"),
])
def test_bad_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalAttention(D, **kwargs)


def test_bad_inputs():
    m = GlobalAttention(D, coverage=True, attn_type="mlp")
    src, enc, _, cov = _inputs(None, True, False, torch.float32)
    with pytest.raises(ValueError, match="src"):
        m(src[:, :-1], enc)
    with pytest.raises(ValueError, match="src"):
        m(src.view(-1), enc)
    with pytest.raises(ValueError, match="enc_out"):
        m(src, enc[0])
    with pytest.raises(ValueError, match="enc_out"):
        m(src, enc[1:])
    with pytest.raises(ValueError, match="src_len"):
        m(src, enc, src_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="coverage"):
        m(src, enc, coverage=cov[:, 1:])
    with pytest.raises(ValueError, match="coverage"):
        GlobalAttention(D)(src, enc, coverage=cov)


@pytest.mark.parametrize("attn_type", TYPES)
def test_compile_fullgraph(attn_type):
    torch._dynamo.reset()
    ref, ours = _pair(attn_type, "softmax", True, torch.float32)
    src, enc, ln, cov = _inputs(5, True, True, torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    h_c, a_c, g_c = _run(compiled, src, enc, ln, cov)
    h_r, a_r, g_r = _run(ref, src, enc, ln, cov)
    torch.testing.assert_close(h_c, h_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(a_c, a_r, rtol=0, atol=1e-5)
    assert g_c.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_c[name], g_r[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("attn_type", TYPES)
def test_low_precision_rule(attn_type, dtype):
    """The suite's tolerance rule: error vs the float64 oracle <= 2x the eager oracle's own
    error in the same dtype, plus a floor (helpers.tolerance)."""
    from helpers import assert_rule

    ref64, _ = _pair(attn_type, "softmax", True, torch.float64)
    ref_lp, ours = _pair(attn_type, "softmax", True, dtype)
    ref64.load_state_dict(ref_lp.state_dict())  # the oracle uses the rounded parameters
    src, enc, ln, cov = _inputs(5, True, True, dtype)  # rounded to dtype, then widened
    h64, a64 = ref64(src.double(), enc.double(), src_len=ln, coverage=cov.double())
    h_lp, a_lp = ref_lp(src, enc, src_len=ln, coverage=cov)
    h, a = ours(src, enc, src_len=ln, coverage=cov)
    assert_rule("attn_h", h.detach(), h_lp.detach(), h64.detach(), dtype)
    assert_rule("align", a.detach(), a_lp.detach(), a64.detach(), dtype)


@pytest.mark.parametrize("attn_type", TYPES)
def test_decoder_loop_with_accumulated_coverage(attn_type):
    """One-step queries as in OpenNMT-py's RNN decoder, coverage = sum of past attention,
    so gradients also flow from later steps into earlier ones through the coverage."""
    ref, ours = _pair(attn_type, "softmax", True, torch.float64)
    g = torch.Generator().manual_seed(3)
    steps = torch.randn(4, B, D, generator=g, dtype=torch.float64)
    enc = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    ln = torch.tensor([S, 2, 5])

    def run(module):
        q = steps.clone().requires_grad_(True)
        e = enc.clone().requires_grad_(True)
        cov = torch.zeros(B, S, dtype=torch.float64)
        outs = []
        for t in range(q.shape[0]):
            h, a = module(q[t], e, src_len=ln, coverage=cov)
            cov = cov + a
            outs.append(h)
        loss = torch.stack(outs).pow(2).sum() + cov.pow(2).sum()
        params = list(module.parameters())
        return [loss.detach()] + list(torch.autograd.grad(loss, [q, e] + params))

    for got, want in zip(run(ours), run(ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
