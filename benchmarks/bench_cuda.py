"""CUDA benchmark of both fused ops against what a user would run instead.

Implementations, each case run in one process, interleaved round by round:
  ours      attention_ext.dot_attention / additive_attention
  eager     attention_ext.reference, the same call in plain PyTorch
  compiled  torch.compile(reference op, dynamic=False) (compilation and warm-up are not
            timed)
  sdpa      F.scaled_dot_product_attention on (B, 1, Tq, D) views with a prebuilt float
            mask (dot op only; it returns no weights)

Decode cases (one (B, D) query per batch element, lengths on the GPU uniform in [S/2, S],
need_weights=True but for SDPA) report two times per call:
  graph   GPU time: a CUDA graph of `--calls` calls, replayed; per call, median of replays
  loop    a Python loop of the same calls (host launch costs included)
and the floor: the bytes a call must move (keys, values, query, outputs) over the copy
bandwidth measured in the same run. Every call of a round reads the next of several
input sets, so the working set exceeds the L2 cache.
Training cases (Tq decoder steps at once, forward + backward with upstream gradients)
report loop time and the rise of peak GPU memory above the inputs.

Usage: python benchmarks/bench_cuda.py [--quick] [--output FILE]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import attention_ext  # noqa: E402
from attention_ext import reference  # noqa: E402

L2_SPAN_BYTES = 150 * 2**20  # three times an H100's 50 MB L2
MAX_SETS = 16

IMPLS = ("ours", "eager", "compiled", "sdpa")

def train_cases() -> dict:
    """Teacher forcing, two sizes in both dtypes: a small model (B32 T30, width 512) and a
    full training batch (B128 T50, width 1024); SDPA computes the dot op alone."""
    sizes = {"": (32, 30, 50, 512), "-full": (128, 50, 50, 1024)}
    dtypes = {"": torch.float32, "-bf16": torch.bfloat16}
    return {f"{op}-train{size}{suffix}":
            (op, "train", *shape, dtype,
             ("ours", "eager", "compiled") + (("sdpa",) if op == "dot" else ()))
            for op in ("dot", "additive") for size, shape in sizes.items()
            for suffix, dtype in dtypes.items()}


# name -> (op, kind, B, Tq, S, D or A, dtype, implementations)
CASES = {
    "dot-decode": ("dot", "decode", 64, 1, 100, 512, torch.float32,
                   ("ours", "eager", "compiled", "sdpa")),
    "dot-decode-bf16": ("dot", "decode", 64, 1, 100, 512, torch.bfloat16,
                        ("ours", "eager", "compiled", "sdpa")),
    "dot-decode-beams": ("dot", "decode", 1280, 1, 66, 1024, torch.float32,
                         ("ours", "eager", "sdpa")),
    "dot-decode-long": ("dot", "decode", 8, 1, 4096, 128, torch.float32,
                        ("ours", "eager", "sdpa")),
    "additive-decode": ("additive", "decode", 64, 1, 100, 512, torch.float32,
                        ("ours", "eager", "compiled")),
    **train_cases(),
}


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, read + write counted."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / C.median(times)


def make_inputs(op, B, Tq, S, F_, dtype, seed, requires_grad=False):
    """One input set on the GPU; lengths uniform in [S/2, S]."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        t = (torch.randn(shape, generator=g) * scale).to("cuda", dtype)
        return t.requires_grad_(requires_grad)

    qshape = (B, F_) if Tq == 1 else (B, Tq, F_)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g).cuda()
    if op == "dot":
        return dict(query=randn(*qshape, scale=F_ ** -0.5), keys=randn(B, S, F_),
                    lengths=lengths)
    return dict(query_proj=randn(*qshape), keys_proj=randn(B, S, F_),
                v=randn(F_, scale=2.5 * F_ ** -0.5), values=randn(B, S, F_), lengths=lengths)


