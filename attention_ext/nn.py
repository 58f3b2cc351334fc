"""Attention layers (Luong 2015, Bahdanau 2015) built only on the fused functional ops.

Every layer splits its work the way a decoder uses it: ``precompute(memory)`` once per
source batch (the memory's projection and its masking), then ``forward(query, ...)`` at
every decoder step, which only projects the query and calls one fused op.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import functional, reference

Tensor = torch.Tensor

__all__ = ["PrecomputedMemory", "LuongAttention", "BahdanauAttention", "IMPLEMENTATIONS",
           "set_implementation"]

# What the layers' attention calls: the fused ops, or reference.py's eager PyTorch (the same
# math as users write it, for comparisons of speed, memory and results with one model).
IMPLEMENTATIONS = {"fused": functional, "reference": reference}


@dataclass(frozen=True)
class PrecomputedMemory:
    """The per-source-batch half of an attention layer, reused at every decoder step.

    Attributes:
        values: (B, S, Dm) encoder states, the values that are averaged.
        keys: what the query is scored against: ``values`` itself (Luong dot/general) or
            their projection (B, S, A) (Luong concat, Bahdanau).
        lengths: integer (B,) or None.
        mask: bool (B, S), True = attend, or None.
        owner: the layer that made it; the projection is only meaningful for that layer.
    """

    values: Tensor
    keys: Tensor
    lengths: Optional[Tensor]
    mask: Optional[Tensor]
    owner: nn.Module = field(repr=False, compare=False)


MemoryArg = Union[Tensor, PrecomputedMemory]


def _check_query(query, query_dim: int) -> None:
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() not in (2, 3) or query.shape[-1] != query_dim:
        raise ValueError(f"query must have shape (B, {query_dim}) or (B, Tq, {query_dim}) "
                         f"(query_dim = {query_dim}), got {tuple(query.shape)}")


def set_implementation(module: nn.Module, implementation: str) -> nn.Module:
    """Makes every attention layer in module (module included) call the ops of
    ``implementation``, a key of IMPLEMENTATIONS; returns module."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {tuple(IMPLEMENTATIONS)}, "
                         f"got {implementation!r}")
    for m in module.modules():
        if isinstance(m, _AttentionLayer):
            m.implementation = implementation
    return module


