"""Fake (meta) kernels and autograd for the operators in torch.ops.attention_ext.

The C++ schemas live in csrc/attention_ext.cpp; the kernels in csrc/cpu and csrc/cuda.
Autograd is registered with torch.library.register_autograd and its backward calls our own
backward operator, so torch.compile sees two opaque ops and no Python math.
"""
import torch

from ._loader import _C  # noqa: F401


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_fake_like(ref, ref_name, named, lengths, mask):
    """The named tensors share ref's device and dtype; lengths (on the CPU or ref's device)
    and mask (on ref's device), not both."""
    for name, t in named:
        torch._check(t.device == ref.device and t.dtype == ref.dtype,
                     lambda: f"{name} must match {ref_name}'s device and dtype "
                             f"({ref.device}, {ref.dtype}), got ({t.device}, {t.dtype})")
    torch._check(lengths is None or mask is None, lambda: "pass either lengths or mask, not both")
    if lengths is not None:
        torch._check(lengths.device == ref.device or lengths.device.type == "cpu",
                     lambda: f"lengths must be on the CPU or on {ref_name}'s device "
                             f"({ref.device}), got {lengths.device}")
    if mask is not None:
        torch._check(mask.device == ref.device,
                     lambda: f"mask must be on {ref_name}'s device ({ref.device}), got {mask.device}")


def _check_fake_query(query, name, feat):
    torch._check(query.dim() in (2, 3),
                 lambda: f"{name} must have shape (B, {feat}) for one decoder step or "
                         f"(B, Tq, {feat}), got {tuple(query.shape)}")


def _rows(query, *last):
    """Sizes of a per-row tensor: the query's leading dimensions ((B,) for a (B, D) query,
    one decoder step; (B, Tq) otherwise), then `last`. As QueryRows in checks.h."""
    return (*query.shape[:-1], *last)


def _check_fake_operands(query, query_name, keys, keys_name, values, width, memory_index):
    """The structural checks of checks.h's check_operands for the fake kernels, which run in
    place of the real ones while tracing (torch.compile) and for meta tensors, so a mistake
    is not silently given outputs there. Value checks (lengths in [0, S], memory_index in
    [0, M)) need data: the real kernels do them. Returns (B, S, W)."""
    _check_fake_query(query, query_name, width)
    torch._check(keys.dim() == 3,
                 lambda: f"{keys_name} must have shape (B, S, {width}), got {tuple(keys.shape)}")
    B, W = query.shape[0], query.shape[-1]
    M, S = keys.shape[0], keys.shape[1]
    if memory_index is None:
        torch._check(M == B, lambda: f"{keys_name} must have shape (B, S, {width}) with B = {B} "
                                     f"like {query_name} (or pass memory_index), "
                                     f"got {tuple(keys.shape)}")
    else:
        torch._check(memory_index.device == query.device,
                     lambda: f"memory_index must be on {query_name}'s device ({query.device}), "
                             f"got {memory_index.device}")
        torch._check(memory_index.dtype in (torch.int64, torch.int32),
                     lambda: f"memory_index must be an int64 or int32 tensor, "
                             f"got {memory_index.dtype}")
        torch._check(memory_index.dim() == 1 and memory_index.shape[0] == B,
                     lambda: f"memory_index must have shape (B,) = ({B},), "
                             f"got {tuple(memory_index.shape)}")
        torch._check(M > 0 or B == 0,
                     lambda: f"memory_index must lie in [0, M), but {keys_name} has no memory "
                             f"rows (M = 0) for the {B} query rows of {query_name}")
    torch._check(keys.shape[2] == W,
                 lambda: f"{keys_name} must have shape (M, S, {width}) = ({M}, S, {W}), "
                         f"got {tuple(keys.shape)}")
    torch._check(values.dim() == 3 and values.shape[0] == M and values.shape[1] == S,
                 lambda: f"values must have shape (M, S, Dv) = ({M}, {S}, Dv), "
                         f"got {tuple(values.shape)}")
    return B, S, W


def _check_fake_dot_inputs(query, keys, values, lengths, mask, memory_index):
    _check_fake_operands(query, "query", keys, "keys", keys if values is None else values, "D",
                         memory_index)
    named = [("keys", keys)] + ([] if values is None else [("values", values)])
    _check_fake_like(query, "query", named, lengths, mask)


@torch.library.register_fake("attention_ext::dot_attention")
def _dot_attention_fake(query, keys, values, lengths, mask, scale, need_weights,
                        memory_index=None):
    _check_fake_dot_inputs(query, keys, values, lengths, mask, memory_index)
    S = keys.shape[1]
    Dv = (keys if values is None else values).shape[2]
    context = query.new_empty(_rows(query, Dv))
    weights = query.new_empty(_rows(query, S) if need_weights else (0,))
    lse = query.new_empty(_rows(query), dtype=_lse_dtype(query.dtype))
    return context, weights, lse


