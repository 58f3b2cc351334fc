"""gradcheck (float64), torch.library.opcheck on both ops, and torch.compile(fullgraph=True)."""
import pytest
import torch

import attention_ext
from conftest import (DEVICES, check_single_step, generator, make_case, randn,
                      run_attention, ours)

OPS = torch.ops.attention_ext


# ---------------------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    ("3d_none", dict(B=2, Tq=3, S=4, D=5)),
    ("3d_lengths", dict(B=3, Tq=2, S=5, D=4, mask_kind="lengths64")),
    ("3d_lengths32", dict(B=3, Tq=2, S=5, D=4, mask_kind="lengths32")),
    ("3d_mask", dict(B=3, Tq=2, S=5, D=4, mask_kind="mask")),
    ("2d_lengths", dict(B=3, Tq=1, S=5, D=4, query_2d=True, mask_kind="lengths64")),
    ("2d_mask", dict(B=3, Tq=1, S=5, D=4, query_2d=True, mask_kind="mask")),
    ("Dv", dict(B=2, Tq=2, S=4, D=3, Dv=6, mask_kind="lengths64")),
    # Values of width 0 are separate values, not the keys (a combined-gradient mix-up
    # once read the empty gradient rows as D wide).
    ("Dv0", dict(B=2, Tq=2, S=4, D=3, Dv=0, mask_kind="lengths64")),
    ("values_none", dict(B=3, Tq=2, S=4, D=3, values_none=True, mask_kind="lengths64")),
    ("S1", dict(B=2, Tq=2, S=1, D=3)),
    ("scaled", dict(B=2, Tq=2, S=4, D=3, scale=0.37, mask_kind="mask")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("case_kw", [c[1] for c in GRADCHECK_CASES],
                         ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case_kw, need_weights, device):
    case = make_case(**case_kw, dtype=torch.float64, device=device, seed=31)
    # Larger scores than make_case's default, so the softmax Jacobian is far from uniform.
    query = (case.query * 2).requires_grad_()
    keys = case.keys.clone().requires_grad_()
    inputs = [query, keys]
    if case.values is not None:
        inputs.append(case.values.clone().requires_grad_())

    def fn(*args):
        values = args[2] if len(args) > 2 else None
        ctx, w = attention_ext.dot_attention(args[0], args[1], values, lengths=case.lengths,
                                             mask=case.mask, scale=case.scale,
                                             need_weights=need_weights)
        return (ctx, w) if need_weights else ctx

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_split_s(device):
    attention_ext._C._set_forced_splits(3)
    try:
        case = make_case(B=2, Tq=2, S=8, D=3, dtype=torch.float64, device=device, seed=32,
                         mask_kind="lengths64")
        inputs = [case.query.clone().requires_grad_(), case.keys.clone().requires_grad_(),
                  case.values.clone().requires_grad_()]

        def fn(q, k, v):
            return attention_ext.dot_attention(q, k, v, lengths=case.lengths)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    finally:
        attention_ext._C._set_forced_splits(0)


# ---------------------------------------------------------------------------- opcheck

def _op_args(device, mask_kind, need_weights, query_requires_grad=True, seed=33,
             query_2d=False, **shape):
    shape = {**dict(B=3, Tq=2, S=6, D=5, Dv=4), **shape}
    case = make_case(**shape, device=device, seed=seed, mask_kind=mask_kind, query_2d=query_2d)
    q = case.query.clone().requires_grad_(query_requires_grad)
    k = case.keys.clone().requires_grad_(query_requires_grad)
    v = case.values.clone().requires_grad_(query_requires_grad)
    return (q, k, v, case.lengths, case.mask, 1.0 if case.scale is None else case.scale,
            need_weights)


MASKS = ["none", "lengths64", "lengths32", "mask"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_dot_attention(requires_grad, mask_kind, need_weights, device):
    args = _op_args(device, mask_kind, need_weights, requires_grad)
    torch.library.opcheck(OPS.dot_attention.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dot_attention_variants(device):
    # Tq=1; a 2-D query (one decoder step, per-row outputs without Tq); scale != 1; B=0; S=1.
    for kw in (dict(Tq=1), dict(Tq=1, query_2d=True), dict(B=0), dict(B=0, query_2d=True),
               dict(S=1), dict(D=17, Dv=17)):
        args = list(_op_args(device, "lengths64" if kw.get("B", 1) else "none", True, **kw))
        args[5] = 0.3
        torch.library.opcheck(OPS.dot_attention.default, tuple(args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("with_grad_weights", [True, False], ids=["gw", "no_gw"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_opcheck_dot_attention_backward(mask_kind, with_grad_weights, query_2d, device):
    q, k, v, lengths, mask, scale, _ = _op_args(device, mask_kind, True, False,
                                                query_2d=query_2d)
    ctx, w, lse = OPS.dot_attention(q, k, v, lengths, mask, scale, True)
    gen = generator(34)
    g_ctx = randn(ctx.shape, gen, device=device)
    g_w = randn(w.shape, gen, device=device) if with_grad_weights else None
    args = (g_ctx, g_w, q, k, v, lengths, mask, scale, lse)
    torch.library.opcheck(OPS._dot_attention_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_outputs(device):
    """The raw op: lse is (B, Tq) float32 (float64 for float64), -inf-free is not required
    but the weights/context must match the functional API; need_weights=False gives an
    empty weights tensor."""
    q, k, v, lengths, mask, scale, _ = _op_args(device, "lengths64", True, False)
    ctx, w, lse = OPS.dot_attention(q, k, v, lengths, mask, scale, True)
    assert lse.shape == (3, 2) and lse.dtype == torch.float32
    ctx2, w2 = attention_ext.dot_attention(q, k, v, lengths=lengths)
    torch.testing.assert_close(ctx, ctx2, rtol=0, atol=0)
    torch.testing.assert_close(w, w2, rtol=0, atol=0)
    ctx3, w3, lse3 = OPS.dot_attention(q, k, v, lengths, mask, scale, False)
    assert w3.numel() == 0
    torch.testing.assert_close(ctx3, ctx, rtol=1e-6, atol=1e-6)
    # lse is the log-sum-exp of the attended scores.
    scores = torch.bmm(q, k.transpose(1, 2)) * scale
    valid = torch.arange(k.shape[1], device=device)[None, :] < lengths[:, None]
    nonempty = lengths > 0
    want = torch.logsumexp(scores.masked_fill(~valid[:, None], float("-inf")), -1)
    torch.testing.assert_close(lse[nonempty], want[nonempty], rtol=1e-5, atol=1e-5)
    q64 = q.double()
    _, _, lse64 = OPS.dot_attention(q64, k.double(), v.double(), lengths, None, scale, False)
    assert lse64.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values_none", [False, True], ids=["values", "values_none"])
def test_ops_single_step_rank(values_none, device):
    """A (B, D) query is one decoder step: the ops give context (B, Dv), weights (B, S) and
    lse (B,), and take gradients of those shapes, with the very values of a (B, 1, D) query."""
    q, k, v, lengths, _, scale, _ = _op_args(device, "lengths64", True, False, query_2d=True)
    v = None if values_none else v
    B, S, Dv = k.shape[0], k.shape[1], (k if v is None else v).shape[2]
    g_ctx, g_w, lse, lse3 = check_single_step(
        lambda q: OPS.dot_attention(q, k, v, lengths, None, scale, True),
        lambda gc, gw, q, lse: OPS._dot_attention_backward(gc, gw, q, k, v, lengths, None,
                                                           scale, lse),
        q, generator(35))
    assert g_ctx.shape == (B, Dv) and g_w.shape == (B, S)
    # The backward op wants the gradients and lse of the query's rank.
    with pytest.raises(ValueError, match=rf"grad_context must have shape \(B, Dv\) = \[{B}, {Dv}\]"):
        OPS._dot_attention_backward(g_ctx[:, None], None, q, k, v, lengths, None, scale, lse)
    with pytest.raises(ValueError, match=r"grad_weights must have shape \(B, S\)"):
        OPS._dot_attention_backward(g_ctx, g_w[:, None], q, k, v, lengths, None, scale, lse)
    with pytest.raises(ValueError, match=rf"lse must have shape \(B,\) = \[{B}\]"):
        OPS._dot_attention_backward(g_ctx, None, q, k, v, lengths, None, scale, lse3)
    with pytest.raises(ValueError, match=r"grad_context must have shape \(B, Tq, Dv\)"):
        OPS._dot_attention_backward(g_ctx, None, q[:, None], k, v, lengths, None, scale, lse3)


# ---------------------------------------------------------------------------- compile

def _compile_check(fn_kwargs, device, backend, seed):
    case = make_case(B=3, Tq=2, S=7, D=8, device=device, seed=seed,
                     mask_kind=fn_kwargs.pop("mask_kind", "lengths64"), **fn_kwargs)

    def f(q, k, v, lengths, mask, g_ctx, g_w):
        ctx, w = attention_ext.dot_attention(q, k, v, lengths=lengths, mask=mask,
                                             scale=0.5)
        loss = (ctx * g_ctx).sum()
        if w is not None:
            loss = loss + (w * g_w).sum()
        return ctx, w, loss

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=False)
    gen = generator(seed + 1)
    q_shape = case.query.shape
    g_ctx = randn(q_shape[:-1] + (case.keys.shape[-1],), gen, device=device)
    g_w = randn(q_shape[:-1] + (case.keys.shape[1],), gen, device=device)

    results = []
    for fn in (f, compiled):
        q = case.query.clone().requires_grad_()
        k = case.keys.clone().requires_grad_()
        ctx, w, loss = fn(q, k, None, case.lengths, case.mask, g_ctx, g_w)
        loss.backward()
        results.append((ctx.detach(), w.detach(), q.grad, k.grad))
    for name, a, b in zip(("context", "weights", "grad_query", "grad_keys"), *results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_fwd_bwd(device, dynamo_reset):
    _compile_check(dict(), device, "inductor", 41)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [
    dict(mask_kind="mask"),
    dict(mask_kind="none", query_2d=True),
    dict(mask_kind="lengths32", query_2d=True),
])
def test_compile_aot_eager_variants(variant, device, dynamo_reset):
    _compile_check(dict(variant), device, "aot_eager", 42)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_no_weights_forward(device, dynamo_reset):
    case = make_case(B=3, Tq=2, S=7, D=8, device=device, seed=43, mask_kind="lengths64")

    def f(q, k, lengths):
        ctx, w = attention_ext.dot_attention(q, k, lengths=lengths, need_weights=False)
        assert w is None
        return torch.tanh(ctx)

    compiled = torch.compile(f, fullgraph=True, backend="inductor", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(case.query, case.keys, case.lengths),
                                   f(case.query, case.keys, case.lengths))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
def test_opcheck_values_none(need_weights, device):
    """values=None (keys are the values): one combined key gradient."""
    q, k, _, lengths, mask, scale, _ = _op_args(device, "lengths64", need_weights, True, Dv=5)
    torch.library.opcheck(OPS.dot_attention.default, (q, k, None, lengths, mask, scale,
                                                      need_weights))
    q, k = q.detach(), k.detach()
    ctx, w, lse = OPS.dot_attention(q, k, None, lengths, mask, scale, True)
    g_ctx = randn(ctx.shape, generator(35), device=device)
    torch.library.opcheck(OPS._dot_attention_backward.default,
                          (g_ctx, w.clone(), q, k, None, lengths, mask, scale, lse))
