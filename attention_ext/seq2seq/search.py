"""Greedy decoding and beam search over a decoder's steps.

Both read the device once per step, to learn which hypotheses ended (the finished-check);
everything else stays on the device. Beam search keeps beam_size rows per sentence that
index the sentence's precomputed memory through ``memory_index`` (nothing is tiled), and
drops a sentence's rows once it is done, so finished sentences cost nothing.

``CapturedGreedy`` and ``CapturedBeamSearch`` (``Seq2Seq``'s ``cuda_graph=True``) run a
step as one replay of a CUDA graph over static buffers instead of a few dozen kernel
launches from Python (a decode step is launch-bound on a GPU). A captured decoding serves
every later batch of its shape: a call copies its memory and initial state into the
buffers and replays. Shapes are fixed: greedy decoding checks every ``CHECK_EVERY`` steps
whether all rows have ended, and beam search keeps computing a done sentence's rows without
reading them. Both compute what the plain loops compute (beam search on all B * K rows,
where the plain loop drops done sentences, so a GPU library may pick other kernels for its
products and round differently). On a CPU the same static loop runs without a graph.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, List, Tuple

import torch

from ..nn import PrecomputedMemory
from .decoders import DecoderState, _Decoder

Tensor = torch.Tensor

_PENALTIES = ("none", "gnmt", "power")


@dataclass(frozen=True)
class LengthPenalty:
    """Divides a finished hypothesis's log-probability by a function of its length L
    (tokens generated, the end token included):

    - ``"none"``: 1, the raw log-probability (favours short hypotheses);
    - ``"gnmt"``: ((5 + L) / 6) ** alpha (Wu et al. 2016, GNMT; alpha about 0.6);
    - ``"power"``: L ** alpha (alpha = 1 is the average log-probability per token).
    """

    kind: str = "none"
    alpha: float = 0.0

    def __post_init__(self):
        if self.kind not in _PENALTIES:
            raise ValueError(f"length_penalty kind must be one of {_PENALTIES}, got {self.kind!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha >= 0):
            raise ValueError(f"length_penalty alpha must be a finite number >= 0, "
                             f"got {self.alpha!r}")

    def __call__(self, length: int) -> float:
        if self.kind == "gnmt":
            return ((5.0 + length) / 6.0) ** self.alpha
        if self.kind == "power":
            return float(length) ** self.alpha
        return 1.0


@dataclass
class BeamSearchResult:
    """Per sentence of the batch, its n_best hypotheses, best first:

    hypotheses[b][i]: token ids (L,), ending with the end token unless max_len cut it;
    scores[b][i]: its log-probability divided by the length penalty;
    alignments[b][i]: the attention weights (L, S) of each generated token."""

    hypotheses: List[List[Tensor]] = field(default_factory=list)
    scores: List[List[float]] = field(default_factory=list)
    alignments: List[List[Tensor]] = field(default_factory=list)


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

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, state: DecoderState,
                 bos: int, eos: int, max_len: int):
        self.decoder, self.device = decoder, memory.values.device
        self.bos, self.eos, self.max_len = bos, eos, max_len
        self.memory = _static_memory(memory)
        self.state = _static_state(state)
        self.tokens = torch.empty(state.hidden[0].shape[1], dtype=torch.long,
                                  device=self.device)
        self.t = torch.empty(1, dtype=torch.long, device=self.device)  # the step counter
        self.graph = None

    def _start(self, memory: PrecomputedMemory, state: DecoderState) -> None:
        """A call's inputs into the buffers, at step 0 with bos as every row's token."""
        _copy_memory(self.memory, memory)
        _copy_state(self.state, state)
        self.tokens.fill_(self.bos)
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


def greedy_decode(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                  eos: int, pad: int, max_len: int) -> Tensor:
    """The argmax token at every step until every row has produced eos or max_len tokens.
    Returns (B, L) token ids, eos included, pad after it."""
    B = memory.values.shape[0]
    state = decoder.init_state(encoder_state)
    tokens = memory.values.new_full((B,), bos, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    out = []
    for _ in range(max_len):
        logits, _, state = decoder.step(tokens, state, memory)
        tokens = logits.argmax(-1).masked_fill(finished, pad)
        out.append(tokens)
        finished = finished | (tokens == eos)
        if bool(finished.all()):  # the step's one host read
            break
    return torch.stack(out, 1)


class CapturedGreedy(_CapturedDecoding):
    """greedy_decode as replays of one captured step, for batches of one captured_key. The
    step writes its tokens into column t of a static (B, max_len) output, t being a device
    counter; the output is cut after the step at which the last row ended, as the plain
    loop stops there."""

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, encoder_state,
                 bos: int, eos: int, pad: int, max_len: int):
        super().__init__(decoder, memory, decoder.init_state(encoder_state), bos, eos, max_len)
        B, device = memory.values.shape[0], memory.values.device
        self.pad = pad
        self.finished = torch.empty(B, dtype=torch.bool, device=device)
        # Column t is written for every row at step t, so no call reads an earlier call's.
        self.out = torch.empty(B, max_len, dtype=torch.long, device=device)

    def _body(self) -> None:
        # A step is launch-bound on a GPU, so its bookkeeping is the fewest kernels: the
        # tokens are written in place, and the length is read from the output once per call.
        logits, _, new = self.decoder.step(self.tokens, self.state, self.memory)
        torch.argmax(logits, -1, out=self.tokens)
        self.tokens.masked_fill_(self.finished, self.pad)
        self.out.index_copy_(1, self.t, self.tokens[:, None])
        self.finished.logical_or_(self.tokens == self.eos)
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
                out = out[:, :int((out == self.eos).any(0).nonzero()[-1]) + 1]
            return out.clone()


def beam_search(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                eos: int, beam_size: int, max_len: int, length_penalty: LengthPenalty,
                n_best: int, min_len: int) -> BeamSearchResult:
    """Beam search with ``beam_size`` rows per sentence. A sentence is done once its best
    candidate of a step ends with eos and it has n_best finished hypotheses (or at max_len,
    when its live beams are finished as they are); its rows are then dropped. A beam that
    ends stops extending (its score becomes -inf), so a sentence may go on with fewer live
    beams, as in OpenNMT-py."""
    B, S = memory.values.shape[:2]
    K = beam_size
    device = memory.values.device
    memory_index = torch.arange(B, device=device).repeat_interleave(K)
    state = decoder.init_state(encoder_state, memory_index)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = _initial_scores(B, K, memory.values)
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    attn = memory.values.new_empty(B * K, 0, S)
    active = list(range(B))  # the sentence of each block of K rows
    finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
    beam_ids = torch.arange(K, device=device)
    for t in range(max_len):
        logits, weights, state = decoder.step(tokens, state, memory)
        top, tok, rows = _candidates(logits, scores, t < min_len, eos, K)
        del logits  # not held while the next step makes its own
        seqs = torch.cat([seqs.index_select(0, rows), tok.view(-1, 1)], dim=1)
        attn = torch.cat([attn.index_select(0, rows), weights.index_select(0, rows)[:, None]],
                         dim=1)
        is_eos = tok == eos
        # The step's one host read: which candidates ended, and which are real (a -inf
        # score is no candidate: fewer than K were possible, as when eos is not allowed).
        ended, real = torch.stack([is_eos, top > float("-inf")]).cpu().tolist()
        A = len(active)
        keep = _collect(finished, list(enumerate(active)), ended, real, top, seqs, attn,
                        length_penalty(t + 1), t == max_len - 1, n_best, K)
        if not keep:
            break
        # Beams that ended stop extending; sentences that are done lose their rows.
        top = top.masked_fill(is_eos, float("-inf"))
        if len(keep) < A:
            kept = _to_device([a for a, _ in keep], device)
            rows = rows.view(A, K).index_select(0, kept).view(-1)
            sel = (kept[:, None] * K + beam_ids).view(-1)
            seqs, attn = seqs.index_select(0, sel), attn.index_select(0, sel)
            top, tok = top.index_select(0, kept), tok.index_select(0, kept)
            active = [b for _, b in keep]
        state = state.reorder(rows)
        scores, tokens = top, tok.reshape(-1)
    return _best(finished, n_best)


def _initial_scores(B: int, K: int, like: Tensor) -> Tensor:
    """(B, K) beam scores, in float32 or wider: only the first beam is live at the start,
    the others would repeat it."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    scores = torch.zeros(B, K, device=like.device, dtype=dtype)
    scores[:, 1:] = float("-inf")
    return scores


