"""The location-sensitive drop-ins against their peers' own code, loaded at test time:

* compat.tacotron2.Attention against SpeechBrain's port of NVIDIA/tacotron2's Attention
  (speechbrain/lobes/models/Tacotron2.py, same parameter names and formula; NVIDIA's
  model.py cannot be installed);
* compat.AttLoc against espnet.nets.pytorch_backend.rnn.attentions.AttLoc;
* compat.LocationAwareAttention against speechbrain/nnet/attention.py's.

SpeechBrain's package imports torchaudio on import, so its two files are loaded alone
from the installed package's directory, with what they import from SpeechBrain replaced
by the minimal substitutes below. The Makefile installs both peers (--no-deps).

Every comparison runs a recurrence of several decoder steps where the weights feed back as
each peer's decoder feeds them (Tacotron 2: the previous and the cumulative weights;
ESPnet: att_prev = w, not detached; SpeechBrain: its own detached prev_attn), with padding,
and checks the outputs, the weights and the gradients of every input and parameter by the
suite's tolerance rule (harness.check_layer_parity: the peer in float64 is the oracle, the
peer in the case's dtype the yardstick).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from attention_ext.compat import AttLoc, LocationAwareAttention, tacotron2
from harness import check_layer_parity, peer_pair
from helpers import dtype_id, generator, randn

# make test installs both peers; elsewhere (the GPU check's environment) these CPU tests
# have nothing to compare against.
if importlib.util.find_spec("espnet") is None or importlib.util.find_spec("speechbrain") is None:
    pytest.skip("the peers espnet and speechbrain are not installed (make test installs them)",
                allow_module_level=True)

from espnet.nets.pytorch_backend.rnn.attentions import AttLoc as EspnetAttLoc  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- the peers

def _length_to_mask(length, max_len=None, dtype=None, device=None):
    """speechbrain.dataio.dataio.length_to_mask: (B, max_len), 1 before each length and 0
    after, in length's dtype (or dtype), on length's device (or device)."""
    max_len = int(length.max()) if max_len is None else max_len
    mask = torch.arange(max_len, device=length.device, dtype=length.dtype)[None] < length[:, None]
    return mask.to(dtype=length.dtype if dtype is None else dtype,
                   device=length.device if device is None else device)


def _not_under_test(*args, **kwargs):
    raise AssertionError("Tacotron2.py's model and loss are not under test")


def _speechbrain_file(relative_path: str, substitutes: dict) -> types.ModuleType:
    """A file of the installed speechbrain package, executed alone (the package itself is
    not imported), with the SpeechBrain modules it imports replaced by substitutes
    ({module name: {attribute: value}}) while it runs."""
    package = importlib.util.find_spec("speechbrain")
    path = Path(package.submodule_search_locations[0]) / relative_path
    name = "peer_speechbrain_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    stubs = {}
    for module_name, attributes in substitutes.items():
        stubs[module_name] = types.ModuleType(module_name)
        vars(stubs[module_name]).update(attributes)
    with mock.patch.dict(sys.modules, stubs):
        spec.loader.exec_module(module)
    return module


SB_ATTENTION = _speechbrain_file("nnet/attention.py", {
    "speechbrain.dataio.dataio": {"length_to_mask": _length_to_mask},
    "speechbrain.utils.logger": {"get_logger": logging.getLogger},
})
SB_TACOTRON2 = _speechbrain_file("lobes/models/Tacotron2.py", {
    "speechbrain.lobes.models.transformer.Transformer": {"get_mask_from_lengths": _not_under_test},
    "speechbrain.nnet.loss.guidedattn_loss": {"GuidedAttentionLoss": _not_under_test},
})

# Sizes: B rows of S positions, T decoder steps; the kernels of 5 and 7 taps reach across
# the padding of the short rows.
B, S, T = 3, 9, 5
LENGTHS = [S, 6, 2]

TACOTRON2_ARGS = (10, 6, 8, 4, 5)  # attention_rnn_dim, embedding_dim, attention_dim, F, K
ESPNET_ARGS = (6, 10, 8, 4, 3)  # eprojs, dunits, att_dim, aconv_chans, aconv_filts
SPEECHBRAIN_ARGS = (6, 10, 8, 7, 4, 3)  # enc_dim, dec_dim, attn_dim, output_dim, chans, ks
PEERS = {
    "tacotron2": (SB_TACOTRON2.Attention, tacotron2.Attention, TACOTRON2_ARGS),
    "espnet": (EspnetAttLoc, AttLoc, ESPNET_ARGS),
    "speechbrain": (SB_ATTENTION.LocationAwareAttention, LocationAwareAttention,
                    SPEECHBRAIN_ARGS),
}


def _queries_and_memory(query_dim, memory_dim, dtype=torch.float32, seed=1, batch=B):
    gen = generator(seed)
    return randn((batch, T, query_dim), gen, dtype), randn((batch, S, memory_dim), gen, dtype)


# ----------------------------------------------------------------------------- decoders

def tacotron2_steps(layer, queries, memory, mask):
    """NVIDIA's Decoder: processed_memory once, then attention_weights_cat = [previous,
    cumulative] (zeros at first), cumulative += weights after each step."""
    processed_memory = layer.memory_layer(memory)
    weights = cumulative = memory.new_zeros(memory.shape[:2])
    contexts, alignments = [], []
    for t in range(queries.shape[1]):
        weights_cat = torch.cat((weights[:, None], cumulative[:, None]), 1)
        context, weights = layer(queries[:, t], memory, processed_memory, weights_cat, mask)
        cumulative = cumulative + weights
        contexts.append(context)
        alignments.append(weights)
    return torch.stack(contexts, 1), torch.stack(alignments, 1)


def espnet_steps(layer, dec_z, enc_hs_pad, enc_hs_len, scaling=2.0, last_attended=None,
                 backward_window=1, forward_window=3):
    """ESPnet's Decoder: reset(), att_prev None at the first step, then att_prev = w (not
    detached); last_attended[t] is step t's last_attended_idx. Resets at the end, so the
    layer holds no graph (harness copies it)."""
    layer.reset()
    att, contexts, weights = None, [], []
    try:
        for t in range(dec_z.shape[1]):
            idx = None if last_attended is None else last_attended[t]
            c, att = layer(enc_hs_pad, enc_hs_len, dec_z[:, t], att, scaling=scaling,
                           last_attended_idx=idx, backward_window=backward_window,
                           forward_window=forward_window)
            contexts.append(c)
            weights.append(att)
    finally:
        layer.reset()
    return torch.stack(contexts, 1), torch.stack(weights, 1)


def speechbrain_steps(layer, dec_states, enc_states, enc_len):
    """SpeechBrain's AttentionalRNNDecoder: reset(), then one call per step; the layer
    feeds its own detached weights back. Resets at the end (harness copies the layer)."""
    layer.reset()
    try:
        steps = [layer(enc_states, enc_len, dec_states[:, t]) for t in range(dec_states.shape[1])]
    finally:
        layer.reset()
    return torch.stack([o for o, _ in steps], 1), torch.stack([a for _, a in steps], 1)


def speechbrain_peer_steps(layer, dec_states, enc_states, enc_len):
    """speechbrain_steps on SpeechBrain's layer, its first call's set-up done here the way
    it does it but for prev_attn's dtype: the model's, where SpeechBrain's is float32, which
    its convolution rejects in float64 (the oracle) and bfloat16."""
    layer.reset()
    layer.precomputed_enc_h = layer.mlp_enc(enc_states)
    layer.mask = _length_to_mask(enc_len, max_len=enc_states.shape[1], device=enc_states.device)
    layer.prev_attn = (layer.mask * (1 / enc_len.double())[:, None]).to(enc_states.dtype)
    try:
        steps = [layer(enc_states, enc_len, dec_states[:, t]) for t in range(dec_states.shape[1])]
    finally:
        layer.reset()
    return torch.stack([o for o, _ in steps], 1), torch.stack([a for _, a in steps], 1)


def _inputs(name, dtype=torch.float32, seed=1):
    _, _, args = PEERS[name]
    if name == "tacotron2":
        queries, memory = _queries_and_memory(args[0], args[1], dtype, seed)
        padding = torch.arange(S)[None] >= torch.tensor(LENGTHS)[:, None]
        return dict(queries=queries, memory=memory, mask=padding)
    if name == "espnet":
        dec_z, enc = _queries_and_memory(args[1], args[0], dtype, seed)
        return dict(dec_z=dec_z, enc_hs_pad=enc, enc_hs_len=list(LENGTHS))
    dec, enc = _queries_and_memory(args[1], args[0], dtype, seed)
    return dict(dec_states=dec, enc_states=enc, enc_len=torch.tensor(LENGTHS))


STEPS = {"tacotron2": (tacotron2_steps, tacotron2_steps),
         "espnet": (espnet_steps, espnet_steps),
         "speechbrain": (speechbrain_steps, speechbrain_peer_steps)}


def _pair(name, dtype=torch.float32, seed=0):
    peer_cls, ours_cls, args = PEERS[name]
    return peer_pair(peer_cls, ours_cls, *args, dtype=dtype, seed=seed)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(PEERS))
def test_state_dict_and_initial_weights(name):
    """The same keys in the same order and shapes, one seed gives the same parameters, and
    each loads the other's state_dict (strict)."""
    peer_cls, ours_cls, args = PEERS[name]
    torch.manual_seed(0)
    peer = peer_cls(*args)
    torch.manual_seed(0)
    ours = ours_cls(*args)
    sp, so = peer.state_dict(), ours.state_dict()
    assert list(so) == list(sp)
    for key in sp:
        assert so[key].shape == sp[key].shape, key
        assert torch.equal(so[key], sp[key]), key
    ours.load_state_dict(sp)
    peer.load_state_dict(so)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(PEERS))
