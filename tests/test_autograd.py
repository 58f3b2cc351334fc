"""Both ops: gradcheck (float64), torch.library.opcheck on the ops and their backward ops,
the raw ops' outputs, torch.compile(fullgraph=True) forward and backward, and bitwise
determinism."""
import sys

import pytest
import torch

from attention_ext import functional
from helpers import DEVICES, check_single_step, generator, randn
from harness import ADDITIVE, DOT, OPS, assert_same, call, per_op, run


# ---------------------------------------------------------------------------- gradcheck

def gradcheck_inputs(case, names=None):
    """The inputs gradcheck differentiates (default: every one that is not None), scaled by
    the op's gradcheck_scales, as new leaves."""
    names = [n for n in case.op.inputs if case.inputs[n] is not None] if names is None else names
    return {n: (case.inputs[n] * case.op.gradcheck_scales.get(n, 1.0)).requires_grad_()
            for n in names}


def gradcheck(case, fn, inputs):
    """torch.autograd.gradcheck of fn(case with inputs replaced) over the inputs."""
    names = list(inputs)
    return torch.autograd.gradcheck(
        lambda *leaves: fn(case.replace(**dict(zip(names, leaves)))),
        list(inputs.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


# (id, kwargs for op.make_case). Small on purpose: gradcheck costs two op calls per input
# element.
GRADCHECK_CASES = per_op(
    dot=[
        ("3d_none", dict(B=2, Tq=3, S=4, D=5)),
        ("3d_lengths", dict(B=3, Tq=2, S=5, D=4, mask_kind="lengths64")),
        ("3d_lengths32", dict(B=3, Tq=2, S=5, D=4, mask_kind="lengths32")),
        ("3d_mask", dict(B=3, Tq=2, S=5, D=4, mask_kind="mask")),
        ("2d_lengths", dict(B=3, Tq=1, S=5, D=4, query_2d=True, mask_kind="lengths64")),
        ("2d_mask", dict(B=3, Tq=1, S=5, D=4, query_2d=True, mask_kind="mask")),
        ("Dv", dict(B=2, Tq=2, S=4, D=3, Dv=6, mask_kind="lengths64")),
        # Values of width 0 are separate values, not the keys: the empty gradient rows are
        # 0 wide, not D.
        ("Dv0", dict(B=2, Tq=2, S=4, D=3, Dv=0, mask_kind="lengths64")),
        ("values_none", dict(B=3, Tq=2, S=4, D=3, values_none=True, mask_kind="lengths64")),
        ("S1", dict(B=2, Tq=2, S=1, D=3)),
        ("scaled", dict(B=2, Tq=2, S=4, D=3, scale=0.37, mask_kind="mask")),
        # memory_index: beams sharing memory rows, and rows in no order with one unused
        ("memory_beams", dict(B=4, Tq=1, S=4, D=3, query_2d=True, memory=("beams", 2),
                              mask_kind="lengths64")),
        ("memory_shuffled", dict(B=3, Tq=2, S=4, D=3, Dv=2, memory=("shuffled", 3),
                                 mask_kind="mask")),
        ("memory_values_none", dict(B=3, Tq=2, S=4, D=3, values_none=True,
                                    memory=("shuffled", 2), mask_kind="lengths64")),
    ],
    additive=[
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
        ("memory_beams", dict(B=4, Tq=1, S=3, A=3, Dv=2, query_2d=True, memory=("beams", 2),
                              mask_kind="lengths64")),
        ("memory_shuffled", dict(B=3, Tq=2, S=4, A=2, Dv=2, memory=("shuffled", 3),
                                 mask_kind="mask")),
    ],
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("op,case_kw", GRADCHECK_CASES)
def test_gradcheck(op, case_kw, need_weights, device):
    """need_weights=True returns the weights as a second output, so gradcheck differentiates
    through them too (weights in the loss)."""
    case = op.make_case(**case_kw, dtype=torch.float64, device=device,
                        seed=op.pick(dot=31, additive=71))

    def fn(c):
        ctx, w = call(op.functional, c, need_weights=need_weights)
        return (ctx, w) if need_weights else ctx

    assert gradcheck(case, fn, gradcheck_inputs(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_weights_only(op, device):
    """Only the weights reach the loss: backward gets grad_context = None."""
    case = op.make_case(B=3, Tq=2, S=5, F=4, Dv=3, dtype=torch.float64, device=device,
                        seed=72, mask_kind="lengths64")
    # values do not affect the weights
    names = [n for n in op.inputs if n != "values"]
    assert gradcheck(case, lambda c: call(op.functional, c)[1], gradcheck_inputs(case, names))


# (id, (kwargs for op.make_case, whether gradcheck_scales apply)): dot's inputs as drawn.
SPLIT_GRADCHECK_CASES = per_op(dot=[("", (dict(B=2, Tq=2, S=8, D=3), False))],
                               additive=[("", (dict(B=2, Tq=2, S=7, A=2, Dv=2), True))])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forced_splits", [3], indirect=True)
@pytest.mark.parametrize("mask_kind", ["lengths64", "mask"])
@pytest.mark.parametrize("op,entry", SPLIT_GRADCHECK_CASES)
def test_gradcheck_split_s(op, entry, mask_kind, forced_splits, device):
    shape, scaled = entry
    case = op.make_case(**shape, dtype=torch.float64, device=device,
                        seed=op.pick(dot=32, additive=73), mask_kind=mask_kind)
    inputs = (gradcheck_inputs(case) if scaled else
              {n: t.clone().requires_grad_() for n, t in case.inputs.items() if t is not None})
    assert gradcheck(case, lambda c: call(op.functional, c), inputs)


# ---------------------------------------------------------------------------- opcheck

def op_case(op, device, mask_kind, seed=None, query_2d=False, **shape):
    """A small case for the raw ops: B=3, Tq=2, S=6, width 5, Dv=4 unless shape says."""
    shape = {"B": 3, "Tq": 2, "S": 6, op.feature: 5, "Dv": 4, **shape}
    seed = op.pick(dot=33, additive=75) if seed is None else seed
    return op.make_case(**shape, device=device, seed=seed, mask_kind=mask_kind,
                        query_2d=query_2d)


def op_args(case, need_weights, requires_grad=True):
    """The raw op's arguments for case, its inputs new leaves (requiring grad or not)."""
    leaves = {n: t.clone().requires_grad_(requires_grad)
              for n, t in case.inputs.items() if t is not None}
    return case.op.op_args(case.replace(**leaves), need_weights)


MASKS = ["none", "lengths64", "lengths32", "mask"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, requires_grad, mask_kind, need_weights, device):
    args = op_args(op_case(op, device, mask_kind), need_weights, requires_grad)
    torch.library.opcheck(op.raw.default, args)


# Tq=1; a 2-D query (one decoder step, per-row outputs without Tq); B=0; Tq=0; S=1;
# widths off the vector size. dot's scale is 0.3 in all of them.
OPCHECK_VARIANTS = per_op(
    dot=[(id_, dict(kw, scale=0.3)) for id_, kw in [
        ("Tq1", dict(Tq=1)), ("Tq1_2d", dict(Tq=1, query_2d=True)), ("B0", dict(B=0)),
        ("B0_2d", dict(B=0, query_2d=True)), ("S1", dict(S=1)), ("D17", dict(D=17, Dv=17)),
        ("memory_beams_2d", dict(B=4, Tq=1, query_2d=True, memory=("beams", 2))),
        ("memory_shuffled", dict(B=5, memory=("shuffled", 3)))]],
    additive=[
        ("Tq1", dict(Tq=1)), ("Tq1_2d", dict(Tq=1, query_2d=True)), ("B0", dict(B=0)),
        ("B0_2d", dict(B=0, query_2d=True)), ("Tq0", dict(Tq=0)), ("S1", dict(S=1)),
        ("A17_Dv3", dict(A=17, Dv=3)), ("A1_Dv1", dict(A=1, Dv=1)),
        ("memory_beams_2d", dict(B=4, Tq=1, query_2d=True, memory=("beams", 2))),
        ("memory_shuffled", dict(B=5, memory=("shuffled", 3)))],
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,variant", OPCHECK_VARIANTS)
def test_opcheck_variants(op, variant, device):
    mask_kind = "none" if variant.get("B", 1) == 0 else "lengths64"
    torch.library.opcheck(op.raw.default, op_args(op_case(op, device, mask_kind, **variant),
                                                  True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("with_grad_weights", [True, False], ids=["gw", "no_gw"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_backward(op, mask_kind, with_grad_weights, query_2d, device):
    args = op_args(op_case(op, device, mask_kind, query_2d=query_2d), True, False)
    ctx, w, lse = op.raw(*args)
    gen = generator(op.pick(dot=34, additive=76))
    g_ctx = randn(ctx.shape, gen, device=device)
    g_w = randn(w.shape, gen, device=device) if with_grad_weights else None
    torch.library.opcheck(op.raw_backward.default, op.backward_args(g_ctx, g_w, args, lse))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_ops_outputs(op, device):
    """The raw op: lse is (B, Tq) float32 (float64 for float64) and is the log-sum-exp of
    the attended scores; context/weights equal the functional API's; need_weights=False
    gives an empty weights tensor and the same context."""
    case = op_case(op, device, "lengths64")
    args = op_args(case, True, False)
    ctx, w, lse = op.raw(*args)
    assert lse.shape == (3, 2) and lse.dtype == torch.float32
    ctx2, w2 = op.functional(*args[:len(op.inputs)], lengths=case.lengths)
    torch.testing.assert_close(ctx, ctx2, rtol=0, atol=0)
    torch.testing.assert_close(w, w2, rtol=0, atol=0)
    ctx3, w3, _ = op.raw(*args[:-1], False)
    assert w3.numel() == 0
    torch.testing.assert_close(ctx3, ctx, rtol=1e-6, atol=1e-6)
    # lse is the log-sum-exp of the attended scores.
    lengths = case.lengths
    scores = op.scores(case)
    valid = torch.arange(scores.shape[-1], device=device)[None, :] < lengths[:, None]
    nonempty = lengths > 0
    want = torch.logsumexp(scores.masked_fill(~valid[:, None], float("-inf")), -1)
    torch.testing.assert_close(lse[nonempty].double(), want[nonempty], rtol=1e-5, atol=1e-5)
    case64 = case.replace(**{n: t.double() for n, t in case.inputs.items()})
    _, _, lse64 = op.raw(*op.op_args(case64, False))
    assert lse64.dtype == torch.float64
    torch.testing.assert_close(lse64[nonempty], want[nonempty], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,values_none", per_op(dot=[("values", False), ("values_none", True)],
                                                  additive=[("values", False)]))
def test_ops_single_step_rank(op, values_none, device):
    """A (B, F) query is one decoder step: the ops give context (B, Dv), weights (B, S) and
    lse (B,), and take gradients of those shapes, with the very values of a (B, 1, F) query.
    dot's values_none: the keys are the values."""
    case = op_case(op, device, "lengths64", query_2d=True)
    if values_none:
        case = case.replace(values=None)
    args = op_args(case, True, False)
    rest = args[1:]  # all but the query
    B, S = case.inputs[op.keys].shape[:2]
    Dv = (case.inputs[op.keys] if values_none else case.values).shape[2]

    def backward(gc, gw, q, lse):
        return op.raw_backward(*op.backward_args(gc, gw, (q, *rest), lse))

    g_ctx, g_w, lse, lse3 = check_single_step(lambda q: op.raw(q, *rest), backward, args[0],
                                              generator(op.pick(dot=35, additive=77)))
    assert g_ctx.shape == (B, Dv) and g_w.shape == (B, S)
    # The backward op wants the gradients and lse of the query's rank.
    q = args[0]
    with pytest.raises(ValueError, match=rf"grad_context must have shape \(B, Dv\) = \[{B}, {Dv}\]"):
        backward(g_ctx[:, None], None, q, lse)
    with pytest.raises(ValueError, match=r"grad_weights must have shape \(B, S\)"):
        backward(g_ctx, g_w[:, None], q, lse)
    with pytest.raises(ValueError, match=rf"lse must have shape \(B,\) = \[{B}\]"):
        backward(g_ctx, None, q, lse3)
    with pytest.raises(ValueError, match=r"grad_context must have shape \(B, Tq, Dv\)"):
        backward(g_ctx, None, q[:, None], lse3)


@pytest.mark.parametrize("op", OPS)
def test_below_autograd_fast_path(op, monkeypatch):
    """The functional API calls the op below autograd when no gradient can flow (the same
    results as through the registered autograd kernel, which does the same in Python), and
    through that kernel when an input requires grad. The fast path rests on a private name
    of torch, torch._C._AutoDispatchBelowAutograd, which every torch the package supports
    has: if this fails, torch changed it; adapt functional._call_op or drop the fast path
    (docs/performance.md, "Python overhead", says what it saves)."""
    assert functional._BELOW_AUTOGRAD, f"no fast path on torch {torch.__version__}"
    below = torch._C._AutoDispatchBelowAutograd
    fast = []  # one entry per call that took the fast path

    class Spy:  # torch.library's autograd kernel enters the guard too, from its own module
        def __enter__(self):
            if sys._getframe(1).f_globals["__name__"] == functional.__name__:
                fast.append(True)
            self.guard = below()
            return self.guard.__enter__()

        def __exit__(self, *exc):
            return self.guard.__exit__(*exc)

    case = op_case(op, "cpu", "lengths64")
    want_ctx, want_w, _ = op.raw(*op.op_args(case))
    monkeypatch.setattr(torch._C, "_AutoDispatchBelowAutograd", Spy)
    with torch.no_grad():
        ctx, w = call(op.functional, case)
    assert len(fast) == 1
    ctx2, w2 = call(op.functional, case)  # no input requires grad
    assert len(fast) == 2 and ctx2.grad_fn is None
    for got in (ctx, ctx2):
        torch.testing.assert_close(got, want_ctx, rtol=0, atol=0)
    for got in (w, w2):
        torch.testing.assert_close(got, want_w, rtol=0, atol=0)
    leaves = case.replace(**{n: t.clone().requires_grad_() for n, t in case.inputs.items()
                             if t is not None})
    assert call(op.functional, leaves)[0].grad_fn is not None
    assert len(fast) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
def test_opcheck_dot_values_none(need_weights, device):
    """values=None (keys are the values): one combined key gradient."""
    q, k, _, lengths, mask, scale, _ = op_args(op_case(DOT, device, "lengths64", Dv=5),
                                               need_weights)
    torch.library.opcheck(DOT.raw.default, (q, k, None, lengths, mask, scale, need_weights))
    q, k = q.detach(), k.detach()
    ctx, w, lse = DOT.raw(q, k, None, lengths, mask, scale, True)
    g_ctx = randn(ctx.shape, generator(35), device=device)
    torch.library.opcheck(DOT.raw_backward.default,
                          (g_ctx, w.clone(), q, k, None, lengths, mask, scale, lse))


# ---------------------------------------------------------------------------- compile

# What each op's compiled function is called with besides make_case's inputs: dot with
# the keys as the values and a scale of 0.5.
COMPILE_OVERRIDES = per_op(dot=[("", dict(values=None, scale=0.5))], additive=[("", dict())])


def _compile_check(op, over, device, backend, seed, mask_kind="lengths64", query_2d=False,
                   need_weights=True, memory=None):
    case = op.make_case(B=3, Tq=2, S=7, F=8, Dv=op.pick(dot=None, additive=5), device=device,
                        seed=seed, mask_kind=mask_kind, query_2d=query_2d,
                        memory=memory).replace(**over)
    options = dict(scale=case.scale) if op.has_scale else {}

    def f(*args):  # the op's inputs (None where absent), lengths, mask, memory_index, g_ctx, g_w
        *tensors, lengths, mask, memory_index, g_ctx, g_w = args
        ctx, w = op.functional(*tensors, lengths=lengths, mask=mask, need_weights=need_weights,
                               memory_index=memory_index, **options)
        loss = (ctx * g_ctx).sum()
        if w is not None:
            loss = loss + (w * g_w).sum()
        return ctx, w, loss

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=False)
    gen = generator(seed + 1)
    lead = case.inputs[op.query].shape[:-1]
    values = case.inputs[op.keys] if case.values is None else case.values
    g_ctx = randn(lead + (values.shape[-1],), gen, device=device)
    g_w = randn(lead + (case.inputs[op.keys].shape[1],), gen, device=device)

    results = []
    names = [n for n in op.inputs if case.inputs[n] is not None]
    for fn in (f, compiled):
        leaves = case.replace(**{n: case.inputs[n].clone().requires_grad_() for n in names})
        ctx, w, loss = fn(*leaves.tensors(), case.lengths, case.mask, case.memory_index, g_ctx,
                          g_w)
        assert (w is None) == (not need_weights)
        loss.backward()
        results.append([ctx.detach(), None if w is None else w.detach()]
                       + [leaves.inputs[n].grad for n in names])
    for name, a, b in zip(("context", "weights") + tuple("grad_" + n for n in names),
                          *results):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,over", COMPILE_OVERRIDES)
def test_compile_inductor_fwd_bwd(op, over, device, dynamo_reset):
    _compile_check(op, over, device, "inductor", op.pick(dot=41, additive=81))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [
    dict(mask_kind="mask"),
    dict(mask_kind="none", query_2d=True),
    dict(mask_kind="lengths32", query_2d=True),
    dict(mask_kind="lengths64", need_weights=False),
    dict(mask_kind="lengths64", memory=("shuffled", 2)),
], ids=["mask", "none_2d", "lengths32_2d", "noweights", "memory_index"])
@pytest.mark.parametrize("op,over", COMPILE_OVERRIDES)
def test_compile_aot_eager_variants(op, over, variant, device, dynamo_reset):
    _compile_check(op, over, device, "aot_eager", op.pick(dot=42, additive=82), **variant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,over", per_op(dot=[("", dict(values=None))], additive=[("", {})]))
def test_compile_no_weights_forward(op, over, device, dynamo_reset):
    case = op.make_case(B=3, Tq=2, S=7, F=8, Dv=op.pick(dot=None, additive=5), device=device,
                        seed=op.pick(dot=43, additive=83), mask_kind="lengths64").replace(**over)

    def f(*tensors, lengths):
        ctx, w = op.functional(*tensors, lengths=lengths, need_weights=False)
        assert w is None
        return torch.tanh(ctx)

    compiled = torch.compile(f, fullgraph=True, backend="inductor", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*case.tensors(), lengths=case.lengths),
                                   f(*case.tensors(), lengths=case.lengths))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_bahdanau_layer(device, dynamo_reset):
    """The additive op inside a small Bahdanau layer (projections, op, output) compiles as
    one graph and trains like eager: gradients reach the Linear weights through
    query_proj/keys_proj."""
    torch.manual_seed(84)
    H, A = 12, 10
    Wq = torch.nn.Linear(H, A, bias=False).to(device)
    Uk = torch.nn.Linear(H, A).to(device)
    v = torch.nn.Parameter(torch.randn(A, device=device) * A ** -0.5)
    case = ADDITIVE.make_case(B=3, Tq=4, S=6, A=H, Dv=H, device=device, seed=85,
                              mask_kind="lengths64")
    dec, enc, lengths = case.query_proj, case.values, case.lengths

    def layer(dec, enc, lengths):
        ctx, _ = ADDITIVE.functional(Wq(dec), Uk(enc), v, enc, lengths=lengths)
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

DETERMINISM_CASES = per_op(
    dot=[("teacher", dict(B=4, Tq=3, S=33, D=40, mask_kind="lengths64"))],
    additive=[
        # one decoder step over a long source: the case where a kernel splits S
        ("decode", dict(B=1, Tq=1, S=700, A=64, Dv=32, query_2d=True, mask_kind="lengths64")),
        ("teacher", dict(B=5, Tq=7, S=33, A=40, Dv=24, mask_kind="mask")),
        ("many_rows", dict(B=37, Tq=3, S=50, A=24, Dv=16, mask_kind="lengths32")),
    ],
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forced_splits", [0, 3], indirect=True)
@pytest.mark.parametrize("op,case_kw", DETERMINISM_CASES)
def test_deterministic(op, case_kw, forced_splits, device):
    """The backward is deterministic (no floating atomics; grad_v, summed over every row and
    key, reduced in a fixed order). Same inputs -> bitwise the same outputs and gradients,
    run after run."""
    case = op.make_case(**case_kw, device=device, seed=op.pick(dot=20, additive=86))
    first = run(case)
    for _ in range(4):
        assert_same(first, run(case))
