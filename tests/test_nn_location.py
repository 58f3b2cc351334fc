"""attention_ext.nn.LocationSensitiveAttention against an eager implementation of the
published formula (Chorowski et al. 2015, section 2.2; Tacotron 2's previous and cumulative
weights), written here from the layer's parameters, not taken from the package: a decoder
recurrence of several steps through LocationState, with channels 1 and 2, softmax and
sigmoid, scale, bias, detached state, masking, windows and beams sharing a memory; values,
weights and every input and parameter gradient by the suite's tolerance rule
(harness.check_layer_parity); the initial state, beam reordering, a padded batch against
each utterance alone, torch.compile(fullgraph=True), and bad arguments."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import attention_ext
from attention_ext.nn import (LocationSensitiveAttention, LocationState, PrecomputedMemory,
                              set_implementation)
from harness import check_layer_parity
from helpers import dtype_id, generator, make_masking, randn

B, S, T = 4, 11, 4
QUERY_DIM, MEMORY_DIM, UNITS, FILTERS, KERNEL = 6, 5, 8, 3, 5


# ----------------------------------------------------------------------------- eager formula

def eager_step(layer, query, memory, prev, lengths, mask, window):
    """One step: L = conv(prev), e_j = scale v . tanh(W q + U h_j + V L_j) (+ bias),
    softmax or normalised sigmoid over the attended j, context = sum_j a_j h_j."""
    location = F.conv1d(prev, layer.location_conv.weight,
                        padding=(layer.kernel_size - 1) // 2).transpose(1, 2)  # (B, S, F)
    hidden = torch.tanh(layer.W(query)[:, None] + layer.U(memory)
                        + location @ layer.location_dense.weight.t())
    e = layer.scale * (hidden @ layer.v)
    if layer.score_bias is not None:
        e = e + layer.score_bias
    j = torch.arange(memory.shape[1])[None]
    attend = torch.ones_like(e, dtype=torch.bool)
    if lengths is not None:
        attend &= j < lengths[:, None]
    if mask is not None:
        attend &= mask
    if window is not None:
        attend &= (j >= window[:, :1]) & (j < window[:, 1:])
    if layer.normalization == "softmax":
        p = torch.exp(e - e.masked_fill(~attend, float("-inf")).amax(-1, keepdim=True)
                      .nan_to_num(0.0, neginf=0.0))
    else:
        p = torch.sigmoid(e)
    p = p * attend
    total = p.sum(-1, keepdim=True)
    a = p / torch.where(total > 0, total, torch.ones_like(total))
    return (a[..., None] * memory).sum(1), a


def eager_steps(layer, queries, memory, lengths, mask, window, memory_index, uniform):
    """The recurrence: prev = the last weights (detached with detach_state), cumulative =
    their running sum; the first weights zeros, or 1 / n over the n attended positions."""
    if memory_index is not None:  # beams: the memory rows repeated per query row
        memory = memory[memory_index]
        lengths = None if lengths is None else lengths[memory_index]
        mask = None if mask is None else mask[memory_index]
    rows = queries.shape[0]
    if uniform:
        attend = torch.ones(rows, memory.shape[1], dtype=torch.bool)
        if lengths is not None:
            attend = attend & (torch.arange(memory.shape[1]) < lengths[:, None])
        attend = attend if mask is None else attend & mask
        previous = (attend / attend.sum(-1, keepdim=True).clamp_min(1)).to(memory.dtype)
    else:
        previous = memory.new_zeros(rows, memory.shape[1])
    cumulative = memory.new_zeros(rows, memory.shape[1])
    contexts, weights = [], []
    for t in range(queries.shape[1]):
        prev = previous[:, None] if layer.channels == 1 else torch.stack((previous, cumulative), 1)
        context, a = eager_step(layer, queries[:, t], memory, prev, lengths, mask, window)
        previous = a.detach() if layer.detach_state else a
        cumulative = cumulative + previous
        contexts.append(context)
        weights.append(a)
    return torch.stack(contexts, 1), torch.stack(weights, 1)


def layer_steps(layer, queries, memory, lengths, mask, window, memory_index, uniform):
    """The user's loop: precompute once, initial_state, then one call per step."""
    pre = layer.precompute(memory, lengths=lengths, mask=mask)
    state = layer.initial_state(pre, memory_index=memory_index, uniform=uniform)
    contexts, weights = [], []
    for t in range(queries.shape[1]):
        context, a, state = layer(queries[:, t], pre, state, window=window,
                                  memory_index=memory_index)
        contexts.append(context)
        weights.append(a)
    return torch.stack(contexts, 1), torch.stack(weights, 1)


