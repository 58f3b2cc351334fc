"""Attention layers (Luong 2015, Bahdanau 2015, Chorowski 2015) built only on the fused
functional ops.

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

__all__ = ["PrecomputedMemory", "LuongAttention", "BahdanauAttention",
           "LocationSensitiveAttention", "LocationState", "IMPLEMENTATIONS", "set_implementation"]

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
        self._check_memory_tensor(memory)
        if lengths is not None and mask is not None:
            raise ValueError("pass either lengths or mask, not both")
        # The ops read memory and keys contiguous: a strided memory (a transposed or
        # sliced view) is copied once here instead of once per step.
        memory = memory.contiguous()
        return PrecomputedMemory(memory, self._keys(memory).contiguous(), lengths, mask, self)

    def _check_memory_tensor(self, memory) -> None:
        if not isinstance(memory, torch.Tensor):
            raise TypeError(f"memory must be a torch.Tensor or a PrecomputedMemory, "
                            f"got {type(memory).__name__}")
        if memory.dim() != 3 or memory.shape[-1] != self.memory_dim:
            raise ValueError(f"memory must have shape (B, S, {self.memory_dim}) "
                             f"(memory_dim = {self.memory_dim}), got {tuple(memory.shape)}")

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


_NORMALIZATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class LocationState:
    """What a LocationSensitiveAttention step reads from the steps before it, and returns
    updated: the attention weights it feeds back.

    Attributes:
        previous: (B, S), the last step's weights (or the initial ones).
        cumulative: (B, S), the sum of the weights of every step so far, for a layer with
            channels=2 (Tacotron 2); None for channels=1.
    """

    previous: Tensor
    cumulative: Optional[Tensor] = None

    def location(self) -> Tensor:
        """(B, C, S): the location convolution's input, [previous] or [previous, cumulative]."""
        if self.cumulative is None:
            return self.previous[:, None]
        return torch.stack((self.previous, self.cumulative), 1)

    def reorder(self, index: Tensor) -> "LocationState":
        """The state of rows ``index`` (integer (B',)): a beam search's surviving beams."""
        cumulative = None if self.cumulative is None else self.cumulative.index_select(0, index)
        return LocationState(self.previous.index_select(0, index), cumulative)


