"""The Bahdanau attention layer of PyTorch's seq2seq translation tutorial, fused.

Tutorial (intermediate/seq2seq_translation_tutorial)::

    scores = Va(tanh(Wa(query) + Ua(keys)))          # (B, S, 1)
    weights = softmax(scores.squeeze(2).unsqueeze(1))  # (B, 1, S)
    context = bmm(weights, keys)                       # (B, 1, H)
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import additive_attention


class BahdanauAttention(nn.Module):
    """Drop-in for the tutorial's ``BahdanauAttention(hidden_size)``: same parameters
    (``Wa``, ``Ua``, ``Va``, all Linear with bias), same ``forward(query, keys)``.

    ``Va.bias`` adds the same constant to every score, which softmax cancels: it does not
    enter the fused op, and its gradient is exactly 0 (the tutorial's is 0 up to rounding).

    ``Ua(keys)`` does not depend on the decoder step, so it is cached: the last projection
    is reused when the very same ``keys`` tensor comes back unchanged (same object, same
    ``keys._version``), ``Ua``'s parameters are the same objects at the same versions and
    the grad mode is the same. A projection that is part of an autograd graph is dropped
    as soon as a backward pass reaches it (its graph may be freed then). The cache is off
    under ``torch.compile`` and for inference tensors (``torch.inference_mode``), which
    have no version counter: there pass ``keys_proj=precompute(keys)`` to ``forward``
    yourself. ``precompute(keys)`` also fills the cache; ``clear_cache()`` empties it.

    Calls that hit the cache share one ``Ua(keys)`` graph node, as if it were computed
    once before the decoder loop: gradients are the same as the tutorial's, but two
    separate ``backward()`` calls through it need ``retain_graph=True`` (as they already
    do for the encoder that produced ``keys``), or ``clear_cache()`` in between. The cache
    holds the last projection (and so ``keys``) until other keys come or backward runs.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.Wa = nn.Linear(hidden_size, hidden_size)
        self.Ua = nn.Linear(hidden_size, hidden_size)
        self.Va = nn.Linear(hidden_size, 1)
        self._cache = None  # (key tuple, weakref to keys, projection)
        self.cache_hits = 0  # counters, for tests and profiling
        self.cache_misses = 0

    def clear_cache(self) -> None:
        self._cache = None

    def _cache_key(self, keys: Tensor):
        p = (self.Ua.weight, self.Ua.bias)
        return (keys._version, torch.is_grad_enabled(),
                tuple(id(t) for t in p), tuple(t._version for t in p))

    def precompute(self, keys: Tensor) -> Tensor:
        """``Ua(keys)`` (B, S, H), reused by later ``forward`` calls with these keys."""
        # Inference tensors have no version counter, so in-place changes can't be seen.
        if torch.compiler.is_compiling() or keys.is_inference() \
                or self.Ua.weight.is_inference():
            return self.Ua(keys)
        key = self._cache_key(keys)
        if self._cache is not None and self._cache[0] == key and self._cache[1]() is keys:
            self.cache_hits += 1
            return self._cache[2]
        self.cache_misses += 1
        proj = self.Ua(keys)
        self._cache = (key, weakref.ref(keys), proj)
        if proj.requires_grad:
            # Once backward has run through proj its saved tensors may be freed:
            # never hand it to a new graph after that.
            entry = self._cache

            def _drop(grad, entry=entry):
                if self._cache is entry:
                    self._cache = None
                return grad

            proj.register_hook(_drop)
        return proj

    def forward(self, query: Tensor, keys: Tensor, *, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None,
                keys_proj: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, 1, H) decoder state (also (B, T, H) or (B, H)).
            keys: (B, S, H) encoder outputs; also the values.
            mask: optional bool (B, S), True = attend.
            lengths: optional integer (B,); positions j < lengths[b] attend.
            keys_proj: optional ``precompute(keys)`` (B, S, H), used as given.

        Returns:
            context (B, 1, H) and weights (B, 1, S) (following the query's rank).
        """
        # Multiplying by 0 keeps Va.bias in the graph, so its gradient is 0, not None.
        query_proj = self.Wa(query) + self.Va.bias * 0
        if keys_proj is None:
            keys_proj = self.precompute(keys)
        return additive_attention(query_proj, keys_proj, self.Va.weight.view(-1),
                                  keys, lengths=lengths, mask=mask)
