"""attention_ext.dot_attention vs reference.py: forward (context, weights) and backward
(grads of query, keys, values), over dtypes, shapes, masks, strides and split-S."""
import pytest
import torch

import attention_ext
from conftest import (
    case_ids,
    DEVICES,
    DTYPES,
    MASK_KINDS,
    OUTPUTS,
    Case,
    check_parity,
    dtype_id,
    generator,
    make_case,
    make_lengths,
    make_mask,
    randn,
    run_attention,
    ours,
)

# (id, kwargs for make_case)
SHAPES = [
    ("basic", dict(B=3, Tq=4, S=7, D=16)),
    ("S1", dict(B=3, Tq=2, S=1, D=8)),
    ("Tq1", dict(B=4, Tq=1, S=9, D=32)),
    ("query2d", dict(B=5, Tq=1, S=9, D=32, query_2d=True)),
    ("D1", dict(B=3, Tq=3, S=6, D=1)),
    ("D3", dict(B=3, Tq=3, S=11, D=3)),
    ("D17", dict(B=3, Tq=3, S=11, D=17)),
    ("D64", dict(B=2, Tq=3, S=20, D=64)),
    ("D513", dict(B=2, Tq=2, S=13, D=513)),
    ("Dv_ne_D", dict(B=3, Tq=2, S=10, D=12, Dv=5)),
    ("Dv_large", dict(B=2, Tq=2, S=10, D=3, Dv=40)),
    ("values_none", dict(B=3, Tq=3, S=8, D=24, values_none=True)),
    ("values_none_2d", dict(B=4, Tq=1, S=8, D=24, values_none=True, query_2d=True)),
    ("B0", dict(B=0, Tq=3, S=5, D=8)),
    ("B0_2d", dict(B=0, Tq=1, S=5, D=8, query_2d=True)),
    ("key_tiles", dict(B=2, Tq=1, S=40, D=4)),  # CUDA: 2 tiles of 32 keys, the last partial
    ("long_S", dict(B=2, Tq=2, S=130, D=20)),
    # Several query tiles per batch element, the last one partial (the CPU kernel tiles
    # queries by 4); D and Dv not multiples of any vector width.
    ("query_tiles", dict(B=2, Tq=9, S=37, D=19, Dv=21)),
    ("query_tiles_values_none", dict(B=2, Tq=6, S=21, D=24, values_none=True)),
    # The CPU products' panel path (8 or more rows): forward tiles of 32 queries over
    # several key blocks of 64 (rescaled contexts), more than 128 terms per product
    # (chunked), source chunks of 64 positions, column panels with a partial last vector.
    ("panels", dict(B=2, Tq=40, S=150, D=29, Dv=27)),
    # Keys as values: the combined key gradient sums over 2 Tq = 140 terms; tiles of 32
    # queries over one key block write their contexts in place.
    ("panels_values_none", dict(B=2, Tq=70, S=20, D=40, values_none=True)),
    # Row counts that are not multiples of 4 (the products' last rows in blocks of 3):
    # forward tiles of 30 queries (for up to 8 threads) over three key blocks, so the
    # rescale of the running contexts reaches the 3-row blocks too.
    ("row_tails", dict(B=16, Tq=30, S=150, D=19, Dv=21)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=case_ids(SHAPES))
def test_parity(shape, mask_kind, dtype, device):
    case = make_case(**shape, dtype=dtype, device=device, seed=11, mask_kind=mask_kind)
    check_parity(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES[:4]], ids=case_ids(SHAPES[:4]))
def test_parity_context_only_loss(shape, mask_kind, dtype, device):
    """Weights returned but unused in the loss: backward gets grad_weights = None."""
    case = make_case(**shape, dtype=dtype, device=device, seed=12, mask_kind=mask_kind)
    check_parity(case, weights_in_loss=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
def test_need_weights_false(query_2d, mask_kind, dtype, device):
    case = make_case(B=4, Tq=3, S=9, D=16, dtype=dtype, device=device, seed=13,
                     query_2d=query_2d, mask_kind=mask_kind)
    got = check_parity(case, need_weights=False)
    assert got["weights"] is None
    ctx, w = attention_ext.dot_attention(case.query, case.keys, case.values,
                                         lengths=case.lengths, mask=case.mask,
                                         need_weights=False)
    assert w is None
    assert ctx.shape == got["context"].shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", [None, 1.0, 0.125, 2.5, 0.0, -0.7, 64 ** -0.5])
def test_scale(scale, dtype, device):
    case = make_case(B=3, Tq=2, S=9, D=64, dtype=dtype, device=device, seed=14,
                     mask_kind="lengths64", scale=scale)
    check_parity(case)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_zero_is_uniform(device):
    case = make_case(B=3, Tq=2, S=6, D=8, device=device, seed=15, mask_kind="none", scale=0.0)
    _, w = ours(case.query, case.keys, case.values, scale=0.0)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "lengths32", "mask", "none"])
