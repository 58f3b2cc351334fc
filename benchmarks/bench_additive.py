"""Benchmark of attention_ext.additive_attention (Bahdanau attention) against PyTorch baselines.

Implementations, run interleaved in one process (ours, eager, compiled, ours, ...):
  ours      attention_ext.additive_attention(query_proj, keys_proj, v, values, lengths=...)
  eager     attention_ext.reference.additive_attention, the same call in plain PyTorch
            (a B x Tq x S x A tanh tensor, as users write it)
  compiled  torch.compile(reference.additive_attention, dynamic=False), compiled once per
            configuration; compilation and warm-up are not timed

Lengths are uniform random in [S/2, S] (seeded). Times are medians of per-call times over
--repeats samples; ratios are ours/X (below 1: ours is faster). fwd+bwd: gradients of all
four inputs (query_proj, keys_proj, v, values) from the context.

Peak memory (docs/performance.md, "Benchmark method"): each (shape, dtype, implementation)
runs fwd+bwd in a fresh subprocess: inputs allocated, one warm-up call (compilation), then
the peak RSS is reset through /proc/self/clear_refs and the rise of VmHWM over the RSS
during one more fwd+bwd is reported (outputs and gradients included). The subprocess fixes
glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) so large temporaries are always fresh
mappings that are returned on free: the warm-up's freed temporaries cannot hide in the
heap and be reused unseen by the measured call.

Usage: python benchmarks/bench_additive.py [--quick] [--output FILE] [--shapes ...]
       [--dtypes ...] [--modes ...] [--impls ...] [--memory-shapes ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import attention_ext  # noqa: E402
from attention_ext import reference  # noqa: E402

# name -> (B, Tq, S, A, Dv); Tq=1 shapes use a 2-D (B, A) query_proj, one decoder step.
SHAPES = {
    "decode": (64, 1, 100, 512, 512),
    "gnmt_infer": (1280, 1, 66, 1024, 1024),
    "gnmt_train": (128, 10, 128, 1024, 1024),
    "teacher": (32, 30, 50, 512, 512),
}
SHAPE_NOTES = {
    "decode": "decode step",
    "gnmt_infer": "MLPerf GNMT inference",
    "gnmt_train": "MLPerf GNMT training",
    "teacher": "teacher forcing",
}
DTYPES = C.DTYPES
MODES = C.MODES
IMPLS = ("ours", "eager", "compiled")

# (shape, mode) -> [(baseline, ratio ours/baseline must not exceed)]: the additive op's
# speed targets, printed as met/missed (never asserted: speed lives here, not in the tests).
TIME_TARGETS = {
    ("decode", "fwd"): [("compiled", 1 / 3), ("eager", 1 / 4)],
    ("teacher", "fwd+bwd"): [("eager", 1 / 4)],
}
MEMORY_TARGET = ("teacher", "eager", 1 / 10)  # extra peak of ours <= 1/10 of eager's

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float32,bfloat16,float16,float64 "
                        "(default float32,bfloat16; float32 with --quick)")
    C.add_op_benchmark_args(p, shapes=SHAPES, modes=MODES, impls=IMPLS,
                            quick_help="fewer samples, float32 only, memory of teacher forcing "
                                       "for ours and eager only (a demo run, about 2 minutes)",
                            quick_budget=2.0, quick_slow=0.5)
    p.add_argument("--memory-shapes", default=None,
                   help="shapes whose fwd+bwd peak memory is measured, comma-separated, or "
                        "'none' (default: the --shapes; teacher with --quick)")
    p.add_argument("--memory-impls", default=None,
                   help="implementations measured for memory (default ours,eager,compiled; "
                        "ours,eager with --quick)")
    p.add_argument("--memory-child", nargs=3, metavar=("IMPL", "SHAPE", "DTYPE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    C.finish_op_benchmark_args(p, args, shapes=SHAPES, modes=MODES, impls=IMPLS)
    if args.dtypes is None:
        args.dtypes = "float32" if args.quick else "float32,bfloat16"
    args.dtypes = C.parse_list(p, "dtypes", args.dtypes, DTYPES)
    if args.memory_shapes is None:
        args.memory_shapes = ",".join(s for s in args.shapes if s == "teacher") \
            if args.quick else ",".join(args.shapes)
    args.memory_shapes = [] if args.memory_shapes == "none" else C.parse_list(
        p, "memory-shapes", args.memory_shapes, SHAPES)
    if args.memory_impls is None:
        args.memory_impls = "ours,eager" if args.quick else ",".join(args.impls)
    args.memory_impls = C.parse_list(p, "memory-impls", args.memory_impls, IMPLS)
    return args


# ----------------------------------------------------------------------------- inputs

def make_inputs(shape, dtype, seed):
    """Seeded inputs as a trained layer sees them (the scales of the tests' harness.ADDITIVE.make_case):
    unit-scale projections, v like nn.Linear's init, lengths uniform in [S/2, S]."""
    B, Tq, S, A, Dv = shape
    gen = torch.Generator().manual_seed(seed)
    qshape = (B, A) if Tq == 1 else (B, Tq, A)
    query_proj = torch.randn(qshape, generator=gen).to(dtype)
    keys_proj = torch.randn((B, S, A), generator=gen).to(dtype)
    v = (torch.randn((A,), generator=gen) * 2.5 / A ** 0.5).to(dtype)
    values = torch.randn((B, S, Dv), generator=gen).to(dtype)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen)
    return query_proj, keys_proj, v, values, lengths


