"""What ``python -m attention_ext.demo`` does: trains (or loads) the date normaliser,
evaluates it on unseen dates, compares its training speed with eager attention, draws
attention heatmaps; or rewrites one user's date with a saved model."""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import unicodedata
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..seq2seq import Seq2Seq, Vocabulary
from . import dates as D
from . import UserError
from .checkpoint import load, save
from .heatmaps import drawable, save_heatmap
from .training import TrainConfig, build_model, compare_training_speed, predict, train

TEST_EXAMPLES = 2000
BEAM_SIZE = 5
SPEED_STEPS = 10
TABLE_ROWS = 10
ERROR_ROWS = 5
HEATMAPS = 4


def held_out_examples() -> List[D.Example]:
    """The test set: the same for every run and checkpoint."""
    return D.DateWriter(D.split_dates()[1]).examples(TEST_EXAMPLES, random.Random(D.SPLIT_SEED))


def run(args: argparse.Namespace, device: torch.device) -> int:
    _check_paths(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.load is not None and world > 1:
        raise UserError("--load: torchrun is for training; run a saved model in one process")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: with {world} processes it must be a "
                        f"multiple of {world} (each process draws an equal share)")
    if args.load is not None:
        model, source, target, locales = load(args.load, device)
        if args.normalize is not None:
            return normalize(model, source, target, locales, args.normalize, args.locale, device)
        print(f"model: {args.load} ({model.metadata['attention']} attention)")
    else:
        rank, world, device = _start_processes(device)
        try:
            model, source, target = _train(args, device, rank, world)
        finally:
            if world > 1:
                dist.destroy_process_group()
        if rank != 0:
            return 0
    if args.save is not None:
        save(model, args.save, source, target, args.attention if args.load is None
             else model.metadata["attention"])
    evaluate(model, source, target, device, args)
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Before any training: where --save and --out write must be writable."""
    if args.save is not None:
        folder = os.path.dirname(os.path.abspath(args.save))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"--save {args.save!r}: {folder} is not a folder this process can "
                            f"write to")
        if os.path.isdir(args.save):
            raise UserError(f"--save {args.save!r} is a folder; name a file")
    if args.normalize is None:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out!r} is a file; name a folder")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {args.out!r}: {err.strerror or err}") from None
        if not os.access(args.out, os.W_OK):
            raise UserError(f"--out {args.out!r} is not a folder this process can write to")


def _start_processes(device: torch.device) -> Tuple[int, int, torch.device]:
    """(rank, world size, this process's device): one process, or one of torchrun's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        # Each process takes the GPU of its local rank, whatever --device's index says.
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"--device {device}: process {local_rank} of this machine has no "
                            f"GPU of its own ({torch.cuda.device_count()} here)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _train(args, device, rank: int, world: int):
    source, target = D.source_vocabulary(), D.target_vocabulary()
    train_dates, test_dates = D.split_dates()
    scripts = {D.locale_script(name) for name in D.LOCALES} - {"LATIN"}
    non_latin = sum(D.locale_script(name) != "LATIN" for name in D.LOCALES)
    torch.manual_seed(args.seed)
    model = build_model(args.attention, source, target).to(device)
    if rank == 0:
        print(f"data: dates {D.FIRST_YEAR}-{D.LAST_YEAR} written by Babel {_babel_version()} "
              f"(CLDR) in {len(D.LOCALES)} locales, {non_latin} of them in {len(scripts)} "
              f"non-Latin scripts, {len(D.FORMATS)} formats, {D.NOISE_RATE:.0%} noisy; "
              f"{len(train_dates)} training dates, {len(test_dates)} unseen test dates")
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.attention} attention (fused), bidirectional {model.encoder.cell} "
              f"encoder, {params:,} parameters, {len(source)} source tokens; device {device}"
              f"{'' if device.type != 'cpu' else f', {torch.get_num_threads()} threads'}"
              f"{f', {world} processes (DistributedDataParallel)' if world > 1 else ''}")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    bar = tqdm(total=cfg.steps, unit="step", disable=rank != 0, dynamic_ncols=True,
               desc="training")
    smooth = {}

    def progress(step: int, loss: float, tokens_per_s: float) -> None:
        for key, value in (("loss", loss), ("tok/s", tokens_per_s)):
            smooth[key] = value if step == 0 else 0.9 * smooth[key] + 0.1 * value
        bar.set_postfix({"loss": f"{smooth['loss']:.4f}",
                         "tok/s": f"{smooth['tok/s']:,.0f}"}, refresh=False)
        bar.update()

    start = time.perf_counter()
    train(model, D.DateWriter(train_dates), source, target, cfg, device, progress)
    seconds = time.perf_counter() - start
    bar.close()
    if rank == 0:
        print(f"trained {cfg.steps} steps of {cfg.batch_size} examples in {seconds:.1f} s")
    return model, source, target


def _babel_version() -> str:
    import babel

    return babel.__version__


