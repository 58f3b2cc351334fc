"""Property-based tests (hypothesis) of both fused ops, forward and backward, against
reference.py with the suite's tolerance rule: random shapes (empty ones included), dtypes,
memory layouts, lengths and masks.

Examples are derandomised under CI (the same examples on every run, so a red CI is
reproducible) and random locally, where hypothesis keeps finding new ones.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DTYPES, MASK_KINDS
from harness import ADDITIVE, DOT, check_parity

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)

LAYOUTS = ["contiguous", "strided", "transposed"]


def relayout(t, layout):
    """The same values in another memory layout: every other element of a buffer twice as
    wide ("strided"), or the last two dims swapped in memory ("transposed", 3-D only)."""
    if t is None or layout == "contiguous" or t.numel() == 0:
        return t
    if layout == "transposed" and t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _relayout_case(case, layout):
    """Every input and the mask in another memory layout (lengths as they are)."""
    return case.replace(**{n: relayout(t, layout) for n, t in case.inputs.items()},
                        mask=relayout(case.mask, layout))


common = dict(
    B=st.integers(0, 3),
    Tq=st.integers(0, 6),
    S=st.integers(0, 21),
    dtype=st.sampled_from(DTYPES),
    mask_kind=st.sampled_from(MASK_KINDS),
    layout=st.sampled_from(LAYOUTS),
    query_2d=st.booleans(),
    need_weights=st.booleans(),
    weights_in_loss=st.booleans(),
    seed=st.integers(0, 2**16),
)


@SETTINGS
@given(D=st.integers(1, 40), Dv=st.integers(1, 24), values_none=st.booleans(),
       scale=st.sampled_from([None, 0.25, 2.0]), **common)
def test_dot_attention_matches_reference(B, Tq, S, D, Dv, dtype, mask_kind, layout, query_2d,
                                         values_none, scale, need_weights, weights_in_loss, seed):
    case = DOT.make_case(B, Tq, S, D, Dv, dtype=dtype, seed=seed, query_2d=query_2d,
                         values_none=values_none, mask_kind=mask_kind, scale=scale)
    check_parity(_relayout_case(case, layout), need_weights=need_weights,
                 weights_in_loss=weights_in_loss)


@SETTINGS
@given(A=st.integers(1, 40), Dv=st.integers(1, 24), **common)
def test_additive_attention_matches_reference(B, Tq, S, A, Dv, dtype, mask_kind, layout, query_2d,
                                              need_weights, weights_in_loss, seed):
    case = ADDITIVE.make_case(B, Tq, S, A, Dv, dtype=dtype, seed=seed, query_2d=query_2d,
                              mask_kind=mask_kind)
    check_parity(_relayout_case(case, layout), need_weights=need_weights,
                 weights_in_loss=weights_in_loss)


def test_relayout_keeps_values_and_changes_strides():
    t = torch.arange(24.0).reshape(2, 3, 4)
    for layout in ("strided", "transposed"):
        r = relayout(t, layout)
        assert torch.equal(r, t) and not r.is_contiguous()
