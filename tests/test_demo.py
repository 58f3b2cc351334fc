"""The demo (python -m attention_ext.demo): its data set, its training under
DistributedDataParallel, its command line and the accuracy it promises."""
from __future__ import annotations

import datetime
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("babel", reason="the demo's optional dependencies (attention_ext[demo])")

from attention_ext.demo import dates as D  # noqa: E402
from attention_ext.demo.cli import main  # noqa: E402
from attention_ext.demo.training import (TeacherForcedLoss, build_model,  # noqa: E402
                                         compare_training_speed)
from attention_ext import functional, reference  # noqa: E402
from attention_ext.nn import set_implementation  # noqa: E402
from attention_ext.seq2seq import Seq2Seq, Vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.demo


# ------------------------------------------------------------------------------ data


def test_locales_span_forty_locales_and_eight_non_latin_scripts():
    scripts = {D.locale_script(name) for name in D.LOCALES}
    assert len(set(D.LOCALES)) >= 40
    assert "LATIN" in scripts and len(scripts - {"LATIN"}) >= 8
    assert {"CYRILLIC", "ARABIC", "CJK", "HANGUL", "DEVANAGARI"} <= scripts


def test_split_is_by_date_over_a_hundred_year_window():
    train, test = D.split_dates()
    assert not set(train) & set(test)
    assert sorted(train + test) == D.all_dates()
    assert D.all_dates()[0] == datetime.date(D.FIRST_YEAR, 1, 1)
    assert D.all_dates()[-1] == datetime.date(D.FIRST_YEAR + 99, 12, 31)
    assert abs(len(test) / len(D.all_dates()) - D.TEST_FRACTION) < 1e-3
    assert D.split_dates() == (train, test)  # the same split in every run


def _partners(date: datetime.date):
    """Dates whose numbers are date's in another order: where a numeric format could be
    read two ways."""
    d, m, yy = date.day, date.month, date.year % 100
    for day, month, two in ((m, d, yy), (yy, m, d), (d, yy, m), (m, yy, d), (yy, d, m)):
        year = D.FIRST_YEAR + (two - D.FIRST_YEAR) % 100
        try:
            other = datetime.date(year, month, day)
        except ValueError:
            continue
        if other != date:
            yield other


def test_every_written_form_names_one_date():
    """No (locale, text) is written for two dates, with two-digit years and numeric
    formats checked against the dates they could be confused with."""
    rng = random.Random(0)
    days = rng.sample(D.all_dates(), 60) + [datetime.date(2005, 6, 7), datetime.date(2026, 11, 23)]
    writer = D.DateWriter(days)
    for name in D.LOCALES:
        locale = writer._parsed[name]

        def forms(date):
            return {D.write_date(date, locale, fmt) for fmt in D.FORMATS}

        for date in days:
            mine = forms(date)
            for other in _partners(date):
                clash = mine & forms(other)
                assert not clash, (name, date, other, clash)


def test_source_vocabulary_covers_every_form_and_noise():
    vocab = D.source_vocabulary()
    writer = D.DateWriter(D.all_dates())
    rng = random.Random(1)
    for e in writer.examples(3000, rng):
        assert all(ch in vocab for ch in e.text), e
    assert all(D.locale_token(n) in vocab for n in D.LOCALES)
    assert vocab.tokens[0] == D.PAD and vocab.bos_idx is vocab.eos_idx is None


def _digit_runs(text: str):
    return re.findall(r"[0-9]+", text)


def test_noise_keeps_the_numbers_apart():
    """Noisy variants never merge or split digit runs (11.2.26 must not become 11226)."""
    rng = random.Random(2)
    writer = D.DateWriter(D.all_dates())
    changed = 0
    for _ in range(4000):
        clean = D.write_date(rng.choice(writer.days), writer._parsed[rng.choice(D.LOCALES)],
                             rng.choice(D.FORMATS))
        noisy = D.add_noise(clean, rng)
        changed += noisy != clean
        assert _digit_runs(noisy) == _digit_runs(clean), (clean, noisy)
    assert changed > 3850  # text without a space or punctuation mark (2026年11月23日) stays


