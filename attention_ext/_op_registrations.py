"""Registers the fake (meta) kernels and the autograd of the operators in
torch.ops.attention_ext; nothing here is called directly.

The C++ schemas live in csrc/attention_ext.cpp; the kernels in csrc/cpu and csrc/cuda.
Autograd is registered with torch.library.register_autograd and its backward calls our own
backward operator, so torch.compile sees two opaque ops and no Python math.
"""
import math

import torch

from ._loader import _C  # noqa: F401


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The fake kernels run in place of the real ones while tracing (torch.compile) and for meta
# tensors. They make the structural checks of csrc/checks.cpp in its order, with its
# messages and exception types, so a mistake fails there as it fails in eager mode instead
# of being given outputs. The value checks (lengths in [0, S], memory_index in [0, M)) need
# data: only the real kernels make them.

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    """dtype as the C++ checks print it, the c10::ScalarType name (Float, Long, BFloat16)."""
    return torch.empty((), dtype=dtype, device="cpu").type()[len("torch."):-len("Tensor")]


def _sizes(t) -> str:
    """t's shape as the C++ checks print it: [3, 5, 4]."""
    return str(list(t.shape))


def _check_query_rank(query, name, feat):
    """query_rows of csrc/checks.cpp: (B, feat) or (B, Tq, feat)."""
    torch._check_value(query.dim() in (2, 3),
                       lambda: f"{name} must have shape (B, {feat}) for one decoder step or "
                               f"(B, Tq, {feat}), got {_sizes(query)}")


def _rows(query, *last):
    """Sizes of a per-row tensor: the query's leading dimensions ((B,) for a (B, D) query,
    one decoder step; (B, Tq) otherwise), then `last`. QueryRows::row_sizes in checks.h."""
    return (*query.shape[:-1], *last)


def _row_shape_name(query, last=None) -> str:
    """QueryRows::row_shape_name: "(B, Tq, last)" / "(B, last)", or "(B, Tq)" / "(B,)"."""
    single = query.dim() == 2
    if last is None:
        return "(B,)" if single else "(B, Tq)"
    return ("(B, " if single else "(B, Tq, ") + last + ")"


def _check_same_device_dtype(ref, ref_name, t, name):
    torch._check(t.device == ref.device,
                 lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), "
                         f"got {t.device}")
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{name} must have the same dtype as {ref_name} "
                         f"({_dtype_name(ref.dtype)}), got {_dtype_name(t.dtype)}")


def _check_float_dtype(t, name):
    torch._check(t.dtype in _FLOAT_DTYPES,
                 lambda: f"{name} must be float32, float64, float16 or bfloat16, "
                         f"got {_dtype_name(t.dtype)}")


def _check_memory_index_arg(memory_index, ref, ref_name, B):
    if memory_index is None:
        return
    mi = memory_index
    torch._check(mi.device == ref.device,
                 lambda: f"memory_index must be on the same device as {ref_name} "
                         f"({ref.device}), got {mi.device}")
    torch._check_value(mi.dtype in (torch.int64, torch.int32),
                       lambda: f"memory_index must be an int64 or int32 tensor of shape (B,) "
                               f"= ({B},), got dtype {_dtype_name(mi.dtype)}")
    torch._check_value(mi.dim() == 1 and mi.shape[0] == B,
                       lambda: f"memory_index must have shape (B,) = ({B},), one memory row "
                               f"per query row of {ref_name}, got {_sizes(mi)}")


def _check_mask_args(lengths, mask, ref, ref_name, M, S):
    torch._check_value(lengths is None or mask is None,
                       lambda: "pass either lengths or mask, not both")
    if lengths is not None:
        torch._check(lengths.device == ref.device or lengths.device.type == "cpu",
                     lambda: f"lengths must be on the CPU or on the same device as {ref_name} "
                             f"({ref.device}), got {lengths.device}")
        torch._check_value(lengths.dtype in (torch.int64, torch.int32),
                           lambda: f"lengths must be an int64 or int32 tensor of shape (B,) = "
                                   f"({M},), got dtype {_dtype_name(lengths.dtype)}")
        torch._check_value(lengths.dim() == 1 and lengths.shape[0] == M,
                           lambda: f"lengths must have shape (B,) = ({M},), "
                                   f"got {_sizes(lengths)}")
    if mask is not None:
        torch._check(mask.device == ref.device,
                     lambda: f"mask must be on the same device as {ref_name} ({ref.device}), "
                             f"got {mask.device}")
        torch._check_value(mask.dtype == torch.bool,
                           lambda: f"mask must be a bool tensor (True = attend), "
                                   f"got dtype {_dtype_name(mask.dtype)}")
        torch._check_value(mask.dim() == 2 and mask.shape[0] == M and mask.shape[1] == S,
                           lambda: f"mask must have shape (B, S) = ({M}, {S}), "
                                   f"got {_sizes(mask)}")


