"""attention_ext.seq2seq: layers with memory_index, teacher forcing, greedy decoding and beam
search (beams share the encoder memory), batch invariance, export/compile, save/load, a
reverse task learnt inside the test, and every bad input."""
import functools
import pickle
import weakref

import pytest
import torch

import attention_ext
from attention_ext.nn import set_implementation
from attention_ext.seq2seq import model as model_module
from attention_ext.seq2seq import (BahdanauDecoder, DecoderState, Encoder, LengthPenalty,
                                   LuongDecoder, Seq2Seq, Vocabulary, pad_batch)
from helpers import DEVICES, HAS_CUDA, generator

V, PAD, BOS, EOS = 13, 0, 1, 2

DECODERS = {
    "bahdanau": lambda H, **kw: BahdanauDecoder(V, 16, H, **kw),
    "luong_dot": lambda H, **kw: LuongDecoder(V, 16, H, score="dot", **kw),
    "luong_general_no_feed": lambda H, **kw: LuongDecoder(V, 16, H, score="general",
                                                           input_feeding=False, **kw),
    "luong_concat": lambda H, **kw: LuongDecoder(V, 16, H, score="concat", **kw),
}


def make_model(kind="bahdanau", H=24, layers=1, cell="lstm", seed=0, dtype=torch.float32,
               device="cpu"):
    torch.manual_seed(seed)
    enc = Encoder(V, 16, H, num_layers=layers, cell=cell)
    dec = DECODERS[kind](H, num_layers=layers, cell=cell)
    return Seq2Seq(enc, dec, bos_idx=BOS, eos_idx=EOS).to(device=device, dtype=dtype).eval()


def source(B, S, seed=0, device="cpu", min_len=1):
    """Random source ids (no special tokens) with lengths in [min_len, S], one of them S."""
    gen = generator(seed)
    lengths = torch.randint(min_len, S + 1, (B,), generator=gen)
    lengths[0] = S
    src = torch.randint(3, V, (B, S), generator=gen)
    src = src.masked_fill(torch.arange(S)[None, :] >= lengths[:, None], PAD)
    return src.to(device), lengths


def until_eos(tokens):
    """A greedy row up to and including its first eos."""
    ends = (tokens == EOS).nonzero()
    return tokens[: int(ends[0, 0]) + 1] if len(ends) else tokens


