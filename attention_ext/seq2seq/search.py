"""Greedy decoding and beam search over a decoder's steps.

Both read the device once per step, to learn which hypotheses ended (the finished-check);
everything else stays on the device. Beam search keeps beam_size rows per sentence that
index the sentence's precomputed memory through ``memory_index`` (nothing is tiled), and
drops a sentence's rows once it is done, so finished sentences cost nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from ..nn import PrecomputedMemory
from .decoders import _Decoder

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


def greedy_decode(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                  eos: int, pad: int, max_len: int) -> Tensor:
    """The argmax token at every step until every row has produced eos or max_len tokens.
    Returns (B, L) token ids, eos included, pad after it."""
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


def beam_search(decoder: _Decoder, memory: PrecomputedMemory, encoder_state, bos: int,
                eos: int, beam_size: int, max_len: int, length_penalty: LengthPenalty,
                n_best: int, min_len: int) -> BeamSearchResult:
    """Beam search with ``beam_size`` rows per sentence. A sentence is done once its best
    candidate of a step ends with eos and it has n_best finished hypotheses (or at max_len,
    when its live beams are finished as they are); its rows are then dropped. A beam that
    ends stops extending (its score becomes -inf), so a sentence may go on with fewer live
    beams, as in OpenNMT-py."""
    B, S = memory.memory.shape[:2]
    K, V = beam_size, decoder.vocab_size
    device = memory.memory.device
    memory_index = torch.arange(B, device=device).repeat_interleave(K)
    state = decoder.init_state(encoder_state, memory_index)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    # Only the first beam is live at the start: the others would repeat it.
    score_dtype = torch.promote_types(memory.memory.dtype, torch.float32)
    scores = torch.zeros(B, K, device=device, dtype=score_dtype)
    scores[:, 1:] = float("-inf")
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    attn = memory.memory.new_empty(B * K, 0, S)
    active = list(range(B))  # the sentence of each block of K rows
    finished: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(B)]
    beam_ids = torch.arange(K, device=device)
    for t in range(max_len):
        logits, weights, state = decoder.step(tokens, state, memory)
        logp = torch.log_softmax(logits.to(score_dtype), dim=-1)
        if t < min_len:
            logp[:, eos] = float("-inf")
        A = len(active)
        top, idx = logp.add_(scores.view(-1, 1)).view(A, K * V).topk(K, dim=1)
        tok = idx % V
        rows = (torch.arange(A, device=device)[:, None] * K + idx // V).view(-1)
        seqs = torch.cat([seqs.index_select(0, rows), tok.view(-1, 1)], dim=1)
        attn = torch.cat([attn.index_select(0, rows), weights.index_select(0, rows)[:, None]],
                         dim=1)
        is_eos = tok == eos
        # The step's one host read: which candidates ended, and which are real (a -inf
        # score is no candidate: fewer than K were possible, as when eos is not allowed).
        ended, real = torch.stack([is_eos, top.isfinite()]).cpu().tolist()
        last = t == max_len - 1
        penalty = length_penalty(t + 1)
        keep = []
        for a, b in enumerate(active):
            for k in range(K):
                if real[a][k] and (last or ended[a][k]):
                    r = a * K + k
                    # Copies: a view would keep the step's whole history alive.
                    finished[b].append((top[a, k] / penalty, seqs[r].clone(), attn[r].clone()))
            if not (last or (ended[a][0] and len(finished[b]) >= n_best)):
                keep.append(a)
        if not keep:
            break
        # Beams that ended stop extending; sentences that are done lose their rows.
        top = top.masked_fill(is_eos, float("-inf"))
        if len(keep) < A:
            kept = _to_device(keep, device)
            rows = rows.view(A, K).index_select(0, kept).view(-1)
            sel = (kept[:, None] * K + beam_ids).view(-1)
            seqs, attn = seqs.index_select(0, sel), attn.index_select(0, sel)
            top, tok = top.index_select(0, kept), tok.index_select(0, kept)
            active = [active[a] for a in keep]
        state = state.reorder(rows)
        scores, tokens = top, tok.reshape(-1)
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