def _check_operands(query, query_name, keys, keys_name, values, width, memory_index):
    """check_operands of csrc/checks.cpp. Returns (S, Dv, M)."""
    _check_query_rank(query, query_name, width)
    torch._check_value(keys.dim() == 3, lambda: f"{keys_name} must have shape (B, S, {width}), "
                                                f"got {_sizes(keys)}")
    torch._check_value(values.dim() == 3,
                       lambda: f"values must have shape (B, S, Dv), got {_sizes(values)}")
    _check_float_dtype(query, query_name)
    _check_same_device_dtype(query, query_name, keys, keys_name)
    _check_same_device_dtype(query, query_name, values, "values")
    B, W = query.shape[0], query.shape[-1]
    S, Dv, M = keys.shape[1], values.shape[2], keys.shape[0]
    _check_memory_index_arg(memory_index, query, query_name, B)
    torch._check_value(memory_index is None or M > 0 or B == 0,
                       lambda: f"memory_index must lie in [0, M), but {keys_name} has no "
                               f"memory rows (M = 0) for the {B} query rows of {query_name}")
    torch._check_value(memory_index is not None or M == B,
                       lambda: f"{keys_name} must have batch size B = {B} like {query_name} "
                               f"(or pass memory_index to map query rows to memory rows), "
                               f"got shape {_sizes(keys)}")
    torch._check_value(values.shape[0] == M,
                       lambda: f"values must have batch size {M} like {keys_name}, "
                               f"got shape {_sizes(values)}")
    torch._check_value(keys.shape[2] == W,
                       lambda: f"{keys_name} must have feature size {width} = {W} like "
                               f"{query_name}, got shape {_sizes(keys)}")
    torch._check_value(values.shape[1] == S,
                       lambda: f"values must have source length S = {S} like {keys_name}, "
                               f"got shape {_sizes(values)}")
    return S, Dv, M


def _check_dot_inputs(query, keys, values, lengths, mask, scale, memory_index):
    """check_dot_inputs of csrc/checks.cpp. Returns (S, Dv)."""
    S, Dv, M = _check_operands(query, "query", keys, "keys", keys if values is None else values,
                               "D", memory_index)
    torch._check_value(math.isfinite(scale), lambda: f"scale must be finite, got {scale}")
    _check_mask_args(lengths, mask, query, "query", M, S)
    return S, Dv


def _check_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index):
    """check_additive_inputs of csrc/checks.cpp. Returns (S, Dv)."""
    S, Dv, M = _check_operands(query_proj, "query_proj", keys_proj, "keys_proj", values, "A",
                               memory_index)
    A = query_proj.shape[-1]
    _check_same_device_dtype(query_proj, "query_proj", v, "v")
    torch._check_value(v.dim() == 1 and v.shape[0] == A,
                       lambda: f"v must have shape (A,) = ({A},) like query_proj's last "
                               f"dimension, got {_sizes(v)}")
    _check_mask_args(lengths, mask, query_proj, "query_proj", M, S)
    return S, Dv


def _check_window_arg(window, ref, B):
    if window is None:
        return
    torch._check(window.device == ref.device,
                 lambda: f"window must be on the same device as query_proj ({ref.device}), "
                         f"got {window.device}")
    torch._check_value(window.dtype in (torch.int64, torch.int32),
                       lambda: f"window must be an int64 or int32 tensor of shape (B, 2) = "
                               f"({B}, 2), got dtype {_dtype_name(window.dtype)}")
    torch._check_value(window.dim() == 2 and window.shape[0] == B and window.shape[1] == 2,
                       lambda: f"window must have shape (B, 2) = ({B}, 2), [start, end) per "
                               f"query row, got {_sizes(window)}")