def impl_functions(impls, lengths, need_weights):
    """name -> f(query_proj, keys_proj, v, values) -> (context, weights)."""
    compiled_ref = torch.compile(reference.additive_attention, dynamic=False) \
        if "compiled" in impls else None

    def ours(*t):
        return attention_ext.additive_attention(*t, lengths=lengths, need_weights=need_weights)

    def eager(*t):
        return reference.additive_attention(*t, lengths=lengths, need_weights=need_weights)

    def compiled(*t):
        return compiled_ref(*t, lengths=lengths, need_weights=need_weights)

    table = {"ours": ours, "eager": eager, "compiled": compiled}
    return {name: table[name] for name in impls}


def build_fns(impls, inputs, mode, need_weights):
    """name -> zero-argument callable doing one forward (or forward+backward)."""
    *tensors, lengths = inputs
    fns = impl_functions(impls, lengths, need_weights)
    out = {}
    if mode == "fwd":
        ts = [t.detach() for t in tensors]
        for name, f in fns.items():
            def run(f=f):
                with torch.no_grad():
                    return f(*ts)[0]
            out[name] = run
    else:
        leaves = [t.detach().requires_grad_() for t in tensors]
        q, values = leaves[0], leaves[3]
        ctx_shape = q.shape[:-1] + (values.shape[-1],)
        g = torch.randn(ctx_shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
        for name, f in fns.items():
            def run(f=f):
                ctx = f(*leaves)[0]
                return torch.autograd.grad(ctx, leaves, g)
            out[name] = run
    return out


def check_agreement(outs, dtype):
    """Every implementation computes the same result as ours (guards the timings)."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 6e-2
    want = outs["ours"]
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    for name, got in outs.items():
        got = [got] if isinstance(got, torch.Tensor) else list(got)
        for i, (a, b) in enumerate(zip(got, want)):
            if not b.numel():
                continue
            err = (a.float() - b.float()).abs().max().item()
            scale = max(1.0, b.float().abs().max().item())
            if not err <= tol * scale:
                raise SystemExit(f"{name} disagrees with ours (output {i}): "
                                 f"max abs diff {err:.3g}, scale {scale:.3g}")


# ----------------------------------------------------------------------------- memory

def memory_child(impl, shape_name, dtype_name, seed, need_weights):
    """In a fresh process: the peak RSS rise of one fwd+bwd, printed as JSON."""
    inputs = make_inputs(SHAPES[shape_name], DTYPES[dtype_name], seed)
    fn = build_fns([impl], inputs, "fwd+bwd", need_weights)[impl]
    del inputs
    fn()  # warm-up: compilation, thread pool, lazily built state
    gc.collect()
    base_kib = C.proc_status_kib("VmRSS")
    rise_kib = C.peak_rss_rise_kib(fn)
    print(json.dumps({"rise_kib": rise_kib, "base_kib": base_kib}))


def measure_memory(impl, shape_name, dtype_name, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, shape_name,
           dtype_name, "--seed", str(args.seed)]
    cmd.append("--need-weights" if args.need_weights else "--no-need-weights")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, **MALLOC_ENV}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"memory subprocess failed ({impl} {shape_name} {dtype_name}):\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        impl, shape_name, dtype_name = args.memory_child
        memory_child(impl, shape_name, dtype_name, args.seed, args.need_weights)
        return
    C.set_compile_cache_limit(64)
    info = C.print_op_benchmark_info(args, "cpu", attention_ext.build_info())

    t_start = time.perf_counter()
    headers = ["shape (B, Tq, S, A, Dv)", "dtype", "mode", "samples"]
    headers += [f"{name} ms" for name in args.impls]
    headers += [f"ours/{name}" for name in args.impls if name != "ours"]
    headers += ["target"]
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(shape, dtype, args.seed)
            for mode in args.modes:
                fns = build_fns(args.impls, inputs, mode, args.need_weights)
                samples = C.interleaved(
                    fns, args.repeats, "cpu", budget_s=args.budget, slow_s=args.slow,
                    check=lambda outs: check_agreement(outs, dtype))
                n_samples = "/".join(sorted({str(len(s)) for s in samples.values()},
                                            key=int, reverse=True))
                med = {name: C.median(s) for name, s in samples.items()}
                ratio = {name: med["ours"] / med[name] for name in args.impls}
                target = []
                for base, limit in TIME_TARGETS.get((shape_name, mode), []):
                    if base in ratio:
                        ok = "met" if ratio[base] <= limit else "MISSED"
                        target.append(f"ours/{base} <= {limit:.2f}: {ok}")
                row = [f"{shape_name} {shape}", dtype_name, mode, n_samples]
                row += [C.fmt_ms(med[name]) for name in args.impls]
                row += [C.fmt_ratio(ratio[name]) for name in args.impls if name != "ours"]
                row += ["; ".join(target) or "-"]
                rows.append(row)
                print("  ".join(str(c) for c in row), flush=True)
                del fns, samples
                gc.collect()
                torch._dynamo.reset()  # the compiled graphs of this configuration
            del inputs
    t_time = time.perf_counter() - t_start

    mem_rows = []
    if args.memory_shapes and not C.peak_rss_supported():
        print("\npeak memory: /proc/self/clear_refs is not writable here; skipped")
    elif args.memory_shapes:
        print("\npeak memory of fwd+bwd (fresh subprocess per variant) ...", flush=True)
        for shape_name in args.memory_shapes:
            B, Tq, S, A, Dv = SHAPES[shape_name]
            for dtype_name in args.dtypes:
                itemsize = DTYPES[dtype_name].itemsize
                one_temp_mb = B * Tq * S * A * itemsize / 2 ** 20
                rise = {}
                for impl in args.memory_impls:
                    rise[impl] = measure_memory(impl, shape_name, dtype_name, args)["rise_kib"] / 1024
                for impl in args.memory_impls:
                    vs = {b: rise[impl] / rise[b] if rise[b] > 0 else float("nan")
                          for b in args.memory_impls if b != impl}
                    target = "-"
                    t_shape, t_base, t_limit = MEMORY_TARGET
                    if impl == "ours" and shape_name == t_shape and t_base in rise:
                        ok = "met" if rise["ours"] <= t_limit * rise[t_base] else "MISSED"
                        target = f"ours/{t_base} <= {t_limit:.2f}: {ok}"
                    row = [f"{shape_name} {SHAPES[shape_name]}", dtype_name, impl,
                           f"{rise[impl]:.1f}", f"{one_temp_mb:.0f}",
                           ", ".join(f"{C.fmt_ratio(r)} of {b}" for b, r in vs.items()) if impl == "ours" else "",
                           target]
                    mem_rows.append(row)
                    print("  ".join(row), flush=True)
    elapsed = time.perf_counter() - t_start

    table = C.markdown_table(headers, rows)
    note = ("Medians of per-call times over interleaved samples; ours/X < 1 means ours is "
            "faster. fwd: no autograd; fwd+bwd: gradients of query_proj, keys_proj, v and "
            "values from the context" + (" (weights returned too)." if args.need_weights
                                         else ".")
            + " Targets are printed, not asserted.")
    out = [table, "", note]
    if mem_rows:
        mem_table = C.markdown_table(
            ["shape (B, Tq, S, A, Dv)", "dtype", "impl", "fwd+bwd peak rise MB",
             "one BxTqxSxA tensor MB", "ours/X", "target"], mem_rows)
        mem_note = ("Peak RSS rise (VmHWM after /proc/self/clear_refs) over the RSS with the "
                    "inputs allocated, one fwd+bwd after a warm-up call, fresh subprocess per "
                    f"variant, {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}. "
                    "Outputs and gradients count.")
        out += ["", mem_table, "", mem_note]
    text = "\n".join(out)
    print()
    print(text)
    print(f"\n(timing {t_time:.0f} s, total {elapsed:.0f} s)")
    if args.output:
        C.write_output(args.output, info, text)


if __name__ == "__main__":
    main()
