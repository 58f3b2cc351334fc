"""Luong and Bahdanau decoders over the fused attention layers, with an incremental decoding
state that beams reorder.

Both decoders take the layer's precomputed memory (``decoder.attention.precompute``, once
per source batch) and call one fused attention op per step. Query rows index that memory
with ``state.memory_index``, so beams of a sentence share its rows instead of copies.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..nn import BahdanauAttention, LuongAttention, PrecomputedMemory
from .rnn import cell_step, rnn_cell

Tensor = torch.Tensor


class DecoderState(NamedTuple):
    """What a decoder carries from one step to the next, one row per query row.

    hidden: the RNN state, (layers, N, hidden_size) tensors ((h, c) for an LSTM, (h,) for a
        GRU). input_feed: the previous attentional hidden (N, hidden_size) (Luong with input
        feeding), else None. memory_index: (N,) memory row of each query row, or None for
        one row per sentence. A NamedTuple, so torch.export takes it as an input."""

    hidden: Tuple[Tensor, ...]
    input_feed: Optional[Tensor]
    memory_index: Optional[Tensor]

    def reorder(self, indices: Tensor) -> "DecoderState":
        """The state of rows ``indices`` (beams' back-pointers, finished sentences dropped)."""
        return DecoderState(
            tuple(h.index_select(1, indices) for h in self.hidden),
            None if self.input_feed is None else self.input_feed.index_select(0, indices),
            None if self.memory_index is None else self.memory_index.index_select(0, indices),
        )


class _Decoder(nn.Module):
    """Embeddings, the RNN and the output projection shared by both decoders."""

    attention: nn.Module

    def __init__(self, kind, vocab_size, embed_dim, hidden_size, memory_dim, num_layers, cell,
                 dropout, pad_idx, rnn_input, config):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                            ("hidden_size", hidden_size), ("memory_dim", memory_dim),
                            ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= pad_idx < vocab_size:
            raise ValueError(f"pad_idx must lie in [0, vocab_size) = [0, {vocab_size}), "
                             f"got {pad_idx}")
        self.kind, self._config = kind, config
        self.vocab_size, self.hidden_size, self.cell = vocab_size, hidden_size, cell
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.dropout = nn.Dropout(dropout)
        self.rnn = rnn_cell(cell)(rnn_input, hidden_size, num_layers=num_layers,
                                  batch_first=True, dropout=dropout if num_layers > 1 else 0.0)

    @property
    def config(self) -> dict:
        """The constructor's arguments: ``type(decoder)(**decoder.config)`` builds its like."""
        return dict(self._config)

    def _run_rnn(self, x: Tensor, hidden: Tuple[Tensor, ...]):
        """The RNN over all steps of x (B, T, input) at once (cuDNN on a GPU)."""
        out, new = self.rnn(x, hidden if self.cell == "lstm" else hidden[0])
        return out, (new if isinstance(new, tuple) else (new,))

    def _rnn_step(self, x: Tensor, hidden: Tuple[Tensor, ...]):
        """One step of the RNN for x (N, input): its output (N, hidden_size) and the new
        hidden state. The RNN's own weights, layer by layer through the cell ops
        (torch.lstm_cell, torch.gru_cell; one fused kernel on a GPU) with the RNN's dropout
        between layers: one step through nn.LSTM takes cuDNN's sequence API, whose set-up
        on the host costs more than the step's work."""
        rnn = self.rnn
        states = []
        for layer in range(rnn.num_layers):
            states.append(cell_step(rnn, layer, x, tuple(h[layer] for h in hidden)))
            x = states[-1][0]
            if layer < rnn.num_layers - 1 and rnn.dropout > 0:
                x = nn.functional.dropout(x, rnn.dropout, self.training)
        # One layer's state is a view, not a copy: a decode step is launch-bound on a GPU.
        return x, tuple(torch.stack(parts) if len(parts) > 1 else parts[0].unsqueeze(0)
                        for parts in zip(*states))

    def init_state(self, encoder_state: Tuple[Tensor, ...],
                   memory_index: Optional[Tensor] = None) -> DecoderState:
        """The first step's state from the encoder's bridged state (rows per sentence); with
        memory_index, row r starts from sentence memory_index[r]."""
        hidden = encoder_state if memory_index is None else tuple(
            h.index_select(1, memory_index) for h in encoder_state)
        return DecoderState(hidden, self._initial_feed(hidden[0]), memory_index)

    def _initial_feed(self, h: Tensor) -> Optional[Tensor]:
        return None

    def step(self, tokens: Tensor, state: DecoderState, memory: PrecomputedMemory):
        """One step for N rows: tokens (N,). Returns logits (N, V), weights (N, S), state."""
        features, weights, state = self._features(self.dropout(self.embedding(tokens)), state,
                                                  memory)
        return self.out(self.dropout(features)), weights, state

    def forward(self, tgt_in: Tensor, state: DecoderState, memory: PrecomputedMemory):
        """Teacher forcing: tgt_in (B, T) token ids (bos first). Returns logits (B, T, V) and
        the attention weights (B, T, S).

        The steps run one after another, but the embedding and the output projection, which
        depend on no earlier step, run once over all T steps: one large matrix product
        instead of T small ones, and one weight gradient instead of T accumulated."""
        embedded = self.dropout(self.embedding(tgt_in))
        features, weights = [], []
        # unbind, not embedded[:, t]: a slice's backward writes a zero gradient of the whole
        # of embedded per step; unbind's is one stack.
        for x in embedded.unbind(1):
            f, w, state = self._features(x, state, memory)
            features.append(f)
            weights.append(w)
        return (self.out(self.dropout(torch.stack(features, 1))), torch.stack(weights, 1))


class LuongDecoder(_Decoder):
    """Luong et al. 2015: the RNN step, then global attention from its output h_t,
    attentional hidden ``tanh(W_c [c_t; h_t])``, logits from it. With input feeding, the
    previous attentional hidden is concatenated to the embedding. Without it, teacher
    forcing runs the RNN over all target steps at once (cuDNN on a GPU) and attention once
    with Tq = T."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int,
                 memory_dim: Optional[int] = None, num_layers: int = 1, cell: str = "lstm",
                 score: str = "dot", input_feeding: bool = True, dropout: float = 0.0,
                 pad_idx: int = 0):
        memory_dim = hidden_size if memory_dim is None else memory_dim
        config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                      memory_dim=memory_dim, num_layers=num_layers, cell=cell, score=score,
                      input_feeding=input_feeding, dropout=dropout, pad_idx=pad_idx)
        rnn_input = embed_dim + (hidden_size if input_feeding else 0)
        super().__init__("luong", vocab_size, embed_dim, hidden_size, memory_dim, num_layers,
                         cell, dropout, pad_idx, rnn_input, config)
        self.input_feeding = input_feeding
        self.attention = LuongAttention(hidden_size, memory_dim, score=score, attentional=True)
        self.out = nn.Linear(hidden_size, vocab_size)

    def _initial_feed(self, h: Tensor) -> Optional[Tensor]:
        return h.new_zeros(h.shape[1:]) if self.input_feeding else None

    def _features(self, x: Tensor, state: DecoderState, memory: PrecomputedMemory):
        """One step from the embedded tokens x (N, E): the attentional hidden (N, H), the
        weights (N, S) and the next state."""
        if self.input_feeding:
            x = torch.cat([x, state.input_feed], dim=-1)
        out, hidden = self._rnn_step(x, state.hidden)
        attn_h, weights = self.attention(out, memory, memory_index=state.memory_index)
        feed = attn_h if self.input_feeding else None
        return attn_h, weights, DecoderState(hidden, feed, state.memory_index)

    def forward(self, tgt_in: Tensor, state: DecoderState, memory: PrecomputedMemory):
        if self.input_feeding:
            return super().forward(tgt_in, state, memory)
        out, _ = self._run_rnn(self.dropout(self.embedding(tgt_in)), state.hidden)
        attn_h, weights = self.attention(out, memory, memory_index=state.memory_index)
        return self.out(self.dropout(attn_h)), weights


class BahdanauDecoder(_Decoder):
    """Bahdanau et al. 2015: additive attention from the previous state's top layer, the
    context concatenated to the embedding as the RNN input, logits from [h_t; c_t; e_t]."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int,
                 memory_dim: Optional[int] = None, attention_units: Optional[int] = None,
                 num_layers: int = 1, cell: str = "lstm", normalize: bool = False,
                 dropout: float = 0.0, pad_idx: int = 0):
        memory_dim = hidden_size if memory_dim is None else memory_dim
        attention_units = hidden_size if attention_units is None else attention_units
        config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                      memory_dim=memory_dim, attention_units=attention_units,
                      num_layers=num_layers, cell=cell, normalize=normalize, dropout=dropout,
                      pad_idx=pad_idx)
        super().__init__("bahdanau", vocab_size, embed_dim, hidden_size, memory_dim,
                         num_layers, cell, dropout, pad_idx, embed_dim + memory_dim, config)
        self.attention = BahdanauAttention(hidden_size, memory_dim, attention_units,
                                           normalize=normalize)
        self.out = nn.Linear(hidden_size + memory_dim + embed_dim, vocab_size)

    def _features(self, emb: Tensor, state: DecoderState, memory: PrecomputedMemory):
        """One step from the embedded tokens emb (N, E): [h_t; c_t; e_t] (N, H + D + E), the
        weights (N, S) and the next state."""
        context, weights = self.attention(state.hidden[0][-1], memory,
                                          memory_index=state.memory_index)
        out, hidden = self._rnn_step(torch.cat([emb, context], dim=-1), state.hidden)
        features = torch.cat([out, context, emb], dim=-1)
        return features, weights, DecoderState(hidden, None, state.memory_index)


DECODERS = {"luong": LuongDecoder, "bahdanau": BahdanauDecoder}