# ------------------------------------------------------------------ layers, memory_index

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["luong_dot", "luong_general", "luong_concat", "bahdanau"])
def test_layer_memory_index_is_tiling(layer, device):
    """A layer attending beams through memory_index gives the outputs and gradients of the
    same layer on the memory tiled per beam."""
    torch.manual_seed(0)
    H, M, K, S = 12, 3, 2, 7
    lay = (attention_ext.nn.BahdanauAttention(H, H, 10) if layer == "bahdanau"
           else attention_ext.nn.LuongAttention(H, H, score=layer.split("_")[1]))
    memory = torch.randn(M, S, H, dtype=torch.float64, requires_grad=True)
    query = torch.randn(M * K, H, dtype=torch.float64, requires_grad=True)
    lay = lay.double().to(device)
    memory = memory.detach().to(device).requires_grad_()
    query = query.detach().to(device).requires_grad_()
    lengths = torch.tensor([7, 3, 5])
    index = torch.arange(M, device=device).repeat_interleave(K)
    out, w = lay(query, lay.precompute(memory, lengths=lengths), memory_index=index)
    out_t, w_t = lay(query, lay.precompute(memory.index_select(0, index),
                                           lengths=lengths[index.cpu()]))
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(w, w_t)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [query, memory, *lay.parameters()])
    grads_t = torch.autograd.grad((out_t * g).sum(), [query, memory, *lay.parameters()])
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("rnn_dropout", [0.0, 1.0])
@pytest.mark.parametrize("grad", [True, False], ids=["step_loop", "module"])
def test_encoder_is_the_packed_rnn(cell, bidirectional, rnn_dropout, grad):
    """The encoder's memory (unpacked by one gather) and bridged states are those of its
    RNN module run on the packed source and unpacked by pad_packed_sequence (zeros past
    each length), with their gradients: whether it runs the module (no autograd) or, where
    autograd records on the CPU, the RNN one step at a time. Dropout 1 between the layers
    (training) zeroes the second layer's input in both."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    enc = Encoder(V, 8, 12, num_layers=2, cell=cell, bidirectional=bidirectional).double()
    enc.rnn.dropout = rnn_dropout
    src, _ = source(5, 7, seed=2, min_len=1)
    lengths = torch.tensor([3, 7, 3, 1, 7])  # ties: the sort order must be the encoder's own
    src = src.masked_fill(torch.arange(7)[None, :] >= lengths[:, None], PAD)
    with torch.set_grad_enabled(grad):
        memory, _, state = enc(src, lengths)
    packed = pack_padded_sequence(enc.embedding(src), lengths, batch_first=True,
                                  enforce_sorted=False)
    out, final = enc.rnn(packed)
    want, _ = pad_packed_sequence(out, batch_first=True, total_length=7)
    finals = final if isinstance(final, tuple) else (final,)
    want_state = tuple(torch.tanh(lin(enc._layers(f))) for lin, f in zip(enc.bridge, finals))
    tol = dict(rtol=1e-12, atol=1e-12) if grad else dict(rtol=0, atol=0)
    torch.testing.assert_close(memory, want, **tol)
    for got, expected in zip(state, want_state, strict=True):
        torch.testing.assert_close(got, expected, **tol)
    if grad:
        ups = [torch.randn(t.shape, dtype=torch.float64) for t in (memory, *state)]

        def loss(outputs):
            return sum((t * u).sum() for t, u in zip(outputs, ups))

        params = list(enc.rnn.parameters())
        got = torch.autograd.grad(loss((memory, *state)), params)
        expected = torch.autograd.grad(loss((want, *want_state)), params)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_set_implementation():
    model = make_model("bahdanau")
    assert set_implementation(model, "reference") is model
    assert model.decoder.attention.implementation == "reference"
    set_implementation(model, "fused")
    assert model.decoder.attention.implementation == "fused"
    with pytest.raises(ValueError, match="implementation must be one of \\('fused', "
                                         "'reference'\\), got 'eager'"):
        set_implementation(model, "eager")


def test_decoder_state_reorder():
    h, c = torch.arange(12.).view(1, 6, 2), -torch.arange(12.).view(1, 6, 2)
    state = DecoderState((h, c), torch.arange(6.)[:, None], torch.tensor([0, 0, 1, 1, 2, 2]))
    got = state.reorder(torch.tensor([5, 0, 0]))
    assert torch.equal(got.hidden[0], h[:, [5, 0, 0]]) and torch.equal(got.hidden[1], c[:, [5, 0, 0]])
    assert torch.equal(got.input_feed[:, 0], torch.tensor([5., 0., 0.]))
    assert torch.equal(got.memory_index, torch.tensor([2, 0, 0]))


# ------------------------------------------------------------------ decoding

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(DECODERS))
def test_beam_size_one_is_greedy(kind, device):
    model = make_model(kind, device=device)
    src, lengths = source(5, 9, seed=1, device=device)
    greedy = model.greedy_decode(src, lengths, max_len=12)
    beam = model.beam_search(src, lengths, beam_size=1, max_len=12)
    for b in range(5):
        assert torch.equal(beam.hypotheses[b][0], until_eos(greedy[b])), b


@functools.lru_cache(maxsize=None)
def _ending_weights(kind):
    """The weights of a model given 40 Adam steps of the reverse task (below): enough that
    its greedy rows end, at steps that follow the source lengths (a random model's end
    logit hardly depends on its input)."""
    model = train_reverse(make_model(kind), steps=40, batch=32, lr=1e-2, seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ending_model(kind, device="cpu"):
    model = make_model(kind, dtype=torch.float64, device=device)
    model.load_state_dict(_ending_weights(kind))
    return model


def _assert_same_beams(got, want, n_best, where):
    for b in range(len(want.hypotheses)):
        assert len(got.hypotheses[b]) == len(want.hypotheses[b]) == n_best, where
        for x, y in zip(got.hypotheses[b], want.hypotheses[b]):
            assert torch.equal(x, y), (where, b)
        for x, y in zip(got.alignments[b], want.alignments[b]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
        assert got.scores[b] == pytest.approx(want.scores[b], rel=1e-12), (where, b)


@pytest.mark.parametrize("kind", list(DECODERS))
def test_captured_decoding_is_the_plain_loop(kind):
    """The static loop of cuda_graph=True (run without a graph on the CPU: the same
    buffers, device step counter, finished-checks every CHECK_EVERY steps and done
    sentences kept at -inf) gives the plain loop's tokens, scores and alignments, at its
    first call and at later calls on other batches of the shape (buffers refilled)."""
    from attention_ext.seq2seq import captured, search

    model = _ending_model(kind)
    with torch.no_grad():
        batches = [model.encode(*source(6, 9, seed=seed)) for seed in (3, 4, 3)]
        first = batches[0]
        for max_len in (1, 6, 30):
            ids = dict(bos_idx=BOS, eos_idx=EOS, max_len=max_len)
            greedy = captured.CapturedGreedy(model.decoder, *first, pad_idx=PAD, **ids)
            for i, (memory, state) in enumerate(batches):
                plain = search.greedy_decode(model.decoder, memory, state, pad_idx=PAD, **ids)
                assert torch.equal(greedy(memory, state), plain), (max_len, i)
            # beam_size = V with min_len: the end token is blocked in the first steps, where
            # fewer than beam_size candidates are real.
            for beam_size, n_best, min_len in ((1, 1, 0), (4, 2, 0), (5, 3, 1), (V, 2, 3)):
                sizes = dict(ids, beam_size=beam_size, min_len=min(min_len, max_len))
                beams = captured.CapturedBeamSearch(model.decoder, *first, **sizes)
                for i, (memory, state) in enumerate(batches):
                    penalty = LengthPenalty("gnmt", 0.6)
                    want = search.beam_search(model.decoder, memory, state,
                                              length_penalty=penalty, n_best=n_best, **sizes)
                    _assert_same_beams(beams(memory, state, penalty, n_best), want, n_best,
                                       (max_len, beam_size, i))
        # At 30 steps, rows ended at different steps.
        ends = {int((row == EOS).nonzero()[0, 0]) for row in plain if bool((row == EOS).any())}
        assert len(ends) > 2, (kind, plain)


def test_beam_search_keeps_only_real_candidates():
    """With beam_size = V and the end token blocked, a step has fewer than beam_size
    candidates: a one-step search returns each of the V - 1 other tokens once, with a finite
    score, and no candidate of score -inf, in the plain loop and the captured one."""
    from attention_ext.seq2seq import captured, search

    model = _ending_model("bahdanau")
    with torch.no_grad():
        memory, state = model.encode(*source(3, 6, seed=1))
        sizes = dict(bos_idx=BOS, eos_idx=EOS, beam_size=V, max_len=1, min_len=1)
        plain = search.beam_search(model.decoder, memory, state, length_penalty=LengthPenalty(),
                                   n_best=V, **sizes)
        beams = captured.CapturedBeamSearch(model.decoder, memory, state, **sizes)
        for res in (plain, beams(memory, state, LengthPenalty(), V)):
            for b in range(3):
                assert sorted(int(h[0]) for h in res.hypotheses[b]) == [
                    t for t in range(V) if t != EOS]
                assert all(s > float("-inf") for s in res.scores[b]), res.scores[b]


def test_captured_decodings_are_kept_per_key():
    """A model keeps one captured decoding per key, the least recently used dropped first;
    the key changes with the options, any decoder module's mode, the implementation and
    inference mode; clearing frees them at once, copies start without them, and moving
    the model drops them."""
    from attention_ext.seq2seq import captured as captured_module

    model = make_model("bahdanau")
    memory, state = model.encode(*source(2, 5))
    made = []

    def captured(*options, make=object):
        return model._cuda_graphs.get(captured_module.captured_key(model.decoder, memory,
                                                                   *options),
                                      lambda: made.append(options) or make())

    a = captured("greedy", 5)
    assert captured("greedy", 5) is a and made == [("greedy", 5)]
    b = captured("greedy", 6)
    model.train()
    assert captured("greedy", 5) is not a
    model.eval()
    model.decoder.dropout.train()
    assert captured("greedy", 5) is not a
    model.decoder.dropout.eval()
    set_implementation(model, "reference")
    assert captured("greedy", 5) is not a
    set_implementation(model, "fused")
    with torch.inference_mode():
        assert captured("greedy", 5) is not a
    assert captured("greedy", 5) is a and len(made) == len(model._cuda_graphs) == 6
    for i in range(model_module.CUDA_GRAPHS_KEPT - 6 + 1):
        captured("greedy", 100 + i)
    assert len(model._cuda_graphs) == model_module.CUDA_GRAPHS_KEPT
    assert captured("greedy", 5) is a  # used after b, so b went first
    assert captured("greedy", 6) is not b

    copy = pickle.loads(pickle.dumps(model))
    assert len(copy._cuda_graphs) == 0 and len(model._cuda_graphs) > 0
    model.double()
    assert len(model._cuda_graphs) == 0

    memory, state = model.encode(*source(2, 5))
    greedy = weakref.ref(captured(
        "greedy", 5, make=lambda: captured_module.CapturedGreedy(
            model.decoder, memory, state, bos_idx=BOS, eos_idx=EOS, pad_idx=PAD, max_len=5)))
    greedy()(memory, state)
    model.clear_cuda_graphs()
    assert greedy() is None  # no reference cycle keeps its buffers (or graph) alive


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize("kind", list(DECODERS))
def test_cuda_graph_decoding(kind):
    """cuda_graph=True captures a step and replays it: the tokens and hypotheses of the
    plain loop on the GPU, at the first call and at later calls on other batches."""
    model = _ending_model(kind, device="cuda")
    batches = [source(6, 9, seed=seed, device="cuda") for seed in (3, 4, 3)]
    for max_len in (1, 30):
        for src, lengths in batches:
            assert torch.equal(model.greedy_decode(src, lengths, max_len=max_len,
                                                   cuda_graph=True),
                               model.greedy_decode(src, lengths, max_len=max_len))
            got = model.beam_search(src, lengths, beam_size=4, max_len=max_len, n_best=2,
                                    cuda_graph=True)
            want = model.beam_search(src, lengths, beam_size=4, max_len=max_len, n_best=2)
            _assert_same_beams(got, want, 2, max_len)
    assert len(model._cuda_graphs) == 4  # greedy and beam, at two max_len each


@pytest.mark.parametrize("layers,cell", [(1, "lstm"), (2, "lstm"), (2, "gru")])
def test_teacher_forcing_without_input_feeding_matches_the_step_loop(layers, cell):
    """Without input feeding, forward() runs the RNN (nn.LSTM / nn.GRU) over all steps and
    attention once with Tq = T: the logits of step() one token at a time, whose RNN runs
    layer by layer through the cell ops on the same weights."""
    model = make_model("luong_general_no_feed", layers=layers, cell=cell, dtype=torch.float64)
    src, lengths = source(3, 6, seed=2)
    tgt_in = torch.randint(3, V, (3, 5), generator=generator(3))
    logits = model(src, lengths, tgt_in)
    memory, enc_state = model.encode(src, lengths)
    state = model.decoder.init_state(enc_state)
    for t in range(5):
        step_logits, _, state = model.decoder.step(tgt_in[:, t], state, memory)
        torch.testing.assert_close(logits[:, t], step_logits)


def _decode_all(model, src, lengths):
    greedy = model.greedy_decode(src, lengths, max_len=12)
    beam = model.beam_search(src, lengths, beam_size=4, max_len=12, n_best=2,
                             length_penalty=LengthPenalty("gnmt", 0.6))
    return greedy, beam


@pytest.mark.parametrize("kind", list(DECODERS))
def test_fused_and_reference_attention_decode_alike(kind):
    """The same weights decode to the same tokens with the fused ops and with reference.py
    (float64), and the beams' scores and alignments agree."""
    model = make_model(kind, dtype=torch.float64)
    src, lengths = source(6, 8, seed=4)
    fused = _decode_all(model, src, lengths)
    ref = _decode_all(set_implementation(model, "reference"), src, lengths)
    assert torch.equal(fused[0], ref[0])
    for b in range(6):
        assert len(fused[1].hypotheses[b]) == len(ref[1].hypotheses[b]) == 2
        for got, want in zip(fused[1].hypotheses[b], ref[1].hypotheses[b]):
            assert torch.equal(got, want)
        torch.testing.assert_close(fused[1].scores[b], ref[1].scores[b])
        for got, want in zip(fused[1].alignments[b], ref[1].alignments[b]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bahdanau", "luong_general_no_feed"])
def test_batch_invariance(kind, device):
    """A sentence decodes to the same tokens alone and inside a padded batch (float64, so
    that no near-tie flips with the batch size's rounding)."""
    model = make_model(kind, dtype=torch.float64, device=device)
    src, lengths = source(5, 10, seed=5, device=device, min_len=2)
    greedy, beam = _decode_all(model, src, lengths)
    for b in range(5):
        n = int(lengths[b])
        alone_greedy, alone_beam = _decode_all(model, src[b:b + 1, :n], lengths[b:b + 1])
        assert torch.equal(until_eos(alone_greedy[0]), until_eos(greedy[b])), b
        assert len(alone_beam.hypotheses[0]) == len(beam.hypotheses[b]) == 2
        for got, want in zip(alone_beam.hypotheses[0], beam.hypotheses[b]):
            assert torch.equal(got, want), b
        assert alone_beam.alignments[0][0].shape[1] == n


def test_beam_search_results():
    model = make_model("luong_dot")
    src, lengths = source(3, 7, seed=6)
    res = model.beam_search(src, lengths, beam_size=5, max_len=9, n_best=3, min_len=4,
                            length_penalty=LengthPenalty("power", 1.0))
    for b in range(3):
        assert len(res.hypotheses[b]) == 3
        assert res.scores[b] == sorted(res.scores[b], reverse=True)
        for hyp, align in zip(res.hypotheses[b], res.alignments[b]):
            assert 4 < len(hyp) <= 9 and not bool((hyp[:-1] == EOS).any())
            assert align.shape == (len(hyp), 7)
            torch.testing.assert_close(align.sum(-1)[: len(hyp)],
                                       torch.ones(len(hyp)))
            assert float(align[:, int(lengths[b]):].abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["bahdanau", "luong_concat"])
def test_beam_hypotheses_rescore(kind):
    """Every hypothesis of a beam search of 4, rescored by teacher forcing: its score is its
    summed log-probability over the length penalty, its alignments the teacher-forced
    attention weights."""
    model = make_model(kind, dtype=torch.float64)
    src, lengths = source(4, 7, seed=11)
    penalty = LengthPenalty("gnmt", 0.6)
    res = model.beam_search(src, lengths, beam_size=4, max_len=8, n_best=4,
                            length_penalty=penalty)
    for b in range(4):
        assert len(res.hypotheses[b]) == 4
        for hyp, score, align in zip(res.hypotheses[b], res.scores[b], res.alignments[b]):
            tgt_in = torch.cat([torch.tensor([BOS]), hyp[:-1]])[None]
            with torch.no_grad():
                memory, state = model.encode(src[b:b + 1, :int(lengths[b])], lengths[b:b + 1])
                logits, weights = model.decoder(tgt_in, model.decoder.init_state(state), memory)
            logp = torch.log_softmax(logits[0], -1).gather(1, hyp[:, None]).sum()
            assert score == pytest.approx(float(logp) / penalty(len(hyp)), rel=1e-9, abs=1e-9)
            n = int(lengths[b])
            torch.testing.assert_close(align[:, :n], weights[0])
            assert float(align[:, n:].abs().sum()) == 0.0


def test_length_penalties():
    assert LengthPenalty()(7) == 1.0
    assert LengthPenalty("gnmt", 0.6)(7) == pytest.approx((12 / 6) ** 0.6)
    assert LengthPenalty("power", 1.0)(7) == 7.0


# ------------------------------------------------------------------ a first model's helpers

def test_vocabulary():
    """Special tokens first (pad, bos, eos, unk, those given), encode and decode, an unknown
    token as unk or as an error, and a round trip through plain values."""
    tgt = Vocabulary("0123456789-")
    assert (tgt.pad_idx, tgt.bos_idx, tgt.eos_idx, tgt.unk_idx) == (0, 1, 2, None)
    assert len(tgt) == 14 and tgt.tokens[:4] == ["<pad>", "<s>", "</s>", "0"]
    ids = tgt.encode("2026-12-07")
    assert ids == [5, 3, 5, 9, 13, 4, 5, 13, 3, 10]
    assert "".join(tgt.decode([tgt.bos_idx] + ids + [tgt.eos_idx, 4, 0])) == "2026-12-07"
    with pytest.raises(ValueError, match="token 'x' is not in the vocabulary, which has no unk"):
        tgt.encode("2x")
    src = Vocabulary(["a", "b"], bos=None, eos=None, unk="<unk>")
    assert src.tokens == ["<pad>", "<unk>", "a", "b"] and src.encode("abz") == [2, 3, 1]
    assert src.pad_idx == tgt.pad_idx == 0
    assert Vocabulary.from_dict(src.to_dict()) == src != tgt
    with pytest.raises(ValueError, match="tokens must be distinct .* got '<s>' twice"):
        Vocabulary(["a", "<s>"])


def test_pad_batch_and_token_lists():
    ids, lengths = pad_batch([[5, 6, 7], [8], []], PAD)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 0, 0], [0, 0, 0]]))
    assert torch.equal(lengths, torch.tensor([3, 1, 0]))
    model = make_model("bahdanau")
    greedy = torch.tensor([[4, 5, EOS, PAD], [EOS, PAD, PAD, PAD], [3, 3, 3, 3]])
    assert model.token_lists(greedy) == [[4, 5], [], [3, 3, 3, 3]]
    src, src_lengths = source(2, 5, seed=3)
    beams = model.beam_search(src, src_lengths, beam_size=3, max_len=4, n_best=2)
    lists = model.token_lists(beams)
    for hyps, cut in zip(beams.hypotheses, lists):
        assert len(cut) == 2
        for h, c in zip(hyps, cut):
            ends = h.tolist().index(EOS) if EOS in h.tolist() else len(h)
            assert c == h.tolist()[:ends]


