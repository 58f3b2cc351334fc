"""Tacotron 2 in eager PyTorch: the model of the whole-model benchmark of location-sensitive
attention (bench_tacotron2.py).

Written from the paper (Shen et al. 2018, "Natural TTS Synthesis by Conditioning WaveNet on
Mel Spectrogram Predictions") at the sizes and training details of NVIDIA/tacotron2's
hparams:

  encoder   character embedding 512; 3 convolutions (512 filters, 5 taps, batch norm, ReLU,
            dropout 0.5); a bidirectional LSTM of 256 units per direction over the packed
            text
  decoder   one mel frame per step, teacher-forced; prenet of two ReLU layers of 256 with
            dropout 0.5 in training and inference alike; attention LSTMCell 1024 over
            [prenet, previous context]; location-sensitive attention (128 units; 32 filters
            of 31 taps over the previous and the cumulative weights); decoder LSTMCell 1024
            over [attention LSTM output, context]; dropout 0.1 on both LSTM outputs (no
            zoneout); a linear projection to the 80 mel channels and a linear stop gate,
            both over [decoder LSTM output, context]
  postnet   5 convolutions (512 filters, 5 taps, batch norm; tanh after all but the last;
            dropout 0.5), added to the decoder's mel frames
  loss      MSE of the mel frames before and after the postnet + BCE with logits of the gate

The modules carry NVIDIA/tacotron2's names, so the state_dict keys are its checkpoints'.
The attention is pluggable: `Tacotron2(attention_factory=...)` builds the decoder's
attention_layer with any module of the `Attention` interface below, and a second model
loads the first one's state_dict to run the very same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Tacotron2Config:
    """NVIDIA/tacotron2's model hparams (n_symbols: its English symbol set of 148)."""
    n_symbols: int = 148
    symbols_embedding_dim: int = 512
    encoder_kernel_size: int = 5
    encoder_n_convolutions: int = 3
    encoder_embedding_dim: int = 512
    n_mel_channels: int = 80
    prenet_dim: int = 256
    attention_rnn_dim: int = 1024
    decoder_rnn_dim: int = 1024
    attention_dim: int = 128
    attention_location_n_filters: int = 32
    attention_location_kernel_size: int = 31
    p_prenet_dropout: float = 0.5
    p_attention_dropout: float = 0.1
    p_decoder_dropout: float = 0.1
    p_conv_dropout: float = 0.5
    postnet_embedding_dim: int = 512
    postnet_kernel_size: int = 5
    postnet_n_convolutions: int = 5


# ----------------------------------------------------------------------------- layers

