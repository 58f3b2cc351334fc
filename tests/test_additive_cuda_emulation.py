"""The additive-attention CUDA kernels (csrc/cuda/additive_attention_*) run on the CPU
under the emulation of CUDA's execution model (csrc/cuda/emulation.h), forward and
backward, against reference.py with the suite's tolerance rule (conftest.assert_rule).

Only the test build runs the CUDA code: `make test-emulated` (ATTENTION_EXT_EMULATE_CUDA=1
in a copy of the tree), where it is the ops' CPU kernels. Shapes are tiny because every
launch starts a block of OS threads; the same reason keeps the rest of the suite off this
build for now.
"""
import pytest
import torch

import attention_ext
from conftest import (
    ADDITIVE_OUTPUTS,
    assert_rule,
    dtype_id,
    generator,
    make_additive_case,
    ref_additive,
    run_additive,
    upstream_grad,
)

if not attention_ext.build_info()["emulated_cuda"]:
    pytest.skip(
        "the ops run the emulated CUDA code only in the test build: run `make test-emulated` "
        "(ATTENTION_EXT_EMULATE_CUDA=1)",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EMU = torch.ops.attention_ext  # in this build the ops' CPU kernels are the CUDA code


def inputs(case):
    return case.query_proj, case.keys_proj, case.v, case.values


def run_emulated(case, *, need_weights=True, seed=1234):
    """Forward then backward through the emulated CUDA ops, with the same seeded upstream
    gradients as conftest.run_additive (loss = <context, g_c> + <weights, g_w>)."""
    q, k, v, values = inputs(case)
    ctx, w, lse = EMU.additive_attention(q, k, v, values, case.lengths, case.mask,
                                         need_weights)
    gen = generator(seed)
    g_ctx = upstream_grad(ctx, gen, q.dtype)
    g_w = upstream_grad(w, gen, q.dtype) if need_weights else None
    grads = EMU._additive_attention_backward(g_ctx, g_w, q, k, v, values,
                                             case.lengths, case.mask, lse)
    out = {"context": ctx, "weights": w if need_weights else None, "lse": lse}
    out.update(zip(ADDITIVE_OUTPUTS[2:], grads))
    return out


def ref_lse(case, dtype):
    """log-sum-exp of the reference scores over the attending keys, computed in `dtype`
    from the case's inputs; -inf for a row with nothing to attend. Shaped like the
    query's rows: (B, Tq), or (B,) for a (B, A) query_proj."""
    q, k, v, _ = (t.to(dtype) for t in inputs(case))
    rows = q.shape[:-1]
    q = q.reshape(q.shape[0], -1, q.shape[-1])
    scores = (torch.tanh(q[:, :, None, :] + k[:, None, :, :]) * v).sum(-1)  # (B, Tq, S)
    B, S = k.shape[0], k.shape[1]
    if case.lengths is not None:
        valid = torch.arange(S)[None, :] < case.lengths.long()[:, None]
    elif case.mask is not None:
        valid = case.mask
    else:
        valid = torch.ones(B, S, dtype=torch.bool)
    return torch.logsumexp(scores.masked_fill(~valid[:, None, :], float("-inf")),
                           dim=-1).reshape(rows)


def check_lse(case, lse):
    """lse is float32 (float64 for float64 inputs): the rule for that dtype on the rows that
    attend to something, and exactly -inf on the others."""
    lse_dtype = torch.float64 if case.query_proj.dtype == torch.float64 else torch.float32
    assert lse.dtype == lse_dtype
    oracle = ref_lse(case, torch.float64)
    empty = oracle == float("-inf")
    assert torch.all(lse[empty] == float("-inf")), "lse of an empty row must be -inf"
    assert_rule("lse", lse[~empty], ref_lse(case, lse_dtype)[~empty], oracle[~empty], lse_dtype)


def check_emulated(case, *, need_weights=True):
    dtype = case.query_proj.dtype
    got = run_emulated(case, need_weights=need_weights)
    lowp = run_additive(ref_additive, case, need_weights=need_weights)
    oracle = run_additive(ref_additive, case, dtype=torch.float64, need_weights=need_weights)
    for name in ADDITIVE_OUTPUTS:
        assert_rule(name, got[name], lowp[name], oracle[name], dtype)
    check_lse(case, got["lse"])
    return got


# Every dtype x split-S off/on x masking. A = 16 and Dv = 8 take the 16-byte path in every
# dtype; B = 2 with conftest's masks gives one row with nothing to attend and one full row.
@pytest.mark.parametrize("forced_splits", [1, 2, 3], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "lengths32", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes_splits_masks(dtype, mask_kind, forced_splits):
    case = make_additive_case(B=2, Tq=2, S=7, A=16, Dv=8, dtype=dtype, seed=31,
                              mask_kind=mask_kind)
    check_emulated(case)


# Odd and aligned sizes, several tiles of keys (rows kernel) and of queries (keys kernel),
# several A rounds per lane (grad_v's block reduction runs once per round), several row
# blocks with the last one partly past the rows (grad_v's partials over blocks).
SHAPES = [
    ("A3", dict(B=2, Tq=2, S=5, A=3)),
    ("A17_Dv5", dict(B=2, Tq=1, S=6, A=17, Dv=5)),
    ("A8", dict(B=2, Tq=2, S=5, A=8)),
    ("A8_Dv5", dict(B=2, Tq=2, S=6, A=8, Dv=5)),
    ("A5_Dv8", dict(B=2, Tq=2, S=6, A=5, Dv=8)),
    ("S1", dict(B=2, Tq=3, S=1, A=8)),
    ("Tq1", dict(B=3, Tq=1, S=6, A=16)),
    ("query_2d", dict(B=3, Tq=1, S=6, A=16, query_2d=True)),  # one decoder step, (B, A)
    ("query_2d_odd", dict(B=2, Tq=1, S=5, A=3, Dv=5, query_2d=True)),
    ("key_tiles", dict(B=2, Tq=1, S=40, A=4, Dv=3)),    # 2 tiles of 32 keys, the last partial
    ("A_rounds", dict(B=1, Tq=2, S=4, A=40, Dv=3)),     # 40 scalar chunks: 2 rounds per lane
    ("query_tiles", dict(B=1, Tq=35, S=3, A=3, Dv=2)),  # 9 row blocks, the last with 3 rows
]


@pytest.mark.parametrize("forced_splits", [1, 3], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_shapes(shape, dtype, mask_kind, forced_splits):
    case = make_additive_case(**shape, dtype=dtype, seed=32, mask_kind=mask_kind)
    check_emulated(case)


@pytest.mark.parametrize("forced_splits", [0], indirect=True, ids=["auto"])
@pytest.mark.parametrize("mask_kind", ["none", "lengths64"])
def test_automatic_split(mask_kind, forced_splits):
    """The heuristic itself: 2 rows on the emulated 4-SM GPU split S = 130 into 3 parts."""
    case = make_additive_case(B=2, Tq=1, S=130, A=4, dtype=torch.float32, seed=33,
                              mask_kind=mask_kind)
    check_emulated(case)


@pytest.mark.parametrize("forced_splits", [1, 2], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_need_weights_false(dtype, forced_splits):
    case = make_additive_case(B=2, Tq=2, S=6, A=8, dtype=dtype, seed=34, mask_kind="mask")
    _, weights, _ = EMU.additive_attention(*inputs(case), None, case.mask, False)
    assert weights.shape == (0,)  # never written
    check_emulated(case, need_weights=False)


@pytest.mark.parametrize("forced_splits", [1, 2], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["lengths64", "mask"])
def test_nothing_attends(mask_kind, forced_splits):
    """No row attends to anything: context, weights and all four gradients are exactly 0
    (grad_v included: its partials must not pick up garbage), lse is -inf."""
    case = make_additive_case(B=2, Tq=2, S=5, A=8, dtype=torch.float32, seed=35)
    if mask_kind == "lengths64":
        case.lengths = torch.zeros(2, dtype=torch.int64)
    else:
        case.mask = torch.zeros(2, 5, dtype=torch.bool)
    got = run_emulated(case)
    for name in ADDITIVE_OUTPUTS:
        assert torch.equal(got[name], torch.zeros_like(got[name])), name
    assert torch.all(got["lse"] == float("-inf"))