def test_loss_is_the_shifted_cross_entropy():
    """loss() reads bos + target and scores target + eos, ignoring what lies past each
    length: the cross-entropy of forward()'s logits against the shifted targets written
    out by hand, also for an empty target."""
    model = make_model("luong_dot", dtype=torch.float64)
    src, src_lengths = source(3, 6, seed=2)
    tgt = torch.tensor([[5, 6, 7], [8, 9, 11], [3, 4, 12]])
    tgt_lengths = torch.tensor([3, 1, 0])
    tgt_in, tgt_out = model.teacher_forcing(tgt, tgt_lengths)
    assert torch.equal(tgt_in, torch.tensor([[BOS, 5, 6, 7], [BOS, 8, PAD, PAD],
                                             [BOS, PAD, PAD, PAD]]))
    assert torch.equal(tgt_out, torch.tensor([[5, 6, 7, EOS], [8, EOS, PAD, PAD],
                                              [EOS, PAD, PAD, PAD]]))
    logits = model(src, src_lengths, tgt_in)
    logp = torch.log_softmax(logits, -1)
    picked = [logp[b, t, tgt_out[b, t]] for b in range(3) for t in range(4)
              if t <= int(tgt_lengths[b])]
    assert len(picked) == 4 + 2 + 1
    want = -torch.stack(picked).mean()
    torch.testing.assert_close(model.loss(src, src_lengths, tgt, tgt_lengths), want,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(model.loss(src, src_lengths, tgt, tgt_lengths, reduction="sum"),
                               want * 7, rtol=1e-12, atol=0)


def test_decoding_never_applies_dropout():
    """A model in training mode with dropout decodes as in eval mode, the same at every
    call, and keeps each module's mode; Seq2Seq.load gives a model ready to decode."""
    torch.manual_seed(0)
    model = Seq2Seq(Encoder(V, 16, 24, dropout=0.5),
                    LuongDecoder(V, 16, 24, dropout=0.5), bos_idx=BOS, eos_idx=EOS)
    src, lengths = source(4, 7, seed=5)
    model.eval()
    want_greedy = model.greedy_decode(src, lengths, max_len=9)
    want_beam = model.beam_search(src, lengths, beam_size=3, max_len=9, n_best=2)
    model.train()
    model.encoder.dropout.eval()  # a mixed mode comes back as it was
    for _ in range(2):
        assert torch.equal(model.greedy_decode(src, lengths, max_len=9), want_greedy)
        _assert_same_beams(model.beam_search(src, lengths, beam_size=3, max_len=9, n_best=2),
                           want_beam, 2, "train mode")
    assert model.training and model.decoder.dropout.training
    assert not model.encoder.dropout.training


def test_loading_a_format_1_checkpoint(tmp_path):
    """Checkpoints of format 1 (the padding id named padding_idx) load as they were."""
    model = make_model("bahdanau", seed=5)
    model.save(tmp_path / "new.pt")
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    ckpt["format"] = "attention_ext.seq2seq/1"
    for part in ("encoder", "decoder"):
        ckpt["config"][part]["padding_idx"] = ckpt["config"][part].pop("pad_idx")
    torch.save(ckpt, tmp_path / "old.pt")
    old = Seq2Seq.load(tmp_path / "old.pt")
    assert old.config == model.config
    src, lengths = source(3, 6, seed=1)
    assert torch.equal(old.greedy_decode(src, lengths, max_len=7),
                       model.greedy_decode(src, lengths, max_len=7))


def test_a_mismatched_decoder_is_one_error():
    """Every way the decoder does not fit the encoder is named in one error, each with the
    argument to set."""
    with pytest.raises(ValueError) as err:
        Seq2Seq(Encoder(V, 8, 16), LuongDecoder(V, 8, 32, num_layers=2, cell="gru", pad_idx=3))
    lines = str(err.value).splitlines()
    assert lines[0] == "the decoder does not fit the encoder:" and len(lines) == 6
    for want in ("memory_dim=16", "decoder_hidden_size=32", "decoder_layers=2",
                 "cell='lstm'", "pad_idx=0"):
        assert sum(want in line for line in lines) == 1, want


# ------------------------------------------------------------------ export, compile

def test_decoder_step_exports():
    """One decoder step (with beams indexing the memory) through torch.export."""
    model = make_model("bahdanau")

    class Step(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, state, memory, lengths):
            pre = self.decoder.attention.precompute(memory, lengths=lengths)
            logits, weights, new = self.decoder.step(tokens, state, pre)
            return logits, weights, new.hidden

    step = Step(model.decoder)
    memory, lengths = torch.randn(2, 6, 24), torch.tensor([6, 4])
    index = torch.tensor([0, 0, 1, 1])
    state = model.decoder.init_state((torch.randn(1, 2, 24), torch.randn(1, 2, 24)), index)
    tokens = torch.tensor([1, 4, 5, 6])
    exported = torch.export.export(step, (tokens, state, memory, lengths))
    for got, want in zip(exported.module()(tokens, state, memory, lengths),
                         step(tokens, state, memory, lengths)):
        torch.testing.assert_close(got, want)


def test_teacher_forcing_under_torch_compile():
    """Teacher forcing compiled with torch.compile: the loss and gradients of eager."""
    model = make_model("luong_general_no_feed").train()
    src, lengths = source(4, 6, seed=7)
    tgt_in = torch.randint(3, V, (4, 5), generator=generator(8))

    def loss_fn(src, tgt_in):
        memory, lengths_, state = model.encoder(src, lengths)
        pre = model.decoder.attention.precompute(memory, lengths=lengths_)
        logits, _ = model.decoder(tgt_in, model.decoder.init_state(state), pre)
        return logits.square().mean()

    eager = loss_fn(src, tgt_in)
    grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(loss_fn)(src, tgt_in)
    grads_c = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ save / load

@pytest.mark.parametrize("kind", list(DECODERS))
def test_save_load_round_trip(kind, tmp_path):
    model = make_model(kind, layers=2, cell="gru", seed=3, dtype=torch.float64)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = Seq2Seq.load(path)
    assert loaded.config == model.config and not loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    src, lengths = source(3, 6, seed=9)
    tgt_in = torch.randint(3, V, (3, 4), generator=generator(9))
    torch.testing.assert_close(loaded.eval()(src, lengths, tgt_in), model(src, lengths, tgt_in),
                               rtol=0, atol=0)
    fresh = make_model(kind, layers=2, cell="gru", seed=4, dtype=torch.float64)
    fresh.load_weights(path)
    assert torch.equal(fresh.greedy_decode(src, lengths, max_len=8),
                       model.greedy_decode(src, lengths, max_len=8))


def test_checkpoint_metadata_round_trip(tmp_path):
    """What belongs with a model (its vocabularies) is saved with it and comes back as the
    loaded model's metadata, also when that model is saved again."""
    model = make_model("luong_dot")
    assert model.metadata == {}
    meta = {"tokens": ["<pad>", "a", "\u00e9"], "first_year": 1950, "nested": {"k": [1.5]}}
    model.save(tmp_path / "a.pt", meta)
    loaded = Seq2Seq.load(tmp_path / "a.pt")
    assert loaded.metadata == meta
    loaded.save(tmp_path / "b.pt")
    assert Seq2Seq.load(tmp_path / "b.pt").metadata == meta
    with pytest.raises(TypeError, match="metadata must be a dict or None, got list"):
        model.save(tmp_path / "c.pt", ["tokens"])
    with pytest.raises(TypeError, match=r"metadata\['paths'\]\[0\] must hold only plain "
                                        r"values .* got PosixPath"):
        model.save(tmp_path / "c.pt", {"paths": [tmp_path]})


def test_checkpoint_errors(tmp_path):
    model = make_model("bahdanau")
    path = tmp_path / "model.pt"
    model.save(path)
    with pytest.raises(ValueError, match="path .* another configuration .*decoder"):
        make_model("luong_dot").load_weights(path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="path .* not a readable Seq2Seq checkpoint"):
        Seq2Seq.load(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="path .* not a Seq2Seq checkpoint"):
        Seq2Seq.load(other)
    with pytest.raises(ValueError, match="path .* not a file"):
        Seq2Seq.load(tmp_path / "missing.pt")
    bad = torch.load(path, weights_only=True)
    bad["state_dict"].pop("decoder.out.weight")
    torch.save(bad, other)
    with pytest.raises(ValueError, match="(?s)path .* invalid.*decoder.out.weight"):
        Seq2Seq.load(other)


# ------------------------------------------------------------------ bad input

BAD_CALLS = [
    ("empty_source", lambda m, s, l: m.greedy_decode(s, torch.tensor([5, 0, 2]), max_len=5),
     r"src_lengths must be >= 1: empty source"),
    ("lengths_past_padding", lambda m, s, l: m.greedy_decode(s, torch.tensor([5, 6, 2]), max_len=5),
     r"src_lengths must be <= the padded length 5"),
    ("lengths_shape", lambda m, s, l: m.greedy_decode(s, torch.tensor([5, 2]), max_len=5),
     r"src_lengths must have shape \(B,\) = \(3,\)"),
    ("lengths_float", lambda m, s, l: m.greedy_decode(s, l.float(), max_len=5),
     r"src_lengths must be an int64 or int32 tensor, got torch.float32"),
    ("beam_size_gt_vocab",
     lambda m, s, l: m.beam_search(s, l, beam_size=V + 1, max_len=5, n_best=1),
     r"beam_size must be <= the vocabulary size 13"),
    ("src_token",
     lambda m, s, l: m.greedy_decode(s.index_fill(1, torch.tensor([0]), V), l, max_len=5),
     r"src has token ids outside the vocabulary \[0, 13\)"),
    ("src_negative",
     lambda m, s, l: m.greedy_decode(s.index_fill(1, torch.tensor([0]), -1), l, max_len=5),
     r"src has token ids outside the vocabulary"),
    ("src_float", lambda m, s, l: m.greedy_decode(s.float(), l, max_len=5),
     r"src must be an int64 or int32 tensor of token ids, got dtype torch.float32"),
    ("empty_batch", lambda m, s, l: m.beam_search(s[:0], l[:0], beam_size=2, max_len=5),
     r"src must have shape \(B, T\) with B >= 1, T >= 1, got \(0, 5\)"),
    ("empty_target", lambda m, s, l: m(s, l, s[:, :0]),
     r"tgt_in must have shape \(B, T\) with B >= 1, T >= 1, got \(3, 0\)"),
    ("tgt_token", lambda m, s, l: m(s, l, torch.full((3, 4), V + 2)),
     r"tgt_in has token ids outside the vocabulary"),
    ("tgt_batch", lambda m, s, l: m(s, l, torch.full((2, 4), 3)),
     r"tgt_in must have batch size 3"),
    ("beam_size_0",
     lambda m, s, l: m.beam_search(s, l, beam_size=0, max_len=5),
     r"beam_size must be an integer >= 1"),
    ("beam_size_float",
     lambda m, s, l: m.beam_search(s, l, beam_size=2.0, max_len=5),
     r"beam_size must be an integer"),
    ("n_best_gt_beam", lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=5, n_best=3),
     r"n_best must be <= beam_size = 2"),
    ("max_len_0",
     lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=0),
     r"max_len must be an integer >= 1"),
    ("greedy_max_len_0",
     lambda m, s, l: m.greedy_decode(s, l, max_len=0),
     r"max_len must be an integer >= 1"),
    ("min_len_gt_max_len", lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=5, min_len=6),
     r"min_len must be <= max_len = 5"),
    ("length_penalty_kind", lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=5,
                                                          length_penalty=LengthPenalty("avg")),
     r"length_penalty kind must be one of"),
    ("length_penalty_type",
     lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=5, length_penalty=0.6),
     r"length_penalty must be a LengthPenalty"),
    ("cuda_graph_on_cpu", lambda m, s, l: m.greedy_decode(s, l, max_len=5, cuda_graph=True),
     r"cuda_graph=True needs the model on a CUDA device, it is on cpu"),
    ("beam_cuda_graph_on_cpu",
     lambda m, s, l: m.beam_search(s, l, beam_size=2, max_len=5, cuda_graph=True),
     r"cuda_graph=True needs the model on a CUDA device"),
    ("loss_tgt_lengths_past_padding",
     lambda m, s, l: m.loss(s, l, torch.full((3, 4), 3), torch.tensor([4, 5, 1])),
     r"tgt_lengths must be <= the padded length 4, got 5"),
    ("loss_tgt_lengths_negative",
     lambda m, s, l: m.loss(s, l, torch.full((3, 4), 3), torch.tensor([4, -1, 1])),
     r"tgt_lengths must be >= 0 \(got a length of -1\)"),
    ("loss_tgt_lengths_shape",
     lambda m, s, l: m.loss(s, l, torch.full((3, 4), 3), torch.tensor([4, 1])),
     r"tgt_lengths must have shape \(B,\) = \(3,\)"),
    ("loss_tgt_token", lambda m, s, l: m.loss(s, l, torch.full((3, 4), V), l.clamp(max=4)),
     r"tgt has token ids outside the vocabulary"),
    ("loss_tgt_batch", lambda m, s, l: m.loss(s, l, torch.full((2, 4), 3), l[:2].clamp(max=4)),
     r"tgt must have batch size 3 like src, got \(2, 4\)"),
    ("token_lists_type", lambda m, s, l: m.token_lists([[1, 2]]),
     r"output must be greedy_decode's tensor or a BeamSearchResult, got list"),
    ("cuda_graph_type", lambda m, s, l: m.greedy_decode(s, l, max_len=5, cuda_graph=1),
     r"cuda_graph must be a bool, got 1"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BAD_CALLS])
