"""Greedy decoding and beam search as replays of one captured step (``Seq2Seq``'s
``cuda_graph=True``): a step runs as one replay of a CUDA graph over static buffers instead
of a few dozen kernel launches from Python (a decode step is launch-bound on a GPU). A
captured decoding serves every later batch of its shape: a call copies its memory and
initial state into the buffers and replays. Shapes are fixed: greedy decoding checks every
``CHECK_EVERY`` steps whether all rows have ended, and beam search keeps computing a done
sentence's rows without reading them. Both compute what the plain loops of ``search``
compute (beam search on all B * beam_size rows, where the plain loop drops done sentences,
so a GPU library may pick other kernels for its products and round differently). On a CPU
the same static loop runs without a graph.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, List, Tuple

import torch

from ..nn import PrecomputedMemory
from .decoders import DecoderState, _Decoder
from .search import (BeamSearchResult, LengthPenalty, best_hypotheses, candidates,
                     collect_finished, initial_scores)

Tensor = torch.Tensor

# Steps between two finished-checks of a captured greedy decoding: a check waits for the
# GPU to drain, so a few replays are queued at once; the steps past the end are padding.
CHECK_EVERY = 4


class _DeviceSlot:
    """What the captured decodings of one device share: a lock that runs their calls one at
    a time and, on a CUDA device, the stream they capture on, kept (cuBLAS keeps a
    workspace per stream, which the graphs then use), and an event that orders each call
    after the last one's queued work (a call returns with its output's copy queued)."""

    def __init__(self, device: torch.device):
        self.lock = threading.Lock()
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.done = torch.cuda.Event() if cuda else None


_SLOTS: dict = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def _exclusive(device: torch.device):
    """One captured decoding at a time on device, each after the last one's queued work."""
    with _SLOTS_LOCK:
        if device not in _SLOTS:
            _SLOTS[device] = _DeviceSlot(device)
        slot = _SLOTS[device]
    with slot.lock:
        if slot.done is None:
            yield
            return
        with torch.cuda.device(device):
            torch.cuda.current_stream().wait_event(slot.done)
            try:
                yield
            finally:
                slot.done.record()


def _copy_state(dst: DecoderState, src: DecoderState) -> None:
    for d, s in zip(dst.hidden, src.hidden):
        d.copy_(s)
    if dst.input_feed is not None:
        dst.input_feed.copy_(src.input_feed)
    if dst.memory_index is not None:
        dst.memory_index.copy_(src.memory_index)


def _static_state(state: DecoderState) -> DecoderState:
    """A copy of state in tensors of its own, which a captured step overwrites in place."""
    return DecoderState(tuple(h.clone() for h in state.hidden),
                        None if state.input_feed is None else state.input_feed.clone(),
                        None if state.memory_index is None else state.memory_index.clone())


def _static_memory(memory: PrecomputedMemory) -> PrecomputedMemory:
    """A copy of memory in tensors of its own (keys stay the values themselves where they are)."""
    own = memory.values.clone()
    return replace(
        memory, values=own, keys=own if memory.keys is memory.values else memory.keys.clone(),
        lengths=None if memory.lengths is None else memory.lengths.clone(),
        mask=None if memory.mask is None else memory.mask.clone())


def _copy_memory(dst: PrecomputedMemory, src: PrecomputedMemory) -> None:
    dst.values.copy_(src.values)
    if dst.keys is not dst.values:
        dst.keys.copy_(src.keys)
    for d, s in ((dst.lengths, src.lengths), (dst.mask, src.mask)):
        if d is not None:
            d.copy_(s)


def captured_key(decoder: _Decoder, memory: PrecomputedMemory, *options) -> tuple:
    """What a captured decoding is specific to: the memory's shapes, dtype, device and
    masking, the options its step or buffers depend on (the kind of search, its sizes and
    token ids), and what else the step reads: where the decoder's parameters lie, its
    modules' training modes (dropout), its attention's implementation, and the modes that
    pick kernels and tensor kinds (autocast, TF32, inference mode). A decoding captured
    for one key serves every batch of that key."""
    m = memory.values
    return (tuple(m.shape), tuple(memory.keys.shape), m.dtype, m.device,
            memory.keys is memory.values,
            None if memory.lengths is None else memory.lengths.dtype,
            None if memory.mask is None else tuple(memory.mask.shape), *options,
            tuple(t.data_ptr() for t in decoder.parameters()),
            tuple(mod.training for mod in decoder.modules()),
            decoder.attention.implementation,
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.is_inference_mode_enabled())