def test_recurrence_parity(name, dtype):
    """T steps with the weights fed back, padded rows: outputs, weights and every gradient."""
    peer, ours = _pair(name)
    ours_steps, peer_steps = STEPS[name]
    got = check_layer_parity(ours_steps, ours, _inputs(name), dtype, eager_forward=peer_steps,
                             eager_layer=peer)
    weights = got["weights"]
    for b, n in enumerate(LENGTHS):  # padding gets exactly zero weight
        assert (weights[b, :, n:] == 0).all()
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(B, T),
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    for key, grad in got.items():  # the recurrence reaches every input and parameter
        if key.startswith("grad_") and key != "grad_gvec.bias":
            assert grad.abs().max() > 0, key


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.5])
def test_espnet_scaling(scaling, dtype):
    peer, ours = _pair("espnet")

    def steps(layer, dec_z, enc_hs_pad, enc_hs_len):
        return espnet_steps(layer, dec_z, enc_hs_pad, enc_hs_len, scaling=scaling)

    check_layer_parity(steps, ours, _inputs("espnet"), dtype, eager_forward=steps,
                       eager_layer=peer)


# Step t's last_attended_idx at S = 9: at the start, inside, near and at the end, and past
# it; the windows (1, 3) and (2, 1) of (backward_window, forward_window) and one of the
# whole memory.
LAST_ATTENDED = [0, 2, 4, 7, 8, 9]
WINDOWS = [(1, 3), (2, 1), (S, S)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backward_window,forward_window", WINDOWS)
def test_espnet_last_attended_window(backward_window, forward_window, dtype):
    """ESPnet's monotonic constraint at batch 1 (all ESPnet supports), over a recurrence
    whose last_attended_idx moves forward step by step."""
    peer, ours = _pair("espnet")
    gen = generator(3)
    inputs = dict(dec_z=randn((1, len(LAST_ATTENDED), ESPNET_ARGS[1]), gen),
                  enc_hs_pad=randn((1, S, ESPNET_ARGS[0]), gen), enc_hs_len=[S])

    def steps(layer, dec_z, enc_hs_pad, enc_hs_len):
        return espnet_steps(layer, dec_z, enc_hs_pad, enc_hs_len, scaling=1.5,
                            last_attended=LAST_ATTENDED, backward_window=backward_window,
                            forward_window=forward_window)

    got = check_layer_parity(steps, ours, inputs, dtype, eager_forward=steps, eager_layer=peer)
    for t, last in enumerate(LAST_ATTENDED):
        start, end = max(last - backward_window, 0), min(last + forward_window, S)
        outside = torch.ones(S, dtype=torch.bool)
        outside[start:end] = False
        assert (got["weights"][0, t, outside] == 0).all()


def test_espnet_batched_window_decodes_each_row_as_alone():
    """Ours also takes one last_attended_idx per row (B,): each row as its own batch of 1."""
    _, ours = _pair("espnet", torch.float64)
    inputs = _inputs("espnet", torch.float64)
    last = [[2, 5, 1], [3, 5, 0], [4, 6, 1], [4, 7, 2], [6, 8, 2]]
    batched = espnet_steps(ours, **inputs, last_attended=[torch.tensor(r) for r in last])
    for b in range(B):
        alone = espnet_steps(ours, inputs["dec_z"][b:b + 1], inputs["enc_hs_pad"][b:b + 1],
                             [LENGTHS[b]], last_attended=[r[b] for r in last])
        for got, want in zip(batched, alone):
            torch.testing.assert_close(got[b:b + 1], want, rtol=1e-12, atol=1e-12)


def test_espnet_bad_last_attended_idx():
    _, ours = _pair("espnet")
    enc = torch.randn(B, S, ESPNET_ARGS[0])
    with pytest.raises(ValueError, match="last_attended_idx"):
        ours(enc, LENGTHS, torch.randn(B, ESPNET_ARGS[1]), None,
             last_attended_idx=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="last_attended_idx"):
        ours(enc, LENGTHS, torch.randn(B, ESPNET_ARGS[1]), None, last_attended_idx=1.5)


def _espnet_calls(layer, enc1, enc2, dec_z):
    """A call on enc1, one on enc2 without reset (ESPnet keeps enc1), reset, enc2 again."""
    out = [layer(enc1, LENGTHS, dec_z, None)]
    out.append(layer(enc2, LENGTHS, dec_z, out[0][1]))
    layer.reset()
    out.append(layer(enc2, LENGTHS, dec_z, None))
    out.append(layer(enc2, LENGTHS, None, None))  # dec_z None: zeros
    layer.reset()
    return out


@pytest.mark.parametrize("han_mode", [False, True])
def test_espnet_reset_and_kept_memory(han_mode):
    """What a call takes from the ones before it, and what reset() forgets, as ESPnet."""
    torch.manual_seed(0)
    peer = EspnetAttLoc(*ESPNET_ARGS, han_mode=han_mode).double()
    ours = AttLoc(*ESPNET_ARGS, han_mode=han_mode).double()
    ours.load_state_dict(peer.state_dict())
    gen = generator(5)
    enc1, enc2 = (randn((B, S, ESPNET_ARGS[0]), gen, torch.float64) for _ in range(2))
    dec_z = randn((B, ESPNET_ARGS[1]), gen, torch.float64)
    want, got = _espnet_calls(peer, enc1, enc2, dec_z), _espnet_calls(ours, enc1, enc2, dec_z)
    for (c, w), (pc, pw) in zip(got, want):
        torch.testing.assert_close(c, pc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w, pw, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[1][0], got[2][0])  # the kept memory made a difference
    assert ours.pre_compute_enc_h is None and ours.mask is None


def test_speechbrain_own_first_step_and_reset():
    """SpeechBrain's layer on its own set-up (float32, prev_attn = 1 / enc_len): the same
    outputs and prev_attn, and reset() starts over (the second utterance batch would
    otherwise read the first one's projection and weights)."""
    peer, ours = _pair("speechbrain")
    inputs = _inputs("speechbrain")
    dec, enc, enc_len = inputs["dec_states"], inputs["enc_states"], inputs["enc_len"]
    enc2 = torch.randn_like(enc)
    for layer in (peer, ours):
        layer.results = [layer(enc, enc_len, dec[:, 0]), layer(enc, enc_len, dec[:, 1])]
        layer.results.append(layer.prev_attn)
        layer.reset()
        assert layer.prev_attn is None and layer.precomputed_enc_h is None
        layer.results.append(layer(enc2, enc_len, dec[:, 2]))
        layer.reset()
    for got, want in zip(ours.results, peer.results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not ours.results[2].requires_grad


def test_tacotron2_alignment_energies():
    peer, ours = _pair("tacotron2", torch.float64)
    queries, memory = _queries_and_memory(10, 6, torch.float64)
    processed = peer.memory_layer(memory)
    weights_cat = torch.rand(B, 2, S, dtype=torch.float64)
    torch.testing.assert_close(
        ours.get_alignment_energies(queries[:, 0], processed, weights_cat),
        peer.get_alignment_energies(queries[:, 0], processed, weights_cat),
        rtol=1e-12, atol=1e-12)


def test_tacotron2_mask_none_and_empty_row():
    """mask None (NVIDIA's inference) attends everything (SpeechBrain's port needs a mask:
    an all-False one); a row whose every position is masked gets weights 0 and context 0
    (NVIDIA's gives NaN)."""
    peer, ours = _pair("tacotron2", torch.float64)
    inputs = _inputs("tacotron2", torch.float64)
    q, memory = inputs["queries"], inputs["memory"]
    got = tacotron2_steps(ours, q, memory, None)
    want = tacotron2_steps(peer, q, memory, torch.zeros(B, S, dtype=torch.bool))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    padding = inputs["mask"].clone()
    padding[1] = True
    context, weights = tacotron2_steps(ours, q, memory, padding)
    assert (weights[1] == 0).all() and (context[1] == 0).all()
    assert torch.isfinite(context).all()


def test_tacotron2_even_kernel_rejected():
    with pytest.raises(ValueError, match="attention_location_kernel_size"):
        tacotron2.Attention(10, 6, 8, 4, 6)