def call_of(op, impl):
    """fn(inputs) -> (context, weights) for one implementation."""
    if op == "dot":
        if impl == "ours":
            return lambda x: attention_ext.dot_attention(x["query"], x["keys"],
                                                         lengths=x["lengths"])
        if impl == "eager":
            return lambda x: reference.dot_attention(x["query"], x["keys"], lengths=x["lengths"])
        if impl == "compiled":
            fn = torch.compile(reference.dot_attention, dynamic=False)
            return lambda x: fn(x["query"], x["keys"], lengths=x["lengths"])
        if impl == "sdpa":
            def sdpa(x):
                q, k = x["query"], x["keys"]
                q4 = q[:, None, None, :] if q.dim() == 2 else q[:, None]
                out = F.scaled_dot_product_attention(q4, k[:, None], k[:, None],
                                                     attn_mask=x["sdpa_mask"], scale=1.0)
                return (out[:, 0, 0] if q.dim() == 2 else out[:, 0]), None
            return sdpa
    else:
        args = ("query_proj", "keys_proj", "v", "values")
        if impl == "ours":
            return lambda x: attention_ext.additive_attention(*(x[a] for a in args),
                                                              lengths=x["lengths"])
        if impl == "eager":
            return lambda x: reference.additive_attention(*(x[a] for a in args),
                                                          lengths=x["lengths"])
        if impl == "compiled":
            fn = torch.compile(reference.additive_attention, dynamic=False)
            return lambda x: fn(*(x[a] for a in args), lengths=x["lengths"])
    raise ValueError(f"{impl} does not apply to the {op} op")


def sdpa_mask(lengths, S, dtype):
    """(B, 1, 1, S) additive float mask, built once per input set (outside the timing)."""
    keep = torch.arange(S, device="cuda")[None, :] < lengths[:, None]
    mask = torch.zeros(keep.shape, device="cuda", dtype=dtype)
    return mask.masked_fill(~keep, float("-inf"))[:, None, None, :]


def decode_bytes(op, B, S, F_, dtype):
    size = torch.finfo(dtype).bits // 8
    if op == "dot":  # keys (= values), query, context, weights
        return size * (B * S * F_ + 2 * B * F_ + B * S)
    return size * (2 * B * S * F_ + 2 * B * F_ + B * S)  # keys_proj, values, query, outputs


def event_time(fn, reps):
    """Median seconds of fn() over reps, each timed with CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return C.median(times)


def graph_replay(run):
    """The replay of a CUDA graph of run()'s work, captured after one run on a side stream
    (capture needs the lazy initialisations done and the current stream left alone)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def bench_decode(name, op, B, S, F_, dtype, impls, calls, rounds, bandwidth):
    set_bytes = decode_bytes(op, B, S, F_, dtype)
    n_sets = max(1, min(MAX_SETS, math.ceil(L2_SPAN_BYTES / set_bytes)))
    sets = [make_inputs(op, B, 1, S, F_, dtype, seed=s) for s in range(n_sets)]
    if "sdpa" in impls:
        for x in sets:
            x["sdpa_mask"] = sdpa_mask(x["lengths"], S, dtype)
    check = {}
    loops, graphs = {}, {}
    for impl in impls:
        fn = call_of(op, impl)
        check[impl] = fn(sets[0])[0].float()
        for _ in range(2):
            for x in sets:
                fn(x)
        torch.cuda.synchronize()

        def run(fn=fn):
            for i in range(calls):
                fn(sets[i % n_sets])
        loops[impl] = run
        graphs[impl] = graph_replay(run)
    for impl in impls:
        err = (check[impl] - check["eager"]).abs().max().item()
        tol = 1e-2 if dtype != torch.float32 else 1e-4
        if err > tol:
            raise SystemExit(f"{name}: {impl}'s context differs from eager's by {err:.3g}")
    graph_t = {impl: [] for impl in impls}
    loop_t = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            graph_t[impl].append(event_time(graphs[impl], 1) / calls)
            loop_t[impl].append(event_time(loops[impl], 1) / calls)
    row = {impl: (C.median(graph_t[impl]), C.median(loop_t[impl])) for impl in impls}
    floor = set_bytes / bandwidth
    return row, floor