class _CapturedDecoding:
    """Static buffers and a decoding step over them (a subclass's ``_body``: no arguments,
    it reads and writes the buffers in place), run as a CUDA graph on a CUDA device, under
    ``_exclusive``: the first step runs on the device's capture stream, as the capture's
    warm-up and as that step's work, then is captured there; every later step, of this
    call and of later calls, is a replay. On other devices each step runs _body.

    The capture uses CUDAGraph.capture_begin/end rather than ``torch.cuda.graph``, which
    also synchronises the device, collects garbage and empties the allocator's cache. It
    runs under autocast without autocast's cache, which would keep the weights' casts
    outside the graph's memory."""

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, state: DecoderState, *,
                 bos_idx: int, eos_idx: int, max_len: int):
        self.decoder, self.device = decoder, memory.values.device
        self.bos_idx, self.eos_idx, self.max_len = bos_idx, eos_idx, max_len
        self.memory = _static_memory(memory)
        self.state = _static_state(state)
        self.tokens = torch.empty(state.hidden[0].shape[1], dtype=torch.long,
                                  device=self.device)
        self.t = torch.empty(1, dtype=torch.long, device=self.device)  # the step counter
        self.graph = None

    def _start(self, memory: PrecomputedMemory, state: DecoderState) -> None:
        """A call's inputs into the buffers, at step 0 with bos_idx as every row's token."""
        _copy_memory(self.memory, memory)
        _copy_state(self.state, state)
        self.tokens.fill_(self.bos_idx)
        self.t.zero_()

    def _step(self) -> None:
        if self.device.type != "cuda":
            self._body()
        elif self.graph is not None:
            self.graph.replay()
        else:
            side, current = _SLOTS[self.device].stream, torch.cuda.current_stream()
            side.wait_stream(current)
            autocast = torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                                      dtype=torch.get_autocast_dtype("cuda"),
                                      cache_enabled=False)
            with torch.cuda.stream(side), autocast:
                self._body()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()
                try:
                    self._body()
                finally:
                    graph.capture_end()
            current.wait_stream(side)
            self.graph = graph


class CapturedDecodings:
    """A model's captured decodings by key, the least recently used dropped past ``kept``:
    each holds its graph's memory pool and buffers of one batch shape."""

    def __init__(self, kept: int):
        self.kept = kept
        self.items: "OrderedDict[tuple, _CapturedDecoding]" = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], "_CapturedDecoding"]) -> "_CapturedDecoding":
        with self.lock:
            found = self.items.pop(key, None)
            self.items[key] = found = make() if found is None else found
            while len(self.items) > self.kept:
                self.items.popitem(last=False)
            return found

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def __len__(self) -> int:
        return len(self.items)

    def __reduce__(self):
        # A copy or pickle of a model starts without captures: they hold the original's
        # buffers and graphs.
        return CapturedDecodings, (self.kept,)


class CapturedGreedy(_CapturedDecoding):
    """greedy_decode as replays of one captured step, for batches of one captured_key. The
    step writes its tokens into column t of a static (B, max_len) output, t being a device
    counter; the output is cut after the step at which the last row ended, as the plain
    loop stops there."""

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, encoder_state, *,
                 bos_idx: int, eos_idx: int, pad_idx: int, max_len: int):
        super().__init__(decoder, memory, decoder.init_state(encoder_state), bos_idx=bos_idx,
                         eos_idx=eos_idx, max_len=max_len)
        B, device = memory.values.shape[0], memory.values.device
        self.pad_idx = pad_idx
        self.finished = torch.empty(B, dtype=torch.bool, device=device)
        # Column t is written for every row at step t, so no call reads an earlier call's.
        self.out = torch.empty(B, max_len, dtype=torch.long, device=device)

    def _body(self) -> None:
        # A step is launch-bound on a GPU, so its bookkeeping is the fewest kernels: the
        # tokens are written in place, and the length is read from the output once per call.
        logits, _, new = self.decoder.step(self.tokens, self.state, self.memory)
        torch.argmax(logits, -1, out=self.tokens)
        self.tokens.masked_fill_(self.finished, self.pad_idx)
        self.out.index_copy_(1, self.t, self.tokens[:, None])
        self.finished.logical_or_(self.tokens == self.eos_idx)
        _copy_state(self.state, new)
        self.t.add_(1)

    def __call__(self, memory: PrecomputedMemory, encoder_state) -> Tensor:
        with _exclusive(self.device):
            self._start(memory, self.decoder.init_state(encoder_state))
            self.finished.zero_()
            steps, done = 0, False
            while steps < self.max_len and not done:
                for _ in range(min(CHECK_EVERY, self.max_len - steps)):
                    self._step()
                    steps += 1
                done = bool(self.finished.all())  # the one host read of CHECK_EVERY steps
            out = self.out[:, :steps]
            if done:  # cut after the last row's end token: only pad follows it in any row
                out = out[:, :int((out == self.eos_idx).any(0).nonzero()[-1]) + 1]
            return out.clone()