def test_bad_input(call, match):
    model = make_model("bahdanau")
    src, lengths = source(3, 5, seed=10)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, src, lengths)


@pytest.mark.parametrize("build,match", [
    (lambda: Encoder(V, 8, 7), r"hidden_size must be even"),
    (lambda: Encoder(V, 8, 8, cell="rnn"), r"cell must be one of"),
    (lambda: Encoder(V, 8, 8, pad_idx=V), r"pad_idx must lie in"),
    (lambda: BahdanauDecoder(V, 8, 8, pad_idx=-1), r"pad_idx must lie in"),
    (lambda: LuongDecoder(V, 8, 8, score="mlp"), r"score must be one of"),
    (lambda: Seq2Seq(Encoder(V, 8, 8), BahdanauDecoder(V, 8, 8, memory_dim=6)),
     r"set the decoder's memory_dim=8 \(the encoder's hidden_size\), got 6"),
    (lambda: Seq2Seq(Encoder(V, 8, 8), BahdanauDecoder(V, 8, 10, memory_dim=8)),
     r"set the encoder's decoder_hidden_size=10 \(the decoder's hidden_size\) or the "
     r"decoder's hidden_size=8"),
    (lambda: Seq2Seq(Encoder(V, 8, 8), BahdanauDecoder(V, 8, 8), eos_idx=V), r"eos_idx must lie"),
    (lambda: Seq2Seq(Encoder(V, 8, 8), BahdanauDecoder(V, 8, 8), bos_idx=2), r"must differ"),
    (lambda: Seq2Seq(Encoder(V, 8, 8), BahdanauDecoder(V, 8, 8, pad_idx=3)),
     r"set the decoder's pad_idx=0 \(the encoder's\), got 3"),
])
def test_bad_configuration(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ------------------------------------------------------------------ a task learnt

def reverse_batch(n, gen):
    """Sequences of 3-8 ids in [3, V) and their reversals: src, src_lengths, tgt,
    tgt_lengths (Seq2Seq.loss's arguments)."""
    lengths = torch.randint(3, 9, (n,), generator=gen)
    sequences = [torch.randint(3, V, (L,), generator=gen).tolist() for L in lengths.tolist()]
    src, src_lengths = pad_batch(sequences, PAD)
    tgt, tgt_lengths = pad_batch([s[::-1] for s in sequences], PAD)
    return src, src_lengths, tgt, tgt_lengths


def train_reverse(model, steps, batch, lr, seed):
    """model after `steps` Adam steps of the reverse task on batches of `batch` sequences."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = generator(seed)
    for _ in range(steps):
        loss = model.loss(*reverse_batch(batch, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.slow
def test_reverse_task_is_learnt():
    """A Bahdanau model learns to reverse sequences: >= 99% exact greedy and beam matches on
    500 held-out sequences after 300 Adam steps. Its beam search then drops finished
    sentences' rows: a batch of one short and one long sentence decodes its last steps on
    the long sentence's beams alone."""
    torch.manual_seed(0)
    model = Seq2Seq(Encoder(V, 32, 64), BahdanauDecoder(V, 32, 64), bos_idx=BOS, eos_idx=EOS)
    train_reverse(model, steps=300, batch=64, lr=3e-3, seed=1).eval()
    src, lengths, tgt, _ = reverse_batch(500, generator(99))
    want = [row[:L] for row, L in zip(tgt.tolist(), lengths.tolist())]
    greedy = model.token_lists(model.greedy_decode(src, lengths, max_len=10))
    beam = model.token_lists(model.beam_search(src, lengths, beam_size=3, max_len=10))
    n_greedy = sum(got == w for got, w in zip(greedy, want))
    n_beam = sum(got[0] == w for got, w in zip(beam, want))
    assert n_greedy >= 495 and n_beam >= 495, (n_greedy, n_beam)

    rows = []
    step = model.decoder.step

    def counting_step(tokens, state, memory):
        rows.append(tokens.shape[0])
        return step(tokens, state, memory)

    model.decoder.step = counting_step
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [7, 8, 0, 0, 0, 0, 0, 0]])
    res = model.beam_search(src, torch.tensor([8, 2]), beam_size=3, max_len=12)
    assert torch.equal(res.hypotheses[1][0], torch.tensor([8, 7, EOS]))
    assert rows[0] == 6 and rows[-1] == 3, rows
