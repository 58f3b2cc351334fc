"""Additive op: gradcheck (float64), torch.library.opcheck on both ops,
torch.compile(fullgraph=True) forward and backward, and bitwise determinism."""
import pytest
import torch

import attention_ext
from conftest import (
    ADDITIVE_INPUTS,
    ADDITIVE_OUTPUTS,
    DEVICES,
    check_single_step,
    generator,
    make_additive_case,
    ours_additive,
    randn,
    run_additive,
)

OPS = torch.ops.attention_ext


# ---------------------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    # Small on purpose: gradcheck costs two op calls per input element.
    ("3d_none", dict(B=2, Tq=2, S=3, A=3, Dv=2)),
    ("3d_lengths", dict(B=3, Tq=2, S=4, A=3, Dv=2, mask_kind="lengths64")),
    ("3d_lengths32", dict(B=3, Tq=2, S=4, A=2, Dv=2, mask_kind="lengths32")),
    ("3d_mask", dict(B=3, Tq=2, S=4, A=3, Dv=2, mask_kind="mask")),
    ("2d_lengths", dict(B=3, Tq=1, S=4, A=3, Dv=2, query_2d=True, mask_kind="lengths64")),
    ("2d_mask", dict(B=3, Tq=1, S=4, A=3, Dv=2, query_2d=True, mask_kind="mask")),
    ("A1", dict(B=2, Tq=2, S=4, A=1, Dv=3, mask_kind="lengths64")),
    ("A9_Dv1", dict(B=2, Tq=2, S=3, A=9, Dv=1, mask_kind="mask")),
    ("S1", dict(B=2, Tq=2, S=1, A=3, Dv=2)),
    # two query tiles (of 4), the second partial
    ("tiles", dict(B=1, Tq=5, S=3, A=2, Dv=2, mask_kind="lengths64")),
]


