"""The Seq2Seq checkpoint: a dict of plain values and tensors (configuration, weights and the
user's metadata), loadable with ``torch.load(weights_only=True)``, so loading runs no
pickled code."""
from __future__ import annotations

import os
from typing import Tuple

import torch

FORMAT = "attention_ext.seq2seq/2"


def _v1_config(config: dict) -> dict:
    """Format 1 named the padding id ``padding_idx``."""
    def renamed(part):
        if not isinstance(part, dict):
            return part
        return {("pad_idx" if k == "padding_idx" else k): v for k, v in part.items()}

    return {**config, "encoder": renamed(config.get("encoder")),
            "decoder": renamed(config.get("decoder"))}


# What each format's configuration needs to read as today's.
_READERS = {FORMAT: lambda config: config, "attention_ext.seq2seq/1": _v1_config}


def check_plain(value, where: str) -> None:
    """value is made of what torch.load(weights_only=True) reads back: None, bool, int,
    float, str, and lists, tuples and str-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} must hold only plain values (None, bool, int, float, str, lists "
                    f"and dicts of them), got {type(value).__name__}")


def write_checkpoint(path, config: dict, state_dict: dict, metadata: dict) -> None:
    torch.save({"format": FORMAT, "config": config, "state_dict": state_dict,
                "metadata": metadata}, path)


def read_checkpoint(path, map_location) -> Tuple[dict, dict, dict]:
    """(config, state_dict, metadata) of the checkpoint at path, in today's format."""
    if not os.path.isfile(path):
        raise ValueError(f"path {os.fspath(path)!r} is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user error)
        raise ValueError(f"path {os.fspath(path)!r} is not a readable Seq2Seq checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not (isinstance(ckpt, dict) and ckpt.get("format") in _READERS
            and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("metadata", {}), dict)):
        raise ValueError(f"path {os.fspath(path)!r} is not a Seq2Seq checkpoint (format "
                         f"{FORMAT!r})")
    config = _READERS[ckpt["format"]](ckpt["config"])
    return config, ckpt["state_dict"], ckpt.get("metadata", {})
