"""Greedy decoding and beam search over a decoder's steps.

Both read the device once per step, to learn which hypotheses ended (the finished-check);
everything else stays on the device. Beam search keeps beam_size rows per sentence that
index the sentence's precomputed memory through ``memory_index`` (nothing is tiled), and
drops a sentence's rows once it is done, so finished sentences cost nothing. The same
decodings as replays of a captured step are in ``captured``.
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


def greedy_decode(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, *,
                  bos_idx: int, eos_idx: int, pad_idx: int, max_len: int) -> Tensor:
    """The argmax token at every step until every row has produced eos_idx or max_len
    tokens. Returns (B, L) token ids, eos_idx included, pad_idx after it."""
    B = memory.values.shape[0]
    state = decoder.init_state(encoder_state)
    tokens = memory.values.new_full((B,), bos_idx, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    out = []
    for _ in range(max_len):
        logits, _, state = decoder.step(tokens, state, memory)
        tokens = logits.argmax(-1).masked_fill(finished, pad_idx)
        out.append(tokens)
        finished = finished | (tokens == eos_idx)
        if bool(finished.all()):  # the step's one host read
            break
    return torch.stack(out, 1)


def beam_search(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, *,
                bos_idx: int, eos_idx: int, beam_size: int, max_len: int,
                length_penalty: LengthPenalty, n_best: int, min_len: int) -> BeamSearchResult:
    """Beam search with ``beam_size`` rows per sentence. A sentence is done once its best
    candidate of a step ends with eos_idx and it has n_best finished hypotheses (or at
    max_len, when its live beams are finished as they are); its rows are then dropped. A
    beam that ends stops extending (its score becomes -inf), so a sentence may go on with
    fewer live beams, as in OpenNMT-py."""
    B, S = memory.values.shape[:2]
    device = memory.values.device
    memory_index = torch.arange(B, device=device).repeat_interleave(beam_size)
    state = decoder.init_state(encoder_state, memory_index)
    tokens = torch.full((B * beam_size,), bos_idx, dtype=torch.long, device=device)
    scores = initial_scores(B, beam_size, memory.values)
    seqs = torch.empty(B * beam_size, 0, dtype=torch.long, device=device)
    attn = memory.values.new_empty(B * beam_size, 0, S)
    active = list(range(B))  # the sentence of each block of beam_size rows
    finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
    beam_ids = torch.arange(beam_size, device=device)
    for t in range(max_len):
        logits, weights, state = decoder.step(tokens, state, memory)
        top, tok, rows = candidates(logits, scores, t < min_len, eos_idx)
        del logits  # not held while the next step makes its own
        seqs = torch.cat([seqs.index_select(0, rows), tok.view(-1, 1)], dim=1)
        attn = torch.cat([attn.index_select(0, rows), weights.index_select(0, rows)[:, None]],
                         dim=1)
        is_eos = tok == eos_idx
        # The step's one host read: which candidates ended, and which are real (a -inf
        # score is no candidate: fewer than beam_size were possible, as when the end token
        # is not allowed).
        ended, real = torch.stack([is_eos, top > float("-inf")]).cpu().tolist()
        A = len(active)
        keep = collect_finished(finished, list(enumerate(active)), ended, real, top, seqs,
                                attn, length_penalty(t + 1), t == max_len - 1, n_best)
        if not keep:
            break
        # Beams that ended stop extending; sentences that are done lose their rows.
        top = top.masked_fill(is_eos, float("-inf"))
        if len(keep) < A:
            kept = _to_device([a for a, _ in keep], device)
            rows = rows.view(A, beam_size).index_select(0, kept).view(-1)
            sel = (kept[:, None] * beam_size + beam_ids).view(-1)
            seqs, attn = seqs.index_select(0, sel), attn.index_select(0, sel)
            top, tok = top.index_select(0, kept), tok.index_select(0, kept)
            active = [b for _, b in keep]
        state = state.reorder(rows)
        scores, tokens = top, tok.reshape(-1)
    return best_hypotheses(finished, n_best)


def initial_scores(B: int, beam_size: int, like: Tensor) -> Tensor:
    """(B, beam_size) beam scores, in float32 or wider: only the first beam is live at the
    start, the others would repeat it."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    scores = torch.zeros(B, beam_size, device=like.device, dtype=dtype)
    scores[:, 1:] = float("-inf")
    return scores


def candidates(logits: Tensor, scores: Tensor, block_eos, eos_idx: int):
    """The best extensions of each sentence's beams, as many as it has beams (scores is
    (A, beam_size)): their scores (A, beam_size), tokens (A, beam_size) and the rows
    (A * beam_size,) of the beams they extend. block_eos (a bool, or a bool tensor for a
    captured step) forbids the end token.

    The log-probabilities are one (A * beam_size, V) tensor in the scores' dtype, from one
    log_softmax (logsumexp is nine kernels on a GPU, and its own temporary as large), and
    the candidate scores are added to it in place."""
    (A, beam_size), V = scores.shape, logits.shape[-1]
    logp = torch.log_softmax(logits, dim=-1, dtype=scores.dtype)
    if isinstance(block_eos, Tensor):
        logp[:, eos_idx].masked_fill_(block_eos, float("-inf"))
    elif block_eos:
        logp[:, eos_idx] = float("-inf")
    top, idx = logp.add_(scores.view(-1, 1)).view(A, beam_size * V).topk(beam_size, dim=1)
    first_row = torch.arange(0, A * beam_size, beam_size, device=idx.device)
    return top, idx % V, (first_row[:, None] + idx // V).view(-1)


def collect_finished(finished, blocks, ended, real, top, seqs, attn, penalty: float,
                     last: bool, n_best: int):
    """Moves the candidates that ended (all live ones at the last step) into finished, for
    the (block, sentence) pairs of blocks (block a: the beam_size rows from a * beam_size
    of seqs and attn, row a of top (A, beam_size)). Returns the pairs whose sentences go
    on."""
    beam_size = top.shape[1]
    keep = []
    for a, b in blocks:
        for k in range(beam_size):
            if real[a][k] and (last or ended[a][k]):
                r = a * beam_size + k
                # Copies: a view would keep the step's whole history alive.
                finished[b].append((top[a, k] / penalty, seqs[r].clone(), attn[r].clone()))
        if not (last or (ended[a][0] and len(finished[b]) >= n_best)):
            keep.append((a, b))
    return keep


def _to_device(values: List[int], device) -> Tensor:
    """A host list as a long tensor on device; to a GPU through pinned memory, so the copy
    does not wait for the GPU (the step's one wait is its finished-check)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def best_hypotheses(finished, n_best: int) -> BeamSearchResult:
    """The n_best finished hypotheses of each sentence, best first."""
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