def test_punctuation_dropping():
    assert D.drop_punctuation("Montag, 23. November 2026") == "Montag 23 November 2026"
    assert D.drop_punctuation("1.12.26") == "1.12.26"
    assert D.drop_punctuation("2026. 11. 23.") == "2026 11 23"
    # Arabic puts a right-to-left mark between a number and its separator.
    assert D.drop_punctuation("23\u200f/11\u200f/2026") == "23\u200f/11\u200f/2026"
    assert D.drop_punctuation("lun. 23 nov. 2026") == "lun 23 nov 2026"
    assert D.drop_punctuation("(23)-(11)-26") == "23)-(11)-26"  # a run of marks between digits


def test_batches_encode_locale_tag_and_iso_targets():
    source, target = D.source_vocabulary(), D.target_vocabulary()
    examples = [D.Example("de_DE", "23. November 2026", "2026-11-23"),
                D.Example("ja_JP", "2026/11/23", "2026-11-23")]
    batch = D.encode_batch(examples, source, target)
    assert batch.src.shape == (2, 1 + len("23. November 2026"))
    assert batch.src_lengths.tolist() == [18, 11]
    assert batch.src[0, 0] == source.id("<de_DE>") and batch.src[1, 11:].eq(0).all()
    assert batch.tgt_lengths.tolist() == [10, 10]
    assert [D.decode_target(r, target) for r in batch.tgt.tolist()] == ["2026-11-23"] * 2
    assert (target.id(D.BOS), target.id(D.EOS)) == (target.bos_idx, target.eos_idx) == (1, 2)
    unknown, _ = D.encode_sources([("de_DE", "\u2603")], source)
    assert unknown[0, 1] == source.id(D.UNK)


# ------------------------------------------------------------------ model and training