def _check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight, v,
                           values, lengths, mask, window, score_bias, scale, memory_index):
    """check_location_inputs of csrc/checks.cpp. Returns (S, Dv)."""
    torch._check_value(query_proj.dim() == 2,
                       lambda: f"query_proj must have shape (B, A): location-sensitive "
                               f"attention takes one decoder step a call (the previous weights "
                               f"feed the next), got {_sizes(query_proj)}")
    S, Dv, M = _check_operands(query_proj, "query_proj", keys_proj, "keys_proj", values, "A",
                               memory_index)
    B, A = query_proj.shape
    for t, name in ((prev, "prev"), (conv_weight, "conv_weight"),
                    (location_weight, "location_weight"), (v, "v")):
        _check_same_device_dtype(query_proj, "query_proj", t, name)
    torch._check_value(prev.dim() == 3 and prev.shape[0] == B and prev.shape[2] == S,
                       lambda: f"prev must have shape (B, C, S) = ({B}, C, {S}), the previous "
                               f"weights of every query row, got {_sizes(prev)}")
    C = prev.shape[1]
    torch._check_value(conv_weight.dim() == 3 and conv_weight.shape[1] == C,
                       lambda: f"conv_weight must have shape (F, C, K) with C = {C} like "
                               f"prev's channels, got {_sizes(conv_weight)}")
    F, K = conv_weight.shape[0], conv_weight.shape[2]
    torch._check_value(K % 2 == 1,
                       lambda: f"conv_weight must have an odd number of taps K (the "
                               f"convolution is centred, padding (K - 1) / 2), got K = {K}")
    torch._check_value(location_weight.dim() == 2 and location_weight.shape[0] == A
                       and location_weight.shape[1] == F,
                       lambda: f"location_weight must have shape (A, F) = ({A}, {F}) (A like "
                               f"query_proj, F like conv_weight's filters), got "
                               f"{_sizes(location_weight)}")
    torch._check_value(v.dim() == 1 and v.shape[0] == A,
                       lambda: f"v must have shape (A,) = ({A},) like query_proj's last "
                               f"dimension, got {_sizes(v)}")
    torch._check_value(math.isfinite(scale), lambda: f"scale must be finite, got {scale}")
    if score_bias is not None:
        _check_same_device_dtype(query_proj, "query_proj", score_bias, "score_bias")
        torch._check_value(score_bias.dim() == 1 and score_bias.shape[0] == 1,
                           lambda: f"score_bias must have shape (1,), got {_sizes(score_bias)}")
    _check_window_arg(window, query_proj, B)
    _check_mask_args(lengths, mask, query_proj, "query_proj", M, S)
    return S, Dv


def _check_backward_extras(grad_context, grad_weights, lse, ref, ref_name, S, Dv):
    """check_backward_extras of csrc/checks.cpp: the incoming gradients and the forward's
    log-sum-exp, shaped by ref's (the query's) rows."""
    _check_same_device_dtype(ref, ref_name, grad_context, "grad_context")
    sizes = _rows(ref, Dv)
    torch._check_value(tuple(grad_context.shape) == sizes,
                       lambda: f"grad_context must have shape {_row_shape_name(ref, 'Dv')} = "
                               f"{list(sizes)}, got {_sizes(grad_context)}")
    if grad_weights is not None:
        _check_same_device_dtype(ref, ref_name, grad_weights, "grad_weights")
        w_sizes = _rows(ref, S)
        torch._check_value(tuple(grad_weights.shape) == w_sizes,
                           lambda: f"grad_weights must have shape {_row_shape_name(ref, 'S')} "
                                   f"= {list(w_sizes)}, got {_sizes(grad_weights)}")
    lse_dtype = _lse_dtype(ref.dtype)
    torch._check(lse.device == ref.device and lse.dtype == lse_dtype,
                 lambda: f"lse must be a {_dtype_name(lse_dtype)} tensor on {ref.device}, "
                         f"got {_dtype_name(lse.dtype)} on {lse.device}")
    lse_sizes = _rows(ref)
    torch._check_value(tuple(lse.shape) == lse_sizes,
                       lambda: f"lse must have shape {_row_shape_name(ref)} = "
                               f"{list(lse_sizes)}, got {_sizes(lse)}")


def _forward_outputs(query, S, Dv, need_weights):
    """(context, weights, lse) of a forward, following the query's rows; weights empty
    without need_weights (as forward_outputs.h allocates them)."""
    context = query.new_empty(_rows(query, Dv))
    weights = query.new_empty(_rows(query, S) if need_weights else (0,))
    lse = query.new_empty(_rows(query), dtype=_lse_dtype(query.dtype))
    return context, weights, lse


