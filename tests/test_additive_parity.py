"""attention_ext.additive_attention vs reference.py: forward (context, weights) and backward
(grads of query_proj, keys_proj, v, values), over dtypes, shapes, masks, strides and split-S.
Every comparison goes through conftest's rule (check_additive_parity / assert_rule)."""
import gc
import os

import pytest
import torch

import attention_ext
from conftest import (
    case_ids,
    ADDITIVE_OUTPUTS,
    DEVICES,
    DTYPES,
    MASK_KINDS,
    AdditiveCase,
    check_additive_parity,
    dtype_id,
    generator,
    make_additive_case,
    make_lengths,
    make_mask,
    ours_additive,
    randn,
    run_additive,
)

# (id, kwargs for make_additive_case). A is the score width (the tanh/v axis), Dv the
# values' width: both are swept over sizes that are not multiples of any vector width.
SHAPES = [
    ("basic", dict(B=3, Tq=4, S=7, A=16, Dv=16)),
    ("S1", dict(B=3, Tq=2, S=1, A=8)),
    ("Tq1", dict(B=4, Tq=1, S=9, A=32)),
    ("query2d", dict(B=5, Tq=1, S=9, A=32, query_2d=True)),
    ("A1_Dv64", dict(B=3, Tq=3, S=6, A=1, Dv=64)),
    ("A3_Dv17", dict(B=3, Tq=3, S=11, A=3, Dv=17)),
    ("A17_Dv3", dict(B=3, Tq=3, S=11, A=17, Dv=3)),
    ("A64_Dv1", dict(B=2, Tq=3, S=20, A=64, Dv=1)),
    ("A513_Dv7", dict(B=2, Tq=2, S=13, A=513, Dv=7)),
    ("A5_Dv513", dict(B=2, Tq=2, S=13, A=5, Dv=513)),
    ("A513_Dv513_2d", dict(B=2, Tq=1, S=6, A=513, Dv=513, query_2d=True)),
    ("B0", dict(B=0, Tq=3, S=5, A=8)),
    ("B0_2d", dict(B=0, Tq=1, S=5, A=8, query_2d=True)),
    ("Tq0", dict(B=3, Tq=0, S=5, A=8, Dv=6)),
    ("long_S", dict(B=2, Tq=2, S=130, A=20, Dv=9)),
    # Several query tiles per batch element with a partial last one, whatever the tile
    # (4 or 8 queries): 9 = 8 + 1 = 2*4 + 1, 13 = 8 + 5 = 3*4 + 1.
    ("query_tiles_9", dict(B=2, Tq=9, S=37, A=19, Dv=21)),
    ("query_tiles_13", dict(B=3, Tq=13, S=10, A=40, Dv=24)),
    ("query_tiles_35", dict(B=1, Tq=35, S=3, A=3, Dv=2)),  # CUDA: 9 blocks of 4 rows, the last 3
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=case_ids(SHAPES))
def test_parity(shape, mask_kind, dtype, device):
    case = make_additive_case(**shape, dtype=dtype, device=device, seed=51, mask_kind=mask_kind)
    check_additive_parity(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES[:4]], ids=case_ids(SHAPES[:4]))
def test_parity_context_only_loss(shape, mask_kind, dtype, device):
    """Weights returned but unused in the loss: backward gets grad_weights = None."""
    case = make_additive_case(**shape, dtype=dtype, device=device, seed=52, mask_kind=mask_kind)
    check_additive_parity(case, weights_in_loss=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
def test_need_weights_false(query_2d, mask_kind, dtype, device):
    case = make_additive_case(B=4, Tq=3, S=9, A=16, Dv=10, dtype=dtype, device=device,
                              seed=53, query_2d=query_2d, mask_kind=mask_kind)
    got = check_additive_parity(case, need_weights=False)
    assert got["weights"] is None
    ctx, w = attention_ext.additive_attention(case.query_proj, case.keys_proj, case.v,
                                              case.values, lengths=case.lengths,
                                              mask=case.mask, need_weights=False)
    assert w is None
    assert ctx.shape == got["context"].shape
    # The raw op writes no weights at all (an empty tensor), and the same context.
    q3 = case.query_proj.unsqueeze(1) if query_2d else case.query_proj
    ctx3, w3, _ = torch.ops.attention_ext.additive_attention(
        q3, case.keys_proj, case.v, case.values, case.lengths, case.mask, False)
    assert w3.numel() == 0
    torch.testing.assert_close(ctx3.reshape(ctx.shape), ctx, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "lengths32", "mask", "none"])
