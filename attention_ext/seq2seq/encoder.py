"""The RNN encoder: embeddings, a packed (bidirectional) LSTM or GRU, and the bridge from its
final state to the decoder's."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .checks import check_lengths, check_tokens
from .rnn import packed_rnn_steps, rnn_cell

Tensor = torch.Tensor


def _padded(data: Tensor, batch_sizes: Tensor, lengths: Tensor, unsorted: Tensor,
            total_length: int) -> Tensor:
    """The (B, total_length, H) batch-first tensor of the packed sequence (data,
    batch_sizes), zeros past each length, by one gather. pad_packed_sequence writes one
    time step at a time into slices of its output, and its backward copies the whole
    output once per step (quadratic in the length); the gather's backward is one
    scatter-add.

    Packed data is time-major: step t holds batch_sizes[t] rows, one per sequence still
    running, in sorted order; sequence b is row unsorted[b] of every step. The index is
    built on the host from host tensors (batch_sizes, lengths, unsorted)."""
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes
    steps = torch.arange(total_length)
    rows = starts[steps.clamp(max=len(batch_sizes) - 1)].unsqueeze(0) + unsorted.unsqueeze(1)
    rows = torch.where(steps.unsqueeze(0) < lengths.unsqueeze(1), rows, data.shape[0])
    padded = torch.cat([data, data.new_zeros(1, data.shape[1])])
    return padded[rows.to(data.device, non_blocking=True)]


class Encoder(nn.Module):
    """Embeddings and a packed RNN over the source.

    With ``bidirectional`` each direction has ``hidden_size // 2`` units, so the memory is
    (B, S, hidden_size) either way. The final states of the directions are concatenated per
    layer and bridged to the decoder's state by ``tanh(Linear(.))`` (one per state tensor:
    h, and c for an LSTM), for a decoder of ``decoder_hidden_size`` units and
    ``decoder_layers`` layers (the encoder's last layers when it has more): by default the
    encoder's own hidden_size and num_layers.

    ``pad_idx`` is the source vocabulary's padding id, the one the target vocabulary uses
    too; a source sequence needs no begin or end token.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int = 1,
                 cell: str = "lstm", bidirectional: bool = True, dropout: float = 0.0,
                 pad_idx: int = 0, decoder_hidden_size: Optional[int] = None,
                 decoder_layers: Optional[int] = None):
        super().__init__()
        rnn = rnn_cell(cell)
        if bidirectional and hidden_size % 2:
            raise ValueError(f"hidden_size must be even with bidirectional=True (two directions "
                             f"of hidden_size // 2), got {hidden_size}")
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                            ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= pad_idx < vocab_size:
            raise ValueError(f"pad_idx must lie in [0, vocab_size) = [0, {vocab_size}), "
                             f"got {pad_idx}")
        decoder_hidden_size = hidden_size if decoder_hidden_size is None else decoder_hidden_size
        decoder_layers = num_layers if decoder_layers is None else decoder_layers
        if decoder_layers > num_layers:
            raise ValueError(f"decoder_layers must be <= num_layers = {num_layers}, "
                             f"got {decoder_layers}")
        self._config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_layers=num_layers, cell=cell, bidirectional=bidirectional,
                           dropout=dropout, pad_idx=pad_idx,
                           decoder_hidden_size=decoder_hidden_size,
                           decoder_layers=decoder_layers)
        self.vocab_size, self.hidden_size, self.cell = vocab_size, hidden_size, cell
        self.decoder_layers = decoder_layers
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.dropout = nn.Dropout(dropout)
        directions = 2 if bidirectional else 1
        self.rnn = rnn(embed_dim, hidden_size // directions, num_layers=num_layers,
                       batch_first=True, bidirectional=bidirectional,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.directions = directions
        states = 2 if cell == "lstm" else 1
        self.bridge = nn.ModuleList(nn.Linear(hidden_size, decoder_hidden_size)
                                    for _ in range(states))

    @property
    def config(self) -> dict:
        """The constructor's arguments: ``Encoder(**encoder.config)`` builds its like."""
        return dict(self._config)

    def forward(self, src: Tensor, src_lengths: Tensor):
        """src: (B, S) token ids; src_lengths: integer (B,) in [1, S].

        Returns (memory (B, S, hidden_size) with zeros past each length, src_lengths as int64
        on src's device, the decoder's initial state: a tuple of (decoder_layers, B,
        decoder_hidden_size) tensors, (h, c) for an LSTM, (h,) for a GRU)."""
        check_tokens(src, "src", self.vocab_size)
        B, S = src.shape
        lengths = check_lengths(src_lengths, "src_lengths", B, S)
        emb = self.dropout(self.embedding(src))
        # Sorted by length on the host, so that no index ever comes back from the device
        # (pack_padded_sequence's own sorting keeps its inverse on the device only).
        order = torch.sort(lengths, descending=True, stable=True)[1]
        unsorted = torch.empty_like(order).scatter_(0, order, torch.arange(B))
        on_device = torch.stack([order, unsorted]).to(src.device, non_blocking=True)
        packed = pack_padded_sequence(emb.index_select(0, on_device[0]), lengths[order],
                                      batch_first=True)
        if packed.data.device.type == "cpu" and torch.is_grad_enabled():
            # Training on the CPU: the step loop's backward is linear in the length.
            data, finals = packed_rnn_steps(self.rnn, packed.data, packed.batch_sizes.tolist())
            finals = tuple(f.index_select(1, on_device[1]) for f in finals)
        else:
            out, final = self.rnn(PackedSequence(packed.data, packed.batch_sizes,
                                                 on_device[0], on_device[1]))
            data, finals = out.data, final if isinstance(final, tuple) else (final,)
        memory = _padded(data, packed.batch_sizes, lengths, unsorted, S)
        bridged = tuple(torch.tanh(lin(self._layers(f))) for lin, f in zip(self.bridge, finals))
        return self.dropout(memory), lengths.to(src.device), bridged

    def _layers(self, state: Tensor) -> Tensor:
        """(layers * directions, B, H / directions) -> the last decoder_layers layers with
        their directions concatenated, (decoder_layers, B, hidden_size)."""
        L = state.shape[0] // self.directions
        state = state.view(L, self.directions, *state.shape[1:])
        state = torch.cat(state.unbind(1), dim=-1)
        return state[L - self.decoder_layers:]

