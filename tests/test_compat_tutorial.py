"""attention_ext.compat.BahdanauAttention against the PyTorch seq2seq tutorial's layer
(eager_layers.EagerTutorialBahdanau).

Comparisons follow the suite's tolerance rule (helpers.py): the oracle is the tutorial's
layer in float64 with the same parameters and inputs, the yardstick that layer in the case's
dtype (harness.check_layer_parity).
"""
from __future__ import annotations

import pytest
import torch

from attention_ext.compat import BahdanauAttention
from eager_layers import EagerTutorialBahdanau
from harness import check_layer_parity, peer_pair
from helpers import assert_rule_float64, dtype_id, generator, randn


B, S, H = 3, 6, 16


def _pair(dtype, seed=0):
    return peer_pair(EagerTutorialBahdanau, BahdanauAttention, H, dtype=dtype, seed=seed)


def _inputs(dtype, seed=1):
    gen = generator(seed)
    return randn((B, 1, H), gen, dtype), randn((B, S, H), gen, dtype)


def _ours(layer, query, keys, lengths, mask):
    return layer(query, keys, lengths=lengths, mask=mask)


def _tutorial(layer, query, keys, lengths, mask):
    """The tutorial's layer with its `keep` mask in place of lengths or mask."""
    keep = mask if lengths is None else torch.arange(keys.shape[1]) < lengths[:, None]
    return layer(query, keys, keep=keep)


def _check(ref, ours, query, keys, dtype, lengths=None, mask=None):
    """Ours vs the tutorial's layer (harness.check_layer_parity): context ("output"),
    weights and the gradients of query, keys and every parameter."""
    return check_layer_parity(_ours, ours, dict(query=query, keys=keys, lengths=lengths,
                                                mask=mask),
                              dtype, eager_forward=_tutorial, eager_layer=ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("masking", ["none", "lengths", "mask"])
def test_parity(dtype, masking):
    ref, ours = _pair(dtype)
    query, keys = _inputs(dtype)
    lengths = torch.tensor([S, 2, 4])
    kw = {"none": {}, "lengths": {"lengths": lengths},
          "mask": {"mask": torch.arange(S) < lengths[:, None]}}[masking]
    got = _check(ref, ours, query, keys, dtype, **kw)
    c_o, w_o = got["output"], got["weights"]
    assert c_o.shape == (B, 1, H) and w_o.shape == (B, 1, S)
    if masking != "none":
        assert (w_o[1, 0, 2:] == 0).all() and (w_o[2, 0, 4:] == 0).all()
    # Va.bias cancels in softmax: exactly 0 for us, 0 up to rounding for the tutorial.
    assert torch.equal(got["grad_Va.bias"], torch.zeros_like(got["grad_Va.bias"]))


def test_state_dict_compatible():
    ref, ours = EagerTutorialBahdanau(H), BahdanauAttention(H)
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
    assert_rule_float64("loss", loss_o.detach(), loss_r.detach())
    loss_r.backward()
    loss_o.backward()
    assert_rule_float64("grad_keys", k_o.grad, k_r.grad)
    assert_rule_float64("grad_Ua.weight", ours.Ua.weight.grad, ref.Ua.weight.grad)
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
    assert_rule_float64("context", c, c_r)
    assert_rule_float64("weights", w, w_r)


def test_empty_row_gives_zeros():
    _, ours = _pair(torch.float64)
    query, keys = _inputs(torch.float64)
    c, w = ours(query, keys, lengths=torch.tensor([0, 3, S]))
    assert (c[0] == 0).all() and (w[0] == 0).all()
    assert torch.isfinite(c).all() and torch.isfinite(w).all()


def test_compile_fullgraph():
    torch._dynamo.reset()
    ref, ours = _pair(torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _check(ref, compiled, *_inputs(torch.float32), torch.float32)


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
    assert_rule_float64("context", c2, c_r)
    assert_rule_float64("context with keys_proj", c3, c_r)
    assert_rule_float64("weights with keys_proj", w3, w_r)
    assert not torch.allclose(c1, c2)