@pytest.mark.parametrize("attention", ["bahdanau", "luong-dot", "luong-general", "luong-concat"])
def test_speed_comparison_compares_the_same_model(attention, monkeypatch):
    """The eager side of the demo's speed comparison computes the fused model's loss and
    gradients (float64) through reference.py's ops, and both sides train."""
    source, target = D.source_vocabulary(), D.target_vocabulary()
    torch.manual_seed(0)
    model = build_model(attention, source, target).double()
    batch = D.encode_batch(D.DateWriter(D.all_dates()).examples(6, random.Random(3)),
                           source, target)
    losses, grads = [], []
    for impl in ("fused", "reference"):
        set_implementation(model, impl)
        model.zero_grad()
        loss = TeacherForcedLoss(model)(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    calls = {"fused": 0, "reference": 0}
    for impl, module in (("fused", functional), ("reference", reference)):
        for op in ("dot_attention", "additive_attention"):
            def counted(*args, _op=getattr(module, op), _impl=impl, **kwargs):
                calls[_impl] += 1
                return _op(*args, **kwargs)
            monkeypatch.setattr(module, op, counted)
    speed = compare_training_speed(set_implementation(model.float(), "fused"), [batch] * 3)
    assert set(speed) == {"fused", "reference"} and min(speed.values()) > 0
    steps = batch.tgt.shape[1] + 1 if attention == "bahdanau" else 1
    assert calls["fused"] >= 3 * steps and calls["fused"] == calls["reference"]


def test_distributed_replicas_stay_identical(tmp_path):
    """Two processes under torchrun (gloo): each draws its own examples (the losses
    differ) and starts from its own weights, yet DistributedDataParallel keeps the
    parameters identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "ddp_replicas.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    for a, b in zip(ranks[0]["parameters"], ranks[1]["parameters"]):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    initial = build_model("bahdanau", D.source_vocabulary(), D.target_vocabulary())
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["parameters"],
                                                     initial.parameters()))


# --------------------------------------------------------------------- command line


def _demo(*args):
    """python -m attention_ext.demo args in a subprocess: (returncode, stdout, stderr).

    One intra-op thread: the suite's other workers keep the other cores busy, and two
    threads of one op then wait at its barrier for a descheduled partner, a time slice per
    op (the default run took 10 s a step beside a busy worker instead of 0.09 s)."""
    proc = subprocess.run([sys.executable, "-m", "attention_ext.demo", *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout, proc.stderr


def _main(capsys, *args):
    """main(args) in this process, as the command line runs it: (exit code, stdout,
    stderr). An exception escaping main is what would print a traceback."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's errors and --help
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A model trained for 2 steps by the demo's command line, saved; the run's output."""
    out = tmp_path_factory.mktemp("demo")
    ckpt = out / "model.pt"
    code, stdout, stderr = _demo("--steps", "2", "--batch-size", "8", "--device", "cpu",
                                 "--save", str(ckpt), "--out", str(out / "maps"))
    assert code == 0, stderr[-3000:]
    return ckpt, out, stdout


def test_demo_run_prints_its_report_and_writes_heatmaps(tiny_checkpoint):
    ckpt, out, stdout = tiny_checkpoint
    assert ckpt.is_file()
    assert re.search(r"test, greedy: [0-9.]+% exact match \([0-9]+ of 2000", stdout)
    assert re.search(r"test, beam search \(5\): [0-9.]+% exact match", stdout)
    assert re.search(r"fused attention [0-9,]+ tokens/s, eager reference attention [0-9,]+ "
                     r"tokens/s: [0-9.]+x", stdout)
    maps = re.findall(r"attention heatmap: (\S+\.png)", stdout)
    assert len(maps) >= 2
    for path in maps:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^locale +input +greedy +beam +truth$", stdout, re.M)  # the table


def test_normalize_with_a_saved_model(tiny_checkpoint):
    ckpt = tiny_checkpoint[0]
    code, stdout, stderr = _demo("--load", str(ckpt), "--normalize", "23. November 2026",
                                 "--locale", "de-DE")
    assert code == 0, stderr
    assert re.fullmatch(r"[0-9-]{0,11}\n", stdout)


@pytest.mark.parametrize("args, exit_code, message", [
    (["--no-such-option"], 2, "unrecognized arguments: --no-such-option"),
    (["--steps", "0"], 2, "--steps: expected an integer >= 1, got '0'"),
    (["--seed", "x"], 2, "--seed: expected an integer >= 0, got 'x'"),
    (["--attention", "luong"], 2, "--attention: invalid choice: 'luong'"),
    (["--normalize", "23. November 2026", "--locale", "de_DE"], 2, "--normalize needs --load"),
    (["--load", "x.pt", "--normalize", "  ", "--locale", "de_DE"], 2,
     "--normalize: the text is empty"),
    (["--load", "x.pt", "--normalize", "1.2.2026"], 2, "--normalize and --locale go together"),
    (["--load", "{missing}"], 1, "is not a file"),
    (["--load", "{corrupt}"], 1, "is not a readable Seq2Seq checkpoint"),
    (["--load", "{foreign}"], 1, "not one saved by this demo"),
    (["--load", "{ckpt}", "--normalize", "1.2.2026", "--locale", "xx_YY"], 1,
     "--locale 'xx_YY' is not one of the model's locales"),
    (["--load", "{mangled}"], 1, "the demo's metadata is invalid: source: a vocabulary's "
     "dict holds its tokens and special tokens, got 5"),
    (["--load", "{ckpt}", "--steps", "5"], 2, "--steps: these set up training"),
    (["--load", "{ckpt}", "--normalize", "1.2.2026", "--locale", "de_DE", "--save", "x.pt"],
     2, "--save: --normalize saves nothing"),
    (["--device", "mps"], 1, "--device 'mps': the demo runs on cpu or cuda"),
    (["--device", "nonsense"], 1, "--device 'nonsense' is not a device name"),
    (["--device", "cuda:abc"], 1, "--device 'cuda:abc' is not a device name"),
    (["--device", "cpu:3"], 1, "--device 'cpu:3': the CPU has no index"),
    (["--steps", "1", "--save", "{nodir}"], 1, "is not a folder this process can write to"),
    (["--steps", "1", "--out", "{afile}"], 1, "afile' is a file; name a folder"),
])
def test_bad_input_is_a_clear_message_without_traceback(args, exit_code, message,
                                                        tiny_checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    Seq2Seq.from_config(build_model("luong-dot", Vocabulary(["a", "b"], bos=None, eos=None),
                                    D.target_vocabulary()).config).save(foreign)
    mangled = tmp_path / "mangled.pt"
    model = Seq2Seq.load(tiny_checkpoint[0])
    model.save(mangled, dict(model.metadata, source=5))
    afile = tmp_path / "afile"
    afile.write_text("")
    names = dict(missing=tmp_path / "missing.pt", corrupt=corrupt, foreign=foreign,
                 mangled=mangled, ckpt=tiny_checkpoint[0], afile=afile,
                 nodir=tmp_path / "no" / "such" / "dir" / "m.pt")
    code, stdout, stderr = _main(capsys, *[a.format(**names) for a in args])
    assert code == exit_code, (stdout, stderr)
    assert message in stderr
    assert "trained" not in stdout  # every check comes before any training


@pytest.mark.parametrize("args, world, message", [
    (["--load", "{ckpt}"], "2", "--load: torchrun is for training"),
    (["--batch-size", "128"], "3", "--batch-size 128: with 3 processes it must be a multiple"),
])
def test_bad_input_under_torchrun(args, world, message, tiny_checkpoint, monkeypatch, capsys):
    """Checked from torchrun's environment before any process group starts."""
    for name, value in (("WORLD_SIZE", world), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code, stdout, stderr = _main(capsys, *[a.format(ckpt=tiny_checkpoint[0]) for a in args])
    assert code == 1 and message in stderr, stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_missing_cuda_device_is_a_clear_message(capsys):
    code, _, stderr = _main(capsys, "--device", "cuda")
    assert code == 1 and "no CUDA device is available here" in stderr


def test_help_works_without_the_optional_dependencies():
    """--help needs neither babel nor tqdm nor matplotlib; running needs them and says so."""
    block = ("import sys\n"
             "for name in ('babel', 'tqdm', 'matplotlib'):\n"
             "    sys.modules[name] = None\n"
             "from attention_ext.demo.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-c", block, "--help"], capture_output=True,
                        text=True, env=env)
    assert ok.returncode == 0 and "--normalize" in ok.stdout
    missing = subprocess.run([sys.executable, "-c", block, "--steps", "1"],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1
    assert "pip install 'attention_ext[demo]'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_help(capsys):
    code, stdout, _ = _main(capsys, "--help")
    assert code == 0
    assert "--attention {bahdanau,luong-dot,luong-general,luong-concat}" in stdout


# ------------------------------------------------------------------------- accuracy


@pytest.mark.slow
def test_default_run_reaches_99_percent_and_normalizes_a_users_date(tmp_path):
    """The README's promise: the default run (Bahdanau, 800 steps) gets >= 99% of the
    unseen test dates exactly right; its saved model rewrites a user's German date."""
    ckpt = tmp_path / "model.pt"
    code, stdout, stderr = _demo("--device", "cpu", "--save", str(ckpt),
                                 "--out", str(tmp_path / "maps"))
    assert code == 0, stderr[-3000:]
    accuracy = float(re.search(r"test, greedy: ([0-9.]+)% exact match", stdout).group(1))
    assert accuracy >= 99.0, stdout
    code, stdout, stderr = _demo("--load", str(ckpt), "--normalize", "23. November 2026",
                                 "--locale", "de_DE")
    assert (code, stdout) == (0, "2026-11-23\n"), stderr
