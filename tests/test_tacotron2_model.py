"""The Tacotron 2 of the whole-model benchmark (benchmarks/tacotron2_model.py): shapes,
attention weights, the pluggable attention and its checkpoint names. Tiny sizes on the CPU."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import tacotron2_model as T  # noqa: E402

# NVIDIA/tacotron2's layers at a tenth of their width or less; the location kernel keeps
# its 31 taps, wider than the text.
TINY = dataclasses.replace(
    T.Tacotron2Config(), symbols_embedding_dim=16, encoder_embedding_dim=16, prenet_dim=8,
    attention_rnn_dim=24, decoder_rnn_dim=20, attention_dim=12, attention_location_n_filters=4,
    postnet_embedding_dim=16)
TEXT_LENGTHS = (7, 4)
OUTPUT_LENGTHS = (9, 6)

# The attention's state_dict keys in NVIDIA/tacotron2's checkpoints.
NVIDIA_ATTENTION_KEYS = [
    "query_layer.linear_layer.weight",
    "memory_layer.linear_layer.weight",
    "v.linear_layer.weight",
    "location_layer.location_conv.conv.weight",
    "location_layer.location_dense.linear_layer.weight",
]


def tiny_batch() -> T.Batch:
    """B 2, 7 characters, 9 frames; the second row padded in both."""
    gen = torch.Generator().manual_seed(0)
    text_lengths, output_lengths = torch.tensor(TEXT_LENGTHS), torch.tensor(OUTPUT_LENGTHS)
    text = torch.randint(1, TINY.n_symbols, (2, 7), generator=gen)
    text = text.masked_fill(T.padding_mask(text_lengths, 7), 0)
    mels = torch.randn(2, TINY.n_mel_channels, 9, generator=gen)
    mels = mels.masked_fill(T.padding_mask(output_lengths, 9)[:, None], 0.0)
    return T.Batch(text, text_lengths, mels, output_lengths)


def tiny_model(attention_factory=T.Attention, seed: int = 0) -> T.Tacotron2:
    torch.manual_seed(seed)
    return T.Tacotron2(TINY, attention_factory)


def test_output_shapes_and_padded_frames():
    batch = tiny_batch()
    model = tiny_model().train()
    out = model(*batch)
    assert out.mel.shape == (2, 80, 9)
    assert out.mel_postnet.shape == (2, 80, 9)
    assert out.gate.shape == (2, 9)
    assert out.alignments.shape == (2, 9, 7)
    # Past its 6 frames the second row predicts the targets' padding: zero frames, a stop.
    assert torch.equal(out.mel[1, :, 6:], torch.zeros(80, 3))
    assert torch.equal(out.mel_postnet[1, :, 6:], torch.zeros(80, 3))
    assert torch.equal(out.gate[1, 6:], torch.full((3,), 1e3))
    assert torch.count_nonzero(out.mel[1, :, :6]) == 80 * 6
    assert torch.isfinite(T.tacotron2_loss(out, batch.mels, batch.output_lengths))


def test_attention_weights_sum_to_one_over_the_text_and_are_zero_on_padding():
    batch = tiny_batch()
    alignments = tiny_model().train()(*batch).alignments.detach()
    for b, length in enumerate(TEXT_LENGTHS):
        sums = alignments[b, :, :length].sum(1)
        torch.testing.assert_close(sums, torch.ones(9), rtol=0, atol=1e-6)
        assert torch.equal(alignments[b, :, length:], torch.zeros(9, 7 - length))
        assert (alignments[b, :, :length] > 0).all()


def test_a_second_attention_via_the_factory_gives_bit_identical_loss_and_grads():
    built = []

    def factory(*args):
        built.append(T.Attention(*args))
        return built[-1]

    batch = tiny_batch()
    model = tiny_model()
    other = tiny_model(factory, seed=1)
    assert len(built) == 1 and other.decoder.attention_layer is built[0]
    key = "decoder.attention_layer.location_layer.location_conv.conv.weight"
    assert not torch.equal(other.state_dict()[key], model.state_dict()[key])
    other.load_state_dict(model.state_dict())
    loss = T.train_step(model, batch, seed=3)
    other_loss = T.train_step(other, batch, seed=3)
    assert torch.equal(loss, other_loss)
    grads = dict(model.named_parameters())
    for name, p in other.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, grads[name].grad), name


def test_attention_state_dict_keys_are_nvidias():
    attention = T.Attention(1024, 512, 128, 32, 31)
    assert list(attention.state_dict()) == NVIDIA_ATTENTION_KEYS
    shapes = {k: tuple(v.shape) for k, v in attention.state_dict().items()}
    assert shapes == {
        "query_layer.linear_layer.weight": (128, 1024),
        "memory_layer.linear_layer.weight": (128, 512),
        "v.linear_layer.weight": (1, 128),
        "location_layer.location_conv.conv.weight": (32, 2, 31),
        "location_layer.location_dense.linear_layer.weight": (128, 32),
    }
    model_keys = [k for k in tiny_model().state_dict() if ".attention_layer." in k]
    assert model_keys == ["decoder.attention_layer." + k for k in NVIDIA_ATTENTION_KEYS]


def test_published_sizes_have_nvidias_parameter_count():
    assert T.parameter_count(T.Tacotron2()) == 28_193_153


def test_saved_tensor_bytes_attention_part():
    batch = tiny_batch()
    saved = T.saved_tensor_bytes(tiny_model(), batch)
    assert 0 < saved.attention < saved.total
    assert 0 < saved.parameters < saved.total
    # Each step saves at least the tanh of the energies, (B, S, A) floats.
    assert saved.attention >= 9 * 2 * 7 * TINY.attention_dim * 4


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="chars"):
        T.synthetic_batch(2, 0, 9)
    with pytest.raises(ValueError, match="symbols_embedding_dim"):
        T.Tacotron2(dataclasses.replace(TINY, symbols_embedding_dim=8))


def test_uniform_attention_is_the_mean_of_the_unpadded_memory():
    attention = T.UniformAttention(24, 16, 12, 4, 31)
    attention.load_state_dict(T.Attention(24, 16, 12, 4, 31).state_dict())
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 7, 16, generator=gen)
    mask = T.padding_mask(torch.tensor(TEXT_LENGTHS), 7)
    context, weights = attention(torch.randn(2, 24, generator=gen), memory,
                                 attention.memory_layer(memory), torch.rand(2, 2, 7), mask)
    for b, length in enumerate(TEXT_LENGTHS):
        torch.testing.assert_close(context[b], memory[b, :length].mean(0))
        assert torch.equal(weights[b, length:], torch.zeros(7 - length))
        torch.testing.assert_close(weights[b, :length], torch.full((length,), 1 / length))
    context, _ = attention(torch.randn(2, 24), memory, None, None, None)
    torch.testing.assert_close(context, memory.mean(1))
