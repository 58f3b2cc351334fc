"""The RNN encoder: embeddings, a packed (bidirectional) LSTM or GRU, and the bridge from its
final state to the decoder's."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

Tensor = torch.Tensor

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def rnn_cell(cell: str):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {cell!r}")
    return CELLS[cell]


def cell_step(rnn: nn.RNNBase, layer: int, x: Tensor, state: Tuple[Tensor, ...],
              reverse: bool = False) -> Tuple[Tensor, ...]:
    """One step of the cell of rnn's layer (its reverse direction with reverse) for x
    (N, input) from state ((h, c) for an LSTM, (h,) for a GRU, each (N, hidden)): the new
    state, by torch.lstm_cell or torch.gru_cell on the RNN's own weights."""
    suffix = "_reverse" if reverse else ""
    weights = [getattr(rnn, f"{name}_l{layer}{suffix}")
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if isinstance(rnn, nn.LSTM):
        return torch.lstm_cell(x, state, *weights)
    return (torch.gru_cell(x, state[0], *weights),)


def _packed_direction(rnn: nn.RNNBase, layer: int, steps, batch_sizes: list, reverse: bool):
    """One direction of one layer of rnn over the packed steps (step t: batch_sizes[t] rows,
    sorted by length): its outputs per step and its final state, rows in packed order."""
    T = len(batch_sizes)
    outs = [None] * T

    def zeros(rows: int) -> Tensor:
        return steps[0].new_zeros(rows, rnn.hidden_size)

    n_states = 2 if isinstance(rnn, nn.LSTM) else 1
    if reverse:
        # Backwards in time the batch grows: a sequence starts at its last step.
        state = tuple(zeros(batch_sizes[-1]) for _ in range(n_states))
        for t in reversed(range(T)):
            new = batch_sizes[t] - state[0].shape[0]
            if new:
                state = tuple(torch.cat([s, zeros(new)]) for s in state)
            state = cell_step(rnn, layer, steps[t], state, reverse=True)
            outs[t] = state[0]
        return outs, state
    # The batch shrinks as sequences end: the rows that leave keep their state.
    state = tuple(zeros(batch_sizes[0]) for _ in range(n_states))
    ended = []
    for t in range(T):
        gone = state[0].shape[0] - batch_sizes[t]
        if gone:
            parts = [s.split([batch_sizes[t], gone]) for s in state]
            state = tuple(p[0] for p in parts)
            ended.append(tuple(p[1] for p in parts))
        state = cell_step(rnn, layer, steps[t], state)
        outs[t] = state[0]
    # Rows in order: the longest sequences' state first, the earliest ended last.
    return outs, tuple(torch.cat(rows) for rows in zip(state, *reversed(ended)))


def packed_rnn_steps(rnn: nn.RNNBase, data: Tensor, batch_sizes: list):
    """What ``rnn`` returns for the packed sequence (data, batch_sizes): the output's data
    and the final states ((h, c) for an LSTM, (h,) for a GRU, each (layers * directions, B,
    hidden)) with the batch in its packed (sorted) order, one step at a time through
    cell_step.

    PyTorch's own packed RNN on the CPU cuts each step's input gates out of one tensor of
    all steps with narrow, whose backward writes a zeroed gradient of that whole tensor per
    step: quadratic in the length. Here each layer's input is cut into steps by one split,
    whose backward is one cat."""
    finals, x = [], data
    for layer in range(rnn.num_layers):
        if layer and rnn.dropout > 0:
            x = nn.functional.dropout(x, rnn.dropout, rnn.training)
        steps = x.split(batch_sizes)
        outputs = []
        for reverse in (False, True)[:2 if rnn.bidirectional else 1]:
            outs, final = _packed_direction(rnn, layer, steps, batch_sizes, reverse)
            outputs.append(torch.cat(outs))
            finals.append(final)
        x = torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]
    return x, tuple(torch.stack(parts) for parts in zip(*finals))


def check_tokens(tokens: Tensor, name: str, vocab_size: int) -> None:
    """tokens: an integer (B, T) tensor of ids in [0, vocab_size), B and T >= 1."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, "
                        f"got dtype {tokens.dtype}")
    if tokens.dim() != 2 or 0 in tokens.shape:
        raise ValueError(f"{name} must have shape (B, T) with B, T >= 1, "
                         f"got {tuple(tokens.shape)}")
    if not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): "
                         f"min {int(tokens.min())}, max {int(tokens.max())}")


def check_lengths(lengths: Tensor, name: str, batch: int, max_len: int) -> Tensor:
    """lengths: integer (B,) in [1, max_len]; returned as int64 on the CPU, as
    pack_padded_sequence takes them (one copy per source batch, never per step)."""
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int64, torch.int32):
        got = lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {got}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    host = lengths.to("cpu", torch.int64)
    if int(host.min()) < 1:
        raise ValueError(f"{name} must be >= 1: empty source sequences cannot be attended to "
                         f"(got a length of {int(host.min())})")
    if int(host.max()) > max_len:
        raise ValueError(f"{name} must be <= the padded length {max_len}, got {int(host.max())}")
    return host


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
    ``decoder_layers`` layers (the encoder's last layers when it has more).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int = 1,
                 cell: str = "lstm", bidirectional: bool = True, dropout: float = 0.0,
                 padding_idx: int = 0, decoder_hidden_size: Optional[int] = None,
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
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx must lie in [0, vocab_size) = [0, {vocab_size}), "
                             f"got {padding_idx}")
        decoder_hidden_size = hidden_size if decoder_hidden_size is None else decoder_hidden_size
        decoder_layers = num_layers if decoder_layers is None else decoder_layers
        if decoder_layers > num_layers:
            raise ValueError(f"decoder_layers must be <= num_layers = {num_layers}, "
                             f"got {decoder_layers}")
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
                           num_layers=num_layers, cell=cell, bidirectional=bidirectional,
                           dropout=dropout, padding_idx=padding_idx,
                           decoder_hidden_size=decoder_hidden_size,
                           decoder_layers=decoder_layers)
        self.vocab_size, self.hidden_size, self.cell = vocab_size, hidden_size, cell
        self.decoder_layers = decoder_layers
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.dropout = nn.Dropout(dropout)
        directions = 2 if bidirectional else 1
        self.rnn = rnn(embed_dim, hidden_size // directions, num_layers=num_layers,
                       batch_first=True, bidirectional=bidirectional,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.directions = directions
        states = 2 if cell == "lstm" else 1
        self.bridge = nn.ModuleList(nn.Linear(hidden_size, decoder_hidden_size)
                                    for _ in range(states))

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

