"""Benchmark of attention_ext.dot_attention (Luong dot attention) against PyTorch baselines.

Implementations, run interleaved in one process (ours, eager, compiled, sdpa, ours, ...):
  ours      attention_ext.dot_attention(query, keys, lengths=lengths, need_weights=...)
            (values=None: the encoder states serve as keys and values, as in Luong/GNMT)
  eager     attention_ext.reference.dot_attention, the same call in plain PyTorch
  compiled  torch.compile(reference.dot_attention, dynamic=False), compiled once per
            configuration; compilation and warm-up are not timed
  sdpa      F.scaled_dot_product_attention on (B, 1, Tq, D) views (one head, its fused
            CPU kernel's layout) with a float mask and scale=1.0; it
            returns no weights, and its (B, 1, 1, S) additive mask is built once outside the
            timing (a decoder builds it once per sequence)

Lengths are uniform random in [S/2, S] (seeded). Times are medians of per-call times over
--repeats samples; ratios are ours/X (below 1: ours is faster).

Usage: python benchmarks/bench_dot.py [--device cpu|cuda] [--quick] [--output FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import attention_ext  # noqa: E402
from attention_ext import reference  # noqa: E402

# name -> (B, Tq, S, D); Tq=1 shapes use a 2-D (B, D) query, one decoder step.
SHAPES = {
    "decode": (64, 1, 100, 512),
    "gnmt": (1280, 1, 66, 1024),
    "teacher": (32, 30, 50, 512),
}
SHAPE_NOTES = {
    "decode": "decode step",
    "gnmt": "MLPerf GNMT inference",
    "teacher": "teacher forcing",
}
DTYPES = C.DTYPES
MODES = C.MODES
IMPLS = ("ours", "eager", "compiled", "sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated: float32,bfloat16,float16,float64")
    C.add_op_benchmark_args(p, shapes=SHAPES, modes=MODES, impls=IMPLS,
                            quick_help="fewer samples (demo run)", quick_budget=3.0,
                            quick_slow=1.0)
    args = p.parse_args(argv)
    C.finish_op_benchmark_args(p, args, shapes=SHAPES, modes=MODES, impls=IMPLS)
    args.dtypes = C.parse_list(p, "dtypes", args.dtypes, DTYPES)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def make_inputs(shape, dtype, device, seed):
    B, Tq, S, D = shape
    gen = torch.Generator().manual_seed(seed)
    qshape = (B, D) if Tq == 1 else (B, Tq, D)
    query = (torch.randn(qshape, generator=gen) * D ** -0.5).to(device=device, dtype=dtype)
    keys = torch.randn((B, S, D), generator=gen).to(device=device, dtype=dtype)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen).to(device)
    return query, keys, lengths


def sdpa_mask(lengths, S, dtype):
    valid = torch.arange(S, device=lengths.device)[None, :] < lengths[:, None]
    mask = torch.zeros(valid.shape, dtype=dtype, device=lengths.device)
    # (B, heads=1, 1, S): SDPA's 4-D multi-head layout takes its fused CPU kernel; the
    # 3-D layout falls back to a slower path (docs/performance.md, "SDPA's layout").
    return mask.masked_fill(~valid, float("-inf"))[:, None, None, :]


def build_fns(impls, query, keys, lengths, mode, need_weights, device):
    """name -> zero-argument callable doing one forward (or forward+backward)."""
    S = keys.shape[1]
    single = query.dim() == 2
    mask = sdpa_mask(lengths, S, query.dtype)
    compiled_ref = torch.compile(reference.dot_attention, dynamic=False)

    def ours(q, k):
        return attention_ext.dot_attention(q, k, lengths=lengths, need_weights=need_weights)

    def eager(q, k):
        return reference.dot_attention(q, k, lengths=lengths, need_weights=need_weights)

    def compiled(q, k):
        return compiled_ref(q, k, lengths=lengths, need_weights=need_weights)

    def sdpa(q, k):
        q4 = (q.unsqueeze(1) if single else q).unsqueeze(1)  # (B, 1, Tq, D)
        k4 = k.unsqueeze(1)
        ctx = F.scaled_dot_product_attention(q4, k4, k4, attn_mask=mask, scale=1.0)
        ctx = ctx.squeeze(1)
        return (ctx.squeeze(1) if single else ctx), None

    impl_fns = {"ours": ours, "eager": eager, "compiled": compiled, "sdpa": sdpa}
    out = {}
    if mode == "fwd":
        q, k = query.detach(), keys.detach()
        for name in impls:
            f = impl_fns[name]

            def run(f=f):
                with torch.no_grad():
                    return f(q, k)[0]

            out[name] = run
    else:
        q = query.detach().requires_grad_()
        k = keys.detach().requires_grad_()
        out_shape = query.shape[:-1] + (keys.shape[-1],)
        g = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(
            device=device, dtype=query.dtype)
        for name in impls:
            f = impl_fns[name]

            def run(f=f):
                ctx = f(q, k)[0]
                return torch.autograd.grad(ctx, (q, k), g)

            out[name] = run
    return out


def check_agreement(outs, dtype):
    """Every implementation computes the same result as ours (guards the timings)."""
    want = outs["ours"]
    want = want if isinstance(want, torch.Tensor) else want[0]
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 6e-2
    for name, got in outs.items():
        got = got if isinstance(got, torch.Tensor) else got[0]
        err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
        scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
        if not err <= tol * scale:
            raise SystemExit(f"{name} disagrees with ours: max abs diff {err:.3g}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.set_compile_cache_limit(64)
    device = args.device
    info = C.print_op_benchmark_info(args, device, attention_ext.build_info())

    headers = ["shape (B, Tq, S, D)", "dtype", "mode", "samples"]
    headers += [f"{name} ms" + (" (no weights)" if name == "sdpa" else "")
                for name in args.impls]
    headers += [f"ours/{name}" for name in args.impls if name != "ours"]
    rows = []
    t_start = time.perf_counter()
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            query, keys, lengths = make_inputs(shape, dtype, device, args.seed)
            for mode in args.modes:
                fns = build_fns(args.impls, query, keys, lengths, mode, args.need_weights,
                                device)
                samples = C.interleaved(
                    fns, args.repeats, device, budget_s=args.budget, slow_s=args.slow,
                    check=lambda outs: check_agreement(outs, dtype))
                n_samples = "/".join(sorted({str(len(s)) for s in samples.values()},
                                            key=int, reverse=True))
                med = {name: C.median(s) for name, s in samples.items()}
                row = [f"{shape_name} {shape}", dtype_name, mode, str(n_samples)]
                row += [C.fmt_ms(med[name]) for name in args.impls]
                row += [C.fmt_ratio(med["ours"] / med[name]) for name in args.impls
                        if name != "ours"]
                rows.append(row)
                print("  ".join(str(c) for c in row), flush=True)
                del fns
                torch._dynamo.reset()  # the compiled graphs of this configuration
    elapsed = time.perf_counter() - t_start

    table = C.markdown_table(headers, rows)
    note = ("Medians of per-call times over interleaved samples; ours/X < 1 means ours is "
            "faster. sdpa returns no attention weights"
            + ("" if not args.need_weights else " (ours, eager and compiled do)")
            + "; its additive mask is precomputed. fwd+bwd: gradients of query and keys "
            "(keys are also the values) from the context.")
    print()
    print(table)
    print()
    print(note)
    print(f"\n(total {elapsed:.0f} s)")
    if args.output:
        C.write_output(args.output, info, table + "\n\n" + note)


if __name__ == "__main__":
    main()