def _candidates(logits: Tensor, scores: Tensor, block_eos, eos: int, K: int):
    """The K best extensions of each sentence's beams: their scores (A, K), tokens (A, K)
    and the rows (A * K,) of the beams they extend. block_eos (a bool, or a bool tensor
    for a captured step) forbids the end token.

    The log-probabilities are one (A * K, V) tensor in the scores' dtype, from one
    log_softmax (logsumexp is nine kernels on a GPU, and its own (A * K, V) temporary),
    and the candidate scores are added to it in place."""
    A, V = scores.shape[0], logits.shape[-1]
    logp = torch.log_softmax(logits, dim=-1, dtype=scores.dtype)
    if isinstance(block_eos, Tensor):
        logp[:, eos].masked_fill_(block_eos, float("-inf"))
    elif block_eos:
        logp[:, eos] = float("-inf")
    top, idx = logp.add_(scores.view(-1, 1)).view(A, K * V).topk(K, dim=1)
    rows = (torch.arange(0, A * K, K, device=idx.device)[:, None] + idx // V).view(-1)
    return top, idx % V, rows


def _collect(finished, blocks, ended, real, top, seqs, attn, penalty: float, last: bool,
             n_best: int, K: int):
    """Moves the candidates that ended (all live ones at the last step) into finished, for
    the (block, sentence) pairs of blocks (block a: rows a*K..a*K+K-1 of seqs, attn and
    top). Returns the pairs whose sentences go on."""
    keep = []
    for a, b in blocks:
        for k in range(K):
            if real[a][k] and (last or ended[a][k]):
                r = a * K + k
                # Copies: a view would keep the step's whole history alive.
                finished[b].append((top[a, k] / penalty, seqs[r].clone(), attn[r].clone()))
        if not (last or (ended[a][0] and len(finished[b]) >= n_best)):
            keep.append((a, b))
    return keep


class CapturedBeamSearch(_CapturedDecoding):
    """beam_search as replays of one captured step over all B * K rows, for batches of one
    captured_key. The histories are static (B * K, max_len) buffers whose column t the step
    writes; a done sentence's rows go on (the shapes are fixed) but are no longer read."""

    def __init__(self, decoder: _Decoder, memory: PrecomputedMemory, encoder_state,
                 bos: int, eos: int, K: int, max_len: int, min_len: int):
        B, S = memory.values.shape[:2]
        device = memory.values.device
        self.memory_index = torch.arange(B, device=device).repeat_interleave(K)
        super().__init__(decoder, memory, decoder.init_state(encoder_state, self.memory_index),
                         bos, eos, max_len)
        self.min_len = min_len
        self.scores = _initial_scores(B, K, memory.values)
        self.top = torch.empty_like(self.scores)
        # Column t is written at step t and the rows re-gathered from columns < t, so no
        # call reads an earlier call's histories.
        self.seqs = torch.empty(B * K, max_len, dtype=torch.long, device=device)
        self.attn = memory.values.new_empty(B * K, max_len, S)
        self.flags = torch.empty(2, B, K, dtype=torch.bool, device=device)  # ended, real

    def _body(self) -> None:
        K = self.scores.shape[1]
        logits, weights, new = self.decoder.step(self.tokens, self.state, self.memory)
        best, tok, rows = _candidates(logits, self.scores, self.t[0] < self.min_len, self.eos,
                                      K)
        self.seqs.copy_(self.seqs.index_select(0, rows))
        self.seqs.index_copy_(1, self.t, tok.view(-1, 1))
        self.attn.copy_(self.attn.index_select(0, rows))
        self.attn.index_copy_(1, self.t, weights.index_select(0, rows)[:, None])
        is_eos = torch.eq(tok, self.eos, out=self.flags[0])
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
        B, K = self.scores.shape
        with _exclusive(self.device):
            self._start(memory, self.decoder.init_state(encoder_state, self.memory_index))
            self.scores.copy_(_initial_scores(B, K, self.scores))
            finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
            live = [(b, b) for b in range(B)]
            for i in range(self.max_len):
                self._step()
                ended, real = self.flags.cpu().tolist()  # the step's one host read
                keep = _collect(finished, live, ended, real, self.top, self.seqs[:, :i + 1],
                                self.attn[:, :i + 1], length_penalty(i + 1),
                                i == self.max_len - 1, n_best, K)
                if not keep:
                    break
                live = keep
            return _best(finished, n_best)


def _to_device(values: List[int], device) -> Tensor:
    """A host list as a long tensor on device; to a GPU through pinned memory, so the copy
    does not wait for the GPU (the step's one wait is its finished-check)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _best(finished, n_best: int) -> BeamSearchResult:
    flat = [h for hyps in finished for h in hyps]
    values = torch.stack([h[0] for h in flat]).tolist() if flat else []
    result, i = BeamSearchResult(), 0
    for hyps in finished:
        scored = sorted(zip(values[i:i + len(hyps)], range(len(hyps))), key=lambda s: -s[0])
        i += len(hyps)
        best = [hyps[j] for _, j in scored[:n_best]]
        result.hypotheses.append([h[1] for h in best])
        result.scores.append([s for s, _ in scored[:n_best]])
        result.alignments.append([h[2] for h in best])
    return result