def test_non_contiguous(mask_kind, dtype, device):
    """Transposed, sliced and strided inputs give the same as contiguous ones."""
    B, Tq, S, A, Dv = 4, 3, 9, 20, 7
    gen = generator(54)
    query_proj = randn((B, A, Tq), gen, dtype, device).transpose(1, 2)
    keys_proj = randn((B, 2 * S, A + 3), gen, dtype, device)[:, ::2, 1:A + 1]
    v = randn((2 * A,), gen, dtype, device, scale=2.5 / A ** 0.5)[::2]
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
        mask[0] = False
    for t in (query_proj, keys_proj, v, values):
        assert not t.is_contiguous()
    check_additive_parity(AdditiveCase(query_proj, keys_proj, v, values, lengths, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "mask", "none"])
def test_broadcast_inputs(mask_kind, dtype, device):
    """Expanded (stride-0) inputs: keys_proj/values shared over the batch (one memory bank),
    one query_proj row repeated over Tq, and a v of equal entries."""
    B, Tq, S, A, Dv = 3, 4, 8, 12, 5
    gen = generator(55)
    query_proj = randn((B, 1, A), gen, dtype, device).expand(B, Tq, A)
    keys_proj = randn((1, S, A), gen, dtype, device).expand(B, S, A)
    v = randn((1,), gen, dtype, device, scale=0.6).expand(A)
    values = randn((1, S, Dv), gen, dtype, device).expand(B, S, Dv)
    lengths, mask = None, None
    if mask_kind == "lengths64":
        lengths = torch.tensor([0, 5, S], device=device)
    elif mask_kind == "mask":
        mask = make_mask(B, S, gen, device)
    check_additive_parity(AdditiveCase(query_proj, keys_proj, v, values, lengths, mask))
    # Broadcast and materialised inputs are the same call.
    dense = AdditiveCase(query_proj.contiguous(), keys_proj.contiguous(), v.contiguous(),
                         values.contiguous(), lengths, mask)
    a = run_additive(ours_additive, AdditiveCase(query_proj, keys_proj, v, values, lengths, mask))
    b = run_additive(ours_additive, dense)
    for name in ADDITIVE_OUTPUTS:
        torch.testing.assert_close(a[name], b[name], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "lengths32", "mask"])
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
def test_fully_masked_rows(query_2d, mask_kind, dtype, device):
    """Rows with nothing to attend to: context 0, weights 0, gradients 0, no NaN."""
    B, Tq, S, A, Dv = 3, 2, 5, 8, 6
    gen = generator(56)
    query_proj = randn((B, A) if query_2d else (B, Tq, A), gen, dtype, device)
    keys_proj = randn((B, S, A), gen, dtype, device)
    v = randn((A,), gen, dtype, device)
    values = randn((B, S, Dv), gen, dtype, device)
    lengths = mask = None
    if mask_kind == "mask":
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        mask[1, 2] = True  # only row 1 attends, to one position
        keep = torch.tensor([False, False, True, False, False], device=device)
    else:
        ldtype = torch.int64 if mask_kind == "lengths64" else torch.int32
        lengths = torch.tensor([0, 3, 0], dtype=ldtype, device=device)
        keep = torch.arange(S, device=device) < 3
    got = check_additive_parity(AdditiveCase(query_proj, keys_proj, v, values, lengths, mask))
    empty = [0, 2]
    for name in ADDITIVE_OUTPUTS:
        assert torch.isfinite(got[name]).all(), name
    for name in ("context", "weights", "grad_query_proj", "grad_keys_proj", "grad_values"):
        assert (got[name][empty] == 0).all(), f"{name} of an empty row is not 0"
    # Row 1 attends only to `keep`: zero weight and no gradient elsewhere.
    assert (got["weights"][1][..., ~keep] == 0).all()
    assert (got["grad_keys_proj"][1][~keep] == 0).all()
    assert (got["grad_values"][1][~keep] == 0).all()
    if mask is not None:
        # One attended position: weight 1 and the context is that row of values.
        row_w = got["weights"][1][..., 2]
        torch.testing.assert_close(row_w, torch.ones_like(row_w))
        ctx1 = got["context"][1].reshape(-1, Dv)
        torch.testing.assert_close(ctx1, values[1, 2].expand_as(ctx1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
def test_everything_masked(query_2d, dtype, device):
    """All rows empty (lengths all 0 / mask all False): every output and gradient,
    grad_v included, is exactly 0."""
    case = make_additive_case(B=3, Tq=2, S=4, A=8, Dv=5, dtype=dtype, device=device, seed=57,
                              query_2d=query_2d)
    for lengths, mask in [
        (torch.zeros(3, dtype=torch.int64, device=device), None),
        (torch.zeros(3, dtype=torch.int32, device=device), None),
        (None, torch.zeros(3, 4, dtype=torch.bool, device=device)),
    ]:
        c = AdditiveCase(case.query_proj, case.keys_proj, case.v, case.values, lengths, mask)
        got = run_additive(ours_additive, c)
        for name, t in got.items():
            assert torch.isfinite(t).all(), name
            assert (t == 0).all(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("query_2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("forced_splits", [0, 3], indirect=True)
def test_padding_beyond_lengths_not_read(forced_splits, query_2d, dtype, device):
    """DESIGN: with lengths, padded rows of keys_proj/values are not even read, so NaN/inf
    there must not reach any output or gradient (v's included)."""
    case = make_additive_case(B=4, Tq=3, S=11, A=9, Dv=5, dtype=dtype, device=device,
                              seed=58, query_2d=query_2d, mask_kind="lengths64")
    clean = run_additive(ours_additive, case)
    keys_proj, values = case.keys_proj.clone(), case.values.clone()
    for b, n in enumerate(case.lengths.tolist()):
        keys_proj[b, n:] = float("nan")
        values[b, n:] = float("inf")
    dirty = run_additive(ours_additive, AdditiveCase(case.query_proj, keys_proj, case.v,
                                                     values, case.lengths, None))
    for name in ADDITIVE_OUTPUTS:
        assert torch.isfinite(dirty[name]).all(), f"{name}: padding was read"
        torch.testing.assert_close(dirty[name], clean[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_saturated_tanh_and_large_scores(dtype, device):
    """Projections far into tanh's saturation and a large v: scores of +-100s, beyond
    fp16's exp range. The softmax must stay finite and the weights sum to 1 per row."""
    case = make_additive_case(B=3, Tq=2, S=12, A=32, Dv=8, dtype=dtype, device=device,
                              seed=59, mask_kind="lengths64")
    big = AdditiveCase(case.query_proj * 6, case.keys_proj * 6, case.v * 40, case.values,
                       case.lengths, None)
    got = check_additive_parity(big)
    sums = got["weights"].double().sum(-1)
    expect = (case.lengths > 0).double()[:, None].expand_as(sums).to(sums.device)
    torch.testing.assert_close(sums, expect, atol=1e-2, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_rows_parallel(device):
    """Enough rows (and a long source) for the kernels to run on every thread."""
    case = make_additive_case(B=37, Tq=5, S=70, A=48, Dv=40, device=device, seed=60,
                              mask_kind="lengths64")
    check_additive_parity(case)
    case = make_additive_case(B=37, Tq=1, S=70, A=48, Dv=40, device=device, seed=61,
                              mask_kind="mask", query_2d=True)
    check_additive_parity(case)


@pytest.mark.parametrize("device", DEVICES)
def test_large_tq_s_a(device):
    """B x Tq x S x A = 8.8M (71 MB per float64 temporary of the oracle, which makes
    several): ours must give the same result with blocks, splits and threads at scale."""
    case = make_additive_case(B=3, Tq=48, S=192, A=319, Dv=96, device=device, seed=62,
                              mask_kind="lengths64")
    check_additive_parity(case)


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="peak RSS reset needs Linux /proc (PERF_NOTES item 6)")
def test_no_b_tq_s_a_temporary():
    """DESIGN: never a B x Tq x S x A tensor, in forward or backward. Here one would be
    134 MB in float32; the peak RSS rise of ours fwd+bwd (outputs and gradients included,
    about 6 MB) must stay under an eighth of that."""
    B, Tq, S, A, Dv = 4, 64, 256, 512, 64
    case = make_additive_case(B=B, Tq=Tq, S=S, A=A, Dv=Dv, seed=66, mask_kind="lengths64")
    one_temporary_kib = B * Tq * S * A * 4 // 1024
    run_additive(ours_additive, case)  # warm-up: threads, lazily built state
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _vm_kib("VmRSS")
    got = run_additive(ours_additive, case)
    rise = _vm_kib("VmHWM") - base
    assert torch.isfinite(got["grad_v"]).all()
    assert rise < one_temporary_kib // 8, (
        f"peak RSS rose by {rise / 1024:.1f} MB; one B x Tq x S x A float32 tensor is "
        f"{one_temporary_kib / 1024:.0f} MB")


# ---------------------------------------------------------------------------- split-S

SPLIT_SHAPES = [
    ("B1_Tq1_S13", dict(B=1, Tq=1, S=13, A=16)),
    ("B2_2d_S64", dict(B=2, Tq=1, S=64, A=33, Dv=20, query_2d=True)),
    ("B3_Tq3_S5", dict(B=3, Tq=3, S=5, A=8)),  # 7 splits > S
    ("B2_S1", dict(B=2, Tq=2, S=1, A=8)),
    ("B3_S100", dict(B=3, Tq=2, S=100, A=24, Dv=11)),
    ("B2_S29_A3", dict(B=2, Tq=2, S=29, A=3, Dv=17)),
    ("B0", dict(B=0, Tq=2, S=9, A=8)),
]


# lengths32 is left out here: the kernels see int64 lengths either way (inputs.h), and
# test_parity covers the conversion.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("shape", [s[1] for s in SPLIT_SHAPES], ids=case_ids(SPLIT_SHAPES))
@pytest.mark.parametrize("forced_splits", [1, 2, 3, 7], indirect=True)
def test_split_s_parity(forced_splits, shape, mask_kind, dtype, device):
    assert attention_ext._C._forced_splits() == forced_splits
    case = make_additive_case(**shape, dtype=dtype, device=device, seed=63, mask_kind=mask_kind)
    check_additive_parity(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mask_kind", ["lengths64", "mask"])
@pytest.mark.parametrize("shape", [s[1] for s in SPLIT_SHAPES[:3]], ids=case_ids(SPLIT_SHAPES[:3]))
@pytest.mark.parametrize("forced_splits", [2, 7], indirect=True)
def test_split_s_no_weights(forced_splits, shape, mask_kind, dtype, device):
    """need_weights=False with splits: no weights written, the context merged alone."""
    case = make_additive_case(**shape, dtype=dtype, device=device, seed=63, mask_kind=mask_kind)
    assert check_additive_parity(case, need_weights=False)["weights"] is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forced_splits", [2, 3, 7], indirect=True)
def test_split_s_fully_masked(forced_splits, device):
    """Splits that see no attending key (and empty rows) merge to zeros, not NaN."""
    B, S, A, Dv = 3, 20, 8, 5
    gen = generator(64)
    query_proj = randn((B, 2, A), gen, device=device)
    keys_proj = randn((B, S, A), gen, device=device)
    v = randn((A,), gen, device=device)
    values = randn((B, S, Dv), gen, device=device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    mask[1, 17] = True  # only the last split of row 1 has a key
    mask[2, 0] = True  # only the first split of row 2
    got = check_additive_parity(AdditiveCase(query_proj, keys_proj, v, values, None, mask))
    for name in ADDITIVE_OUTPUTS:
        assert torch.isfinite(got[name]).all(), name
    assert (got["context"][0] == 0).all() and (got["weights"][0] == 0).all()
    for w in (got["weights"][1, :, 17], got["weights"][2, :, 0]):
        torch.testing.assert_close(w, torch.ones_like(w))
    lengths = torch.tensor([0, 1, S], device=device)
    check_additive_parity(AdditiveCase(query_proj, keys_proj, v, values, lengths, None))


@pytest.mark.parametrize("device", DEVICES)
def test_splits_agree(device):
    """Any number of splits computes the same function: all within the float32 rule of the
    oracle, and close to each other."""
    case = make_additive_case(B=2, Tq=3, S=50, A=24, Dv=10, device=device, seed=65,
                              mask_kind="lengths64")
    results = []
    for n in (1, 2, 3, 7):
        attention_ext._C._set_forced_splits(n)
        try:
            results.append(check_additive_parity(case))
        finally:
            attention_ext._C._set_forced_splits(0)
    for r in results[1:]:
        for name in ADDITIVE_OUTPUTS:
            torch.testing.assert_close(r[name], results[0][name], rtol=1e-5, atol=1e-6,
                                       msg=name)