def test_non_contiguous(mask_kind, dtype, device):
    """Transposed, sliced and broadcast (stride 0) inputs give the same as contiguous ones."""
    B, Tq, S, D, Dv = 4, 3, 9, 20, 7
    gen = generator(16)
    query = randn((B, D, Tq), gen, dtype, device, scale=D ** -0.5).transpose(1, 2)
    keys = randn((B, 2 * S, D + 3), gen, dtype, device)[:, ::2, 1:D + 1]
    values = randn((B, S, 2 * Dv), gen, dtype, device)[..., ::2]
    lengths = mask = None
    if mask_kind.startswith("lengths"):
        ldtype = torch.int64 if mask_kind == "lengths64" else torch.int32
        lengths = make_lengths(2 * B, S, gen, ldtype, device)[::2]  # strided
        lengths[0] = 0
        lengths[-1] = S
    elif mask_kind == "mask":
        mask = make_mask(S, B, gen, device).t()  # transposed
        mask[:, 1] = False
    assert not query.is_contiguous() and not keys.is_contiguous()
    assert not values.is_contiguous()
    case = Case(query, keys, values, lengths, mask, None)
    check_parity(case)

    # Keys and values broadcast over the batch (stride 0), as a shared memory bank.
    shared = randn((1, S, D), gen, dtype, device).expand(B, S, D)
    check_parity(Case(query, shared, None, lengths, mask, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "lengths32", "mask"])
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
def test_fully_masked_rows(query_2d, mask_kind, dtype, device):
    """Rows with nothing to attend to: context 0, weights 0, gradients 0, no NaN."""
    B, Tq, S, D = 3, 2, 5, 8
    gen = generator(17)
    query = randn((B, D) if query_2d else (B, Tq, D), gen, dtype, device)
    keys = randn((B, S, D), gen, dtype, device)
    values = randn((B, S, 6), gen, dtype, device)
    lengths = mask = None
    if mask_kind == "mask":
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        mask[1, 2] = True  # only row 1 attends, to one position
    else:
        ldtype = torch.int64 if mask_kind == "lengths64" else torch.int32
        lengths = torch.tensor([0, 3, 0], dtype=ldtype, device=device)
    case = Case(query, keys, values, lengths, mask, None)
    got = check_parity(case)
    empty = [0, 2]
    for name in ("context", "weights", "grad_query"):
        t = got[name]
        assert torch.isfinite(t).all(), name
        assert (t[empty] == 0).all(), f"{name} of an empty row is not 0"
    for name in ("grad_keys", "grad_values"):
        assert (got[name][empty] == 0).all(), f"{name} of an empty batch entry is not 0"
    # Masked positions of a non-empty row: weight exactly 0 and no gradient to keys/values.
    if mask is not None:
        row_w = got["weights"][1][..., 2]
        torch.testing.assert_close(row_w, torch.ones_like(row_w))
        keep = torch.tensor([False, False, True, False, False], device=device)
    else:
        keep = torch.arange(S, device=device) < 3
    assert (got["weights"][1][..., ~keep] == 0).all()
    assert (got["grad_keys"][1][~keep] == 0).all()
    assert (got["grad_values"][1][~keep] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_everything_masked(dtype, device):
    """All rows empty (lengths all 0 / mask all False), including S=0-like degenerate use."""
    case = make_case(B=3, Tq=2, S=4, D=8, dtype=dtype, device=device, seed=18)
    for lengths, mask in [
        (torch.zeros(3, dtype=torch.int64, device=device), None),
        (None, torch.zeros(3, 4, dtype=torch.bool, device=device)),
    ]:
        got = run_attention(ours, Case(case.query, case.keys, case.values, lengths, mask, None))
        for name, t in got.items():
            assert torch.isfinite(t).all(), name
            assert (t == 0).all(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_scores_do_not_overflow(dtype, device):
    """Scores far beyond the fp16 range of exp: the online softmax must stay finite."""
    case = make_case(B=2, Tq=2, S=12, D=32, dtype=dtype, device=device, seed=19,
                     mask_kind="lengths64", scale=40.0)
    got = run_attention(ours, case)
    oracle = run_attention(attention_ext.reference.dot_attention, case, dtype=torch.float64)
    for name in ("context", "weights"):
        assert torch.isfinite(got[name]).all(), name
    # Weights sum to 1 on non-empty rows, 0 on empty ones.
    sums = got["weights"].double().sum(-1)
    expect = (case.lengths > 0).double()[:, None].expand_as(sums).to(sums.device)
    torch.testing.assert_close(sums, expect, atol=2e-2, rtol=0)
    torch.testing.assert_close(got["context"].double().cpu(), oracle["context"].cpu(),
                               atol=0.05 * oracle["context"].abs().max().item() + 1e-6, rtol=0)


# Nearly one-hot rows: scores with a standard deviation of 12, so the log-sum-exp is large
# and dP_j - delta a small difference. The backward's probabilities, recomputed from the
# log-sum-exp, sum to 1 only to within its rounding; before delta was normalised by their
# sum, float32 gradients were up to 1.8x the tolerance here (seeds 3 and 9).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("seed", range(12))
def test_peaked_softmax_gradients(seed, mask_kind, dtype, device):
    case = make_case(B=8, Tq=5, S=6, D=14, dtype=dtype, device=device, seed=seed,
                     mask_kind=mask_kind, scale=8.0)
    check_parity(case, need_weights=False, weights_in_loss=False)
    check_parity(case)


# The example the property test found: grad_query 1.26e-5 from float64, over its 1e-5.
@pytest.mark.parametrize("device", DEVICES)
def test_peaked_softmax_found_example(device):
    case = make_case(2, 2, 2, 14, dtype=torch.float32, device=device, seed=38223,
                     values_none=True, mask_kind="lengths64", scale=2.0)
    check_parity(case, need_weights=False, weights_in_loss=False)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    case = make_case(B=4, Tq=3, S=33, D=40, device=device, seed=20, mask_kind="lengths64")
    a = run_attention(ours, case)
    b = run_attention(ours, case)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_many_rows_parallel(device):
    """Enough rows (and a long source) for the kernels to run on every thread."""
    case = make_case(B=37, Tq=5, S=70, D=48, device=device, seed=21, mask_kind="lengths64")
    check_parity(case)
    case = make_case(B=37, Tq=5, S=70, D=48, device=device, seed=22, mask_kind="mask",
                     query_2d=True, values_none=True)
    check_parity(case)


# ---------------------------------------------------------------------------- split-S

SPLIT_SHAPES = [
    ("B1_Tq1_S13", dict(B=1, Tq=1, S=13, D=16)),
    ("B2_2d_S64", dict(B=2, Tq=1, S=64, D=33, query_2d=True)),
    ("B3_Tq3_S5", dict(B=3, Tq=3, S=5, D=8)),  # 7 splits > S
    ("B2_S1", dict(B=2, Tq=2, S=1, D=8)),
    ("B3_S100_valnone", dict(B=3, Tq=2, S=100, D=24, values_none=True)),
    ("B2_S29_Dv", dict(B=2, Tq=2, S=29, D=10, Dv=3)),
    ("B0", dict(B=0, Tq=2, S=9, D=8)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "lengths32", "mask"])
@pytest.mark.parametrize("shape", [s[1] for s in SPLIT_SHAPES], ids=case_ids(SPLIT_SHAPES))
@pytest.mark.parametrize("forced_splits", [2, 3, 7], indirect=True)
def test_split_s_parity(forced_splits, shape, mask_kind, dtype, device):
    assert attention_ext._C._forced_splits() == forced_splits
    case = make_case(**shape, dtype=dtype, device=device, seed=23, mask_kind=mask_kind)
    check_parity(case)
    check_parity(case, need_weights=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forced_splits", [2, 3, 7], indirect=True)
def test_split_s_fully_masked(forced_splits, device):
    """Splits that see no attending key (and empty rows) merge to zeros, not NaN."""
    B, S, D = 3, 20, 8
    gen = generator(24)
    query = randn((B, 2, D), gen, device=device)
    keys = randn((B, S, D), gen, device=device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    mask[1, 17] = True  # only the last split of row 1 has a key
    mask[2, 0] = True  # only the first split of row 2
    case = Case(query, keys, None, None, mask, None)
    got = check_parity(case)
    assert (got["context"][0] == 0).all() and (got["weights"][0] == 0).all()
    for w in (got["weights"][1, :, 17], got["weights"][2, :, 0]):
        torch.testing.assert_close(w, torch.ones_like(w))
    lengths = torch.tensor([0, 1, S], device=device)
    check_parity(Case(query, keys, None, lengths, None, None))


def test_forced_splits_fixture_resets():
    assert attention_ext._C._forced_splits() == 0
    with pytest.raises(ValueError, match="splits"):
        attention_ext._C._set_forced_splits(-1)
    assert attention_ext._C._forced_splits() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("forced_splits", [0, 3], indirect=True)
def test_padding_beyond_lengths_not_read(forced_splits, query_2d, dtype, device):
    """DESIGN: with lengths, padded rows of keys/values are not even read, so NaN/inf
    there must not reach any output or gradient."""
    case = make_case(B=4, Tq=3, S=11, D=9, Dv=5, dtype=dtype, device=device, seed=25,
                     query_2d=query_2d, mask_kind="lengths64")
    clean = run_attention(ours, case)
    keys, values = case.keys.clone(), case.values.clone()
    for b, n in enumerate(case.lengths.tolist()):
        keys[b, n:] = float("nan")
        values[b, n:] = float("inf")
    dirty = run_attention(ours, Case(case.query, keys, values, case.lengths, None, None))
    for name in OUTPUTS:
        assert torch.isfinite(dirty[name]).all(), f"{name}: padding was read"
        torch.testing.assert_close(dirty[name], clean[name], rtol=0, atol=0, msg=name)