@torch.library.register_fake("attention_ext::_dot_attention_backward")
def _dot_attention_backward_fake(
    grad_context, grad_weights, query, keys, values, lengths, mask, scale, lse, memory_index=None
):
    _check_fake_dot_inputs(query, keys, values, lengths, mask, memory_index)
    return (
        query.new_empty(query.shape),
        keys.new_empty(keys.shape),
        # values=None: the combined gradient is in grad_keys.
        keys.new_empty((0,)) if values is None else values.new_empty(values.shape),
    )


def _dot_setup_context(ctx, inputs, output):
    query, keys, values, lengths, mask, scale, need_weights, memory_index = inputs
    _, _, lse = output
    # Inputs and the per-row log-sum-exp only: backward recomputes scores.
    ctx.save_for_backward(query, keys, values, lengths, mask, memory_index, lse)
    ctx.scale = scale
    ctx.need_weights = need_weights
    ctx.set_materialize_grads(False)


def _dot_backward(ctx, grad_context, grad_weights, grad_lse):
    query, keys, values, lengths, mask, memory_index, lse = ctx.saved_tensors
    if grad_context is None:
        grad_context = query.new_zeros(_rows(query, (keys if values is None else values).shape[2]))
    if not ctx.need_weights:
        grad_weights = None
    grad_query, grad_keys, grad_values = torch.ops.attention_ext._dot_attention_backward.default(
        grad_context, grad_weights, query, keys, values, lengths, mask, ctx.scale, lse,
        memory_index,
    )
    if values is None:
        grad_values = None
    return grad_query, grad_keys, grad_values, None, None, None, None, None


torch.library.register_autograd(
    "attention_ext::dot_attention", _dot_backward, setup_context=_dot_setup_context
)


def _check_fake_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index):
    _, _, A = _check_fake_operands(query_proj, "query_proj", keys_proj, "keys_proj", values, "A",
                                   memory_index)
    torch._check(v.dim() == 1 and v.shape[0] == A,
                 lambda: f"v must have shape (A,) = ({A},), got {tuple(v.shape)}")
    _check_fake_like(query_proj, "query_proj",
                     [("keys_proj", keys_proj), ("v", v), ("values", values)], lengths, mask)


@torch.library.register_fake("attention_ext::additive_attention")
def _additive_attention_fake(query_proj, keys_proj, v, values, lengths, mask, need_weights,
                             memory_index=None):
    _check_fake_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index)
    S, Dv = values.shape[1], values.shape[2]
    context = query_proj.new_empty(_rows(query_proj, Dv))
    weights = query_proj.new_empty(_rows(query_proj, S) if need_weights else (0,))
    lse = query_proj.new_empty(_rows(query_proj), dtype=_lse_dtype(query_proj.dtype))
    return context, weights, lse


@torch.library.register_fake("attention_ext::_additive_attention_backward")
def _additive_attention_backward_fake(
    grad_context, grad_weights, query_proj, keys_proj, v, values, lengths, mask, lse,
    memory_index=None,
):
    _check_fake_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index)
    return (
        query_proj.new_empty(query_proj.shape),
        keys_proj.new_empty(keys_proj.shape),
        v.new_empty(v.shape),
        values.new_empty(values.shape),
    )


def _additive_setup_context(ctx, inputs, output):
    query_proj, keys_proj, v, values, lengths, mask, need_weights, memory_index = inputs
    _, _, lse = output
    # Inputs and the per-row log-sum-exp only: backward recomputes tanh, so no
    # B x Tq x S x A tensor exists at any time.
    ctx.save_for_backward(query_proj, keys_proj, v, values, lengths, mask, memory_index, lse)
    ctx.need_weights = need_weights
    ctx.set_materialize_grads(False)


def _additive_backward(ctx, grad_context, grad_weights, grad_lse):
    query_proj, keys_proj, v, values, lengths, mask, memory_index, lse = ctx.saved_tensors
    if grad_context is None:
        grad_context = query_proj.new_zeros(_rows(query_proj, values.shape[2]))
    if not ctx.need_weights:
        grad_weights = None
    grads = torch.ops.attention_ext._additive_attention_backward.default(
        grad_context, grad_weights, query_proj, keys_proj, v, values, lengths, mask, lse,
        memory_index,
    )
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "attention_ext::additive_attention", _additive_backward,
    setup_context=_additive_setup_context,
)
