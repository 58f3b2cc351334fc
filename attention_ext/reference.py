"""Pure-PyTorch attention with the same semantics as the fused ops.

The test oracle (run in float64) and the eager baseline of the benchmarks (run in the
input dtype, as a user would write it): several kernels and a masked_fill with -inf.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def valid_positions(
    lengths: Optional[Tensor], mask: Optional[Tensor], batch: int, src_len: int, device
) -> Optional[Tensor]:
    """(B, S) bool, True where a position attends; None when everything attends."""
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both")
    if lengths is not None:
        return torch.arange(src_len, device=device)[None, :] < lengths.to(device)[:, None]
    if mask is not None:
        return mask.to(device=device, dtype=torch.bool)
    return None


def masked_softmax(scores: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim of (B, Tq, S) scores; rows with nothing valid give 0."""
    if valid is None:
        return torch.softmax(scores, dim=-1)
    keep = valid[:, None, :]
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    # A fully masked row is NaN after softmax; zero it like the fused kernels do.
    return weights.masked_fill(~keep, 0.0)


def tile_memory(memory_index: Optional[Tensor], *memory):
    """The memory-side tensors (keys, values, lengths, mask; None passes through) with
    row b = row memory_index[b]: what memory_index spares the fused ops, done by copying."""
    if memory_index is None:
        return memory
    return tuple(None if t is None else t.index_select(0, memory_index.to(t.device))
                 for t in memory)


def _weighted_values(scores: Tensor, values: Tensor, lengths, mask, single: bool,
                     need_weights: bool):
    """Both ops' tail: the masked softmax of scores (B, Tq, S) and the context, in the
    query's rank."""
    valid = valid_positions(lengths, mask, values.shape[0], values.shape[1], values.device)
    weights = masked_softmax(scores, valid)
    context = torch.bmm(weights, values)
    if single:
        context, weights = context.squeeze(1), weights.squeeze(1)
    return context, (weights if need_weights else None)


def dot_attention(
    query: Tensor,
    keys: Tensor,
    values: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    single = query.dim() == 2
    q = query.unsqueeze(1) if single else query
    values = keys if values is None else values
    keys, values, lengths, mask = tile_memory(memory_index, keys, values, lengths, mask)
    scores = torch.bmm(q, keys.transpose(1, 2))
    if scale is not None and scale != 1.0:
        scores = scores * scale
    return _weighted_values(scores, values, lengths, mask, single, need_weights)


def additive_attention(
    query_proj: Tensor,
    keys_proj: Tensor,
    v: Tensor,
    values: Tensor,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Bahdanau attention as users write it: a B x Tq x S x A tanh tensor, then v."""
    keys_proj, values, lengths, mask = tile_memory(memory_index, keys_proj, values, lengths, mask)
    single = query_proj.dim() == 2
    q = query_proj.unsqueeze(1) if single else query_proj
    hidden = torch.tanh(q[:, :, None, :] + keys_proj[:, None, :, :])  # (B, Tq, S, A)
    scores = torch.matmul(hidden, v)
    return _weighted_values(scores, values, lengths, mask, single, need_weights)


def window_positions(window: Optional[Tensor], batch: int, src_len: int, device) -> Optional[Tensor]:
    """(B, S) bool, True inside each row's attended window [start, end); None without one."""
    if window is None:
        return None
    j = torch.arange(src_len, device=device)[None, :]
    window = window.to(device)
    return (j >= window[:, :1]) & (j < window[:, 1:])


def location_attention(
    query_proj: Tensor,
    keys_proj: Tensor,
    prev: Tensor,
    conv_weight: Tensor,
    location_weight: Tensor,
    v: Tensor,
    values: Tensor,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    window: Optional[Tensor] = None,
    score_bias: Optional[Tensor] = None,
    scale: float = 1.0,
    normalization: str = "softmax",
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Location-sensitive attention (Chorowski 2015; Tacotron 2) as users write it, one
    decoder step: a convolution over the previous weights, a dense projection of it, then
    a B x S x A tanh tensor and v."""
    keys_proj, values, lengths, mask = tile_memory(memory_index, keys_proj, values, lengths, mask)
    batch, src_len = prev.shape[0], prev.shape[2]
    taps = conv_weight.shape[-1]
    location = torch.nn.functional.conv1d(prev, conv_weight, padding=(taps - 1) // 2)
    location = torch.nn.functional.linear(location.transpose(1, 2), location_weight)  # (B, S, A)
    hidden = torch.tanh(query_proj[:, None, :] + keys_proj + location)
    scores = torch.matmul(hidden, v) * scale
    if score_bias is not None:
        scores = scores + score_bias
    valid = valid_positions(lengths, mask, batch, src_len, prev.device)
    inside = window_positions(window, batch, src_len, prev.device)
    if inside is not None:
        valid = inside if valid is None else valid & inside
    if normalization == "softmax":
        weights = masked_softmax(scores[:, None, :], valid)[:, 0]
    elif normalization == "sigmoid":
        weights = torch.sigmoid(scores)
        if valid is not None:
            weights = weights.masked_fill(~valid, 0.0)
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    else:
        raise ValueError(f"normalization must be 'softmax' or 'sigmoid', got {normalization!r}")
    context = torch.bmm(weights[:, None, :], values)[:, 0]
    return context, (weights if need_weights else None)
