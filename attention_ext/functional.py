"""The user API: argument normalisation in front of the fused operators.

Shape, dtype, device and value checks live once, in C++ (csrc/include/attention_ext/checks.h),
so the ops give the same messages whether called from here or from torch.ops directly.
The ops take the query as given, (B, D) for one decoder step or (B, Tq, D), and their
outputs follow its rank, so nothing is reshaped here (a decode step spends no Python time
on views).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _op_registrations  # noqa: F401  (fake kernels and autograd of the ops)

Tensor = torch.Tensor


def _outputs(context: Tensor, weights: Tensor, need_weights: bool):
    return context, (weights if need_weights else None)


def _below_autograd_supported() -> bool:
    """Whether _call_op's fast path may use torch's private guard
    torch._C._AutoDispatchBelowAutograd (the one torch.library's autograd kernel uses). It
    exists throughout torch 2 from the package's minimum (2.4);
    tests/test_autograd.py::test_below_autograd_fast_path fails on a torch where it or the
    path change. Any other torch gets the plain call."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    return (2, 4) <= version < (3, 0) and hasattr(torch._C, "_AutoDispatchBelowAutograd")


_BELOW_AUTOGRAD = _below_autograd_supported()


def _call_op(op, *args):
    """Calls op, skipping its Python autograd kernel when no gradient can flow.

    With grad mode off or no input requiring grad (inference, decoding), the kernel that
    torch.library.register_autograd installs only redispatches below autograd; doing that
    here saves its Python round trip (docs/performance.md, "Python overhead"). Under
    torch.compile the op is called as is, so tracing sees the registered autograd.
    """
    if (
        not _BELOW_AUTOGRAD
        or torch.compiler.is_compiling()
        or (
            torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        )
    ):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _as_scale(scale) -> float:
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        raise ValueError(
            "scale must be a Python number; to learn a scale, multiply the query by it"
        )
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def dot_attention(
    query: Tensor,
    keys: Tensor,
    values: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Luong dot attention: score + masked softmax + context in one fused pass.

    score[b, t, j] = scale * <query[b, t], keys[b, j]>; weights = softmax over the
    positions that attend; context = sum_j weights[b, t, j] * values[b, j].
    Luong "general" is this op on a query projected by the layer's weight matrix.

    Args:
        query: (B, D) for one decoder step or (B, Tq, D).
        keys: (B, S, D), or (M, S, D) with memory_index.
        values: (B, S, Dv); defaults to ``keys`` (the encoder states).
        lengths: integer (B,); positions j < lengths[b] attend, the rest are never read.
        mask: bool (B, S), True = attend. Give lengths or mask, not both.
        scale: multiplies the scores; None means 1 (Luong's unscaled dot). Pass
            ``query.shape[-1] ** -0.5`` for scaled dot-product attention.
        need_weights: when False the weights are never written and None is returned.
        memory_index: integer (B,) on the query's device: query row b attends memory row
            ``memory_index[b]`` of keys, values, lengths and mask (M rows each). Beams of
            one sentence share its memory this way instead of tiling it; gradients of the
            shared rows are summed in query-row order.

    Returns:
        (context, weights): context (B, Dv) / (B, Tq, Dv) and weights (B, S) / (B, Tq, S),
        following the query's rank. A row with nothing to attend to gives context 0 and
        weights 0 (and zero gradients), never NaN.
    """
    context, weights, _ = _call_op(
        torch.ops.attention_ext.dot_attention.default,
        query, keys, values, lengths, mask, _as_scale(scale), bool(need_weights), memory_index,
    )
    return _outputs(context, weights, need_weights)


def additive_attention(
    query_proj: Tensor,
    keys_proj: Tensor,
    v: Tensor,
    values: Tensor,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Additive (Bahdanau; Luong "concat") attention, fused: tanh-score, masked softmax
    and context in one pass, with no B x Tq x S x A tensor in forward or backward.

    score[b, t, j] = sum_a v[a] * tanh(query_proj[b, t, a] + keys_proj[b, j, a]);
    weights = softmax over the positions that attend; context = weights @ values.
    The projections are the caller's (W q and U k, biases included): keys_proj is computed
    once per source sentence, query_proj once per decoder step.

    float32 uses a tanh about as accurate as ``torch.tanh`` (CUDA's ``tanhf``; on the CPU
    a vectorised one within 9e-8); float16/bfloat16 compute in float32 with it; float64
    uses the exact tanh.

    Args:
        query_proj: (B, A) for one decoder step or (B, Tq, A).
        keys_proj: (B, S, A), or (M, S, A) with memory_index.
        v: (A,), the score vector.
        values: (B, S, Dv), usually the encoder states.
        lengths: integer (B,); positions j < lengths[b] attend, the rest are never read.
        mask: bool (B, S), True = attend. Give lengths or mask, not both.
        need_weights: when False the weights are never written and None is returned.
        memory_index: integer (B,) on query_proj's device: query row b attends memory row
            ``memory_index[b]`` of keys_proj, values, lengths and mask (M rows each), as
            in :func:`dot_attention`.

    Returns:
        (context, weights): context (B, Dv) / (B, Tq, Dv) and weights (B, S) / (B, Tq, S),
        following query_proj's rank. A row with nothing to attend to gives context 0,
        weights 0 and zero gradients, never NaN.
    """
    context, weights, _ = _call_op(
        torch.ops.attention_ext.additive_attention.default,
        query_proj, keys_proj, v, values, lengths, mask, bool(need_weights), memory_index,
    )
    return _outputs(context, weights, need_weights)


_NORMALIZATIONS = {"softmax": False, "sigmoid": True}  # -> the op's `sigmoid` flag


def location_attention(
    query_proj: Tensor,
    keys_proj: Tensor,
    prev: Tensor,
    conv_weight: Tensor,
    location_weight: Tensor,
    v: Tensor,
    values: Tensor,
    *,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    window: Optional[Tensor] = None,
    score_bias: Optional[Tensor] = None,
    scale: float = 1.0,
    normalization: str = "softmax",
    need_weights: bool = True,
    memory_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Location-sensitive attention (Chorowski et al. 2015; Tacotron 2, ESPnet ``AttLoc``,
    SpeechBrain), one decoder step, fused: the location convolution, its projection, the
    tanh score, the normalisation and the context in one pass, with no B x S x A or
    B x S x F tensor in forward or backward.

    For query row b and source position j (P = (K - 1) / 2, prev zero outside [0, S))::

        L[j, f] = sum_{c, k} conv_weight[f, c, k] * prev[b, c, j + k - P]
        e[j]    = scale * (v . tanh(query_proj[b] + keys_proj[b, j] + location_weight @ L[j]))
                  + score_bias
        weights = softmax(e) over the attended positions ("softmax"), or
                  sigmoid(e[j]) / sum_k sigmoid(e[k]) ("sigmoid")
        context = sum_j weights[j] * values[b, j]

    Gradients flow to every tensor input, ``prev`` included (it trains the recurrence when
    the previous weights are fed back without detaching them).

    Args:
        query_proj: (B, A), the projected decoder state (any biases folded in).
        keys_proj: (B, S, A), or (M, S, A) with memory_index: the projected memory,
            computed once per utterance.
        prev: (B, C, S), the previous weights: C = 1 (ESPnet, SpeechBrain) or 2 (Tacotron 2:
            previous and cumulative).
        conv_weight: (F, C, K), K odd: the location convolution (``nn.Conv1d(C, F, K,
            padding=(K - 1) // 2, bias=False).weight``).
        location_weight: (A, F): the location features' projection U (``nn.Linear(F, A,
            bias=False).weight``).
        v: (A,), the score vector.
        values: (B, S, Dv), or (M, S, Dv) with memory_index.
        lengths: integer (B,) (or (M,)); positions j < lengths[b] attend.
        mask: bool (B, S) (or (M, S)), True = attend. Give lengths or mask, not both.
        window: integer (B, 2) on query_proj's device: row b attends only positions in
            [window[b, 0], window[b, 1]) as well, the monotonic window of TTS inference
            (0 <= start <= end <= S; on a GPU checked by the kernels, with no host read).
        score_bias: (1,), added to every score. Softmax ignores it (its gradient is 0);
            the sigmoid normalisation does not.
        scale: multiplies v . tanh(...) (ESPnet's ``scaling``, SpeechBrain's ``scaling``).
        normalization: "softmax" or "sigmoid".
        need_weights: when False the weights are never written and None is returned.
        memory_index: integer (B,): query row b reads memory row ``memory_index[b]`` of
            keys_proj, values, lengths and mask (beams sharing an utterance's memory); prev
            and window stay per query row.

    Returns:
        (context (B, Dv), weights (B, S)). A row with nothing to attend to gives context 0,
        weights 0 and zero gradients, never NaN.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be 'softmax' or 'sigmoid', got {normalization!r}")
    context, weights, _ = _call_op(
        torch.ops.attention_ext.location_attention.default,
        query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
        window, score_bias, _as_scale(scale), _NORMALIZATIONS[normalization], bool(need_weights),
        memory_index,
    )
    return _outputs(context, weights, need_weights)
