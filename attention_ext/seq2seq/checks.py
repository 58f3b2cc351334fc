"""Checks of the seq2seq models' inputs: token ids, lengths, and integer options."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def positive_int(value, name: str, minimum: int = 1) -> int:
    """value, an integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_tokens(tokens: Tensor, name: str, vocab_size: int, min_length: int = 1) -> None:
    """tokens: an integer (B, T) tensor of ids in [0, vocab_size), B >= 1, T >= min_length."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, "
                        f"got dtype {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < min_length:
        raise ValueError(f"{name} must have shape (B, T) with B >= 1, T >= {min_length}, "
                         f"got {tuple(tokens.shape)}")
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): "
                         f"min {int(tokens.min())}, max {int(tokens.max())}")


def check_lengths(lengths: Tensor, name: str, batch: int, max_len: int,
                  minimum: int = 1) -> Tensor:
    """lengths: integer (B,) in [minimum, max_len]; returned as int64 on the CPU, as
    pack_padded_sequence takes them (one copy per batch, never per step)."""
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int64, torch.int32):
        got = lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {got}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    host = lengths.to("cpu", torch.int64)
    if int(host.min()) < minimum:
        empty = ": empty source sequences cannot be attended to" if minimum else ""
        raise ValueError(f"{name} must be >= {minimum}{empty} (got a length of "
                         f"{int(host.min())})")
    if int(host.max()) > max_len:
        raise ValueError(f"{name} must be <= the padded length {max_len}, got {int(host.max())}")
    return host