@torch.library.register_fake("attention_ext::dot_attention")
def _dot_attention_fake(query, keys, values, lengths, mask, scale, need_weights,
                        memory_index=None):
    S, Dv = _check_dot_inputs(query, keys, values, lengths, mask, scale, memory_index)
    return _forward_outputs(query, S, Dv, need_weights)


@torch.library.register_fake("attention_ext::_dot_attention_backward")
def _dot_attention_backward_fake(
    grad_context, grad_weights, query, keys, values, lengths, mask, scale, lse, memory_index=None
):
    S, Dv = _check_dot_inputs(query, keys, values, lengths, mask, scale, memory_index)
    _check_backward_extras(grad_context, grad_weights, lse, query, "query", S, Dv)
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


@torch.library.register_fake("attention_ext::additive_attention")
def _additive_attention_fake(query_proj, keys_proj, v, values, lengths, mask, need_weights,
                             memory_index=None):
    S, Dv = _check_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index)
    return _forward_outputs(query_proj, S, Dv, need_weights)


@torch.library.register_fake("attention_ext::_additive_attention_backward")
def _additive_attention_backward_fake(
    grad_context, grad_weights, query_proj, keys_proj, v, values, lengths, mask, lse,
    memory_index=None,
):
    S, Dv = _check_additive_inputs(query_proj, keys_proj, v, values, lengths, mask, memory_index)
    _check_backward_extras(grad_context, grad_weights, lse, query_proj, "query_proj", S, Dv)
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


@torch.library.register_fake("attention_ext::location_attention")
def _location_attention_fake(query_proj, keys_proj, prev, conv_weight, location_weight, v,
                             values, lengths, mask, window, score_bias, scale, sigmoid,
                             need_weights, memory_index=None):
    S, Dv = _check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight,
                                   v, values, lengths, mask, window, score_bias, scale,
                                   memory_index)
    return _forward_outputs(query_proj, S, Dv, need_weights)


@torch.library.register_fake("attention_ext::_location_attention_backward")
def _location_attention_backward_fake(
    grad_context, grad_weights, query_proj, keys_proj, prev, conv_weight, location_weight, v,
    values, lengths, mask, window, score_bias, scale, sigmoid, lse, memory_index=None,
):
    S, Dv = _check_location_inputs(query_proj, keys_proj, prev, conv_weight, location_weight,
                                   v, values, lengths, mask, window, score_bias, scale,
                                   memory_index)
    _check_backward_extras(grad_context, grad_weights, lse, query_proj, "query_proj", S, Dv)
    return (
        query_proj.new_empty(query_proj.shape),
        keys_proj.new_empty(keys_proj.shape),
        prev.new_empty(prev.shape),
        conv_weight.new_empty(conv_weight.shape),
        location_weight.new_empty(location_weight.shape),
        v.new_empty(v.shape),
        values.new_empty(values.shape),
        query_proj.new_empty((0,) if score_bias is None else (1,)),
    )


def _location_setup_context(ctx, inputs, output):
    (query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
     window, score_bias, scale, sigmoid, need_weights, memory_index) = inputs
    _, _, lse = output
    # Inputs and the per-row log-sum-exp only: backward recomputes the location features
    # and tanh, so no B x S x A or B x S x F tensor exists at any time.
    ctx.save_for_backward(query_proj, keys_proj, prev, conv_weight, location_weight, v, values,
                          lengths, mask, window, score_bias, memory_index, lse)
    ctx.scale = scale
    ctx.sigmoid = sigmoid
    ctx.need_weights = need_weights
    ctx.set_materialize_grads(False)


def _location_backward(ctx, grad_context, grad_weights, grad_lse):
    (query_proj, keys_proj, prev, conv_weight, location_weight, v, values, lengths, mask,
     window, score_bias, memory_index, lse) = ctx.saved_tensors
    if grad_context is None:
        grad_context = query_proj.new_zeros(_rows(query_proj, values.shape[2]))
    if not ctx.need_weights:
        grad_weights = None
    grads = torch.ops.attention_ext._location_attention_backward.default(
        grad_context, grad_weights, query_proj, keys_proj, prev, conv_weight, location_weight,
        v, values, lengths, mask, window, score_bias, ctx.scale, ctx.sigmoid, lse, memory_index,
    )
    grad_score_bias = None if score_bias is None else grads[7]
    return (*grads[:7], None, None, None, grad_score_bias, None, None, None, None)


torch.library.register_autograd(
    "attention_ext::location_attention", _location_backward,
    setup_context=_location_setup_context,
)
