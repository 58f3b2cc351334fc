"""Seq2Seq: an Encoder and a Luong or Bahdanau decoder, trained with teacher forcing and
decoded greedily or with beam search; saved as configuration + weights (no pickled code)."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .decoders import DECODERS, _Decoder
from .encoder import Encoder, check_tokens
from .search import (BeamSearchResult, CapturedBeamSearch, CapturedDecodings, CapturedGreedy,
                     LengthPenalty, beam_search, captured_key, greedy_decode)

Tensor = torch.Tensor

# The checkpoint format: a dict of plain values and tensors, loadable with weights_only=True.
_FORMAT = "attention_ext.seq2seq/1"

# Captured decodings (cuda_graph=True) a model keeps.
CUDA_GRAPHS_KEPT = 8


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Seq2Seq(nn.Module):
    """An encoder-decoder with attention over the encoder's memory.

    Token ids ``bos_idx`` and ``eos_idx`` start and end target sequences; ``pad_idx`` (the
    encoder's padding_idx) fills greedy outputs after the end token. The decoder's
    memory_dim must be the encoder's hidden_size and its hidden_size the encoder's
    decoder_hidden_size.

    Decoding with ``cuda_graph=True`` captures a step once per batch shape and options and
    keeps the capture (up to CUDA_GRAPHS_KEPT of them) for later calls;
    ``clear_cuda_graphs()`` frees them, and moving or casting the model drops them.
    """

    def __init__(self, encoder: Encoder, decoder: _Decoder, bos_idx: int = 1, eos_idx: int = 2):
        super().__init__()
        enc, dec = encoder.config, decoder.config
        if dec["memory_dim"] != enc["hidden_size"]:
            raise ValueError(f"decoder memory_dim ({dec['memory_dim']}) must be the encoder's "
                             f"hidden_size ({enc['hidden_size']})")
        if dec["hidden_size"] != enc["decoder_hidden_size"] or (
                dec["num_layers"] != enc["decoder_layers"]) or dec["cell"] != enc["cell"]:
            raise ValueError("the encoder's bridge must fit the decoder: decoder_hidden_size, "
                             "decoder_layers and cell of the encoder "
                             f"({enc['decoder_hidden_size']}, {enc['decoder_layers']}, "
                             f"{enc['cell']!r}) against the decoder's hidden_size, num_layers "
                             f"and cell ({dec['hidden_size']}, {dec['num_layers']}, "
                             f"{dec['cell']!r})")
        if dec["padding_idx"] != enc["padding_idx"]:
            raise ValueError(f"the decoder's padding_idx ({dec['padding_idx']}) must be the "
                             f"encoder's ({enc['padding_idx']})")
        for name, idx in (("bos_idx", bos_idx), ("eos_idx", eos_idx)):
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"{name} must be an integer token id, got {idx!r}")
            if not 0 <= idx < decoder.vocab_size:
                raise ValueError(f"{name} must lie in [0, {decoder.vocab_size}), got {idx}")
        if bos_idx == eos_idx:
            raise ValueError(f"bos_idx and eos_idx must differ, got {bos_idx} for both")
        if enc["padding_idx"] in (bos_idx, eos_idx):
            raise ValueError(f"bos_idx ({bos_idx}) and eos_idx ({eos_idx}) must differ from "
                             f"padding_idx ({enc['padding_idx']})")
        self.encoder, self.decoder = encoder, decoder
        self.bos_idx, self.eos_idx = bos_idx, eos_idx
        self.pad_idx = enc["padding_idx"]
        self.metadata: dict = {}
        self._cuda_graphs = CapturedDecodings(CUDA_GRAPHS_KEPT)

    def clear_cuda_graphs(self) -> None:
        """Frees the decodings captured by ``cuda_graph=True`` calls."""
        self._cuda_graphs.clear()

    def _apply(self, fn, *args, **kwargs):
        # The captured steps read the parameters where they were; .to(), .half() and the
        # like put them elsewhere.
        self.clear_cuda_graphs()
        return super()._apply(fn, *args, **kwargs)

    def config(self) -> dict:
        return dict(encoder=dict(self.encoder.config), decoder_type=self.decoder.kind,
                    decoder=dict(self.decoder.config), bos_idx=self.bos_idx,
                    eos_idx=self.eos_idx)

    def encode(self, src: Tensor, src_lengths: Tensor):
        """The encoder's memory, precomputed by the decoder's attention layer once for every
        step and beam, and the decoder's initial state (rows per sentence)."""
        memory, lengths, state = self.encoder(src, src_lengths)
        return self.decoder.attention.precompute(memory, lengths=lengths), state

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), src_lengths (B,), tgt_in (B, T) (bos first).
        Returns logits (B, T, V)."""
        check_tokens(tgt_in, "tgt_in", self.decoder.vocab_size)
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"tgt_in must have batch size {src.shape[0]} like src, "
                             f"got {tuple(tgt_in.shape)}")
        memory, state = self.encode(src, src_lengths)
        logits, _ = self.decoder(tgt_in, self.decoder.init_state(state), memory)
        return logits

    def _check_cuda_graph(self, cuda_graph) -> bool:
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        device = self.decoder.out.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, "
                             f"it is on {device}")
        return cuda_graph

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, max_len: int,
                      cuda_graph: bool = False) -> Tensor:
        """(B, L) token ids, L <= max_len: eos included, pad_idx after it.

        cuda_graph: run each step as the replay of a CUDA graph, captured at the first call
        of this batch shape and max_len (the same tokens; a decode step is otherwise bound
        by its kernel launches)."""
        _positive_int(max_len, "max_len")
        cuda_graph = self._check_cuda_graph(cuda_graph)
        memory, state = self.encode(src, src_lengths)
        args = (self.decoder, memory, state, self.bos_idx, self.eos_idx, self.pad_idx, max_len)
        if not cuda_graph:
            return greedy_decode(*args)
        key = captured_key(self.decoder, memory, "greedy", max_len, self.bos_idx,
                           self.eos_idx, self.pad_idx)
        return self._cuda_graphs.get(key, lambda: CapturedGreedy(*args))(memory, state)

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, beam_size: int, max_len: int,
                    length_penalty: Optional[LengthPenalty] = None, n_best: int = 1,
                    min_len: int = 0, cuda_graph: bool = False) -> BeamSearchResult:
        """The n_best hypotheses per sentence of a beam search of beam_size, at most max_len
        tokens each and no end token before min_len (see search.beam_search).

        cuda_graph: run each step as the replay of a CUDA graph, captured at the first call
        of this batch shape, beam_size, max_len and min_len (the same hypotheses; sentences
        that are done keep their rows until the end)."""
        cuda_graph = self._check_cuda_graph(cuda_graph)
        _positive_int(beam_size, "beam_size")
        _positive_int(max_len, "max_len")
        _positive_int(n_best, "n_best")
        if n_best > beam_size:
            raise ValueError(f"n_best must be <= beam_size = {beam_size}, got {n_best}")
        if beam_size > self.decoder.vocab_size:
            raise ValueError(f"beam_size must be <= the vocabulary size "
                             f"{self.decoder.vocab_size}, got {beam_size}")
        _positive_int(min_len, "min_len", minimum=0)
        if min_len > max_len:
            raise ValueError(f"min_len must be <= max_len = {max_len}, got {min_len}")
        if length_penalty is None:
            length_penalty = LengthPenalty()
        if not isinstance(length_penalty, LengthPenalty):
            raise TypeError(f"length_penalty must be a LengthPenalty or None, "
                            f"got {type(length_penalty).__name__}")
        memory, state = self.encode(src, src_lengths)
        if not cuda_graph:
            return beam_search(self.decoder, memory, state, self.bos_idx, self.eos_idx,
                               beam_size, max_len, length_penalty, n_best, min_len)
        key = captured_key(self.decoder, memory, "beam", beam_size, max_len, min_len,
                           self.bos_idx, self.eos_idx)
        search = self._cuda_graphs.get(key, lambda: CapturedBeamSearch(
            self.decoder, memory, state, self.bos_idx, self.eos_idx, beam_size, max_len,
            min_len))
        return search(memory, state, length_penalty, n_best)

    def save(self, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
        """Saves the configuration and weights at path, with ``metadata``: a dict of plain
        values (strings, numbers, lists, dicts) that belong with the model, such as its
        vocabularies (default: the model's ``metadata``, empty unless it was loaded with
        some); ``Seq2Seq.load`` returns it as the model's ``metadata``."""
        if metadata is None:
            metadata = self.metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        _check_plain(metadata, "metadata")
        torch.save({"format": _FORMAT, "config": self.config(), "state_dict": self.state_dict(),
                    "metadata": dict(metadata)}, path)

    @classmethod
    def from_config(cls, config: dict) -> "Seq2Seq":
        if config.get("decoder_type") not in DECODERS:
            raise ValueError(f"unknown decoder_type {config.get('decoder_type')!r}, expected one "
                             f"of {tuple(DECODERS)}")
        return cls(Encoder(**config["encoder"]), DECODERS[config["decoder_type"]](
            **config["decoder"]), bos_idx=config["bos_idx"], eos_idx=config["eos_idx"])

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None) -> "Seq2Seq":
        """The model saved at path by save(), on map_location (default: where it was), with
        the metadata saved with it as its ``metadata`` attribute."""
        config, state_dict, metadata = _read_checkpoint(path, map_location)
        try:
            model = cls.from_config(config)
            # The weights' dtype and device (map_location's, else where they were saved).
            like = next(iter(state_dict.values()))
            model.to(device=like.device, dtype=like.dtype)
            model.load_state_dict(state_dict)
        except (TypeError, KeyError, RuntimeError, ValueError, StopIteration) as e:
            raise ValueError(f"path {os.fspath(path)!r}: the checkpoint's configuration or "
                             f"weights are invalid: {e}") from None
        model.metadata = metadata
        return model

    def load_weights(self, path: Union[str, os.PathLike], map_location=None) -> None:
        """Loads the weights saved at path into this model; the checkpoint must have been
        saved from a model of this configuration."""
        config, state_dict, _ = _read_checkpoint(path, map_location)
        mine = self.config()
        if config != mine:
            diff = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
            raise ValueError(f"path {os.fspath(path)!r} holds a model of another configuration "
                             f"(differs in {', '.join(diff)})")
        try:
            self.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"path {os.fspath(path)!r}: the checkpoint's weights do not fit "
                             f"its configuration: {e}") from None


def _check_plain(value, where: str) -> None:
    """value is made of what torch.load(weights_only=True) reads back: None, bool, int,
    float, str, and lists, tuples and str-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} must hold only plain values (None, bool, int, float, str, lists "
                    f"and dicts of them), got {type(value).__name__}")


def _read_checkpoint(path, map_location) -> Tuple[dict, dict, dict]:
    if not os.path.isfile(path):
        raise ValueError(f"path {os.fspath(path)!r} is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user error)
        raise ValueError(f"path {os.fspath(path)!r} is not a readable Seq2Seq checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not (isinstance(ckpt, dict) and ckpt.get("format") == _FORMAT
            and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("metadata", {}), dict)):
        raise ValueError(f"path {os.fspath(path)!r} is not a Seq2Seq checkpoint (format "
                         f"{_FORMAT!r})")
    return ckpt["config"], ckpt["state_dict"], ckpt.get("metadata", {})