def normalize(model: Seq2Seq, source: Vocabulary, target: Vocabulary,
              locales: Sequence[str], text: str, locale: str, device: torch.device) -> int:
    """Prints text (a date written in locale) as ISO 8601."""
    name = locale.replace("-", "_")
    if name not in locales:
        raise UserError(f"--locale {locale!r} is not one of the model's locales: "
                        f"{', '.join(sorted(locales))}")
    text = text.strip()
    unseen = sorted({ch for ch in text if ch not in source})
    if unseen:
        print(f"note: the model has never seen the characters {' '.join(unseen)}",
              file=sys.stderr)
    src, lengths = D.encode_sources([(name, text)], source)
    result = model.beam_search(src.to(device), lengths.to(device), beam_size=BEAM_SIZE,
                               max_len=D.TARGET_LENGTH)
    print(D.decode_target(result.hypotheses[0][0].tolist(), target))
    return 0


def evaluate(model: Seq2Seq, source: Vocabulary, target: Vocabulary,
             device: torch.device, args: argparse.Namespace) -> None:
    """Accuracy (greedy and beam), examples, training speed against eager attention and
    heatmaps, printed."""
    examples = held_out_examples()
    results = {}
    for name, beam in (("greedy", 0), (f"beam search ({BEAM_SIZE})", BEAM_SIZE)):
        start = time.perf_counter()
        got = predict(model, examples, source, target, device, beam_size=beam)
        seconds = time.perf_counter() - start
        results[name] = got
        right = sum(p == e.iso for p, e in zip(got, examples))
        print(f"test, {name}: {right / len(examples):.2%} exact match ({right} of "
              f"{len(examples)} unseen dates), {len(examples) / seconds:,.0f} sentences/s")
    greedy, beam = results.values()
    print()
    print(_examples_table(examples, greedy, beam))
    print()
    batches = [D.DateWriter(D.split_dates()[0]).examples(args.batch_size, random.Random(i))
               for i in range(SPEED_STEPS + 1)]  # the first one warms up
    speed = compare_training_speed(model, [D.encode_batch(b, source, target).to(device)
                                           for b in batches])
    print(f"training speed of this model ({SPEED_STEPS} steps each, interleaved, medians): "
          f"fused attention {speed['fused']:,.0f} tokens/s, eager reference attention "
          f"{speed['reference']:,.0f} tokens/s: {speed['fused'] / speed['reference']:.2f}x")
    print()
    for path in _heatmaps(model, examples, source, target, device, args.out):
        print(f"attention heatmap: {path}")


def _display_width(text: str) -> int:
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Cf", "Mn", "Me"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _examples_table(examples, greedy, beam) -> str:
    """The first test examples of TABLE_ROWS locales, then up to ERROR_ROWS of the wrong
    ones (greedy or beam)."""
    rows, seen, errors = [], set(), []
    for e, g, b in zip(examples, greedy, beam):
        row = (e.locale, e.text, g, b, e.iso, "ok" if g == b == e.iso else "WRONG")
        if e.locale not in seen and len(rows) < TABLE_ROWS:
            seen.add(e.locale)
            rows.append(row)
        elif row[-1] == "WRONG" and len(errors) < ERROR_ROWS:
            errors.append(row)
    header = ("locale", "input", "greedy", "beam", "truth", "")
    table = [header] + rows + ([("...",) * 5 + ("",)] + errors if errors else [])
    widths = [max(_display_width(r[c]) for r in table) for c in range(len(header))]

    def line(row):
        return "  ".join(cell + " " * (w - _display_width(cell)) for cell, w in
                         zip(row, widths)).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths))] +
                     [line(r) for r in table[1:]])


def _heatmaps(model, examples, source, target, device, out: str) -> List[str]:
    """Heatmaps of beam search's best hypothesis for test examples in different scripts
    that the installed fonts can draw."""
    chosen, scripts = [], set()
    for e in examples:
        s = D.script(e.text)
        if s not in scripts and drawable(e.text):
            scripts.add(s)
            chosen.append(e)
        if len(chosen) == HEATMAPS:
            break
    batch = D.encode_batch(chosen, source, target).to(device)
    result = model.beam_search(batch.src, batch.src_lengths, beam_size=BEAM_SIZE,
                               max_len=D.TARGET_LENGTH)
    paths = []
    for i, e in enumerate(chosen):
        tokens = result.hypotheses[i][0].tolist()
        output = [target.tokens[t] for t in tokens]
        src_tokens = [D.locale_token(e.locale)] + list(e.text)
        weights = result.alignments[i][0][:, : len(src_tokens)].cpu()
        # Only Latin script in the title: a right-to-left input would reorder the line.
        title = f"{e.locale}: {D.decode_target(tokens, target)} (truth {e.iso})"
        path = os.path.join(out, f"attention-{i + 1}-{e.locale}.png")
        try:
            paths.append(save_heatmap(weights, src_tokens, output, title, path))
        except OSError as err:
            raise UserError(f"--out {out!r}: cannot write {path}: {err.strerror or err}") from None
    return paths