class LocationSensitiveAttention(_AttentionLayer):
    """Location-sensitive attention (Chorowski et al. 2015): Tacotron 2's, ESPnet's
    ``AttLoc``'s and SpeechBrain's, one decoder step per call.

    With the weights fed back from the steps before, prev (B, C, S) = [previous] (C = 1) or
    [previous, cumulative] (C = 2), at query row b and source position j::

        L[:, j] = location_conv(prev[b])[:, j]    (F filters of K taps, zero padded)
        e[j]    = scale * v . tanh(W query[b] + U memory[b, j] + location_dense(L[:, j]))
                  (+ score_bias with normalization="sigmoid")
        a       = softmax(e) over the attended positions ("softmax"), or
                  sigmoid(e[j]) / sum_k sigmoid(e[k]) ("sigmoid")
        output  = context = sum_j a[j] memory[b, j], (B, memory_dim)

    The state carries the weights from step to step, so a decoder loop reads::

        memory = layer.precompute(encoder_out, lengths=lengths)
        state = layer.initial_state(memory)
        for query in queries:                    # (B, query_dim) each
            context, weights, state = layer(query, memory, state)

    The whole step (convolution, its projection, the scores, the normalisation and the
    context) is one fused op: no (B, S, units) or (B, S, filters) tensor is kept for the
    backward.

    Args:
        query_dim: the decoder state's size.
        memory_dim: the encoder states' size.
        units: A, the attention's hidden size (W, U, location_dense map to it).
        filters: F, the location convolution's output channels.
        kernel_size: K, odd: its taps.
        channels: C, 1 (the previous weights; ESPnet, SpeechBrain) or 2 (the previous and
            the cumulative weights; Tacotron 2).
        scale: multiplies v . tanh(...) (ESPnet's and SpeechBrain's ``scaling``).
        normalization: "softmax", or "sigmoid" (Chorowski et al.'s smoothed focus), which
            adds a learned score bias ``score_bias`` (initialised to 0; a softmax would
            ignore it).
        bias: W has a bias (the b inside tanh of ESPnet's and SpeechBrain's layers).
        detach_state: the state carries the weights detached, so no gradient flows from one
            step to the next through them (SpeechBrain); by default it does (Tacotron 2,
            ESPnet).
    """

    def __init__(self, query_dim: int, memory_dim: int, units: int, filters: int,
                 kernel_size: int, channels: int = 2, *, scale: float = 1.0,
                 normalization: str = "softmax", bias: bool = False,
                 detach_state: bool = False):
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 (the previous weights) or 2 (the previous "
                             f"and the cumulative weights), got {channels!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (the convolution is "
                             f"zero padded by (kernel_size - 1) / 2 on each side to keep "
                             f"the length), got {kernel_size!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, "
                             f"got {normalization!r}")
        _check_scale(scale)
        self.query_dim, self.memory_dim, self.units = query_dim, memory_dim, units
        self.filters, self.kernel_size, self.channels = filters, kernel_size, channels
        self.scale = 1.0 if scale is None else float(scale)
        self.normalization, self.detach_state = normalization, detach_state
        self.W = nn.Linear(query_dim, units, bias=bias)
        self.U = nn.Linear(memory_dim, units, bias=False)
        self.location_conv = nn.Conv1d(channels, filters, kernel_size,
                                       padding=(kernel_size - 1) // 2, bias=False)
        self.location_dense = nn.Linear(filters, units, bias=False)
        self.v = nn.Parameter(torch.empty(units))
        bound = 1.0 / math.sqrt(units)
        nn.init.uniform_(self.v, -bound, bound)
        self.score_bias = (nn.Parameter(torch.zeros(1)) if normalization == "sigmoid"
                           else None)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, memory_dim={self.memory_dim}, "
                f"units={self.units}, filters={self.filters}, "
                f"kernel_size={self.kernel_size}, channels={self.channels}, "
                f"scale={self.scale}, normalization={self.normalization!r}, "
                f"detach_state={self.detach_state}")

    def _keys(self, memory: Tensor) -> Tensor:
        return self.U(memory)

    def initial_state(self, memory: MemoryArg, *, lengths: Optional[Tensor] = None,
                      mask: Optional[Tensor] = None, memory_index: Optional[Tensor] = None,
                      uniform: bool = False) -> LocationState:
        """The state before the first step, one row per query row.

        Args:
            memory: this layer's ``precompute(...)``, or the (B, S, memory_dim) memory.
            lengths, mask: the masking, as for forward (with a precomputed memory, only if
                it has none).
            memory_index: integer (B,) as for forward: the state then has B rows.
            uniform: previous = 1 / n over each row's n attended positions (ESPnet,
                SpeechBrain) instead of zeros (Tacotron 2).

        Returns:
            LocationState of the memory's dtype and device; ``cumulative`` (channels=2)
            starts at zeros.
        """
        if isinstance(memory, PrecomputedMemory):
            pre = self._memory(memory, lengths, mask)
            values, lengths, mask = pre.values, pre.lengths, pre.mask
        else:
            self._check_memory_tensor(memory)
            if lengths is not None and mask is not None:
                raise ValueError("pass either lengths or mask, not both")
            values = memory
        S = values.shape[1]
        rows = values.shape[0] if memory_index is None else memory_index.shape[0]
        if uniform:
            valid = reference.valid_positions(lengths, mask, values.shape[0], S, values.device)
            if valid is None:
                valid = torch.ones(values.shape[0], S, dtype=torch.bool, device=values.device)
            (valid,) = reference.tile_memory(memory_index, valid)
            previous = (valid / valid.sum(-1, keepdim=True).clamp_min(1)).to(values.dtype)
        else:
            previous = values.new_zeros(rows, S)
        cumulative = values.new_zeros(rows, S) if self.channels == 2 else None
        return LocationState(previous, cumulative)

    def _check_state(self, state, rows: int, src_len: int) -> None:
        if not isinstance(state, LocationState):
            raise TypeError(f"state must be a LocationState (layer.initial_state(memory), then "
                            f"what each step returns), got {type(state).__name__}")
        want = (rows, src_len)
        if tuple(state.previous.shape) != want:
            raise ValueError(f"state.previous must have shape (B, S) = {want}, "
                             f"got {tuple(state.previous.shape)}")
        if (state.cumulative is not None) != (self.channels == 2):
            raise ValueError(f"state.cumulative must be {'a' if self.channels == 2 else 'no'} "
                             f"tensor for a layer of channels={self.channels}")
        if state.cumulative is not None and tuple(state.cumulative.shape) != want:
            raise ValueError(f"state.cumulative must have shape (B, S) = {want}, "
                             f"got {tuple(state.cumulative.shape)}")

    def forward(self, query: Tensor, memory: MemoryArg, state: LocationState, *,
                lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                window: Optional[Tensor] = None, memory_index: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, LocationState]:
        """One decoder step.

        Args:
            query: (B, query_dim), the decoder state.
            memory: (B, S, memory_dim) encoder states, or this layer's
                ``precompute(memory, lengths=..., mask=...)`` (once per batch).
            state: the LocationState of the step before (``initial_state`` at the first).
            lengths: integer (B,), positions j < lengths[b] attend; or
            mask: bool (B, S), True = attend. Not both; not again if ``memory`` has them.
            window: integer (B, 2) on the query's device: row b also attends only
                [window[b, 0], window[b, 1]) (the monotonic window of TTS inference).
            memory_index: integer (B,): query row b attends row memory_index[b] of the
                memory (M rows), e.g. a sentence's beams its one precomputed memory; the
                state and the window stay per query row.

        Returns:
            (context (B, memory_dim), weights (B, S), the next step's LocationState).
        """
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if query.dim() != 2 or query.shape[1] != self.query_dim:
            raise ValueError(f"query must have shape (B, {self.query_dim}), one decoder step "
                             f"(query_dim = {self.query_dim}), got {tuple(query.shape)}")
        pre = self._memory(memory, lengths, mask)
        self._check_state(state, query.shape[0], pre.values.shape[1])
        context, weights = self._ops.location_attention(
            self.W(query), pre.keys, state.location(), self.location_conv.weight,
            self.location_dense.weight, self.v, pre.values, lengths=pre.lengths,
            mask=pre.mask, window=window, score_bias=self.score_bias, scale=self.scale,
            normalization=self.normalization, memory_index=memory_index)
        fed_back = weights.detach() if self.detach_state else weights
        cumulative = None if state.cumulative is None else state.cumulative + fed_back
        return context, weights, LocationState(fed_back, cumulative)
