"""End-to-end seq2seq throughput: whole models with the fused attention against the same
models with eager attention and against those under torch.compile.

One configuration (the usual NMT baseline of the Luong and Bahdanau papers, scaled to a
benchmark): a 2-layer bidirectional LSTM encoder (256 units per direction), a 1-layer LSTM
decoder of 512 units, embeddings of 512, a vocabulary of 8000, batch 64, source and
target length 50 (source lengths uniform in [25, 50]). Models:

  bahdanau               additive attention before the RNN step (attention units 512)
  luong-dot, luong-general          Luong attention with input feeding
  luong-dot-nofeed, luong-general-nofeed   without it (teacher forcing runs the RNN over
                         all steps at once and attention once with Tq = T)

Implementations, interleaved round by round in one process, from the same weights:

  ours      attention_ext.seq2seq as it is (the fused ops)
  eager     the same model with attention_ext.nn.set_implementation(model, "reference"):
            plain PyTorch attention, as users write it
  compiled  that eager model with the decoder's forward and step under torch.compile
            (compilation happens in the untimed warm-up)
  ours-graph, eager-graph   (CUDA, decoding only) ours and eager with cuda_graph=True:
            each decoding step is the replay of a CUDA graph, captured at the first call of
            the batch shape (the untimed warm-up) and kept by the model for later calls

Tasks:

  train   forward (teacher forcing) + cross-entropy + backward + Adam step; target tokens/s
  greedy  greedy_decode of 50 steps (encoder included); tokens/s (64 x 50 per call)
  beam    beam_search, beam 5, 50 steps (min_len = max_len, so every implementation does
          the same work); sentences/s

Peak memory: the rise of the peak above what is allocated before one call, after a
warm-up call (Adam's state exists by then): torch's peak allocation on CUDA; on the CPU
(training only by default) the peak RSS of a fresh process per implementation, with glibc
told to return every freed block of 1 MiB or more at once (see
_common.glibc_returns_freed_memory_at_once), so that the rise is not hidden in memory kept from
an earlier call. The attention's share of a greedy call is the time spent inside the
decoder's attention layer (timed with the device synchronised around it, in a separate
untimed call) over the whole call; the encoder's share, the same for the encoder (of ours
and ours-graph: what the decoding loop leaves, which bounds the gain of capturing it).

Usage: python benchmarks/bench_seq2seq.py [--quick] [--device cuda] [--output FILE.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import attention_ext  # noqa: E402
from attention_ext.nn import set_implementation  # noqa: E402
from attention_ext.seq2seq import (BahdanauDecoder, Encoder, LengthPenalty,  # noqa: E402
                                   LuongDecoder, Seq2Seq)

# name -> the decoder's keyword arguments (besides the sizes)
MODELS = {
    "bahdanau": dict(kind="bahdanau"),
    "luong-dot": dict(kind="luong", score="dot", input_feeding=True),
    "luong-general": dict(kind="luong", score="general", input_feeding=True),
    "luong-dot-nofeed": dict(kind="luong", score="dot", input_feeding=False),
    "luong-general-nofeed": dict(kind="luong", score="general", input_feeding=False),
}
IMPLS = ("ours", "eager", "compiled", "ours-graph", "eager-graph")
GRAPHED = ("ours-graph", "eager-graph")
TASKS = ("train", "greedy", "beam")
UNITS = {"train": "tok/s", "greedy": "tok/s", "beam": "sent/s"}
QUICK_MODELS = ("bahdanau", "luong-dot")


def build_model(name: str, args, impl: str, device, dtype) -> Seq2Seq:
    """The model `name` of the benchmark's configuration; every implementation starts from
    the weights of the same seed."""
    spec = dict(MODELS[name])
    kind = spec.pop("kind")
    torch.manual_seed(args.seed)
    H, E, V = args.hidden, args.embed, args.vocab
    encoder = Encoder(V, E, H, num_layers=2, bidirectional=True, decoder_layers=1)
    decoder = (BahdanauDecoder(V, E, H) if kind == "bahdanau"
               else LuongDecoder(V, E, H, **spec))
    model = Seq2Seq(encoder, decoder).to(device=device, dtype=dtype)
    if impl not in ("ours", "ours-graph"):
        set_implementation(model, "reference")
    if impl == "compiled":
        # The decoder is where the attention runs; the encoder's packed LSTM is one call.
        model.decoder.forward = torch.compile(model.decoder.forward)
        model.decoder.step = torch.compile(model.decoder.step)
    return model


def make_batch(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    src = torch.randint(3, args.vocab, (args.batch, args.src_len), generator=gen)
    lengths = torch.randint(args.src_len // 2, args.src_len + 1, (args.batch,), generator=gen)
    lengths[0] = args.src_len
    tgt = torch.randint(3, args.vocab, (args.batch, args.tgt_len + 1), generator=gen)
    return src.to(device), lengths.to(device), tgt.to(device)


def task_fn(task: str, model: Seq2Seq, batch, args, graph: bool) -> Callable[[], object]:
    src, lengths, tgt = batch
    if task == "train":
        # A small learning rate: the weights stay close to the other implementations'.
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def train():
            model.train()
            opt.zero_grad(set_to_none=True)
            logits = model(src, lengths, tgt[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, args.vocab).float(),
                                   tgt[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            return loss.detach()
        return train
    if task == "greedy":
        return lambda: model.eval().greedy_decode(src, lengths, max_len=args.tgt_len,
                                                  cuda_graph=graph)
    return lambda: model.eval().beam_search(src, lengths, beam_size=args.beam,
                                            max_len=args.tgt_len, min_len=args.tgt_len,
                                            cuda_graph=graph)


def work(task: str, out, args) -> int:
    """What one call produces: target tokens (train, greedy) or sentences (beam)."""
    if task == "train":
        return args.batch * args.tgt_len
    if task == "greedy":
        return out.numel()
    return args.batch


def check_agreement(task: str, outs: Dict[str, object], dtype) -> str:
    """The implementations compute the same model: the same first training loss (within
    the dtype's rounding), and the decoders' outputs compared row by row (a near-tie of
    two logits may flip one token, and the row's rest with it)."""
    ref = outs["eager"] if "eager" in outs else outs["ours"]
    if task == "train":
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, loss in outs.items():
            if not torch.allclose(loss.float(), ref.float(), rtol=tol, atol=tol):
                raise SystemExit(f"{name}: first training loss {float(loss):.6f} differs from "
                                 f"{float(ref):.6f}")
        return "losses agree"
    if task == "greedy":
        # Outputs end after their last row's end token: pad them to one length.
        width = max(out.shape[1] for out in outs.values())

        def padded(out):
            return F.pad(out, (0, width - out.shape[1]), value=-1)
        alike = {name: int((padded(out) == padded(ref)).all(1).sum())
                 for name, out in outs.items()}
        total = ref.shape[0]
    else:
        total = len(ref.hypotheses)
        alike = {name: sum(torch.equal(a[0], b[0])
                           for a, b in zip(out.hypotheses, ref.hypotheses))
                 for name, out in outs.items()}
    return "rows alike " + ", ".join(f"{n} {k}/{total}" for n, k in alike.items())


def share_of(module: torch.nn.Module, fn: Callable[[], object], device) -> float:
    """The fraction of one call of fn spent inside module's forward."""
    spent = [0.0]
    start = [0.0]

    def before(module, inputs):
        C.sync(device)
        start[0] = time.perf_counter()

    def after(module, inputs, output):
        C.sync(device)
        spent[0] += time.perf_counter() - start[0]

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        C.sync(device)
        t0 = time.perf_counter()
        fn()
        C.sync(device)
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / total


def memory_child(spec: str, args) -> None:
    """The child process of C.peak_rise_in_fresh_process: after one warm-up call, the
    peak RSS rise of one call of a task, printed. glibc returns freed blocks at once from
    the start, so the warm-up leaves no freed memory the measured call could reuse."""
    name, task, impl, dtype_name = spec.split(":")
    C.glibc_returns_freed_memory_at_once()
    model = build_model(name, args, impl, "cpu", C.DTYPES[dtype_name])
    fn = task_fn(task, model, make_batch(args, "cpu"), args, graph=False)
    fn()
    C.glibc_returns_freed_memory_at_once()
    print(C.peak_memory_rise_mib(fn, "cpu"))


def bench_model(name: str, args, device, dtype, argv) -> List[dict]:
    """The results of one model: a record per task."""
    impls, dtype_name = args.impls, str(dtype).replace("torch.", "")
    batch = make_batch(args, device)
    models = {impl: build_model(name, args, impl, device, dtype) for impl in impls}
    records = []
    for task in args.tasks:
        fns = {impl: task_fn(task, models[impl], batch, args, impl in GRAPHED)
               for impl in impls if not (task == "train" and impl in GRAPHED)}
        outs = {}
        for impl, fn in fns.items():  # warm-up: compilation, allocator, Adam's state
            outs[impl] = fn()
            C.sync(device)
        agreement = check_agreement(task, outs, dtype)
        amount = work(task, outs["ours"], args)
        del outs
        seconds = {impl: [] for impl in fns}
        for _ in range(args.repeats):
            for impl, fn in fns.items():
                seconds[impl].append(C.time_calls(fn, 1, device))
        rate = {impl: amount / C.median(s) for impl, s in seconds.items()}
        greedy = task == "greedy"
        share = {impl: share_of(models[impl].decoder.attention, fns[impl], device)
                 for impl in ("ours", "eager") if greedy and impl in fns}
        encoder = {impl: share_of(models[impl].encoder, fns[impl], device)
                   for impl in ("ours", "ours-graph") if greedy and impl in fns}
        if device.startswith("cuda"):
            peak = {impl: C.peak_memory_rise_mib(fn, device) for impl, fn in fns.items()}
        elif task in args.cpu_memory:
            peak = {impl: C.peak_rise_in_fresh_process(
                __file__, argv, f"{name}:{task}:{impl}:{dtype_name}") for impl in fns}
        else:
            peak = {}
        records.append(dict(model=name, task=task, unit=UNITS[task], dtype=dtype_name,
                            samples=args.repeats, rate=rate, peak_mib=peak,
                            attention_share=share, encoder_share=encoder,
                            agreement=agreement))
        print(format_record(records[-1]), flush=True)
        del fns
    del models
    torch._dynamo.reset()
    return records


def format_record(r: dict) -> str:
    parts = [f"{r['model']} {r['dtype']} {r['task']}:"]
    parts += [f"{i} {rate:.1f} {r['unit']}"
              + (f" {r['peak_mib'][i]:.0f} MiB" if r["peak_mib"] else "")
              for i, rate in r["rate"].items()]
    parts += [f"({r['agreement']})"]
    return "  ".join(parts)


def table(records: List[dict], impls) -> str:
    baselines = [i for i in impls if i not in ("ours", "ours-graph")]
    headers = ["model", "dtype", "task"] + [f"{i}" for i in impls]
    headers += [f"speedup vs {b}" for b in baselines]
    if "ours-graph" in impls:
        headers += ["ours-graph vs eager"]
    headers += ["peak MiB " + " / ".join(impls)]
    headers += [f"memory vs {b}" for b in baselines]
    headers += ["attention share (eager / ours)"]
    shown = [i for i in ("ours", "ours-graph") if i in impls]
    headers += ["encoder share (" + " / ".join(shown) + ")"]
    rows = []
    for r in records:
        rate, peak = r["rate"], r["peak_mib"]
        # ours-graph is the fused implementation of a graphed decoding: compared with the
        # graphed eager one as well as with the plain loops.
        best = rate.get("ours-graph", rate["ours"])
        row = [r["model"], r["dtype"], f"{r['task']} ({r['unit']})"]
        row += ["-" if i not in rate else f"{rate[i]:.1f}" if rate[i] < 100
                else f"{rate[i]:.0f}" for i in impls]
        row += [C.fmt_ratio((best if b in GRAPHED else rate["ours"]) / rate[b])
                if b in rate else "-" for b in baselines]
        if "ours-graph" in impls:
            row += [C.fmt_ratio(best / rate["eager"]) if "ours-graph" in rate else "-"]
        row += [" / ".join(f"{peak[i]:.0f}" if i in peak else "-" for i in impls)]
        row += [C.fmt_ratio(peak["ours-graph" if b in GRAPHED else "ours"] / peak[b])
                if b in peak and peak[b] > 0 else "-" for b in baselines]
        for key, impls_shown in (("attention_share", ("eager", "ours")),
                                 ("encoder_share", shown)):
            share = r[key]
            row += [" / ".join(f"{100 * share[i]:.0f}%" for i in impls_shown if i in share)
                    or "-"]
        rows.append(row)
    return C.markdown_table(headers, rows)


NOTE = ("Throughput of whole models, medians of interleaved calls: target tokens/s for "
        "training (forward + backward + Adam) and greedy decoding, sentences/s for beam "
        "search (beam 5). speedup vs X = ours' throughput / X's (> 1: ours is faster; "
        "ours-graph's against eager-graph); "
        "memory vs X = ours' peak rise / X's (< 1: ours needs less). Attention share: "
        "the part of a greedy decoding call spent in the attention layer, which bounds "
        "what a faster attention can gain. Encoder share: the part spent in the encoder, "
        "which bounds what a faster decoding loop can gain.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None,
                   help=f"comma-separated: {','.join(MODELS)} (default: all; --quick: "
                        f"{','.join(QUICK_MODELS)})")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated: {','.join(IMPLS)} (default: all the device runs; "
                        "--quick: without compiled; the -graph ones need CUDA)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default: float32 on the CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src-len", type=int, default=50)
    p.add_argument("--tgt-len", type=int, default=50)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="two models, ours and eager, 2 rounds (under 5 minutes on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-memory", default=None,
                   help="comma-separated tasks whose peak memory is measured on the CPU, each "
                        "implementation in a fresh process (default: train; none with --quick)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None,
                   help="write the markdown table and machine info (and the records as "
                        "JSON beside it)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.models = C.parse_list(p, "models", args.models or ",".join(
        QUICK_MODELS if args.quick else MODELS), MODELS)
    cuda = args.device.startswith("cuda")
    default = [i for i in IMPLS if (cuda or i not in GRAPHED)
               and not (args.quick and i == "compiled")]
    args.impls = C.parse_list(p, "impls", args.impls or ",".join(default), IMPLS)
    if not cuda and any(i in GRAPHED for i in args.impls):
        p.error("--impls: ours-graph and eager-graph need --device cuda")
    args.tasks = C.parse_list(p, "tasks", args.tasks, TASKS)
    args.cpu_memory = C.parse_list(p, "cpu-memory", "" if args.quick and args.cpu_memory is None
                                   else args.cpu_memory or "train", TASKS)
    args.dtypes = C.parse_list(p, "dtypes", args.dtypes or (
        "float32,bfloat16" if cuda else "float32"), C.DTYPES)
    if "ours" not in args.impls:
        p.error("--impls must include ours (the ratios are relative to it)")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if not cuda and not C.peak_rss_supported():
        p.error("peak memory on the CPU needs a writable /proc/self/clear_refs (Linux)")
    for name in ("batch", "src_len", "tgt_len", "hidden", "embed", "vocab", "beam", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden % 2:
        p.error("--hidden must be even (two encoder directions of hidden / 2)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args.memory_of, args)
        return
    device = args.device
    C.set_compile_cache_limit(64)
    info = C.print_benchmark_info(device, attention_ext.build_info(),
                                  f"B={args.batch} S={args.src_len} T={args.tgt_len} "
                                  f"hidden={args.hidden} embed={args.embed} "
                                  f"vocab={args.vocab} beam={args.beam}, "
                                  f"rounds={args.repeats}, seed={args.seed}")
    records = []
    t_start = time.perf_counter()
    for dtype_name in args.dtypes:
        for name in args.models:
            records += bench_model(name, args, device, C.DTYPES[dtype_name], argv)
    text = table(records, args.impls) + "\n\n" + NOTE
    print("\n" + text + f"\n\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.output:
        C.write_output(args.output, info, text, records={"seq2seq": records})


if __name__ == "__main__":
    main()