class XavierLinear(nn.Module):
    """nn.Linear with Xavier-uniform weights scaled by the gain of the nonlinearity that
    follows; the inner module's attribute name (linear_layer) is the checkpoints'."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True,
                 w_init_gain: str = "linear"):
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.linear_layer.weight, nn.init.calculate_gain(w_init_gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_layer(x)


class XavierConv1d(nn.Module):
    """nn.Conv1d, stride 1, padded to keep the length (odd kernel_size), with Xavier-uniform
    weights as XavierLinear; the inner module's attribute name (conv) is the checkpoints'."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 bias: bool = True, w_init_gain: str = "linear"):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size,
                              padding=(kernel_size - 1) // 2, bias=bias)
        nn.init.xavier_uniform_(self.conv.weight, nn.init.calculate_gain(w_init_gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_batchnorm(in_channels: int, out_channels: int, kernel_size: int,
                   w_init_gain: str) -> nn.Sequential:
    """A convolution of the encoder or the postnet and its batch norm (keys .0 and .1)."""
    return nn.Sequential(XavierConv1d(in_channels, out_channels, kernel_size,
                                      w_init_gain=w_init_gain),
                         nn.BatchNorm1d(out_channels))


# ----------------------------------------------------------------------------- attention

class LocationLayer(nn.Module):
    """The location features of the previous and cumulative weights (B, 2, S): F filters
    of K taps, then a dense map to the attention dimension A, both without bias. -> (B, S, A)"""

    def __init__(self, attention_n_filters: int, attention_kernel_size: int,
                 attention_dim: int):
        super().__init__()
        self.location_conv = XavierConv1d(2, attention_n_filters, attention_kernel_size,
                                          bias=False)
        self.location_dense = XavierLinear(attention_n_filters, attention_dim, bias=False,
                                           w_init_gain="tanh")

    def forward(self, attention_weights_cat: torch.Tensor) -> torch.Tensor:
        return self.location_dense(self.location_conv(attention_weights_cat).transpose(1, 2))


class Attention(nn.Module):
    """Location-sensitive attention with NVIDIA/tacotron2's interface, in eager PyTorch.

    forward(attention_hidden_state (B, attention_rnn_dim), memory (B, S, embedding_dim),
    processed_memory (B, S, attention_dim) = memory_layer(memory), attention_weights_cat
    (B, 2, S) = [previous weights, cumulative weights], mask (B, S) bool, True at PADDED
    positions, or None) -> (attention_context (B, embedding_dim), attention_weights (B, S)).
    energies = v(tanh(query_layer(query) + location_layer(weights_cat) + processed_memory)),
    padded positions set to -inf before the softmax (every row needs one position).
    """

    def __init__(self, attention_rnn_dim: int, embedding_dim: int, attention_dim: int,
                 attention_location_n_filters: int, attention_location_kernel_size: int):
        super().__init__()
        self.query_layer = XavierLinear(attention_rnn_dim, attention_dim, bias=False,
                                        w_init_gain="tanh")
        self.memory_layer = XavierLinear(embedding_dim, attention_dim, bias=False,
                                         w_init_gain="tanh")
        self.v = XavierLinear(attention_dim, 1, bias=False)
        self.location_layer = LocationLayer(attention_location_n_filters,
                                            attention_location_kernel_size, attention_dim)

    def forward(self, attention_hidden_state, memory, processed_memory, attention_weights_cat,
                mask):
        query = self.query_layer(attention_hidden_state).unsqueeze(1)
        location = self.location_layer(attention_weights_cat)
        energies = self.v(torch.tanh(query + location + processed_memory)).squeeze(2)
        if mask is not None:
            energies = energies.masked_fill(mask, float("-inf"))
        attention_weights = torch.softmax(energies, dim=1)
        attention_context = torch.bmm(attention_weights.unsqueeze(1), memory).squeeze(1)
        return attention_context, attention_weights


class UniformAttention(Attention):
    """The mean of the memory over the unpadded positions in place of the attention: the
    weights and the interface of Attention (its state_dict loads), at a cost next to
    nothing. A model with it is another model, but every layer outside the attention does
    the same work, so its training step is the floor that no implementation of the
    attention can go below."""

    def forward(self, attention_hidden_state, memory, processed_memory, attention_weights_cat,
                mask):
        keep = memory.new_ones(memory.shape[:2]) if mask is None else (~mask).to(memory.dtype)
        attention_weights = keep / keep.sum(1, keepdim=True)
        attention_context = torch.bmm(attention_weights.unsqueeze(1), memory).squeeze(1)
        return attention_context, attention_weights


# An attention factory: called as Attention is, returns a module of its interface.
AttentionFactory = Callable[[int, int, int, int, int], nn.Module]


# ----------------------------------------------------------------------------- model

class Encoder(nn.Module):
    def __init__(self, config: Tacotron2Config):
        super().__init__()
        E = config.encoder_embedding_dim
        self.p_dropout = config.p_conv_dropout
        self.convolutions = nn.ModuleList(
            conv_batchnorm(E, E, config.encoder_kernel_size, "relu")
            for _ in range(config.encoder_n_convolutions))
        self.lstm = nn.LSTM(E, E // 2, batch_first=True, bidirectional=True)

    def forward(self, embedded: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """embedded (B, E, N), text_lengths (B,) -> memory (B, N, E), zero past each length."""
        x = embedded
        for conv in self.convolutions:
            x = F.dropout(F.relu(conv(x)), self.p_dropout, self.training)
        # The packed LSTM reads each text to its length only: the backward direction starts
        # at the last character, not at the padding.
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(1, 2), text_lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        memory, _ = self.lstm(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(memory, batch_first=True,
                                                     total_length=embedded.shape[2])
        return memory


class Prenet(nn.Module):
    def __init__(self, in_dim: int, sizes, p_dropout: float):
        super().__init__()
        self.p_dropout = p_dropout
        self.layers = nn.ModuleList(XavierLinear(i, o, bias=False)
                                    for i, o in zip([in_dim] + list(sizes[:-1]), sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            # Dropout at inference too: the paper's source of output variation.
            x = F.dropout(F.relu(layer(x)), self.p_dropout, training=True)
        return x


class Decoder(nn.Module):
    def __init__(self, config: Tacotron2Config, attention_factory: AttentionFactory):
        super().__init__()
        c = config
        E = c.encoder_embedding_dim
        self.config = c
        self.prenet = Prenet(c.n_mel_channels, [c.prenet_dim, c.prenet_dim], c.p_prenet_dropout)
        self.attention_rnn = nn.LSTMCell(c.prenet_dim + E, c.attention_rnn_dim)
        self.attention_layer = attention_factory(c.attention_rnn_dim, E, c.attention_dim,
                                                 c.attention_location_n_filters,
                                                 c.attention_location_kernel_size)
        self.decoder_rnn = nn.LSTMCell(c.attention_rnn_dim + E, c.decoder_rnn_dim)
        self.linear_projection = XavierLinear(c.decoder_rnn_dim + E, c.n_mel_channels)
        self.gate_layer = XavierLinear(c.decoder_rnn_dim + E, 1, w_init_gain="sigmoid")

    def forward(self, memory: torch.Tensor, mels: torch.Tensor, mask: torch.Tensor):
        """Teacher forcing: memory (B, S, E), target mels (B, n_mel, T), mask (B, S) True at
        padded text. Step t reads target frame t - 1 (a zero frame at t = 0). Returns mel
        frames (B, n_mel, T), gate logits (B, T) and the attention weights (B, T, S)."""
        c = self.config
        B, S, E = memory.shape
        go = memory.new_zeros(1, B, c.n_mel_channels)
        previous_frames = torch.cat((go, mels.permute(2, 0, 1)[:-1]), 0)
        prenet_out = self.prenet(previous_frames)
        processed_memory = self.attention_layer.memory_layer(memory)

        attention_state = (memory.new_zeros(B, c.attention_rnn_dim),) * 2
        decoder_state = (memory.new_zeros(B, c.decoder_rnn_dim),) * 2
        weights = weights_cum = memory.new_zeros(B, S)
        context = memory.new_zeros(B, E)
        frames, gates, alignments = [], [], []
        for prenet_t in prenet_out:
            h, cell = self.attention_rnn(torch.cat((prenet_t, context), 1), attention_state)
            # The dropped-out output is also the next step's hidden state.
            h = F.dropout(h, c.p_attention_dropout, self.training)
            attention_state = (h, cell)
            context, weights = self.attention_layer(h, memory, processed_memory,
                                                    torch.stack((weights, weights_cum), 1), mask)
            weights_cum = weights_cum + weights
            dh, dcell = self.decoder_rnn(torch.cat((h, context), 1), decoder_state)
            dh = F.dropout(dh, c.p_decoder_dropout, self.training)
            decoder_state = (dh, dcell)
            features = torch.cat((dh, context), 1)
            frames.append(self.linear_projection(features))
            gates.append(self.gate_layer(features))
            alignments.append(weights)
        return torch.stack(frames, 2), torch.cat(gates, 1), torch.stack(alignments, 1)


class Postnet(nn.Module):
    def __init__(self, config: Tacotron2Config):
        super().__init__()
        M, P = config.n_mel_channels, config.postnet_embedding_dim
        channels = [M] + [P] * (config.postnet_n_convolutions - 1) + [M]
        last = len(channels) - 2
        self.p_dropout = config.p_conv_dropout
        self.convolutions = nn.ModuleList(
            conv_batchnorm(i, o, config.postnet_kernel_size, "linear" if k == last else "tanh")
            for k, (i, o) in enumerate(zip(channels[:-1], channels[1:])))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel
        for k, conv in enumerate(self.convolutions):
            x = conv(x)
            if k < len(self.convolutions) - 1:
                x = torch.tanh(x)
            x = F.dropout(x, self.p_dropout, self.training)
        return x


class Tacotron2Output(NamedTuple):
    mel: torch.Tensor            # (B, n_mel, T) the decoder's frames, 0 past each length
    mel_postnet: torch.Tensor    # (B, n_mel, T) after the postnet's residual, 0 likewise
    gate: torch.Tensor           # (B, T) stop-gate logits, a sure stop past each length
    alignments: torch.Tensor     # (B, T, S) the attention weights of every step


class Tacotron2(nn.Module):
    def __init__(self, config: Tacotron2Config = Tacotron2Config(),
                 attention_factory: AttentionFactory = Attention):
        super().__init__()
        if config.symbols_embedding_dim != config.encoder_embedding_dim:
            raise ValueError("config: symbols_embedding_dim must equal encoder_embedding_dim "
                             "(the encoder's convolutions read the embeddings), got "
                             f"{config.symbols_embedding_dim} and {config.encoder_embedding_dim}")
        self.config = config
        self.embedding = nn.Embedding(config.n_symbols, config.symbols_embedding_dim)
        # Xavier-uniform bound over (symbols, embedding dim).
        bound = math.sqrt(6.0 / (config.n_symbols + config.symbols_embedding_dim))
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, attention_factory)
        self.postnet = Postnet(config)

    def forward(self, text, text_lengths, mels, output_lengths) -> Tacotron2Output:
        """text (B, N) symbol ids, text_lengths (B,) in [1, N], mels (B, n_mel, T) targets
        (teacher forcing), output_lengths (B,) in [1, T]."""
        memory = self.encoder(self.embedding(text).transpose(1, 2), text_lengths)
        mel, gate, alignments = self.decoder(memory, mels, padding_mask(text_lengths,
                                                                        text.shape[1]))
        mel_postnet = mel + self.postnet(mel)
        # Past its length a prediction is set to the targets' padding (zero frames, stop),
        # so padded frames add no error and no gradient.
        padded = padding_mask(output_lengths, mels.shape[2])
        return Tacotron2Output(mel.masked_fill(padded[:, None], 0.0),
                               mel_postnet.masked_fill(padded[:, None], 0.0),
                               gate.masked_fill(padded, 1e3), alignments)


def padding_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool, True at positions j >= lengths[b] (padding)."""
    return torch.arange(size, device=lengths.device)[None, :] >= lengths[:, None]


def gate_targets(output_lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) float: 1 from each sequence's last frame on (stop), 0 before."""
    return (torch.arange(frames, device=output_lengths.device)[None, :]
            >= output_lengths[:, None] - 1).float()


def tacotron2_loss(out: Tacotron2Output, mels: torch.Tensor,
                   output_lengths: torch.Tensor) -> torch.Tensor:
    gate = gate_targets(output_lengths, mels.shape[2])
    return (F.mse_loss(out.mel, mels) + F.mse_loss(out.mel_postnet, mels)
            + F.binary_cross_entropy_with_logits(out.gate, gate))


# ----------------------------------------------------------------------------- data, step

class Batch(NamedTuple):
    text: torch.Tensor            # (B, N) int64, 0 (the pad symbol) past each length
    text_lengths: torch.Tensor    # (B,) int64, longest first, the first of length N
    mels: torch.Tensor            # (B, n_mel, T) float32, 0 past each length
    output_lengths: torch.Tensor  # (B,) int64, the first of length T


def synthetic_batch(batch_size: int, chars: int, frames: int, *,
                    config: Tacotron2Config = Tacotron2Config(), seed: int = 0,
                    device="cpu") -> Batch:
    """A seeded batch of random symbols and random mel frames: text lengths uniform in
    [N/2, N] sorted longest first (as NVIDIA/tacotron2's collate sorts them), output lengths
    uniform in [T/2, T]; the first element has the full N and T, so the padded sizes are
    exactly chars and frames."""
    for name, value in (("batch_size", batch_size), ("chars", chars), ("frames", frames)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    gen = torch.Generator().manual_seed(seed)
    text_lengths = torch.randint(max(1, chars // 2), chars + 1, (batch_size,), generator=gen)
    text_lengths[0] = chars
    text_lengths = text_lengths.sort(descending=True).values
    text = torch.randint(1, config.n_symbols, (batch_size, chars), generator=gen)
    text = text.masked_fill(padding_mask(text_lengths, chars), 0)
    output_lengths = torch.randint(max(1, frames // 2), frames + 1, (batch_size,), generator=gen)
    output_lengths[0] = frames
    mels = torch.randn(batch_size, config.n_mel_channels, frames, generator=gen)
    mels = mels.masked_fill(padding_mask(output_lengths, frames)[:, None], 0.0)
    return Batch(*(t.to(device) for t in (text, text_lengths, mels, output_lengths)))


def train_step(model: Tacotron2, batch: Batch, *, seed: int = 0) -> torch.Tensor:
    """One teacher-forced training step, forward and backward, from gradients set to None
    (no optimizer step: the weights stay the same, so repeated steps and models loaded
    with the same state_dict do the same work). Dropout is drawn from `seed`. Returns the
    loss, detached."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = tacotron2_loss(model(*batch), batch.mels, batch.output_lengths)
    loss.backward()
    return loss.detach()


@dataclass(frozen=True)
class SavedBytes:
    """Bytes of the tensors autograd keeps for the backward, each storage counted once."""
    total: int
    attention: int   # saved while the decoder's attention_layer runs its forward
    parameters: int  # the weights among them (saved by the layers that use them)


def saved_tensor_bytes(model: Tacotron2, batch: Batch, *, seed: int = 0) -> SavedBytes:
    """The saved-for-backward bytes of one training step's forward (train_step's), counted
    by a saved_tensors_hooks pack hook over each saved tensor's storage. The attention's
    share is what is saved between the attention_layer's forward pre-hook and forward hook;
    a storage saved both inside and outside (the memory) counts in both. The graph is freed
    without a backward."""
    total, attention = {}, {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        total[key] = storage.nbytes()
        if inside[0]:
            attention[key] = storage.nbytes()
        return t

    def enter(module, args):
        inside[0] = True

    def leave(module, args, output):
        inside[0] = False

    layer = model.decoder.attention_layer
    handles = [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    model.train()
    torch.manual_seed(seed)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = tacotron2_loss(model(*batch), batch.mels, batch.output_lengths)
    finally:
        for h in handles:
            h.remove()
    del loss
    params = {(str(p.device), p.untyped_storage().data_ptr()) for p in model.parameters()}
    return SavedBytes(total=sum(total.values()), attention=sum(attention.values()),
                      parameters=sum(n for k, n in total.items() if k in params))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
