"""The RNN helpers the encoder and the decoders share: the cell types, one step of a layer's
cell on the RNN's own weights, and a packed RNN run one step at a time."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

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