def bench_train(op, B, Tq, S, F_, dtype, impls, rounds):
    x = make_inputs(op, B, Tq, S, F_, dtype, seed=0, requires_grad=True)
    leaves = [t for k, t in x.items() if k != "lengths"]
    if "sdpa" in impls:
        x["sdpa_mask"] = sdpa_mask(x["lengths"], S, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    S_ = x["keys" if op == "dot" else "keys_proj"].shape[1]
    Dv = x["keys" if op == "dot" else "values"].shape[2]
    g_ctx = torch.randn((B, Tq, Dv), generator=g).to("cuda", dtype)
    g_w = torch.randn((B, Tq, S_), generator=g).to("cuda", dtype)
    steps = {}
    for impl in impls:
        fn = call_of(op, impl)

        def step(fn=fn):
            ctx, w = fn(x)
            loss = (ctx * g_ctx).sum() + (0 if w is None else (w * g_w).sum())
            return torch.autograd.grad(loss, leaves)
        steps[impl] = step
        step()
    torch.cuda.synchronize()
    peaks = {}
    for impl in impls:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = steps[impl]()
        torch.cuda.synchronize()
        peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del grads
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            times[impl].append(event_time(steps[impl], 1))
    return {impl: (C.median(times[impl]), peaks[impl]) for impl in impls}


def us(seconds):
    return f"{seconds * 1e6:.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {','.join(CASES)}")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma-separated: {','.join(IMPLS)} (each case runs those of them "
                        "that apply; ours and eager always)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--calls", type=int, default=50, help="calls per graph / loop (decode)")
    p.add_argument("--output", default=None, help="write the markdown tables and machine info")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    if not attention_ext.build_info()["with_cuda"]:
        p.error("attention_ext was built without its CUDA kernels")
    cases = C.parse_list(p, "cases", args.cases, CASES)
    chosen = set(C.parse_list(p, "impls", args.impls, IMPLS)) | {"ours", "eager"}
    rounds = 5 if args.quick else 20
    C.set_compile_cache_limit()

    bandwidth = copy_bandwidth()
    info = C.print_benchmark_info(
        "cuda", attention_ext.build_info(), f"{rounds} rounds, {args.calls} calls per graph/loop",
        extra={"copy bandwidth (read + write)": f"{bandwidth / 1e12:.2f} TB/s"})

    decode_rows, train_rows = [], []
    for name in cases:
        op, kind, B, Tq, S, F_, dtype, impls = CASES[name]
        impls = tuple(i for i in impls if i in chosen)
        feat = f"{'D' if op == 'dot' else 'A'}{F_} {str(dtype).replace('torch.', '')}"
        label = f"{name} B{B} S{S} {feat}"
        if kind == "decode":
            row, floor = bench_decode(name, op, B, S, F_, dtype, impls, args.calls, rounds,
                                      bandwidth)
            cells = [label, us(floor)]
            for impl in IMPLS:
                cells.append(f"{us(row[impl][0])} / {us(row[impl][1])}" if impl in row else "-")
            cells.append(C.fmt_ratio(row["ours"][0] / row["eager"][0]))
            decode_rows.append(cells)
        else:
            row = bench_train(op, B, Tq, S, F_, dtype, impls, rounds)
            label = f"{name} B{B} T{Tq} S{S} {feat}"
            cells = [label]
            for impl in IMPLS:
                cells.append(f"{row[impl][0] * 1e3:.3f} ms, +{row[impl][1]:.0f} MiB"
                             if impl in row else "-")
            cells.append(C.fmt_ratio(row["ours"][0] / row["eager"][0]))
            cells.append(C.fmt_ratio(row["ours"][1] / max(row["eager"][1], 1e-9)))
            train_rows.append(cells)
        print("  ".join(decode_rows[-1] if kind == "decode" else train_rows[-1]), flush=True)

    text = ""
    if decode_rows:
        text += C.markdown_table(
            ["decode case", "floor us", "ours us (graph / loop)", "eager", "compiled", "sdpa",
             "ours/eager (graph)"], decode_rows)
        text += ("\n\nGPU time per call from CUDA graph replay / wall time per call in a "
                 "Python loop; floor = bytes moved / copy bandwidth.\n\n")
    if train_rows:
        text += C.markdown_table(
            ["training case (fwd+bwd)", "ours", "eager", "compiled", "sdpa",
             "ours/eager time", "ours/eager memory"], train_rows)
        text += ("\n\nMedian time of forward + backward; peak GPU memory above the inputs. "
                 "The loss weighs context and weights, but SDPA's (it returns no weights): "
                 "its backward has no weights' gradient to carry.\n")
    print("\n" + text)
    if args.output:
        C.write_output(args.output, info, text)


if __name__ == "__main__":
    main()
