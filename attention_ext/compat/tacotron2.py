"""NVIDIA/tacotron2's location-sensitive ``Attention`` on the fused op.

Semantics follow NVIDIA/tacotron2's ``model.py`` (``Attention``, ``LocationLayer``) and
``layers.py`` (``LinearNorm``, ``ConvNorm``) at commit 03727ad (master), which
SpeechBrain's ``speechbrain.lobes.models.Tacotron2`` ports with the same parameter names:
the same constructor, forward signature, state_dict keys and initial weights (Xavier
uniform with the same gains, drawn in the same order, so one seed gives the same layer).

Differences, all deliberate:
* a row whose every position is masked gets weights 0 and context 0 (NVIDIA's gives NaN);
* ``get_alignment_energies`` is kept for callers of it, in eager PyTorch; ``forward`` does
  not call it (the fused op computes the energies itself), so overriding it in a subclass
  does not change ``forward``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import location_attention


class LinearNorm(nn.Module):
    """nn.Linear (as ``linear_layer``) with Xavier-uniform weights of the gain of
    ``w_init_gain`` (torch.nn.init.calculate_gain)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True,
                 w_init_gain: str = "linear"):
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.linear_layer.weight, nn.init.calculate_gain(w_init_gain))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_layer(x)


class ConvNorm(nn.Module):
    """nn.Conv1d (as ``conv``) with Xavier-uniform weights as LinearNorm; padding None
    keeps the length (odd kernel_size)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 bias: bool = True, w_init_gain: str = "linear"):
        super().__init__()
        if padding is None:
            if kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd when padding is None (the padding "
                                 f"then keeps the length), got {kernel_size}")
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=kernel_size,
                              stride=stride, padding=padding, dilation=dilation, bias=bias)
        nn.init.xavier_uniform_(self.conv.weight, nn.init.calculate_gain(w_init_gain))

    def forward(self, signal: Tensor) -> Tensor:
        return self.conv(signal)


class LocationLayer(nn.Module):
    """The location features of the previous and cumulative weights: ``location_conv``
    (2 -> attention_n_filters channels, attention_kernel_size taps, no bias), then
    ``location_dense`` (-> attention_dim, no bias). Its forward, (B, 2, S) -> (B, S,
    attention_dim), is eager; the fused Attention reads its weights only."""

    def __init__(self, attention_n_filters: int, attention_kernel_size: int,
                 attention_dim: int):
        super().__init__()
        self.location_conv = ConvNorm(2, attention_n_filters, kernel_size=attention_kernel_size,
                                      padding=(attention_kernel_size - 1) // 2, bias=False)
        self.location_dense = LinearNorm(attention_n_filters, attention_dim, bias=False,
                                         w_init_gain="tanh")

    def forward(self, attention_weights_cat: Tensor) -> Tensor:
        return self.location_dense(self.location_conv(attention_weights_cat).transpose(1, 2))


class Attention(nn.Module):
    """Drop-in for NVIDIA/tacotron2's ``model.Attention``: location-sensitive attention over
    the previous and the cumulative weights, fused.

    energies[b, j] = v . tanh(query_layer(h[b]) + processed_memory[b, j]
                              + location_layer(attention_weights_cat[b])[j]),
    attention_weights = softmax over the unmasked positions, context = weights @ memory.

    Args:
        attention_rnn_dim: the query's (attention LSTM's) size.
        embedding_dim: the memory's (encoder's) size.
        attention_dim: A.
        attention_location_n_filters: F.
        attention_location_kernel_size: K, odd.
    """

    def __init__(self, attention_rnn_dim: int, embedding_dim: int, attention_dim: int,
                 attention_location_n_filters: int, attention_location_kernel_size: int):
        super().__init__()
        if attention_location_kernel_size % 2 == 0:
            raise ValueError(f"attention_location_kernel_size must be odd (the location "
                             f"convolution keeps the length), got "
                             f"{attention_location_kernel_size}")
        self.query_layer = LinearNorm(attention_rnn_dim, attention_dim, bias=False,
                                      w_init_gain="tanh")
        self.memory_layer = LinearNorm(embedding_dim, attention_dim, bias=False,
                                       w_init_gain="tanh")
        self.v = LinearNorm(attention_dim, 1, bias=False)
        self.location_layer = LocationLayer(attention_location_n_filters,
                                            attention_location_kernel_size, attention_dim)
        self.score_mask_value = -float("inf")

    def get_alignment_energies(self, query: Tensor, processed_memory: Tensor,
                               attention_weights_cat: Tensor) -> Tensor:
        """The unmasked energies (B, S) of query (B, attention_rnn_dim), processed_memory
        (B, S, attention_dim) and attention_weights_cat (B, 2, S), in eager PyTorch."""
        hidden = torch.tanh(self.query_layer(query)[:, None] + processed_memory
                            + self.location_layer(attention_weights_cat))
        return self.v(hidden).squeeze(-1)

    def forward(self, attention_hidden_state: Tensor, memory: Tensor, processed_memory: Tensor,
                attention_weights_cat: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """
        Args:
            attention_hidden_state: (B, attention_rnn_dim), the attention LSTM's output.
            memory: (B, S, embedding_dim), the encoder's output.
            processed_memory: (B, S, attention_dim) = ``memory_layer(memory)``, once per
                utterance.
            attention_weights_cat: (B, 2, S), the previous weights and their running sum.
            mask: bool (B, S), True at PADDED positions, or None.

        Returns:
            attention_context (B, embedding_dim), attention_weights (B, S).
        """
        location = self.location_layer
        return location_attention(
            self.query_layer(attention_hidden_state), processed_memory, attention_weights_cat,
            location.location_conv.conv.weight, location.location_dense.linear_layer.weight,
            self.v.linear_layer.weight[0], memory, mask=None if mask is None else ~mask)
