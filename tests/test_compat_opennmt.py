"""attention_ext.compat.GlobalAttention against an eager OpenNMT-py GlobalAttention.

The eager layer (eager_layers.EagerGlobalAttention) is written from OpenNMT-py's published
formulas and its code at commit 97111d9 (2024-06-27, batch-first outputs): coverage
replaces the encoder states by tanh(enc_out + linear_cover(coverage)) for scores and
context; padding is masked to -inf before softmax/sparsemax; attn_h = linear_out([c, q])
(+ tanh for dot/general). Parity runs with src_len >= 1 (OpenNMT-py gives NaN for an empty
row; ours gives 0).

Comparisons follow the suite's tolerance rule (helpers.py): the oracle is the eager layer in
float64 with the same parameters and inputs, the yardstick the eager layer in the case's
dtype (harness.check_layer_parity).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from attention_ext.compat import GlobalAttention
from attention_ext.compat.opennmt import sparsemax
from eager_layers import EagerGlobalAttention
from harness import check_layer_parity, peer_pair
from helpers import assert_rule_float64, dtype_id, generator, randn


TYPES = ["dot", "general", "mlp"]
FUNCS = ["softmax", "sparsemax"]
B, S, D = 3, 7, 8


def _pair(attn_type, attn_func, coverage, dtype, seed=0):
    return peer_pair(EagerGlobalAttention, GlobalAttention, D, coverage, attn_type, attn_func,
                     dtype=dtype, seed=seed)


def _inputs(T, coverage, lengths, dtype, seed=1):
    gen = generator(seed)
    src = randn((B, D) if T is None else (B, T, D), gen, dtype)
    enc = randn((B, S, D), gen, dtype)
    cov = (torch.rand(B, S, generator=gen) * 2).to(dtype) if coverage else None
    ln = torch.tensor([S, 1, 4]) if lengths else None
    return src, enc, ln, cov


def _call(layer, src, enc_out, src_len, coverage):
    return layer(src, enc_out, src_len=src_len, coverage=coverage)


def _check(ref, ours, src, enc, ln, cov, dtype):
    """Ours vs the eager layer (harness.check_layer_parity): attn_h ("output"), align
    ("weights") and the gradients of the inputs and every parameter."""
    return check_layer_parity(_call, ours, dict(src=src, enc_out=enc, src_len=ln, coverage=cov),
                              dtype, eager_forward=_call, eager_layer=ref)


CASES = list(itertools.product(TYPES, FUNCS, [False, True], [None, 5], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(
    "attn_type,attn_func,coverage,T,lengths", CASES,
    ids=[f"{t}-{f}-{'cov' if c else 'nocov'}-{'T1step' if T is None else 'T5'}-"
         f"{'len' if ln else 'full'}" for t, f, c, T, ln in CASES])
def test_parity(attn_type, attn_func, coverage, T, lengths, dtype):
    ref, ours = _pair(attn_type, attn_func, coverage, dtype)
    got = _check(ref, ours, *_inputs(T, coverage, lengths, dtype), dtype)
    h_o, a_o = got["output"], got["weights"]
    out_shape = (B, D) if T is None else (B, T, D)
    assert h_o.shape == out_shape
    assert a_o.shape == out_shape[:-1] + (S,)
    if lengths:  # padding gets exactly zero weight
        assert (a_o[1, ..., 1:] == 0).all() and (a_o[2, ..., 4:] == 0).all()
    if attn_func == "sparsemax":  # really sparse, and a distribution
        assert (a_o == 0).any()
        torch.testing.assert_close(a_o.sum(-1), torch.ones_like(a_o.sum(-1)))


@pytest.mark.parametrize("attn_type", TYPES)
@pytest.mark.parametrize("coverage", [False, True])
def test_state_dict_keys_and_shapes(attn_type, coverage):
    ref = EagerGlobalAttention(D, coverage, attn_type)
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
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _check(ref, compiled, *_inputs(5, True, True, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("attn_type", TYPES)
def test_low_precision_rule(attn_type, dtype):
    ref, ours = _pair(attn_type, "softmax", True, dtype)
    _check(ref, ours, *_inputs(5, True, True, dtype), dtype)


@pytest.mark.parametrize("attn_type", TYPES)
def test_decoder_loop_with_accumulated_coverage(attn_type):
    """One-step queries as in OpenNMT-py's RNN decoder, coverage = sum of past attention,
    so gradients also flow from later steps into earlier ones through the coverage."""
    ref, ours = _pair(attn_type, "softmax", True, torch.float64)
    g = generator(3)
    steps = randn((4, B, D), g, torch.float64)
    enc = randn((B, S, D), g, torch.float64)
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
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(loss, [q, e] + list(params.values()))
        return dict(zip(["loss", "grad_steps", "grad_enc"] + [f"grad_{n}" for n in params],
                        [loss.detach()] + list(grads)))

    got, want = run(ours), run(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert_rule_float64(name, got[name], want[name])
