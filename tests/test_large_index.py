"""64-bit indexing: a keys tensor of more than 2^31 elements (bfloat16). Each batch
element alone holds more than 2^31 elements, so both a row offset j * D and a batch offset
b * S * D past 2^31 occur: a 32-bit offset anywhere in a kernel reads or writes the wrong
rows. Only the attending rows are written (the rest stay untouched pages of a fresh
allocation: they take no memory, and the kernels never read them), so the reference runs
on those rows alone."""
import pytest
import torch

import attention_ext as ae
from attention_ext import reference
from helpers import DEVICES, assert_rule, generator, randn

pytestmark = pytest.mark.slow

B, D = 2, 1024
S = 2**31 // D + 4096  # S * D > 2^31 with room to spare
DT = torch.bfloat16


def attending_positions():
    # A few near the start of each batch element and a few at the very end.
    pos = torch.tensor([0, 7, 1000, S // 2, S - 3000, S - 2, S - 1])
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, pos] = True
    return pos, mask


def test_case_is_past_2_pow_31():
    pos, _ = attending_positions()
    assert pos[-1] * D > 2**31 and ((B - 1) * S + pos[1]) * D > 2**31


def _compare(got, small_fn):
    """Ours (got: dict of outputs at the attending rows) vs reference.py on the gathered
    problem, in bfloat16 (the yardstick) and float64 (the oracle)."""
    lowp, oracle = small_fn(DT), small_fn(torch.float64)
    for name in got:
        assert_rule(name, got[name], lowp[name], oracle[name], DT)


@pytest.mark.parametrize("device", DEVICES)
def test_dot_attention_beyond_2_pow_31(device):
    pos, mask = attending_positions()
    gen = generator(0)
    keys = torch.empty(B, S, D, dtype=DT, device=device)
    keys[:, pos] = randn((B, len(pos), D), gen, DT, device)
    query = randn((B, 3, D), gen, DT, scale=1.5 / D**0.5)
    g_ctx = randn((B, 3, D), gen, DT)

    q = query.to(device).requires_grad_(True)
    k = keys.requires_grad_(True)
    ctx, w = ae.dot_attention(q, k, mask=mask.to(device))
    (ctx * g_ctx.to(device)).sum().backward()
    got = {"context": ctx.detach(), "weights": w.detach()[:, :, pos],
           "grad_query": q.grad, "grad_keys": k.grad[:, pos]}
    # Nothing outside the attending positions was written.
    assert not w[:, :, 1:7].any() and not k.grad[:, 1:7].any()
    assert not k.grad[:, S - 2999:S - 2].any()
    key_rows = keys.detach()[:, pos].cpu()
    del keys, k

    def small(dtype):
        qs = query.detach().to(dtype).requires_grad_(True)
        ks = key_rows.detach().to(dtype).requires_grad_(True)
        c, ww = reference.dot_attention(qs, ks)
        (c * g_ctx.to(dtype)).sum().backward()
        return {"context": c.detach(), "weights": ww.detach(), "grad_query": qs.grad,
                "grad_keys": ks.grad}

    _compare({n: t.cpu() for n, t in got.items()}, small)


@pytest.mark.parametrize("device", DEVICES)
def test_additive_attention_beyond_2_pow_31(device):
    pos, mask = attending_positions()
    gen = generator(1)
    A, Dv = D, 8
    keys_proj = torch.empty(B, S, A, dtype=DT, device=device)
    keys_proj[:, pos] = randn((B, len(pos), A), gen, DT, device)
    values = torch.empty(B, S, Dv, dtype=DT, device=device)
    values[:, pos] = randn((B, len(pos), Dv), gen, DT, device)
    query_proj = randn((B, 2, A), gen, DT)
    v = randn((A,), gen, DT, scale=2.5 / A**0.5)

    ctx, w = ae.additive_attention(query_proj.to(device), keys_proj, v.to(device), values,
                                   mask=mask.to(device))
    got = {"context": ctx.cpu(), "weights": w[:, :, pos].cpu()}
    key_rows, value_rows = keys_proj[:, pos].cpu(), values[:, pos].cpu()
    del keys_proj, values

    def small(dtype):
        c, ww = reference.additive_attention(query_proj.to(dtype), key_rows.to(dtype),
                                             v.to(dtype), value_rows.to(dtype))
        return {"context": c, "weights": ww}

    _compare(got, small)