def _gradcheck_inputs(case):
    # Projections of 1.5x the default scale: tanh' far from 1 and from 0.
    return [(case.query_proj * 1.5).requires_grad_(), (case.keys_proj * 1.5).requires_grad_(),
            (case.v * 2).requires_grad_(), case.values.clone().requires_grad_()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("case_kw", [c[1] for c in GRADCHECK_CASES],
                         ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case_kw, need_weights, device):
    """need_weights=True returns the weights as a second output, so gradcheck differentiates
    through them too (weights in the loss)."""
    case = make_additive_case(**case_kw, dtype=torch.float64, device=device, seed=71)

    def fn(q, k, v, values):
        ctx, w = attention_ext.additive_attention(q, k, v, values, lengths=case.lengths,
                                                  mask=case.mask, need_weights=need_weights)
        return (ctx, w) if need_weights else ctx

    assert torch.autograd.gradcheck(fn, _gradcheck_inputs(case), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_weights_only(device):
    """Only the weights reach the loss: backward gets grad_context = None."""
    case = make_additive_case(B=3, Tq=2, S=5, A=4, Dv=3, dtype=torch.float64, device=device,
                              seed=72, mask_kind="lengths64")

    def fn(q, k, v, values):
        return attention_ext.additive_attention(q, k, v, values, lengths=case.lengths)[1]

    inputs = _gradcheck_inputs(case)[:3]  # values do not affect the weights
    values = case.values

    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, values), inputs, eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forced_splits", [3], indirect=True)
@pytest.mark.parametrize("mask_kind", ["lengths64", "mask"])
def test_gradcheck_split_s(mask_kind, forced_splits, device):
    case = make_additive_case(B=2, Tq=2, S=7, A=2, Dv=2, dtype=torch.float64, device=device,
                              seed=73, mask_kind=mask_kind)

    def fn(q, k, v, values):
        return attention_ext.additive_attention(q, k, v, values, lengths=case.lengths,
                                                mask=case.mask)

    assert torch.autograd.gradcheck(fn, _gradcheck_inputs(case), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# ---------------------------------------------------------------------------- opcheck

def _op_args(device, mask_kind, need_weights, requires_grad=True, seed=75, query_2d=False,
             **shape):
    shape = {**dict(B=3, Tq=2, S=6, A=5, Dv=4), **shape}
    case = make_additive_case(**shape, device=device, seed=seed, mask_kind=mask_kind,
                              query_2d=query_2d)
    leaves = [getattr(case, n).clone().requires_grad_(requires_grad) for n in ADDITIVE_INPUTS]
    return (*leaves, case.lengths, case.mask, need_weights)


MASKS = ["none", "lengths64", "lengths32", "mask"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_additive_attention(requires_grad, mask_kind, need_weights, device):
    args = _op_args(device, mask_kind, need_weights, requires_grad)
    torch.library.opcheck(OPS.additive_attention.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_additive_attention_variants(device):
    # Tq=1; a 2-D query_proj (one decoder step, per-row outputs without Tq); B=0; Tq=0;
    # S=1; widths off the vector size.
    for kw in (dict(Tq=1), dict(Tq=1, query_2d=True), dict(B=0), dict(B=0, query_2d=True),
               dict(Tq=0), dict(S=1), dict(A=17, Dv=3), dict(A=1, Dv=1)):
        mask_kind = "none" if kw.get("B", 1) == 0 else "lengths64"
        torch.library.opcheck(OPS.additive_attention.default, _op_args(device, mask_kind,
                                                                       True, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("with_grad_weights", [True, False], ids=["gw", "no_gw"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_opcheck_additive_attention_backward(mask_kind, with_grad_weights, query_2d, device):
    q, k, v, values, lengths, mask, _ = _op_args(device, mask_kind, True, False,
                                                 query_2d=query_2d)
    ctx, w, lse = OPS.additive_attention(q, k, v, values, lengths, mask, True)
    gen = generator(76)
    g_ctx = randn(ctx.shape, gen, device=device)
    g_w = randn(w.shape, gen, device=device) if with_grad_weights else None
    args = (g_ctx, g_w, q, k, v, values, lengths, mask, lse)
    torch.library.opcheck(OPS._additive_attention_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_outputs(device):
    """The raw op: lse is (B, Tq) float32 (float64 for float64) and is the log-sum-exp of
    the attended scores; context/weights equal the functional API's."""
    q, k, v, values, lengths, mask, _ = _op_args(device, "lengths64", True, False)
    ctx, w, lse = OPS.additive_attention(q, k, v, values, lengths, mask, True)
    assert lse.shape == (3, 2) and lse.dtype == torch.float32
    ctx2, w2 = attention_ext.additive_attention(q, k, v, values, lengths=lengths)
    torch.testing.assert_close(ctx, ctx2, rtol=0, atol=0)
    torch.testing.assert_close(w, w2, rtol=0, atol=0)
    scores = torch.tanh(q.double()[:, :, None, :] + k.double()[:, None, :, :]) @ v.double()
    valid = torch.arange(k.shape[1], device=device)[None, :] < lengths[:, None]
    nonempty = lengths > 0
    want = torch.logsumexp(scores.masked_fill(~valid[:, None], float("-inf")), -1)
    torch.testing.assert_close(lse[nonempty].double(), want[nonempty], rtol=1e-5, atol=1e-5)
    _, _, lse64 = OPS.additive_attention(q.double(), k.double(), v.double(), values.double(),
                                         lengths, None, False)
    assert lse64.dtype == torch.float64
    torch.testing.assert_close(lse64[nonempty], want[nonempty], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_single_step_rank(device):
    """A (B, A) query_proj is one decoder step: the ops give context (B, Dv), weights (B, S)
    and lse (B,), and take gradients of those shapes, with the very values of a (B, 1, A)
    query_proj."""
    q, k, v, values, lengths, _, _ = _op_args(device, "lengths64", True, False, query_2d=True)
    B, S, Dv = values.shape
    g_ctx, g_w, lse, lse3 = check_single_step(
        lambda q: OPS.additive_attention(q, k, v, values, lengths, None, True),
        lambda gc, gw, q, lse: OPS._additive_attention_backward(gc, gw, q, k, v, values,
                                                                lengths, None, lse),
        q, generator(77))
    assert g_ctx.shape == (B, Dv) and g_w.shape == (B, S)
    with pytest.raises(ValueError, match=r"grad_context must have shape \(B, Dv\)"):
        OPS._additive_attention_backward(g_ctx[:, None], None, q, k, v, values, lengths, None,
                                         lse)
    with pytest.raises(ValueError, match=r"lse must have shape \(B,\)"):
        OPS._additive_attention_backward(g_ctx, None, q, k, v, values, lengths, None, lse3)


# ---------------------------------------------------------------------------- compile

def _compile_check(device, backend, seed, mask_kind="lengths64", query_2d=False,
                   need_weights=True):
    case = make_additive_case(B=3, Tq=2, S=7, A=8, Dv=5, device=device, seed=seed,
                              mask_kind=mask_kind, query_2d=query_2d)

    def f(q, k, v, values, lengths, mask, g_ctx, g_w):
        ctx, w = attention_ext.additive_attention(q, k, v, values, lengths=lengths, mask=mask,
                                                  need_weights=need_weights)
        loss = (ctx * g_ctx).sum()
        if w is not None:
            loss = loss + (w * g_w).sum()
        return ctx, w, loss

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=False)
    gen = generator(seed + 1)
    lead = case.query_proj.shape[:-1]
    g_ctx = randn(lead + (case.values.shape[-1],), gen, device=device)
    g_w = randn(lead + (case.keys_proj.shape[1],), gen, device=device)

    results = []
    for fn in (f, compiled):
        leaves = [getattr(case, n).clone().requires_grad_() for n in ADDITIVE_INPUTS]
        ctx, w, loss = fn(*leaves, case.lengths, case.mask, g_ctx, g_w)
        assert (w is None) == (not need_weights)
        loss.backward()
        results.append([ctx.detach(), None if w is None else w.detach()]
                       + [t.grad for t in leaves])
    for name, a, b in zip(ADDITIVE_OUTPUTS, *results):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_fwd_bwd(device, dynamo_reset):
    _compile_check(device, "inductor", 81)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [
    dict(mask_kind="mask"),
    dict(mask_kind="none", query_2d=True),
    dict(mask_kind="lengths32", query_2d=True),
    dict(mask_kind="lengths64", need_weights=False),
], ids=["mask", "none_2d", "lengths32_2d", "noweights"])
def test_compile_aot_eager_variants(variant, device, dynamo_reset):
    _compile_check(device, "aot_eager", 82, **variant)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_no_weights_forward(device, dynamo_reset):
    case = make_additive_case(B=3, Tq=2, S=7, A=8, Dv=5, device=device, seed=83,
                              mask_kind="lengths64")

    def f(q, k, v, values, lengths):
        ctx, w = attention_ext.additive_attention(q, k, v, values, lengths=lengths,
                                                  need_weights=False)
        assert w is None
        return torch.tanh(ctx)

    compiled = torch.compile(f, fullgraph=True, backend="inductor", dynamic=False)
    args = (case.query_proj, case.keys_proj, case.v, case.values, case.lengths)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), f(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_bahdanau_layer(device, dynamo_reset):
    """The op inside a small Bahdanau layer (projections, op, output) compiles as one graph
    and trains like eager: gradients reach the Linear weights through query_proj/keys_proj."""
    torch.manual_seed(84)
    H, A = 12, 10
    Wq = torch.nn.Linear(H, A, bias=False).to(device)
    Uk = torch.nn.Linear(H, A).to(device)
    v = torch.nn.Parameter(torch.randn(A, device=device) * A ** -0.5)
    case = make_additive_case(B=3, Tq=4, S=6, A=H, Dv=H, device=device, seed=85,
                              mask_kind="lengths64")
    dec, enc, lengths = case.query_proj, case.values, case.lengths

    def layer(dec, enc, lengths):
        ctx, _ = attention_ext.additive_attention(Wq(dec), Uk(enc), v, enc, lengths=lengths)
        return ctx.square().sum()

    params = [Wq.weight, Uk.weight, Uk.bias, v]
    grads = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        loss = fn(dec, enc, lengths)
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- determinism

DETERMINISM_CASES = [
    # one decoder step over a long source: the case where a kernel splits S
    ("decode", dict(B=1, Tq=1, S=700, A=64, Dv=32, query_2d=True, mask_kind="lengths64")),
    ("teacher", dict(B=5, Tq=7, S=33, A=40, Dv=24, mask_kind="mask")),
    ("many_rows", dict(B=37, Tq=3, S=50, A=24, Dv=16, mask_kind="lengths32")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_kw", [c[1] for c in DETERMINISM_CASES],
                         ids=[c[0] for c in DETERMINISM_CASES])
@pytest.mark.parametrize("forced_splits", [0, 3], indirect=True)
def test_deterministic(forced_splits, case_kw, device):
    """DESIGN: the backward is deterministic (no floating atomics; grad_v, summed over every
    row and key, reduced in a fixed order). Same inputs -> bitwise the same outputs and
    gradients, run after run."""
    case = make_additive_case(**case_kw, device=device, seed=86)
    first = run_additive(ours_additive, case)
    for _ in range(4):
        again = run_additive(ours_additive, case)
        for name in ADDITIVE_OUTPUTS:
            torch.testing.assert_close(again[name], first[name], rtol=0, atol=0, msg=name)
