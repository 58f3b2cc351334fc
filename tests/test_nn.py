"""attention_ext.nn layers against eager implementations of the published formulas
(Luong et al. 2015: dot / general / concat scores and the attentional hidden state;
Bahdanau et al. 2015 and its weight-normalised form), written here, not taken from the
package: values, all parameter and input gradients, masking, one- and multi-step queries,
precompute reuse, state_dict, torch.compile(fullgraph=True) and bad inputs."""
import copy

import pytest
import torch

import attention_ext
from attention_ext.nn import BahdanauAttention, LuongAttention, PrecomputedMemory
from harness import check_layer_parity
from helpers import DEVICES, generator, make_masking, randn


# ----------------------------------------------------------------------------- eager formulas

def eager_softmax(scores, lengths, mask):
    """Softmax over s of (B, Tq, S) scores; masked positions excluded, empty rows give 0."""
    B, _, S = scores.shape
    if lengths is not None:
        valid = torch.arange(S, device=scores.device)[None, :] < lengths[:, None]
    elif mask is not None:
        valid = mask
    else:
        valid = torch.ones(B, S, dtype=torch.bool, device=scores.device)
    valid = valid[:, None, :]
    e = torch.exp(scores - scores.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
                  .nan_to_num(0.0, neginf=0.0))
    e = e * valid
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def eager_luong(layer, h_t, h_s, lengths=None, mask=None):
    """Luong 2015, eq. (7)-(8) and (5): score, a_t, c_t, tanh(W_c [c_t; h_t])."""
    single = h_t.dim() == 2
    if single:
        h_t = h_t[:, None]
    Dq = layer.query_dim
    if layer.score == "dot":
        score = torch.einsum("btd,bsd->bts", h_t, h_s)
    elif layer.score == "general":
        W_a = layer.W_a.weight.t()  # (Dq, Dm): h_t^T W_a h_s
        score = torch.einsum("btd,de,bse->bts", h_t, W_a, h_s)
    else:
        B, Tq, _ = h_t.shape
        S = h_s.shape[1]
        cat = torch.cat([h_t[:, :, None].expand(B, Tq, S, Dq),
                         h_s[:, None].expand(B, Tq, S, layer.memory_dim)], dim=-1)
        score = torch.tanh(cat @ layer.W_a.weight.t()) @ layer.v_a
    if layer.scale is not None:
        score = layer.scale * score
    if layer.g is not None:
        score = layer.g * score
    a = eager_softmax(score, lengths, mask)
    c = a @ h_s
    out = c
    if layer.attentional:
        out = torch.tanh(torch.cat([c, h_t], -1) @ layer.W_c.weight.t()
                         + (layer.W_c.bias if layer.W_c.bias is not None else 0))
    return (out[:, 0], a[:, 0]) if single else (out, a)


def eager_bahdanau(layer, s, h, lengths=None, mask=None):
    """Bahdanau 2015 appendix A.1.2: e_j = v^T tanh(W s + U h_j); normalised form
    e_j = (g v / ||v||)^T tanh(W s + U h_j + b)."""
    single = s.dim() == 2
    if single:
        s = s[:, None]
    pre = (s @ layer.W.weight.t())[:, :, None, :] + (h @ layer.U.weight.t())[:, None, :, :]
    v = layer.v
    if layer.normalize:
        pre = pre + layer.b
        v = layer.g * v / torch.sqrt((v * v).sum())
    a = eager_softmax(torch.tanh(pre) @ v, lengths, mask)
    c = a @ h
    return (c[:, 0], a[:, 0]) if single else (c, a)


def eager_of(layer):
    return eager_luong if isinstance(layer, LuongAttention) else eager_bahdanau


# ----------------------------------------------------------------------------- helpers

QUERY_DIM = 6
LUONG_CONFIGS = [
    ("dot", dict(score="dot")),
    ("dot_scaled_noattn", dict(score="dot", scale=QUERY_DIM ** -0.5, attentional=False)),
    ("general_rect", dict(score="general", memory_dim=7)),
    ("general_learned_bias", dict(score="general", memory_dim=5, learn_scale=True, bias=True)),
    ("general_scaled_learned", dict(score="general", memory_dim=5, scale=0.7,
                                    learn_scale=True)),
    ("concat_rect", dict(score="concat", memory_dim=7)),
    ("concat_learned_noattn", dict(score="concat", learn_scale=True, attentional=False)),
    ("concat_scaled_bias", dict(score="concat", memory_dim=3, scale=QUERY_DIM ** -0.5,
                                bias=True)),
]
BAHDANAU_CONFIGS = [
    ("bahdanau", dict(normalize=False)),
    ("bahdanau_norm", dict(normalize=True)),
]
CONFIGS = [(n, "luong", kw) for n, kw in LUONG_CONFIGS] + \
          [(n, "bahdanau", kw) for n, kw in BAHDANAU_CONFIGS]


