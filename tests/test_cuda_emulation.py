"""The CUDA kernels (csrc/cuda) run on the CPU under the emulation of CUDA's execution
model (csrc/cuda/emulation.h: one OS thread per CUDA thread, real barriers and warp
shuffles), forward and backward, against reference.py with the suite's tolerance rule.

Only the test build runs the CUDA code: `make test-emulated` (ATTENTION_EXT_EMULATE_CUDA=1
in a copy of the tree), where it is the ops' CPU kernels. Shapes are tiny because every
launch starts a block of OS threads; the same reason keeps the rest of the suite off this
build for now.
"""

import pytest
import torch

import attention_ext
from conftest import (OUTPUTS, assert_rule, dtype_id, generator, make_case, ref, run_attention,
                      upstream_grad)

if not attention_ext.build_info()["emulated_cuda"]:
    pytest.skip(
        "the ops run the emulated CUDA code only in the test build: run `make test-emulated` "
        "(ATTENTION_EXT_EMULATE_CUDA=1)",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EMU = torch.ops.attention_ext  # in this build the ops' CPU kernels are the CUDA code


def run_emulated(case, *, need_weights=True, seed=1234):
    """Forward then backward through the emulated CUDA ops, with the same seeded upstream
    gradients as conftest.run_attention (loss = <context, g_c> + <weights, g_w>)."""
    q, k, v = case.query, case.keys, case.values
    scale = 1.0 if case.scale is None else float(case.scale)
    ctx, w, lse = EMU.dot_attention(q, k, v, case.lengths, case.mask, scale,
                                    need_weights)
    gen = generator(seed)
    g_ctx = upstream_grad(ctx, gen, q.dtype)
    g_w = upstream_grad(w, gen, q.dtype) if need_weights else None
    gq, gk, gv = EMU._dot_attention_backward(g_ctx, g_w, q, k, v, case.lengths,
                                             case.mask, scale, lse)
    return {
        "context": ctx,
        "weights": w if need_weights else None,
        "grad_query": gq,
        "grad_keys": gk,
        "grad_values": gv if v is not None else None,  # values=None: combined in grad_keys
    }


def check_emulated(case, *, need_weights=True):
    dtype = case.query.dtype
    got = run_emulated(case, need_weights=need_weights)
    lowp = run_attention(ref, case, need_weights=need_weights)
    oracle = run_attention(ref, case, dtype=torch.float64, need_weights=need_weights)
    for name in OUTPUTS:
        assert_rule(name, got[name], lowp[name], oracle[name], dtype)


@pytest.fixture
def splits(request):
    """Forces the split-S count of the emulated launches (1 = off); restores automatic."""
    attention_ext._C._set_forced_splits(request.param)
    try:
        yield request.param
    finally:
        attention_ext._C._set_forced_splits(0)


# Every dtype x split-S off/on x masking. D = 16 takes the 16-byte path in every dtype;
# B = 2 with make_case's masks gives one all-masked row and one full row.
@pytest.mark.parametrize("splits", [1, 2, 3], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "lengths32", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes_splits_masks(dtype, mask_kind, splits):
    case = make_case(B=2, Tq=2, S=7, D=16, dtype=dtype, seed=21, mask_kind=mask_kind)
    check_emulated(case)


# Odd and aligned sizes, several key tiles, several Dv rounds per lane, values None.
SHAPES = [
    ("D3", dict(B=2, Tq=2, S=5, D=3)),
    ("D17", dict(B=2, Tq=1, S=6, D=17)),
    ("D8", dict(B=2, Tq=2, S=5, D=8)),
    ("Dv_ne_D", dict(B=2, Tq=2, S=6, D=8, Dv=5)),
    ("S1", dict(B=2, Tq=3, S=1, D=8)),
    ("Tq1", dict(B=3, Tq=1, S=6, D=16)),
    ("query_2d", dict(B=3, Tq=1, S=6, D=16, query_2d=True)),  # one decoder step, (B, D)
    ("query_2d_odd", dict(B=2, Tq=1, S=5, D=3, Dv=5, query_2d=True)),
    ("key_tiles", dict(B=2, Tq=1, S=40, D=4)),   # 2 tiles of 32 keys, the last partial
    ("Dv_rounds", dict(B=1, Tq=2, S=4, D=3, Dv=40)),  # 40 scalar chunks: 2 rounds per lane
    ("values_none", dict(B=2, Tq=2, S=6, D=8, values_none=True)),
    ("values_none_odd", dict(B=2, Tq=2, S=6, D=5, values_none=True)),
]


@pytest.mark.parametrize("splits", [1, 3], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_shapes(shape, dtype, mask_kind, splits):
    case = make_case(**shape, dtype=dtype, seed=22, mask_kind=mask_kind)
    check_emulated(case)


@pytest.mark.parametrize("splits", [0], indirect=True, ids=["auto"])
@pytest.mark.parametrize("mask_kind", ["none", "lengths64"])
def test_automatic_split(mask_kind, splits):
    """The heuristic itself: 2 rows on the emulated 4-SM GPU split S = 130 into 3 parts."""
    case = make_case(B=2, Tq=1, S=130, D=4, dtype=torch.float32, seed=23, mask_kind=mask_kind)
    check_emulated(case)


@pytest.mark.parametrize("splits", [1, 2], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_need_weights_false(dtype, splits):
    case = make_case(B=2, Tq=2, S=6, D=8, dtype=dtype, seed=24, mask_kind="mask")
    _, weights, _ = EMU.dot_attention(case.query, case.keys, case.values, None,
                                      case.mask, 1.0, False)
    assert weights.numel() == 0  # never written
    check_emulated(case, need_weights=False)


@pytest.mark.parametrize("splits", [1, 2], indirect=True, ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("seed", [3, 8, 9])
def test_peaked_softmax_gradients(seed, mask_kind, splits):
    """Nearly one-hot rows (as in test_dot_parity.py): delta normalised by the sum of the
    recomputed probabilities."""
    case = make_case(B=8, Tq=5, S=6, D=14, dtype=torch.float32, seed=seed,
                     mask_kind=mask_kind, scale=8.0)
    check_emulated(case, need_weights=False)
    check_emulated(case)


@pytest.mark.parametrize("splits", [1, 2], indirect=True, ids=lambda n: f"splits{n}")
def test_all_masked_rows_are_zero(splits):
    """Nothing attends anywhere: context, weights and gradients are exactly 0, lse -inf."""
    case = make_case(B=2, Tq=2, S=5, D=8, dtype=torch.float32, seed=25)
    case.lengths = torch.zeros(2, dtype=torch.int64)
    got = run_emulated(case)
    for name in OUTPUTS:
        assert torch.equal(got[name], torch.zeros_like(got[name])), name
    _, _, lse = EMU.dot_attention(case.query, case.keys, case.values, case.lengths,
                                  None, 1.0, True)
    assert torch.all(lse == float("-inf"))