class CapturedBeamSearch(_CapturedDecoding):
    """beam_search as replays of one captured step over all B * beam_size rows, for batches
    of one captured_key. The histories are static (B * beam_size, max_len) buffers whose
    column t the step writes; a done sentence's rows go on (the shapes are fixed) but are
    no longer read."""

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, encoder_state, *,
                 bos_idx: int, eos_idx: int, beam_size: int, max_len: int, min_len: int):
        B, S = memory.values.shape[:2]
        device = memory.values.device
        rows = B * beam_size
        self.memory_index = torch.arange(B, device=device).repeat_interleave(beam_size)
        super().__init__(decoder, memory, decoder.init_state(encoder_state, self.memory_index),
                         bos_idx=bos_idx, eos_idx=eos_idx, max_len=max_len)
        self.min_len = min_len
        self.scores = initial_scores(B, beam_size, memory.values)
        self.top = torch.empty_like(self.scores)
        # Column t is written at step t and the rows re-gathered from columns < t, so no
        # call reads an earlier call's histories.
        self.seqs = torch.empty(rows, max_len, dtype=torch.long, device=device)
        self.attn = memory.values.new_empty(rows, max_len, S)
        # ended, real
        self.flags = torch.empty(2, B, beam_size, dtype=torch.bool, device=device)

    def _body(self) -> None:
        logits, weights, new = self.decoder.step(self.tokens, self.state, self.memory)
        best, tok, rows = candidates(logits, self.scores, self.t[0] < self.min_len,
                                     self.eos_idx)
        self.seqs.copy_(self.seqs.index_select(0, rows))
        self.seqs.index_copy_(1, self.t, tok.view(-1, 1))
        self.attn.copy_(self.attn.index_select(0, rows))
        self.attn.index_copy_(1, self.t, weights.index_select(0, rows)[:, None])
        is_eos = torch.eq(tok, self.eos_idx, out=self.flags[0])
        torch.gt(best, float("-inf"), out=self.flags[1])  # real (isfinite is four kernels)
        self.top.copy_(best)
        self.scores.copy_(best).masked_fill_(is_eos, float("-inf"))
        self.tokens.copy_(tok.view(-1))
        # The new state's rows gathered straight into the buffers; memory_index stays, as
        # every row extends a beam of its own sentence.
        for dst, src in zip(self.state.hidden, new.hidden):
            torch.index_select(src, 1, rows, out=dst)
        if new.input_feed is not None:
            torch.index_select(new.input_feed, 0, rows, out=self.state.input_feed)
        self.t.add_(1)

    def __call__(self, memory: PrecomputedMemory, encoder_state,
                 length_penalty: LengthPenalty, n_best: int) -> BeamSearchResult:
        B, beam_size = self.scores.shape
        with _exclusive(self.device):
            self._start(memory, self.decoder.init_state(encoder_state, self.memory_index))
            self.scores.copy_(initial_scores(B, beam_size, self.scores))
            finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
            live = [(b, b) for b in range(B)]
            for i in range(self.max_len):
                self._step()
                ended, real = self.flags.cpu().tolist()  # the step's one host read
                keep = collect_finished(finished, live, ended, real, self.top,
                                        self.seqs[:, :i + 1], self.attn[:, :i + 1],
                                        length_penalty(i + 1), i == self.max_len - 1, n_best)
                if not keep:
                    break
                live = keep
            return best_hypotheses(finished, n_best)
