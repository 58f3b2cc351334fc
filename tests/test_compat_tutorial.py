"""attention_ext.compat.BahdanauAttention against the PyTorch seq2seq tutorial's layer.

Tolerances: float64 1e-10 absolute; float32 1e-5 absolute (values O(1), H = 16).
"""
from __future__ import annotations

import pytest
import torch

from attention_ext.compat import BahdanauAttention
from eager_layers import EagerTutorialBahdanau as TutorialBahdanau


B, S, H = 3, 6, 16


def _pair(dtype, seed=0):
    torch.manual_seed(seed)
    ref = TutorialBahdanau(H).to(dtype)
    ours = BahdanauAttention(H).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, H, generator=g, dtype=dtype),
            torch.randn(B, S, H, generator=g, dtype=dtype))


def _grads(module, query, keys, seed=2, **kw):
    q = query.detach().clone().requires_grad_(True)
    k = keys.detach().clone().requires_grad_(True)
    ctx, w = module(q, k, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (ctx * torch.randn(ctx.shape, generator=g, dtype=ctx.dtype)).sum() \
        + (w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
    # A torch.compile wrapper names its parameters "_orig_mod.<name>".
    params = {n.removeprefix("_orig_mod."): p for n, p in module.named_parameters()}
    grads = torch.autograd.grad(loss, [q, k] + list(params.values()))
    return ctx.detach(), w.detach(), dict(zip(["query", "keys"] + list(params), grads))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("masking", ["none", "lengths", "mask"])
def test_parity(dtype, tol, masking):
    ref, ours = _pair(dtype)
    query, keys = _inputs(dtype)
    lengths = torch.tensor([S, 2, 4])
    keep = torch.arange(S) < lengths.unsqueeze(1)
    kw_ref = {} if masking == "none" else {"keep": keep}
    kw = {"none": {}, "lengths": {"lengths": lengths}, "mask": {"mask": keep}}[masking]
    c_r, w_r, g_r = _grads(ref, query, keys, **kw_ref)
    c_o, w_o, g_o = _grads(ours, query, keys, **kw)
    assert c_o.shape == (B, 1, H) and w_o.shape == (B, 1, S)
    torch.testing.assert_close(c_o, c_r, rtol=0, atol=tol)
    torch.testing.assert_close(w_o, w_r, rtol=0, atol=tol)
    if masking != "none":
        assert (w_o[1, 0, 2:] == 0).all() and (w_o[2, 0, 4:] == 0).all()
    assert g_o.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_o[name], g_r[name], rtol=0, atol=tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")
    # Va.bias cancels in softmax: exactly 0 for us, 0 up to rounding for the tutorial.
    assert torch.equal(g_o["Va.bias"], torch.zeros_like(g_o["Va.bias"]))


def test_state_dict_compatible():
    ref, ours = TutorialBahdanau(H), BahdanauAttention(H)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(so) == list(sr) == ["Wa.weight", "Wa.bias", "Ua.weight", "Ua.bias",
                                    "Va.weight", "Va.bias"]
    assert all(so[k].shape == sr[k].shape for k in sr)
    ours.load_state_dict(sr)
    ref.load_state_dict(ours.state_dict())


def test_cache_hits_across_decoder_steps_and_gradients_accumulate():
    ref, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    steps = [query * (t + 1) for t in range(4)]
    k_r = keys.clone().requires_grad_(True)
    k_o = keys.clone().requires_grad_(True)
    loss_r = sum(ref(q, k_r)[0].pow(2).sum() for q in steps)
    loss_o = sum(ours(q, k_o)[0].pow(2).sum() for q in steps)
    assert (ours.cache_misses, ours.cache_hits) == (1, 3)
    torch.testing.assert_close(loss_o, loss_r, rtol=0, atol=1e-10)
    loss_r.backward()
    loss_o.backward()
    torch.testing.assert_close(k_o.grad, k_r.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.Ua.weight.grad, ref.Ua.weight.grad, rtol=0, atol=1e-10)
    # The backward pass freed the cached graph: the next call must recompute, and a
    # second forward + backward with the same keys must work.
    ours.zero_grad()
    ours(steps[0], k_o)[0].sum().backward()
    assert ours.cache_misses == 2
    assert ours.Ua.weight.grad is not None


def test_cache_invalidation():
    _, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    with torch.no_grad():
        c1, _ = ours(query, keys)
        ours(query, keys)
        assert (ours.cache_misses, ours.cache_hits) == (1, 1)
        keys.mul_(2)  # in-place change of keys: stale projection must not be used
        c2, _ = ours(query, keys)
        assert ours.cache_misses == 2
        expect, _ = _pair(torch.float64)[0](query, keys)
        torch.testing.assert_close(c2, expect, rtol=0, atol=1e-12)
        assert not torch.allclose(c1, c2)
        ours.Ua.bias.add_(1.0)  # parameter update (e.g. optimizer.step)
        ours(query, keys)
        assert ours.cache_misses == 3
        ours(query, keys.clone())  # a different tensor with equal values
        assert ours.cache_misses == 4
    ours(query, keys)  # grad mode changed: the no-grad projection has no graph
    assert ours.cache_misses == 5
    ours.clear_cache()
    ours(query, keys)
    assert ours.cache_misses == 6


def test_precompute():
    ref, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    with torch.no_grad():
        proj = ours.precompute(keys)
        torch.testing.assert_close(proj, ref.Ua(keys), rtol=0, atol=0)
        c, w = ours(query, keys)
        assert (ours.cache_misses, ours.cache_hits) == (1, 1)
        c_r, w_r = ref(query, keys)
    torch.testing.assert_close(c, c_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(w, w_r, rtol=0, atol=1e-10)


def test_empty_row_gives_zeros():
    _, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    c, w = ours(query, keys, lengths=torch.tensor([0, 3, S]))
    assert (c[0] == 0).all() and (w[0] == 0).all()
    assert torch.isfinite(c).all() and torch.isfinite(w).all()


def test_compile_fullgraph():
    torch._dynamo.reset()
    ref, ours = _pair(torch.float32)
    query, keys = _inputs(torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    c_c, w_c, g_c = _grads(compiled, query, keys)
    c_r, w_r, g_r = _grads(ref, query, keys)
    torch.testing.assert_close(c_c, c_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_c, w_r, rtol=0, atol=1e-5)
    assert g_c.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_c[name], g_r[name], rtol=0, atol=1e-5)


def test_exported_from_package():
    import attention_ext

    assert "compat" in attention_ext.__all__
    assert attention_ext.compat.BahdanauAttention is BahdanauAttention


def test_inference_mode_bypasses_cache_and_keys_proj_argument():
    ref, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    with torch.inference_mode():
        k = keys.clone()  # an inference tensor: no version counter
        c1, _ = ours(query, k)
        k.mul_(2)
        c2, _ = ours(query, k)
        assert (ours.cache_hits, ours.cache_misses) == (0, 0)
        proj = ours.precompute(k)
        c3, w3 = ours(query, k, keys_proj=proj)
        c_r, w_r = ref(query, k)
    torch.testing.assert_close(c2, c_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(c3, c_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(w3, w_r, rtol=0, atol=1e-10)
    assert not torch.allclose(c1, c2)