# ----------------------------------------------------------------------------- cases

# (id, constructor keywords, uniform initial weights): Tacotron 2's, ESPnet's (scaling 2,
# the bias inside tanh, uniform start), SpeechBrain's (detached state) and the sigmoid.
CONFIGS = [
    ("tacotron2", dict(channels=2), False),
    ("espnet", dict(channels=1, scale=2.0, bias=True), True),
    ("speechbrain", dict(channels=1, bias=True, detach_state=True), True),
    ("sigmoid", dict(channels=2, normalization="sigmoid", scale=0.7), False),
]


def make_layer(kw, seed=0):
    torch.manual_seed(seed)
    layer = LocationSensitiveAttention(QUERY_DIM, MEMORY_DIM, UNITS, FILTERS, KERNEL, **kw)
    if layer.score_bias is not None:
        with torch.no_grad():
            layer.score_bias.fill_(0.3)  # a bias the sigmoid feels
    return layer


def make_inputs(mask_kind="lengths64", window=False, memory=None, seed=1):
    """Inputs of a recurrence; memory=M gives B query rows over M memory rows (beams)."""
    gen = generator(seed)
    M = B if memory is None else memory
    lengths, mask = make_masking(mask_kind, M, S, gen)
    win = None
    if window:
        start = torch.randint(0, S // 2, (B,), generator=gen)
        win = torch.stack((start, start + torch.randint(1, S // 2 + 1, (B,), generator=gen)), 1)
    index = None if memory is None else torch.arange(M).repeat_interleave(B // M)
    return dict(queries=randn((B, T, QUERY_DIM), gen), memory=randn((M, S, MEMORY_DIM), gen),
                lengths=lengths, mask=mask, window=win, memory_index=index)


def check(kw, uniform, inputs, dtype):
    layer = make_layer(kw)
    return check_layer_parity(layer_steps, layer, {**inputs, "uniform": uniform}, dtype,
                              eager_forward=eager_steps)


PARITY = list(itertools.product(CONFIGS, ["none", "lengths64", "mask"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config,mask_kind", PARITY,
                         ids=[f"{c[0]}-{m}" for c, m in PARITY])
def test_recurrence_parity(config, mask_kind, dtype):
    _, kw, uniform = config
    got = check(kw, uniform, make_inputs(mask_kind), dtype)
    assert got["output"].shape == (B, T, MEMORY_DIM) and got["weights"].shape == (B, T, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_window_and_beams(config, dtype):
    """A window per query row, and B = 4 beams over M = 2 memory rows (memory_index)."""
    _, kw, uniform = config
    got = check(kw, uniform, make_inputs("lengths64", window=True), dtype)
    window = make_inputs("lengths64", window=True)["window"]
    j = torch.arange(S)
    outside = (j < window[:, :1]) | (j >= window[:, 1:])
    assert (got["weights"].transpose(0, 1)[:, outside] == 0).all()
    check(kw, uniform, make_inputs("lengths64", memory=2), dtype)


def test_initial_state():
    memory = torch.randn(3, 5, MEMORY_DIM)
    lengths = torch.tensor([5, 2, 0])
    two = make_layer(dict(channels=2))
    state = two.initial_state(two.precompute(memory, lengths=lengths))
    assert torch.equal(state.previous, torch.zeros(3, 5))
    assert torch.equal(state.cumulative, torch.zeros(3, 5))
    one = make_layer(dict(channels=1))
    state = one.initial_state(memory, lengths=lengths, uniform=True)
    assert state.cumulative is None
    want = torch.tensor([[0.2] * 5, [0.5, 0.5, 0, 0, 0], [0.0] * 5])
    torch.testing.assert_close(state.previous, want, rtol=0, atol=0)
    state = one.initial_state(memory, lengths=lengths, uniform=True,
                              memory_index=torch.tensor([1, 1, 0]))
    torch.testing.assert_close(state.previous, want[[1, 1, 0]], rtol=0, atol=0)
    mask = torch.tensor([[True, False, True, False, False]]).expand(3, 5)
    state = one.initial_state(one.precompute(memory, mask=mask), uniform=True)
    torch.testing.assert_close(state.previous, mask / 2.0, rtol=0, atol=0)
    assert state.location().shape == (3, 1, 5)


def test_reorder_follows_the_beams():
    """A step from state.reorder(index) equals the step of the rows index of the batch."""
    layer = make_layer(dict(channels=2))
    inputs = make_inputs("lengths64")
    pre = layer.precompute(inputs["memory"], lengths=inputs["lengths"])
    state = layer.initial_state(pre)
    for t in range(2):
        _, _, state = layer(inputs["queries"][:, t], pre, state)
    index = torch.tensor([2, 0, 0, 3])
    moved = state.reorder(index)
    assert torch.equal(moved.cumulative, state.cumulative[index])
    got = layer(inputs["queries"][index, 2], pre, moved, memory_index=index)
    want = layer(inputs["queries"][:, 2], pre, state)
    # Close, not equal: W(query) of another batch shape is another BLAS product.
    torch.testing.assert_close(got[0], want[0][index])
    torch.testing.assert_close(got[1], want[1][index])


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_padded_batch_decodes_each_utterance_as_alone(config):
    """The weights and contexts of a padded batch, row by row, are those of each utterance
    decoded alone at its own length: equal where the op's inputs are (its rows are
    computed independently), and within float32 rounding through the layer, whose
    projections W(query) and U(memory) are BLAS products of the batch's shape."""
    _, kw, uniform = config
    layer = make_layer(kw)
    inputs = make_inputs("lengths64")
    lengths = inputs["lengths"].clamp_min(1)
    args = dict(window=None, memory_index=None, uniform=uniform)
    with torch.no_grad():
        context, weights = layer_steps(layer, inputs["queries"], inputs["memory"], lengths,
                                       None, **args)
        queries, keys = layer.W(inputs["queries"]), layer.U(inputs["memory"])
        state = layer.initial_state(inputs["memory"], lengths=lengths, uniform=uniform)
        steps = [_op_step(layer, queries[:, t], keys, inputs["memory"], lengths)
                 for t in range(T)]
        for b in range(B):
            n = int(lengths[b])
            c, w = layer_steps(layer, inputs["queries"][b:b + 1], inputs["memory"][b:b + 1, :n],
                               None, None, **args)
            torch.testing.assert_close(context[b:b + 1], c)
            torch.testing.assert_close(weights[b:b + 1, :, :n], w)
            assert (weights[b, :, n:] == 0).all()
            state_b = LocationState(*(None if x is None else x[b:b + 1, :n].contiguous()
                                      for x in (state.previous, state.cumulative)))
            batch_state = state
            for t in range(T):
                step = _op_step(layer, queries[b:b + 1, t], keys[b:b + 1, :n].contiguous(),
                                inputs["memory"][b:b + 1, :n].contiguous(), None)
                c, w, state_b = step(state_b)
                cb, wb, batch_state = steps[t](batch_state)
                assert torch.equal(c, cb[b:b + 1]) and torch.equal(w, wb[b:b + 1, :n])


def _op_step(layer, query_proj, keys_proj, memory, lengths):
    """The fused op of one layer step on given projections: state -> (context, weights,
    next state), fed back as the layer feeds it."""
    def step(state):
        context, weights = attention_ext.location_attention(
            query_proj, keys_proj, state.location(), layer.location_conv.weight,
            layer.location_dense.weight, layer.v, memory, lengths=lengths,
            score_bias=layer.score_bias, scale=layer.scale, normalization=layer.normalization)
        cumulative = None if state.cumulative is None else state.cumulative + weights
        return context, weights, LocationState(weights, cumulative)
    return step


def test_reference_implementation_matches():
    layer = make_layer(dict(channels=2))
    inputs = {**make_inputs("lengths64"), "uniform": False}
    fused = layer_steps(layer, *inputs.values())
    set_implementation(layer, "reference")
    assert layer.implementation == "reference"
    reference = layer_steps(layer, *inputs.values())
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=["tacotron2", "sigmoid"])
def test_compile_fullgraph_recurrence(config, dynamo_reset):
    """Two decoder steps through LocationState (precompute, initial_state, the steps and a
    loss) compiled without graph breaks give the eager values and gradients."""
    _, kw, uniform = config
    layer = make_layer(kw)
    inputs = make_inputs("lengths64")

    def steps(layer, queries, memory):
        context, weights = layer_steps(layer, queries[:, :2], memory, inputs["lengths"], None,
                                       None, None, uniform)
        return (context * context).sum() + (weights * weights).sum()

    compiled = torch.compile(steps, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn in (steps, compiled):
        q = inputs["queries"].clone().requires_grad_()
        m = inputs["memory"].clone().requires_grad_()
        loss = fn(layer, q, m)
        results.append([loss] + list(torch.autograd.grad(loss, [q, m, *layer.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_state_dict_and_repr():
    layer = make_layer(dict(channels=2, normalization="sigmoid", bias=True))
    assert list(layer.state_dict()) == ["v", "score_bias", "W.weight", "W.bias", "U.weight",
                                        "location_conv.weight", "location_dense.weight"]
    assert layer.location_conv.weight.shape == (FILTERS, 2, KERNEL)
    assert layer.location_dense.weight.shape == (UNITS, FILTERS)
    other = make_layer(dict(channels=2, normalization="sigmoid", bias=True), seed=1)
    other.load_state_dict(layer.state_dict())
    assert "channels=2" in repr(layer) and "normalization='sigmoid'" in repr(layer)
    assert make_layer(dict(channels=1)).score_bias is None


@pytest.mark.parametrize("kw,match", [
    (dict(channels=3), "channels"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(normalization="relu"), "normalization"),
    (dict(scale=float("nan")), "scale"),
])
def test_bad_constructor_arguments(kw, match):
    args = dict(query_dim=QUERY_DIM, memory_dim=MEMORY_DIM, units=UNITS, filters=FILTERS,
                kernel_size=KERNEL)
    with pytest.raises(ValueError, match=match):
        LocationSensitiveAttention(**{**args, **kw})


def test_bad_inputs():
    layer = make_layer(dict(channels=2))
    memory = torch.randn(B, S, MEMORY_DIM)
    pre = layer.precompute(memory)
    state = layer.initial_state(pre)
    query = torch.randn(B, QUERY_DIM)
    with pytest.raises(ValueError, match="query"):
        layer(query[:, None], pre, state)
    with pytest.raises(TypeError, match="query"):
        layer(None, pre, state)
    with pytest.raises(TypeError, match="state"):
        layer(query, pre, (state.previous, state.cumulative))
    with pytest.raises(ValueError, match=r"state.previous"):
        layer(query, pre, LocationState(state.previous[:, :-1], state.cumulative))
    with pytest.raises(ValueError, match=r"state.cumulative"):
        layer(query, pre, LocationState(state.previous))
    with pytest.raises(ValueError, match=r"state.cumulative"):
        layer(query, pre, LocationState(state.previous, state.cumulative[:2]))
    with pytest.raises(ValueError, match=r"state.cumulative"):
        make_layer(dict(channels=1))(query, memory, state)
    with pytest.raises(ValueError, match="memory"):
        layer.initial_state(torch.randn(B, S, MEMORY_DIM + 1))
    with pytest.raises(ValueError, match="another layer"):
        make_layer(dict(channels=2))(query, pre, state)
    with pytest.raises(ValueError, match="window"):
        layer(query, pre, state, window=torch.tensor([[0, S + 1]] * B))
    assert isinstance(pre, PrecomputedMemory)