def make_layer(kind, kw, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    if kind == "luong":
        layer = LuongAttention(QUERY_DIM, **kw)
    else:
        layer = BahdanauAttention(QUERY_DIM, 5, units=8, **kw)
    with torch.no_grad():  # nondefault values for everything (g, b), so all are tested
        for name, p in layer.named_parameters():
            if name in ("g", "b"):
                p.add_(0.3 * torch.randn(p.shape))
    return layer.to(device=device, dtype=dtype)


def make_inputs(layer, B, Tq, S, mask_kind, dtype, device, seed):
    gen = generator(seed)
    qshape = (B, layer.query_dim) if Tq is None else (B, Tq, layer.query_dim)
    query = randn(qshape, gen, dtype, device)
    memory = randn((B, S, layer.memory_dim), gen, dtype, device)
    lengths, mask = make_masking(mask_kind, B, S, gen, device)
    return query, memory, lengths, mask


def ours(layer, q, m, lengths, mask):
    return layer(q, m, lengths=lengths, mask=mask)


def ours_precomputed(layer, q, m, lengths, mask):
    return layer(q, layer.precompute(m, lengths=lengths, mask=mask))


def check_against_eager(layer, query, memory, lengths, mask, dtype, precompute=False):
    return check_layer_parity(ours_precomputed if precompute else ours, layer,
                              dict(query=query, memory=memory, lengths=lengths, mask=mask),
                              dtype, eager_forward=eager_of(layer))


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mask_kind", ["none", "lengths64", "mask"])
@pytest.mark.parametrize("Tq", [None, 3], ids=["onestep", "multistep"])
@pytest.mark.parametrize("name,kind,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parity_with_published_formulas(name, kind, kw, Tq, mask_kind, dtype, device):
    """Output, weights and the gradients of the query, the memory and every parameter."""
    layer = make_layer(kind, kw, device=device, seed=1)
    inputs = make_inputs(layer, 4, Tq, 5, mask_kind, dtype, device, seed=2)
    got = check_against_eager(layer, *inputs, dtype)
    if mask_kind != "none":  # row 0 attends to nothing: weights 0, no NaN anywhere
        assert (got["weights"][0] == 0).all()


@pytest.mark.parametrize("name,kind,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_precompute_reuse_matches_raw_memory(name, kind, kw):
    """One precompute reused over several steps equals raw memory at each step, gradients
    included (they accumulate into the memory through the shared projection)."""
    layer = make_layer(kind, kw, dtype=torch.float64, seed=3)
    query, memory, lengths, _ = make_inputs(layer, 3, 4, 6, "lengths32", torch.float64,
                                            "cpu", seed=4)
    pre = layer.precompute(memory, lengths=lengths)
    assert isinstance(pre, PrecomputedMemory)
    for t in range(query.shape[1]):
        o1, w1 = layer(query[:, t], pre)
        o2, w2 = layer(query[:, t], memory, lengths=lengths)
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    # per-step loop over a precompute == one multi-step call; with gradients
    check_against_eager(layer, query, memory, lengths, None, torch.float64, precompute=True)
    steps = [layer(query[:, t], pre)[0] for t in range(query.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), layer(query, pre)[0],
                               rtol=1e-12, atol=1e-12)


def test_precompute_without_masking_takes_masking_per_call():
    layer = make_layer("bahdanau", dict(normalize=True), dtype=torch.float64)
    query, memory, _, mask = make_inputs(layer, 3, None, 5, "mask", torch.float64, "cpu", 5)
    pre = layer.precompute(memory)
    o1, w1 = layer(query, pre, mask=mask)
    o2, w2 = eager_bahdanau(layer, query, memory, mask=mask)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kind,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_need_weights_false(name, kind, kw):
    layer = make_layer(kind, kw, seed=6)
    query, memory, lengths, _ = make_inputs(layer, 3, 2, 4, "lengths64", torch.float32,
                                            "cpu", seed=7)
    out, w = layer(query, memory, lengths=lengths, need_weights=False)
    assert w is None
    torch.testing.assert_close(out, layer(query, memory, lengths=lengths)[0], rtol=0, atol=0)


def test_output_shapes_and_parameters():
    q1, q3, mem = torch.randn(2, 6), torch.randn(2, 4, 6), torch.randn(2, 5, 7)
    luong = LuongAttention(6, 7, score="general")
    assert luong(q1, mem)[0].shape == (2, 6) and luong(q3, mem)[1].shape == (2, 4, 5)
    raw = LuongAttention(6, 7, score="concat", attentional=False)
    assert raw(q1, mem)[0].shape == (2, 7)
    assert LuongAttention(6, score="dot", attentional=False)(q1, torch.randn(2, 5, 6))[0] \
        .shape == (2, 6)
    bahdanau = BahdanauAttention(6, 7, units=9, normalize=True)
    assert bahdanau(q3, mem)[0].shape == (2, 4, 7)
    assert dict((n, p.shape) for n, p in bahdanau.named_parameters()) == {
        "W.weight": (9, 6), "U.weight": (9, 7), "v": (9,), "g": (), "b": (9,)}
    assert bahdanau.g.item() == pytest.approx((1 / 9) ** 0.5)
    assert set(n for n, _ in LuongAttention(6, 7, "concat", learn_scale=True, bias=True)
               .named_parameters()) == {"W_a.weight", "v_a", "g", "W_c.weight", "W_c.bias"}
    assert set(n for n, _ in LuongAttention(6).named_parameters()) == {"W_c.weight"}
    assert attention_ext.nn.LuongAttention is LuongAttention


def test_scale_is_the_ops_scale():
    """The layer's scale means what dot_attention's does: it multiplies the scores."""
    gen = generator(13)
    q, mem = randn((3, 2, QUERY_DIM), gen), randn((3, 5, QUERY_DIM), gen)
    layer = LuongAttention(QUERY_DIM, scale=0.4, attentional=False)
    torch.testing.assert_close(layer(q, mem), attention_ext.dot_attention(q, mem, scale=0.4),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name,kind,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_state_dict_round_trip(name, kind, kw):
    a = make_layer(kind, kw, seed=8)
    b = make_layer(kind, kw, seed=9)
    query, memory, _, mask = make_inputs(a, 2, 3, 4, "mask", torch.float32, "cpu", seed=10)
    if list(a.parameters()):  # (dot without W_c has none)
        assert not torch.equal(a(query, memory, mask=mask)[0], b(query, memory, mask=mask)[0])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(query, memory, mask=mask)[0], a(query, memory, mask=mask)[0],
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- compile

COMPILE_CONFIGS = [c for c in CONFIGS if c[0] in (
    "general_learned_bias", "concat_learned_noattn", "bahdanau_norm")]


# aot_eager checks the graph (no breaks, fake kernels, autograd) on every layer kind;
# inductor (~8 s to compile on 2 cores) on one.
COMPILE_CASES = [(c, "aot_eager") for c in COMPILE_CONFIGS] + [(COMPILE_CONFIGS[0], "inductor")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config,backend", COMPILE_CASES,
                         ids=[f"{c[0]}-{b}" for c, b in COMPILE_CASES])
def test_compile_fullgraph_forward_backward(config, backend, device, dynamo_reset):
    """A decoder step (precompute + forward + loss) compiled without graph breaks gives the
    eager values and gradients."""
    name, kind, kw = config
    layer = make_layer(kind, kw, device=device, seed=11)
    query, memory, lengths, _ = make_inputs(layer, 3, None, 5, "lengths64", torch.float32,
                                            device, seed=12)

    def step(layer, q, m):
        pre = layer.precompute(m, lengths=lengths)
        out, w = layer(q, pre)
        return (out * out).sum() + (w * w).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend, dynamic=False)
    results = []
    for fn in (step, compiled):
        q, m = query.clone().requires_grad_(), memory.clone().requires_grad_()
        loss = fn(layer, q, m)
        params = list(layer.parameters())
        results.append([loss] + list(torch.autograd.grad(loss, [q, m] + params)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="score"):
        LuongAttention(4, score="bilinear")
    for scale in ("sqrt", torch.tensor(0.5), True):
        with pytest.raises(TypeError, match=r"scale must be a Python number .* got "):
            LuongAttention(4, scale=scale)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scale must be finite"):
            LuongAttention(4, scale=scale)
    with pytest.raises(TypeError, match="positional"):
        LuongAttention(4, 4, "dot", 0.5)  # options past score are keyword-only
    with pytest.raises(ValueError, match="memory_dim"):
        LuongAttention(4, 5, score="dot")


@pytest.mark.parametrize("kind", ["luong", "bahdanau"])
def test_bad_inputs(kind):
    layer = make_layer(kind, dict(score="general", memory_dim=5) if kind == "luong" else {})
    q, mem = torch.randn(2, QUERY_DIM), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"query must have shape \(B, 6\)"):
        layer(torch.randn(2, QUERY_DIM + 1), mem)
    with pytest.raises(ValueError, match="query"):
        layer(torch.randn(2, 1, 1, QUERY_DIM), mem)
    with pytest.raises(ValueError, match=r"memory must have shape \(B, S, 5\)"):
        layer(q, torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="memory"):
        layer(q, torch.randn(2, 5))
    with pytest.raises(ValueError, match="memory"):
        layer.precompute(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="lengths or mask"):
        layer(q, mem, lengths=torch.tensor([1, 2]), mask=torch.ones(2, 4, dtype=torch.bool))
    other = copy.deepcopy(layer)
    with pytest.raises(ValueError, match="memory"):
        layer(q, other.precompute(mem))
    pre = layer.precompute(mem, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        layer(q, pre, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mask"):
        layer(q, pre, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="memory"):
        layer(q, [mem])
    with pytest.raises(TypeError, match="positional"):  # masking is keyword-only
        layer(q, mem, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="positional"):
        layer.precompute(mem, torch.tensor([1, 2]))


def test_precompute_from_other_layer_kind():
    luong = make_layer("luong", dict(score="concat", memory_dim=5))
    bahdanau = make_layer("bahdanau", {})
    mem = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="memory was precomputed by another layer"):
        bahdanau(torch.randn(2, QUERY_DIM), luong.precompute(mem))
