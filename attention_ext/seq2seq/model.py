"""Seq2Seq: an Encoder and a Luong or Bahdanau decoder, trained with teacher forcing and
decoded greedily or with beam search; saved as configuration + weights (no pickled code)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .captured import CapturedBeamSearch, CapturedDecodings, CapturedGreedy, captured_key
from .checkpoint import check_plain, read_checkpoint, write_checkpoint
from .checks import check_lengths, check_tokens, positive_int
from .decoders import DECODERS, _Decoder
from .encoder import Encoder
from .search import BeamSearchResult, LengthPenalty, beam_search, greedy_decode
from .tokens import until_eos

Tensor = torch.Tensor

# Captured decodings (cuda_graph=True) a model keeps.
CUDA_GRAPHS_KEPT = 8


def _mismatches(enc: dict, dec: dict) -> List[str]:
    """What keeps the decoder from fitting the encoder, one line each, with the arguments
    that make it fit."""
    found = []
    if dec["memory_dim"] != enc["hidden_size"]:
        found.append(f"the decoder reads the encoder's memory: set the decoder's "
                     f"memory_dim={enc['hidden_size']} (the encoder's hidden_size), "
                     f"got {dec['memory_dim']}")
    if dec["hidden_size"] != enc["decoder_hidden_size"]:
        found.append(f"the encoder's bridge starts the decoder: set the encoder's "
                     f"decoder_hidden_size={dec['hidden_size']} (the decoder's hidden_size) "
                     f"or the decoder's hidden_size={enc['decoder_hidden_size']}")
    if dec["num_layers"] != enc["decoder_layers"]:
        found.append(f"the encoder's bridge starts every decoder layer: set the encoder's "
                     f"decoder_layers={dec['num_layers']} (the decoder's num_layers, at most the "
                     f"encoder's num_layers = {enc['num_layers']}) or the decoder's "
                     f"num_layers={enc['decoder_layers']}")
    if dec["cell"] != enc["cell"]:
        article = "an" if enc["cell"] == "lstm" else "a"
        found.append(f"the encoder's bridge gives {article} {enc['cell'].upper()} state: set "
                     f"the decoder's cell={enc['cell']!r}, got {dec['cell']!r}")
    if dec["pad_idx"] != enc["pad_idx"]:
        found.append(f"both vocabularies share the padding id: set the decoder's "
                     f"pad_idx={enc['pad_idx']} (the encoder's), got {dec['pad_idx']}")
    return found


@contextmanager
def _without_dropout(model: nn.Module):
    """model's modules in eval mode, each put back in its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Seq2Seq(nn.Module):
    """An encoder-decoder with attention over the encoder's memory.

    Token ids: ``bos_idx`` and ``eos_idx`` are target ids, the begin token the decoder
    reads first and the end token it writes last; a source needs neither. ``pad_idx``, the
    encoder's and the decoder's (they must agree), pads sources and targets and fills
    greedy outputs after the end token. ``Vocabulary`` puts pad, bos and eos at 0, 1 and 2,
    these arguments' defaults.

    The decoder's memory_dim must be the encoder's hidden_size, and the encoder's
    decoder_hidden_size and decoder_layers the decoder's hidden_size and num_layers (both
    default to the encoder's own sizes); a mismatch raises one error listing each argument
    to set.

    Training: ``loss(src, src_lengths, tgt, tgt_lengths)``, or ``forward`` for the logits.
    Decoding (``greedy_decode``, ``beam_search``) never applies dropout, whatever the
    model's mode, and ``token_lists`` cuts its outputs at the end token.

    Decoding with ``cuda_graph=True`` captures a step once per batch shape and options and
    keeps the capture (up to CUDA_GRAPHS_KEPT of them) for later calls;
    ``clear_cuda_graphs()`` frees them, and moving or casting the model drops them.
    """

    def __init__(self, encoder: Encoder, decoder: _Decoder, *, bos_idx: int = 1,
                 eos_idx: int = 2):
        super().__init__()
        enc, dec = encoder.config, decoder.config
        mismatches = _mismatches(enc, dec)
        if mismatches:
            raise ValueError("the decoder does not fit the encoder:\n  - " +
                             "\n  - ".join(mismatches))
        for name, idx in (("bos_idx", bos_idx), ("eos_idx", eos_idx)):
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"{name} must be an integer token id, got {idx!r}")
            if not 0 <= idx < decoder.vocab_size:
                raise ValueError(f"{name} must lie in [0, {decoder.vocab_size}), got {idx}")
        if bos_idx == eos_idx:
            raise ValueError(f"bos_idx and eos_idx must differ, got {bos_idx} for both")
        if enc["pad_idx"] in (bos_idx, eos_idx):
            raise ValueError(f"bos_idx ({bos_idx}) and eos_idx ({eos_idx}) must differ from "
                             f"pad_idx ({enc['pad_idx']})")
        self.encoder, self.decoder = encoder, decoder
        self.bos_idx, self.eos_idx = bos_idx, eos_idx
        self.pad_idx = enc["pad_idx"]
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

    @property
    def config(self) -> dict:
        """The encoder's and decoder's configurations and the token ids:
        ``Seq2Seq.from_config(model.config)`` builds its like."""
        return dict(encoder=self.encoder.config, decoder_type=self.decoder.kind,
                    decoder=self.decoder.config, bos_idx=self.bos_idx, eos_idx=self.eos_idx)

    def encode(self, src: Tensor, src_lengths: Tensor):
        """The encoder's memory, precomputed by the decoder's attention layer once for every
        step and beam, and the decoder's initial state (rows per sentence)."""
        memory, lengths, state = self.encoder(src, src_lengths)
        return self.decoder.attention.precompute(memory, lengths=lengths), state

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), src_lengths (B,), tgt_in (B, T), the decoder's inputs
        (bos_idx, then the target). Returns logits (B, T, V), those of the target and then
        eos_idx; ``loss`` does the shift and the cross-entropy."""
        check_tokens(tgt_in, "tgt_in", self.decoder.vocab_size)
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"tgt_in must have batch size {src.shape[0]} like src, "
                             f"got {tuple(tgt_in.shape)}")
        memory, state = self.encode(src, src_lengths)
        logits, _ = self.decoder(tgt_in, self.decoder.init_state(state), memory)
        return logits

    def teacher_forcing(self, tgt: Tensor, tgt_lengths: Tensor):
        """The decoder's inputs and the loss's targets for targets tgt (B, T) of tgt_lengths
        (B,) tokens each, with neither bos nor eos: tgt_in (B, T + 1) = bos_idx, then the
        target; tgt_out (B, T + 1) = the target, then eos_idx; pad_idx past each."""
        check_tokens(tgt, "tgt", self.decoder.vocab_size, min_length=0)
        B, T = tgt.shape
        lengths = check_lengths(tgt_lengths, "tgt_lengths", B, T, minimum=0).to(tgt.device)
        steps = torch.arange(T + 1, device=tgt.device)
        pad = tgt.new_full((B, 1), self.pad_idx)
        tgt_in = torch.cat([tgt.new_full((B, 1), self.bos_idx), tgt], 1)
        tgt_in = tgt_in.masked_fill(steps > lengths[:, None], self.pad_idx)
        tgt_out = torch.cat([tgt, pad], 1).masked_fill(steps >= lengths[:, None], self.pad_idx)
        tgt_out = tgt_out.masked_fill(steps == lengths[:, None], self.eos_idx)
        return tgt_in, tgt_out

    def loss(self, src: Tensor, src_lengths: Tensor, tgt: Tensor, tgt_lengths: Tensor, *,
             reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
        """The teacher-forced cross-entropy of targets tgt (B, T) of tgt_lengths (B,) tokens
        each, given without bos or eos (``teacher_forcing`` adds them): the decoder reads
        bos_idx and the target and is scored on the target and eos_idx, over each
        sequence's tgt_lengths + 1 tokens (pad_idx positions are ignored). ``reduction``
        and ``label_smoothing`` are ``F.cross_entropy``'s; "mean" averages over tokens.

        Under DistributedDataParallel, compute it through the wrapper's forward, e.g. a
        module whose forward returns this loss, wrapped instead of the model."""
        tgt_in, tgt_out = self.teacher_forcing(tgt, tgt_lengths)
        if isinstance(src, Tensor) and src.dim() == 2 and tgt.shape[0] != src.shape[0]:
            raise ValueError(f"tgt must have batch size {src.shape[0]} like src, "
                             f"got {tuple(tgt.shape)}")
        logits = self(src, src_lengths, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(),
                               ignore_index=self.pad_idx, reduction=reduction,
                               label_smoothing=label_smoothing)

    def _check_cuda_graph(self, cuda_graph) -> bool:
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        device = self.decoder.out.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, "
                             f"it is on {device}")
        return cuda_graph

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, *, max_len: int,
                      cuda_graph: bool = False) -> Tensor:
        """(B, L) token ids, L <= max_len: eos_idx included, pad_idx after it
        (``token_lists`` cuts them). Dropout is off, whatever the model's mode.

        cuda_graph: run each step as the replay of a CUDA graph, captured at the first call
        of this batch shape and max_len (the same tokens; a decode step is otherwise bound
        by its kernel launches)."""
        positive_int(max_len, "max_len")
        cuda_graph = self._check_cuda_graph(cuda_graph)
        with _without_dropout(self):
            memory, state = self.encode(src, src_lengths)
            ids = dict(bos_idx=self.bos_idx, eos_idx=self.eos_idx, pad_idx=self.pad_idx,
                       max_len=max_len)
            if not cuda_graph:
                return greedy_decode(self.decoder, memory, state, **ids)
            key = captured_key(self.decoder, memory, "greedy", *ids.values())
            search = self._cuda_graphs.get(
                key, lambda: CapturedGreedy(self.decoder, memory, state, **ids))
            return search(memory, state)

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, *, beam_size: int, max_len: int,
                    length_penalty: Optional[LengthPenalty] = None, n_best: int = 1,
                    min_len: int = 0, cuda_graph: bool = False) -> BeamSearchResult:
        """The n_best hypotheses per sentence of a beam search of beam_size, at most max_len
        tokens each and no end token before min_len (see search.beam_search);
        ``token_lists`` cuts them at the end token. Dropout is off, whatever the model's
        mode.

        cuda_graph: run each step as the replay of a CUDA graph, captured at the first call
        of this batch shape, beam_size, max_len and min_len (the same hypotheses; sentences
        that are done keep their rows until the end)."""
        cuda_graph = self._check_cuda_graph(cuda_graph)
        positive_int(beam_size, "beam_size")
        positive_int(max_len, "max_len")
        positive_int(n_best, "n_best")
        if n_best > beam_size:
            raise ValueError(f"n_best must be <= beam_size = {beam_size}, got {n_best}")
        if beam_size > self.decoder.vocab_size:
            raise ValueError(f"beam_size must be <= the vocabulary size "
                             f"{self.decoder.vocab_size}, got {beam_size}")
        positive_int(min_len, "min_len", minimum=0)
        if min_len > max_len:
            raise ValueError(f"min_len must be <= max_len = {max_len}, got {min_len}")
        if length_penalty is None:
            length_penalty = LengthPenalty()
        if not isinstance(length_penalty, LengthPenalty):
            raise TypeError(f"length_penalty must be a LengthPenalty or None, "
                            f"got {type(length_penalty).__name__}")
        with _without_dropout(self):
            memory, state = self.encode(src, src_lengths)
            sizes = dict(bos_idx=self.bos_idx, eos_idx=self.eos_idx, beam_size=beam_size,
                         max_len=max_len, min_len=min_len)
            if not cuda_graph:
                return beam_search(self.decoder, memory, state, length_penalty=length_penalty,
                                   n_best=n_best, **sizes)
            key = captured_key(self.decoder, memory, "beam", *sizes.values())
            search = self._cuda_graphs.get(
                key, lambda: CapturedBeamSearch(self.decoder, memory, state, **sizes))
            return search(memory, state, length_penalty, n_best)

    def token_lists(self, output) -> list:
        """A decoding's token ids as lists, each cut before its end token: for
        greedy_decode's (B, L) tensor, one list per sentence; for a BeamSearchResult, one
        list of n_best lists per sentence."""
        return until_eos(output, self.eos_idx)

    def save(self, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
        """Saves the configuration and weights at path, with ``metadata``: a dict of plain
        values (strings, numbers, lists, dicts) that belong with the model, such as its
        vocabularies (default: the model's ``metadata``, empty unless it was loaded with
        some); ``Seq2Seq.load`` returns it as the model's ``metadata``."""
        if metadata is None:
            metadata = self.metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        check_plain(metadata, "metadata")
        write_checkpoint(path, self.config, self.state_dict(), dict(metadata))

    @classmethod
    def from_config(cls, config: dict) -> "Seq2Seq":
        if config.get("decoder_type") not in DECODERS:
            raise ValueError(f"unknown decoder_type {config.get('decoder_type')!r}, expected one "
                             f"of {tuple(DECODERS)}")
        return cls(Encoder(**config["encoder"]), DECODERS[config["decoder_type"]](
            **config["decoder"]), bos_idx=config["bos_idx"], eos_idx=config["eos_idx"])

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None) -> "Seq2Seq":
        """The model saved at path by save(), on map_location (default: where it was), in
        eval mode (ready to decode; ``.train()`` to train it further), with the metadata
        saved with it as its ``metadata`` attribute."""
        config, state_dict, metadata = read_checkpoint(path, map_location)
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
        return model.eval()

    def load_weights(self, path: Union[str, os.PathLike], map_location=None) -> None:
        """Loads the weights saved at path into this model; the checkpoint must have been
        saved from a model of this configuration."""
        config, state_dict, _ = read_checkpoint(path, map_location)
        mine = self.config
        if config != mine:
            diff = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
            raise ValueError(f"path {os.fspath(path)!r} holds a model of another configuration "
                             f"(differs in {', '.join(diff)})")
        try:
            self.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"path {os.fspath(path)!r}: the checkpoint's weights do not fit "
                             f"its configuration: {e}") from None

