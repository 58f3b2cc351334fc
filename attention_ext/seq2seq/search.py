"""Greedy decoding and beam search over a decoder's steps.

Both read the device once per step, to learn which hypotheses ended (the finished-check);
everything else stays on the device. Beam search keeps beam_size rows per sentence that
index the sentence's precomputed memory through ``memory_index`` (nothing is tiled), and
drops a sentence's rows once it is done, so finished sentences cost nothing.

With ``captured=True`` (``Seq2Seq``'s ``cuda_graph=True``) a step is one replay of a CUDA
graph over static buffers instead of a few dozen kernel launches from Python (a decode
step is launch-bound on a GPU); each call captures its graph once, at its first step.
Shapes are then fixed: greedy decoding checks every ``CHECK_EVERY`` steps whether all rows
have ended, and beam search keeps computing a done sentence's rows without reading them.
Both compute what the plain loops compute (beam search on all B * K rows, where the plain
loop drops done sentences, so a GPU library may pick other kernels for its products and
round differently). On a CPU the same static loop runs without a graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

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


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One capture stream per device, kept: a new stream per call would give cuBLAS a new
    workspace each time (it keeps one per stream)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class StepGraph:
    """Calls ``body`` (no arguments; it reads and writes static tensors in place) as a CUDA
    graph on a CUDA device: the first call runs it on a side stream, as the capture's
    warm-up and as that step's work, then captures it on that stream; later calls replay
    it. On other devices every call runs body.

    The capture uses CUDAGraph.capture_begin/end rather than ``torch.cuda.graph``, which
    also synchronises the device, collects garbage and empties the allocator's cache at
    every capture: once per decoding call here."""

    def __init__(self, body, device: torch.device):
        self.body, self.device = body, device
        self.graph = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.device.type != "cuda":
            self.body()
            return
        with torch.cuda.device(self.device):
            if self.graph is not None:
                self.graph.replay()
                return
            side, current = _side_stream(self.device), torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.body()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()
                try:
                    self.body()
                finally:
                    graph.capture_end()
            current.wait_stream(side)
            self.graph = graph


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


def greedy_decode(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                  eos: int, pad: int, max_len: int, captured: bool = False) -> Tensor:
    """The argmax token at every step until every row has produced eos or max_len tokens.
    Returns (B, L) token ids, eos included, pad after it."""
    if captured:
        return _captured_greedy_decode(decoder, memory, encoder_state, bos, eos, pad, max_len)
    B = memory.memory.shape[0]
    state = decoder.init_state(encoder_state)
    tokens = memory.memory.new_full((B,), bos, dtype=torch.long)
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


def _captured_greedy_decode(decoder: _Decoder, memory: PrecomputedMemory, encoder_state,
                            bos: int, eos: int, pad: int, max_len: int) -> Tensor:
    """greedy_decode as replays of one captured step. The step writes its tokens into
    column t of a static (B, max_len) output, t being a device counter, and records the
    step at which each row ended; the output is cut after the step at which the last row
    ended, as the plain loop stops there."""
    B, device = memory.memory.shape[0], memory.memory.device
    state = _static_state(decoder.init_state(encoder_state))
    tokens = torch.full((B,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ended_at = torch.full((B,), max_len - 1, dtype=torch.long, device=device)
    out = torch.full((B, max_len), pad, dtype=torch.long, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)

    def body():
        logits, _, new = decoder.step(tokens, state, memory)
        nxt = logits.argmax(-1).masked_fill(finished, pad)
        out.index_copy_(1, t, nxt[:, None])
        ends = (nxt == eos) & ~finished
        ended_at.copy_(torch.where(ends, t, ended_at))
        finished.logical_or_(ends)
        tokens.copy_(nxt)
        _copy_state(state, new)
        t.add_(1)

    step = StepGraph(body, device)
    while step.calls < max_len:
        for _ in range(min(CHECK_EVERY, max_len - step.calls)):
            step()
        if bool(finished.all()):  # the one host read of CHECK_EVERY steps
            break
    length = int(ended_at.max()) + 1 if bool(finished.all()) else max_len
    return out[:, :length].clone()


def beam_search(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                eos: int, beam_size: int, max_len: int, length_penalty: LengthPenalty,
                n_best: int, min_len: int, captured: bool = False) -> BeamSearchResult:
    """Beam search with ``beam_size`` rows per sentence. A sentence is done once its best
    candidate of a step ends with eos and it has n_best finished hypotheses (or at max_len,
    when its live beams are finished as they are); its rows are then dropped. A beam that
    ends stops extending (its score becomes -inf), so a sentence may go on with fewer live
    beams, as in OpenNMT-py."""
    if captured:
        return _captured_beam_search(decoder, memory, encoder_state, bos, eos, beam_size,
                                     max_len, length_penalty, n_best, min_len)
    B, S = memory.memory.shape[:2]
    K = beam_size
    device = memory.memory.device
    memory_index = torch.arange(B, device=device).repeat_interleave(K)
    state = decoder.init_state(encoder_state, memory_index)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = _initial_scores(B, K, memory.memory)
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    attn = memory.memory.new_empty(B * K, 0, S)
    active = list(range(B))  # the sentence of each block of K rows
    finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
    beam_ids = torch.arange(K, device=device)
    for t in range(max_len):
        logits, weights, state = decoder.step(tokens, state, memory)
        top, tok, rows = _candidates(logits, scores, t < min_len, eos, K)
        seqs = torch.cat([seqs.index_select(0, rows), tok.view(-1, 1)], dim=1)
        attn = torch.cat([attn.index_select(0, rows), weights.index_select(0, rows)[:, None]],
                         dim=1)
        is_eos = tok == eos
        # The step's one host read: which candidates ended, and which are real (a -inf
        # score is no candidate: fewer than K were possible, as when eos is not allowed).
        ended, real = torch.stack([is_eos, top.isfinite()]).cpu().tolist()
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
    for a captured step) forbids the end token."""
    A, V = scores.shape[0], logits.shape[-1]
    logp = torch.log_softmax(logits.to(scores.dtype), dim=-1)
    if isinstance(block_eos, Tensor):
        logp[:, eos] = logp[:, eos].masked_fill(block_eos, float("-inf"))
    elif block_eos:
        logp[:, eos] = float("-inf")
    top, idx = logp.add_(scores.view(-1, 1)).view(A, K * V).topk(K, dim=1)
    rows = (torch.arange(A, device=idx.device)[:, None] * K + idx // V).view(-1)
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


def _captured_beam_search(decoder: _Decoder, memory: PrecomputedMemory, encoder_state,
                          bos: int, eos: int, K: int, max_len: int,
                          length_penalty: LengthPenalty, n_best: int,
                          min_len: int) -> BeamSearchResult:
    """beam_search as replays of one captured step over all B * K rows. The histories are
    static (B * K, max_len) buffers whose column t the step writes; a done sentence's rows
    go on (the shapes are fixed) but are no longer read."""
    B, S = memory.memory.shape[:2]
    device = memory.memory.device
    memory_index = torch.arange(B, device=device).repeat_interleave(K)
    state = _static_state(decoder.init_state(encoder_state, memory_index))
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = _initial_scores(B, K, memory.memory)
    top = torch.empty_like(scores)
    seqs = torch.zeros(B * K, max_len, dtype=torch.long, device=device)
    attn = memory.memory.new_zeros(B * K, max_len, S)
    flags = torch.zeros(2, B, K, dtype=torch.bool, device=device)  # ended, real
    t = torch.zeros(1, dtype=torch.long, device=device)

    def body():
        logits, weights, new = decoder.step(tokens, state, memory)
        best, tok, rows = _candidates(logits, scores, t[0] < min_len, eos, K)
        seqs.copy_(seqs.index_select(0, rows))
        seqs.index_copy_(1, t, tok.view(-1, 1))
        attn.copy_(attn.index_select(0, rows))
        attn.index_copy_(1, t, weights.index_select(0, rows)[:, None])
        is_eos = tok == eos
        flags.copy_(torch.stack([is_eos, best.isfinite()]))
        top.copy_(best)
        scores.copy_(best.masked_fill(is_eos, float("-inf")))
        tokens.copy_(tok.view(-1))
        _copy_state(state, new.reorder(rows))
        t.add_(1)

    step = StepGraph(body, device)
    finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
    live = [(b, b) for b in range(B)]
    for i in range(max_len):
        step()
        ended, real = flags.cpu().tolist()  # the step's one host read
        keep = _collect(finished, live, ended, real, top, seqs[:, :i + 1], attn[:, :i + 1],
                        length_penalty(i + 1), i == max_len - 1, n_best, K)
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