class _AttentionLayer(nn.Module):
    """Shared precompute/forward plumbing; subclasses define _keys, _attend and _output."""

    query_dim: int
    memory_dim: int
    implementation: str = "fused"  # set_implementation

    @property
    def _ops(self):
        return IMPLEMENTATIONS[self.implementation]

    def precompute(self, memory: Tensor, *, lengths: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> PrecomputedMemory:
        """Projects and stores ``memory`` (B, S, memory_dim) with its masking, for reuse
        at every decoder step of this source batch (and only with this layer)."""
        if not isinstance(memory, torch.Tensor):
            raise TypeError(f"memory must be a torch.Tensor or a PrecomputedMemory, "
                            f"got {type(memory).__name__}")
        if memory.dim() != 3 or memory.shape[-1] != self.memory_dim:
            raise ValueError(f"memory must have shape (B, S, {self.memory_dim}) "
                             f"(memory_dim = {self.memory_dim}), got {tuple(memory.shape)}")
        if lengths is not None and mask is not None:
            raise ValueError("pass either lengths or mask, not both")
        # The ops read memory and keys contiguous: a strided memory (a transposed or
        # sliced view) is copied once here instead of once per step.
        memory = memory.contiguous()
        return PrecomputedMemory(memory, self._keys(memory).contiguous(), lengths, mask, self)

    def _memory(self, memory: MemoryArg, lengths, mask) -> PrecomputedMemory:
        if not isinstance(memory, PrecomputedMemory):
            return self.precompute(memory, lengths=lengths, mask=mask)
        if memory.owner is not self:
            raise ValueError(f"memory was precomputed by another layer "
                             f"({type(memory.owner).__name__}); its projection only fits "
                             f"that layer: call this layer's precompute()")
        if lengths is None and mask is None:
            return memory
        if memory.lengths is not None or memory.mask is not None:
            name = "lengths" if lengths is not None else "mask"
            raise ValueError(f"{name} given together with a precomputed memory that already "
                             f"has its masking; pass it to precompute() only")
        if lengths is not None and mask is not None:
            raise ValueError("pass either lengths or mask, not both")
        # Masking per call on a memory precomputed without any: keep the projection.
        return PrecomputedMemory(memory.values, memory.keys, lengths, mask, self)

    def forward(self, query: Tensor, memory: MemoryArg, *, lengths: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, need_weights: bool = True,
                memory_index: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Attends ``query`` over ``memory``.

        Args:
            query: (B, query_dim) for one decoder step or (B, Tq, query_dim).
            memory: (B, S, memory_dim) encoder states, or this layer's
                ``precompute(memory, lengths=..., mask=...)``.
            lengths: integer (B,), positions j < lengths[b] attend; or
            mask: bool (B, S), True = attend. Not both; not again if ``memory`` has them.
            need_weights: when False the weights are not computed and None is returned.
            memory_index: integer (B,): query row b attends row memory_index[b] of the
                memory (M rows), e.g. the beams of a sentence its one precomputed memory.

        Returns:
            (output, weights): output (B, out_dim) / (B, Tq, out_dim) and weights
            (B, S) / (B, Tq, S), following the query's rank.
        """
        _check_query(query, self.query_dim)
        pre = self._memory(memory, lengths, mask)
        context, weights = self._attend(query, pre, need_weights, memory_index)
        return self._output(context, query), weights

    def _output(self, context: Tensor, query: Tensor) -> Tensor:
        return context


_LUONG_SCORES = ("dot", "general", "concat")


def _check_scale(scale) -> None:
    """scale is what dot_attention's scale is: a finite Python number, or None for 1."""
    if scale is None:
        return
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a Python number that multiplies the scores (e.g. "
                        f"memory_dim ** -0.5) or None; for a learned factor pass "
                        f"learn_scale=True; got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


class LuongAttention(_AttentionLayer):
    """Luong et al. 2015 global attention.

    score(h_t, h_s) = scale * g * h_t^T h_s                    ("dot")
                      scale * g * h_t^T W_a h_s                ("general")
                      scale * g * v_a^T tanh(W_a [h_t; h_s])   ("concat", W_a: query_dim rows)
    a_t = masked softmax over s; c_t = sum_s a_t(s) h_s;
    output = tanh(W_c [c_t; h_t]) (the attentional hidden state) if ``attentional``,
    else c_t (B, memory_dim).

    ``scale`` is a fixed number, as in :func:`attention_ext.dot_attention` (None means 1;
    ``memory_dim ** -0.5`` gives scaled dot-product scores). g is a learned scalar
    initialised to 1 with ``learn_scale=True`` (TF-Addons ``scale=True``), else 1.
    ``bias`` adds a bias to W_c.
    """

    def __init__(self, query_dim: int, memory_dim: Optional[int] = None, score: str = "dot",
                 *, scale: Optional[float] = None, learn_scale: bool = False,
                 attentional: bool = True, bias: bool = False):
        super().__init__()
        memory_dim = query_dim if memory_dim is None else memory_dim
        if score not in _LUONG_SCORES:
            raise ValueError(f"score must be one of {_LUONG_SCORES}, got {score!r}")
        _check_scale(scale)
        if score == "dot" and memory_dim != query_dim:
            raise ValueError(f"score='dot' needs memory_dim == query_dim, got memory_dim="
                             f"{memory_dim} and query_dim={query_dim}; use score='general'")
        self.query_dim, self.memory_dim = query_dim, memory_dim
        self.score, self.attentional = score, attentional
        self.scale = None if scale is None else float(scale)
        if score == "general":
            # W_a h_s is applied as (W_a^T h_t)^T h_s: projecting the query costs
            # B*Dq*Dm per step instead of B*S*Dq*Dm per source batch.
            self.W_a = nn.Linear(query_dim, memory_dim, bias=False)  # weight = W_a^T
        elif score == "concat":
            # One W_a over [h_t; h_s], applied as W_q h_t + W_k h_s so the memory half is
            # precomputed once per source batch.
            self.W_a = nn.Linear(query_dim + memory_dim, query_dim, bias=False)
            self.v_a = nn.Parameter(torch.empty(query_dim))
            bound = 1.0 / math.sqrt(query_dim)
            nn.init.uniform_(self.v_a, -bound, bound)
        self.g = nn.Parameter(torch.ones(())) if learn_scale else None
        self.W_c = (nn.Linear(memory_dim + query_dim, query_dim, bias=bias)
                    if attentional else None)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, memory_dim={self.memory_dim}, "
                f"score={self.score!r}, scale={self.scale}, learn_scale={self.g is not None}, "
                f"attentional={self.attentional}")

    def _keys(self, memory: Tensor) -> Tensor:
        if self.score == "concat":
            return memory @ self.W_a.weight[:, self.query_dim:].t()
        return memory

    def _attend(self, query: Tensor, pre: PrecomputedMemory, need_weights: bool,
                memory_index: Optional[Tensor]):
        kw = dict(lengths=pre.lengths, mask=pre.mask, need_weights=need_weights,
                  memory_index=memory_index)
        if self.score == "concat":
            # scale g v^T tanh(.) = (scale g v)^T tanh(.): the factors go into v, the op
            # stays fused.
            v = self.v_a if self.scale is None else self.v_a * self.scale
            if self.g is not None:
                v = v * self.g
            query_proj = query @ self.W_a.weight[:, : self.query_dim].t()
            return self._ops.additive_attention(query_proj, pre.keys, v, pre.values, **kw)
        q = self.W_a(query) if self.score == "general" else query
        if self.g is not None:
            q = q * self.g  # g (q.h) = (g q).h: autograd gives g its gradient
        return self._ops.dot_attention(q, pre.keys, pre.values, scale=self.scale, **kw)

    def _output(self, context: Tensor, query: Tensor) -> Tensor:
        if self.W_c is None:
            return context
        return torch.tanh(self.W_c(torch.cat([context, query], dim=-1)))


class BahdanauAttention(_AttentionLayer):
    """Bahdanau et al. 2015 additive attention.

    score(s, h_j) = v^T tanh(W s + U h_j)              (normalize=False)
                  = (g v/||v||)^T tanh(W s + U h_j + b) (normalize=True: weight-normalised v,
                    g initialised to sqrt(1/units), b to 0; TF-Addons / NVIDIA GNMT)
    a = masked softmax over j; output = context = sum_j a_j h_j, (B, memory_dim).
    """

    def __init__(self, query_dim: int, memory_dim: int, units: int, *, normalize: bool = False):
        super().__init__()
        self.query_dim, self.memory_dim, self.units = query_dim, memory_dim, units
        self.normalize = normalize
        self.W = nn.Linear(query_dim, units, bias=False)
        self.U = nn.Linear(memory_dim, units, bias=False)
        self.v = nn.Parameter(torch.empty(units))
        bound = 1.0 / math.sqrt(units)
        nn.init.uniform_(self.v, -bound, bound)
        if normalize:
            self.g = nn.Parameter(torch.tensor(math.sqrt(1.0 / units)))
            self.b = nn.Parameter(torch.zeros(units))
        else:
            self.g, self.b = None, None

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, memory_dim={self.memory_dim}, "
                f"units={self.units}, normalize={self.normalize}")

    def _keys(self, memory: Tensor) -> Tensor:
        keys = self.U(memory)
        # b sits inside tanh with U h_j: added once per source batch, not per step.
        return keys + self.b if self.b is not None else keys

    def _attend(self, query: Tensor, pre: PrecomputedMemory, need_weights: bool,
                memory_index: Optional[Tensor]):
        v = self.v if self.g is None else self.g * self.v / self.v.norm()
        return self._ops.additive_attention(self.W(query), pre.keys, v, pre.values,
                                            lengths=pre.lengths, mask=pre.mask,
                                            need_weights=need_weights,
                                            memory_index=memory_index)
