"""One test harness for the fused ops and the layers built on them.

An OpSpec says what an op is to the tests: its tensor inputs (in call order; the first is
the query, the second the keys), how to draw a seeded case, how to call ours (the
functional API and the raw torch.ops op and its backward) and reference.py, and which
outputs and gradients there are. A Case is one op's inputs. run() and check_parity() take
any op's case, so the parity, autograd and error tests are written once and parametrised
over OPS (test ids "dot" and "additive"); what only one op has (dot's scale and
values=None, additive's v) is an option of its spec or an entry of that op alone.
LOCATION, the location-sensitive op (one decoder step, with the previous weights, a
convolution, a window and options of its own), is an OpSpec with shapes of its own
(LocationSpec) and cases that carry its window and normalization (LocationCase): run() and
check_parity() take them unchanged, and test_location.py is its parity and autograd file.

The layers built on the ops (attention_ext.nn, attention_ext.compat) have theirs:
run_layer() and check_layer_parity() take any layer, a function calling it and its eager
peer (the published formulas in test_nn.py, the layers of eager_layers.py).

The tolerance rule is helpers.py's (assert_rule): the same for both ops and every layer.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

import attention_ext
from attention_ext import reference
from attention_ext.reference import tile_memory
from helpers import assert_rule, generator, make_masking, on_device, randn, upstream_grad

Tensor = torch.Tensor


@dataclass(frozen=True)
class OpSpec:
    """An op as the tests see it. Its functions follow from its name: the functional API
    attention_ext.<name>_attention, reference.<name>_attention (eager PyTorch), the raw op
    torch.ops.attention_ext.<name>_attention (inputs..., lengths, mask[, scale],
    need_weights) and its backward op _<name>_attention_backward (grad_context,
    grad_weights, the forward's arguments but need_weights, lse)."""

    name: str  # "dot" or "additive": test ids, pick()
    inputs: Tuple[str, ...]  # tensor arguments in call order: query, keys, ...
    feature: str  # the query's and keys' width in shape tables and messages: "D" or "A"
    init_scales: Callable[[int], Dict[str, float]]  # F -> std of make_case's draws (1 if absent)
    gradcheck_scales: Dict[str, float]  # inputs scaled for gradcheck (1 if absent)
    scores: Callable  # case with a 3-D query -> its scores (B, Tq, S) in float64
    has_scale: bool = False  # takes a score scale (dot)
    values_optional: bool = False  # values may be None: the keys are the values (dot)

    def __repr__(self):
        return self.name

    @property
    def functional(self) -> Callable:
        return getattr(attention_ext, f"{self.name}_attention")

    @property
    def reference(self) -> Callable:
        return getattr(reference, f"{self.name}_attention")

    @property
    def raw(self):
        return getattr(torch.ops.attention_ext, f"{self.name}_attention")

    @property
    def raw_backward(self):
        return getattr(torch.ops.attention_ext, f"_{self.name}_attention_backward")

    @property
    def query(self) -> str:
        return self.inputs[0]

    @property
    def keys(self) -> str:
        return self.inputs[1]

    @property
    def outputs(self) -> Tuple[str, ...]:
        """run()'s keys: context, weights and a gradient per input."""
        return ("context", "weights") + tuple("grad_" + n for n in self.inputs)

    @property
    def batched_outputs(self) -> Tuple[str, ...]:
        """The outputs with a batch dimension first (all but the gradient of v)."""
        return tuple(n for n in self.outputs if n != "grad_v")

    def pick(self, **per_op):
        """This op's entry of per_op (keyword = op name): per-op seeds, shapes, messages."""
        return per_op[self.name]

    def shapes(self, B, Tq, S, F, Dv, query_2d=False, M=None) -> Dict[str, tuple]:
        """Every input's shape: query (B, F) or (B, Tq, F), keys (M, S, F), v (F,), values
        (M, S, Dv); M = B unless the query rows index M memory rows."""
        M = B if M is None else M
        shape = {self.query: (B, F) if query_2d else (B, Tq, F), self.keys: (M, S, F),
                 "v": (F,), "values": (M, S, Dv)}
        return {n: shape[n] for n in self.inputs}

    def draw(self, gen, B, Tq, S, F, Dv=None, *, dtype=torch.float32, device="cpu",
             query_2d=False, values_none=False, scales=None,
             M=None) -> Dict[str, Optional[Tensor]]:
        """Seeded standard normal inputs (times scales[name]), drawn from gen in call order;
        with values_none, values is None and not drawn."""
        if values_none and not self.values_optional:
            raise ValueError(f"{self.name} attention needs values")
        Dv = F if Dv is None else Dv
        scales = scales or {}
        return {n: None if (n == "values" and values_none)
                else randn(shape, gen, dtype, device, scale=scales.get(n, 1.0))
                for n, shape in self.shapes(B, Tq, S, F, Dv, query_2d, M).items()}

    def make_case(self, B, Tq, S, F=None, Dv=None, *, D=None, A=None, dtype=torch.float32,
                  device="cpu", seed=0, query_2d=False, values_none=False, mask_kind="none",
                  scale=None, memory=None) -> "Case":
        """Seeded inputs, then masking (helpers.MASK_KINDS) from the same generator. The
        width F may be given by the op's own name (D=, A=) as in the shape tables. The
        scales (init_scales) make scores of a standard deviation of about 1.5: softmax
        neither uniform nor one-hot. memory=(kind, M) gives the case M memory rows and a
        memory_index (MEMORY_INDEX_KINDS) from the same generator."""
        widths = {"D": D, "A": A}
        named = widths.pop(self.feature)
        if any(w is not None for w in widths.values()) or (named is not None and F is not None):
            raise TypeError(f"{self.name} attention's width is F or {self.feature}")
        F = named if F is None else F
        if scale is not None and not self.has_scale:
            raise ValueError(f"{self.name} attention takes no scale")
        gen = generator(seed)
        M = B if memory is None else memory[1]
        inputs = self.draw(gen, B, Tq, S, F, Dv, dtype=dtype, device=device, query_2d=query_2d,
                           values_none=values_none, scales=self.init_scales(max(F, 1)), M=M)
        lengths, mask = make_masking(mask_kind, M, S, gen, device)
        memory_index = None if memory is None else make_memory_index(memory[0], B, M, gen, device)
        return Case(self, inputs, lengths, mask, scale, memory_index)

    def case(self, *, lengths=None, mask=None, scale=None, **inputs) -> "Case":
        """A case of given tensors (every input by name)."""
        if set(inputs) != set(self.inputs):
            raise TypeError(f"{self.name} attention's inputs are {self.inputs}, got {tuple(inputs)}")
        return Case(self, {n: inputs[n] for n in self.inputs}, lengths, mask, scale)

    def op_args(self, case: "Case", need_weights=True) -> tuple:
        """The raw op's positional arguments for case (a scale of None is 1), memory_index
        last when the case has one."""
        args = [case.inputs[n] for n in self.inputs] + [case.lengths, case.mask]
        if self.has_scale:
            args.append(1.0 if case.scale is None else case.scale)
        args.append(need_weights)
        if case.memory_index is not None:
            args.append(case.memory_index)
        return tuple(args)

    def backward_args(self, grad_context, grad_weights, op_args: tuple, lse) -> tuple:
        """The raw backward op's positional arguments: the upstream gradients, the forward's
        arguments but need_weights, the forward's lse, then memory_index if op_args has it."""
        n = len(self.inputs) + 2 + int(self.has_scale)
        return (grad_context, grad_weights, *op_args[:n], lse, *op_args[n + 1:])


@dataclass
class Case:
    """One op's inputs: its tensors by name (in call order), lengths or mask, and a scale
    where the op has one. case.<input name> reads a tensor."""

    op: OpSpec
    inputs: Dict[str, Optional[Tensor]]
    lengths: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    scale: Optional[float] = None
    memory_index: Optional[Tensor] = None

    def __getattr__(self, name):
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in inputs:
            return inputs[name]
        raise AttributeError(name)

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[self.op.query].dtype

    def tensors(self) -> list:
        return [self.inputs[n] for n in self.op.inputs]

    def kwargs(self) -> dict:
        """The keyword arguments of the functional and reference ops (need_weights aside)."""
        kw = dict(lengths=self.lengths, mask=self.mask)
        if self.op.has_scale:
            kw["scale"] = self.scale
        if self.memory_index is not None:
            kw["memory_index"] = self.memory_index
        return kw

    def replace(self, **over) -> "Case":
        """A copy with some inputs (by name), lengths, mask or scale replaced."""
        inputs = {n: over.pop(n, t) for n, t in self.inputs.items()}
        return dataclasses.replace(self, inputs=inputs, **over)

    def tensor_args(self) -> Dict[str, Optional[Tensor]]:
        """Every tensor argument by name (None where not given): the inputs, lengths, mask
        and memory_index."""
        return {**self.inputs, "lengths": self.lengths, "mask": self.mask,
                "memory_index": self.memory_index}

    def on_device(self, device) -> "Case":
        """Every tensor on device but lengths, which stay on the CPU (helpers.on_device)."""
        return self.replace(**on_device(self.tensor_args(), device))


# How a case's query rows index its memory rows (make_case's memory=(kind, M)):
# - "beams": B / M consecutive rows per memory row, as a beam search lays them out;
# - "shuffled": seeded draws in [0, M - 1), in no order, so rows repeat and row M - 1 is never
#   read (its gradients must be zero), as after beams are reordered and finished sentences
#   dropped.
MEMORY_INDEX_KINDS = ("beams", "shuffled")


def make_memory_index(kind, B, M, gen, device) -> Tensor:
    if kind == "beams":
        assert B % M == 0, "beams: B must be a multiple of M"
        return torch.arange(M, device=device).repeat_interleave(B // M)
    if kind == "shuffled":
        return torch.randint(0, max(M - 1, 1), (B,), generator=gen).to(device)
    raise ValueError(f"unknown memory_index kind {kind!r}")


def _dot_scores(case: Case) -> Tensor:
    (keys,) = tile_memory(case.memory_index, case.keys)
    scores = torch.bmm(case.query.double(), keys.double().transpose(1, 2))
    return scores if case.scale is None else scores * case.scale


def _additive_scores(case: Case) -> Tensor:
    (keys_proj,) = tile_memory(case.memory_index, case.keys_proj)
    q, k = case.query_proj.double(), keys_proj.double()
    return torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ case.v.double()


DOT = OpSpec(
    name="dot",
    inputs=("query", "keys", "values"),
    feature="D",
    init_scales=lambda D: {"query": 1.5 / D ** 0.5},
    # Larger scores than make_case's, so the softmax Jacobian is far from uniform.
    gradcheck_scales={"query": 2.0},
    scores=_dot_scores,
    has_scale=True,
    values_optional=True,
)

ADDITIVE = OpSpec(
    name="additive",
    inputs=("query_proj", "keys_proj", "v", "values"),
    feature="A",
    # Projections of unit scale (tanh neither linear nor saturated everywhere), as a trained
    # layer sees them, and v like nn.Linear's init, scaled so the scores have a standard
    # deviation of about 1.5.
    init_scales=lambda A: {"v": 2.5 / A ** 0.5},
    # Projections of 1.5x: tanh' far from 1 and from 0.
    gradcheck_scales={"query_proj": 1.5, "keys_proj": 1.5, "v": 2.0},
    scores=_additive_scores,
)

# ----------------------------------------------------------------------------- location

# A location case's attended window (make_window): none, or one per query row in int64
# ("rows64") or int32 ("rows32"): row 0 windowed to nothing [s, s), the last row every
# position [0, S), the others seeded [start, end).
WINDOW_KINDS = ("none", "rows64", "rows32")


def make_window(kind, B, S, gen, device) -> Optional[Tensor]:
    """A (B, 2) window [start, end) per query row for one of WINDOW_KINDS, on device."""
    if kind == "none":
        return None
    bounds = torch.randint(0, S + 1, (B, 2), generator=gen).sort(dim=1).values
    if B >= 2:
        bounds[0] = min(S, 2)
        bounds[-1] = torch.tensor([0, S])
    dtype = {"rows64": torch.int64, "rows32": torch.int32}[kind]
    return bounds.to(device=device, dtype=dtype)


@dataclass
class LocationCase(Case):
    """A location case: Case's inputs (score_bias among them, None when absent) plus the
    attended window and the normalization ("softmax" or "sigmoid"). The functional op and
    reference.py take score_bias as a keyword, so tensors() leaves it out and kwargs() has
    it."""

    window: Optional[Tensor] = None
    normalization: str = "softmax"

    def tensors(self) -> list:
        return [self.inputs[n] for n in self.op.positional]

    def kwargs(self) -> dict:
        kw = dict(lengths=self.lengths, mask=self.mask, window=self.window,
                  score_bias=self.inputs["score_bias"],
                  scale=1.0 if self.scale is None else self.scale,
                  normalization=self.normalization)
        if self.memory_index is not None:
            kw["memory_index"] = self.memory_index
        return kw

    def tensor_args(self) -> Dict[str, Optional[Tensor]]:
        """Case.tensor_args and the window."""
        return {**super().tensor_args(), "window": self.window}


@dataclass(frozen=True)
class LocationSpec(OpSpec):
    """location_attention: one decoder step, query_proj (B, A) against keys_proj (M, S, A),
    with prev (B, C, S), conv_weight (F, C, K), location_weight (A, F), v (A,), values
    (M, S, Dv) and score_bias (1,) or None. Its shapes are its own (make_case takes B, S,
    A, Dv, C, F, K: F is the filters here, A the score width) and its cases LocationCases;
    run(), check_parity() and assert_same() take them as any op's."""

    @property
    def positional(self) -> Tuple[str, ...]:
        """The functional op's positional tensors: all inputs but score_bias."""
        return self.inputs[:-1]

    @property
    def batched_outputs(self) -> Tuple[str, ...]:
        """The outputs of one row per query row or memory row."""
        return ("context", "weights", "grad_query_proj", "grad_keys_proj", "grad_prev",
                "grad_values")

    def shapes(self, B, S, A, Dv, C, F, K, M=None) -> Dict[str, tuple]:
        M = B if M is None else M
        return {"query_proj": (B, A), "keys_proj": (M, S, A), "prev": (B, C, S),
                "conv_weight": (F, C, K), "location_weight": (A, F), "v": (A,),
                "values": (M, S, Dv), "score_bias": (1,)}

    def make_case(self, B, S, A, Dv=None, *, C=2, F=4, K=3, dtype=torch.float32,
                  device="cpu", seed=0, mask_kind="none", window_kind="none", memory=None,
                  score_bias=False, scale=None, normalization="softmax") -> LocationCase:
        """Seeded inputs (init_scales), then masking, memory_index (memory=(kind, M)) and
        window from the same generator. Without score_bias the case has none."""
        Dv = A if Dv is None else Dv
        gen = generator(seed)
        M = B if memory is None else memory[1]
        scales = self.init_scales(A, C, F, K)
        inputs = {n: randn(shape, gen, dtype, device, scale=scales.get(n, 1.0))
                  for n, shape in self.shapes(B, S, A, Dv, C, F, K, M).items()}
        if not score_bias:
            inputs["score_bias"] = None
        lengths, mask = make_masking(mask_kind, M, S, gen, device)
        memory_index = None if memory is None else make_memory_index(memory[0], B, M, gen, device)
        window = make_window(window_kind, B, S, gen, device)
        return LocationCase(self, inputs, lengths, mask, scale, memory_index, window,
                            normalization)

    def case(self, *, lengths=None, mask=None, scale=None, window=None, memory_index=None,
             normalization="softmax", **inputs) -> LocationCase:
        """A case of given tensors (every input by name; score_bias may be left out)."""
        inputs.setdefault("score_bias", None)
        if set(inputs) != set(self.inputs):
            raise TypeError(f"location attention's inputs are {self.inputs}, got {tuple(inputs)}")
        return LocationCase(self, {n: inputs[n] for n in self.inputs}, lengths, mask, scale,
                            memory_index, window, normalization)

    def op_args(self, case: LocationCase, need_weights=True) -> tuple:
        """The raw op's positional arguments, memory_index last when the case has one."""
        kw = case.kwargs()
        args = (*case.tensors(), kw["lengths"], kw["mask"], kw["window"], kw["score_bias"],
                kw["scale"], case.normalization == "sigmoid", need_weights)
        return args + ((case.memory_index,) if case.memory_index is not None else ())

    def backward_args(self, grad_context, grad_weights, op_args: tuple, lse) -> tuple:
        """The backward op's: upstream gradients, the forward's arguments up to sigmoid,
        lse, then memory_index if op_args has it."""
        n = len(self.positional) + 6
        return (grad_context, grad_weights, *op_args[:n], lse, *op_args[n + 1:])


def _location_scores(case: LocationCase) -> Tensor:
    """The scores e (B, S) in float64."""
    d = {n: None if t is None else t.double() for n, t in case.inputs.items()}
    (keys_proj,) = tile_memory(case.memory_index, d["keys_proj"])
    K = d["conv_weight"].shape[-1]
    location = torch.nn.functional.conv1d(d["prev"], d["conv_weight"], padding=(K - 1) // 2)
    hidden = torch.tanh(d["query_proj"][:, None] + keys_proj
                        + location.transpose(1, 2) @ d["location_weight"].T)
    scores = (hidden @ d["v"]) * (1.0 if case.scale is None else case.scale)
    return scores if d["score_bias"] is None else scores + d["score_bias"]


LOCATION = LocationSpec(
    name="location",
    inputs=("query_proj", "keys_proj", "prev", "conv_weight", "location_weight", "v",
            "values", "score_bias"),
    feature="A",
    # Projections of unit scale and previous weights of unit scale, the convolution and U
    # like nn.Conv1d's and nn.Linear's init (the location term of unit scale too), and v
    # as the additive op's: scores of a standard deviation of about 1.5.
    init_scales=lambda A, C, F, K: {"conv_weight": (C * K) ** -0.5,
                                    "location_weight": F ** -0.5, "v": 2.5 / A ** 0.5},
    gradcheck_scales={"query_proj": 1.5, "keys_proj": 1.5, "v": 2.0},
    scores=_location_scores,
    has_scale=True,
)

OPS = [pytest.param(DOT, id="dot"), pytest.param(ADDITIVE, id="additive")]
BY_NAME = {op.name: op for op in (DOT, ADDITIVE, LOCATION)}


def per_op(**tables):
    """Parameters (op, entry) from each op's list of (id, entry), keyword = op name; test
    ids "dot-<id>", "additive-<id>"."""
    return [pytest.param(BY_NAME[name], entry, id=f"{name}-{id_}")
            for name, table in tables.items() for id_, entry in table]


# ----------------------------------------------------------------------------- running

def call(fn, case: Case, **kw):
    """fn (op.functional, op.reference or another implementation of the op) on case."""
    return fn(*case.tensors(), **case.kwargs(), **kw)


UPSTREAM_SEED = 1234  # run()'s and run_layer()'s upstream gradients


def seeded_grads(outputs, leaves: Dict[str, Tensor], case_dtype: torch.dtype,
                 seed: int) -> Dict[str, Tensor]:
    """The gradient by every leaf ("grad_<name>"; zeros where the loss does not reach it) of
    the loss sum_i <outputs[i], g_i>, with seeded upstream gradients g_i drawn in order and
    rounded to case_dtype (helpers.upstream_grad), so that runs in every dtype of one case
    differentiate the same loss."""
    gen = generator(seed)
    loss = sum((out * upstream_grad(out, gen, case_dtype)).sum() for out in outputs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {"grad_" + n: torch.zeros_like(t) if g is None else g
            for (n, t), g in zip(leaves.items(), grads)}


def run(case: Case, fn=None, *, dtype=None, need_weights=True, weights_in_loss=True,
        seed=UPSTREAM_SEED) -> Dict[str, Optional[Tensor]]:
    """Forward + backward of fn (default: ours, the op's functional API) on case, its inputs
    cast to dtype. Returns context, weights and a gradient per input (case.op.outputs; None
    for an input that is None). The loss is <context, g_c> (+ <weights, g_w> when
    weights_in_loss) with seeded upstream gradients (seeded_grads)."""
    op = case.op
    fn = op.functional if fn is None else fn
    dtype = case.dtype if dtype is None else dtype
    leaves = case.replace(**{n: t.detach().to(dtype).requires_grad_(True)
                             for n, t in case.inputs.items() if t is not None})
    ctx, w = call(fn, leaves, need_weights=need_weights)
    out = {"context": ctx.detach(), "weights": None if w is None else w.detach()}
    in_loss = [ctx] + ([w] if weights_in_loss and w is not None else [])
    grads = seeded_grads(in_loss, {n: t for n, t in leaves.inputs.items() if t is not None},
                         case.dtype, seed)
    out.update({"grad_" + n: grads.get("grad_" + n) for n in op.inputs})
    return out


def check_parity(case: Case, *, fn=None, need_weights=True, weights_in_loss=True,
                 outputs=None):
    """Ours (or fn) vs the float64 oracle, with reference.py in the input dtype as the
    yardstick (helpers.py's tolerance rule), on every output and gradient. Returns ours."""
    op = case.op
    kw = dict(need_weights=need_weights, weights_in_loss=weights_in_loss)
    got = run(case, fn, **kw)
    lowp = run(case, op.reference, **kw)
    oracle = run(case, op.reference, dtype=torch.float64, **kw)
    for name in op.outputs if outputs is None else outputs:
        assert_rule(name, got[name], lowp[name], oracle[name], case.dtype)
    return got


def assert_same(a: dict, b: dict, msg=""):
    """Two run() results bitwise equal, None where None."""
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None:
            assert b[name] is None, f"{msg}{name}"
        else:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{msg}{name}")


# ----------------------------------------------------------------------------- layers

def _float_tensor(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _in_dtype(layer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """layer, or a copy of it cast to dtype where a parameter or buffer is in another dtype."""
    tensors = itertools.chain(layer.parameters(), layer.buffers())
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return layer
    return copy.deepcopy(layer).to(dtype)


def run_layer(forward, layer, inputs: Dict[str, Optional[Tensor]], dtype: torch.dtype, *,
              case_dtype=None) -> Dict[str, Tensor]:
    """Forward + backward of forward(layer, *inputs.values()) -> (output, weights), with the
    layer's parameters and the floating-point inputs cast to dtype (other inputs, such as
    lengths and masks, as given). Returns output, weights and the gradient of every
    floating-point input and every parameter by name ("grad_<name>"); the upstream gradients
    are rounded to case_dtype (default dtype), the dtype under test (seeded_grads)."""
    layer = _in_dtype(layer, dtype)
    args = {n: t.detach().to(dtype).requires_grad_(True) if _float_tensor(t) else t
            for n, t in inputs.items()}
    out, w = forward(layer, *args.values())
    leaves = {n: t for n, t in args.items() if _float_tensor(t)}
    # A torch.compile wrapper names its parameters "_orig_mod.<name>".
    params = {n.removeprefix("_orig_mod."): p for n, p in layer.named_parameters()}
    assert not leaves.keys() & params.keys(), "an input and a parameter of the same name"
    return {"output": out.detach(), "weights": w.detach(),
            **seeded_grads((out, w), {**leaves, **params}, case_dtype or dtype, UPSTREAM_SEED)}


def check_layer_parity(forward, layer, inputs: Dict[str, Optional[Tensor]], dtype, *,
                       eager_forward, eager_layer=None) -> Dict[str, Tensor]:
    """Ours (forward on layer) vs the float64 oracle, the eager peer (eager_forward on
    eager_layer, default layer itself, with the same parameters), with the peer in dtype as
    the yardstick (helpers.py's tolerance rule), on output, weights and every gradient
    (run_layer). Parameters and inputs are rounded to dtype first, so all three runs see the
    same values. Returns ours."""
    eager_layer = layer if eager_layer is None else eager_layer
    layer, eager_layer = _in_dtype(layer, dtype), _in_dtype(eager_layer, dtype)
    inputs = {n: t.to(dtype) if _float_tensor(t) else t for n, t in inputs.items()}
    got = run_layer(forward, layer, inputs, dtype)
    lowp = run_layer(eager_forward, eager_layer, inputs, dtype)
    oracle = run_layer(eager_forward, eager_layer, inputs, torch.float64, case_dtype=dtype)
    assert got.keys() == oracle.keys()
    for name in oracle:
        assert_rule(name, got[name], lowp[name], oracle[name], dtype)
    return got


def peer_pair(eager_cls, ours_cls, *args, dtype=torch.float32, seed=0):
    """(eager, ours): a drop-in and the eager layer it replaces, both built with args, the
    eager one initialised under torch.manual_seed(seed), ours loading its state_dict, both in
    dtype."""
    torch.manual_seed(seed)
    eager = eager_cls(*args).to(dtype)
    ours = ours_cls(*args).to(dtype)
    ours.load_state_dict(eager.state_dict())
    return eager, ours
