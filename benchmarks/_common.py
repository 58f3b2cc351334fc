"""Timing and reporting helpers shared by the benchmarks.

Method (docs/performance.md, "Benchmark method"): all implementations run interleaved in
one process (a, b, c, a, b, c, ...), so drift between runs and slow modes of a baseline
hit every implementation alike; each sample times a few back-to-back calls with
time.perf_counter (synchronising the device on CUDA); we report medians over many samples
and ratios of medians.
"""
from __future__ import annotations

import datetime
import glob
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


# The op benchmarks' dtypes (by name) and modes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MODES = ("fwd", "fwd+bwd")


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], calls: int, device: str) -> float:
    """Seconds per call of `calls` back-to-back calls of fn."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def calibrate_calls(per_call_s: float, target_s: float = 2e-3, max_calls: int = 50) -> int:
    """Calls per sample so that one sample lasts about target_s (at least one call)."""
    return max(1, min(max_calls, int(target_s / max(per_call_s, 1e-9))))


def warm_up(fn: Callable[[], object], device: str, max_calls: int = 3,
            max_s: float = 0.2):
    """One untimed call (compilation, allocator, caches), then timed calls: at least one,
    at most max_calls, stopping once max_s has passed. Returns (fastest timed call in
    seconds, the first call's result)."""
    first = fn()
    sync(device)
    best, spent, n = float("inf"), 0.0, 0
    while n < max_calls and (n == 0 or spent < max_s):
        t = time_calls(fn, 1, device)
        best, spent, n = min(best, t), spent + t, n + 1
    return best, first


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: str,
                target_s: float = 2e-3, budget_s: float = float("inf"),
                min_repeats: int = 3, slow_s: float = float("inf"),
                check: Optional[Callable[[Dict[str, object]], None]] = None,
                ) -> Dict[str, List[float]]:
    """Per-call times (seconds) of every fn, sampled round-robin up to `repeats` times.

    Each fn is warmed up first (its first result goes to `check`); the number of calls per
    sample is calibrated on the first fn (the reference point of the ratios) and shared by
    all, so samples are comparable. Sampling stops early, after at least min_repeats
    rounds, once budget_s has passed; a fn whose warm-up call took longer than slow_s is
    sampled once only (slow baselines would otherwise dominate the run time).
    """
    best, outs = {}, {}
    for name, fn in fns.items():
        best[name], outs[name] = warm_up(fn, device)
    if check is not None:
        check(outs)
    del outs
    calls = calibrate_calls(next(iter(best.values())), target_s)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            if i == 0 or best[name] <= slow_s:
                samples[name].append(time_calls(fn, calls, device))
        if i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags_summary() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ",".join(f for f in ("avx512f", "avx512_bf16", "avx2", "fma", "f16c")
                                    if f in flags) or "none of avx2/avx512"
    except OSError:
        pass
    return "unknown"


def machine_info(device: str, build_info: dict | None = None) -> Dict[str, str]:
    info = {
        "cpu": f"{cpu_model()} ({cpu_flags_summary()})",
        "cores (os.cpu_count)": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        # Other processes on the cores stretch every parallel region: say so in the table.
        info["load average (1/5/15 min, at start)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if build_info is not None:
        info["attention_ext"] = ", ".join(f"{k}={v}" for k, v in build_info.items())
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["cuda device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda (torch)"] = str(torch.version.cuda)
    return info


# What a CPU's or GPU's name holds that does not tell machines apart: trademarks, clock
# speeds, core counts, vendor and product-line words, memory sizes and kinds, form factors.
_NAME_NOISE = re.compile(r"\(r\)|\(tm\)|@ ?[0-9.]+ ?ghz|\b[0-9]+-core\b")
_NOISE_WORDS = re.compile(r"processor|cpu|nvidia|[0-9]+gb|hbm[0-9]*|pcie|sxm[0-9]*|nvl")


def machine_name(device: str) -> str:
    """The machine's part of a result file's name: the GPU's model on CUDA ("h100"), else
    "cpu", the CPU's model and its core count ("cpu-intel-xeon-2c")."""
    cuda = str(device).startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_model()
    words = [w for w in re.split(r"[^a-z0-9]+", _NAME_NOISE.sub(" ", name.lower()))
             if w and not _NOISE_WORDS.fullmatch(w)]
    return "-".join((words or ["gpu"]) if cuda else ["cpu", *words, f"{os.cpu_count()}c"])


def result_stem(folder: str, benchmark: str, device: str) -> str:
    """Where a run's results go, without the extension: folder/<benchmark>-<machine>-<date>
    (today, UTC), e.g. results/seq2seq-cpu-intel-xeon-2c-2026-11-28; a later run of the
    same day gets -2, -3, ... so that no earlier result is overwritten."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    base = os.path.join(folder, f"{benchmark.replace('_', '-')}-{machine_name(device)}-{date}")
    stem, n = base, 1
    while glob.glob(glob.escape(stem) + ".*"):
        n += 1
        stem = f"{base}-{n}"
    return stem


def print_benchmark_info(device: str, build_info: dict, benchmark: str,
                         extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The machine (machine_info), any extra lines and what the benchmark runs, printed
    before its tables; returned for write_output."""
    info = {**machine_info(device, build_info), **(extra or {}), "benchmark": benchmark}
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)} : {v}")
    print()
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def set_compile_cache_limit(n: int = 64) -> None:
    """Every benchmarked shape/dtype/mode is its own compiled graph (dynamic=False)."""
    cfg = torch._dynamo.config
    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), n))


# ----------------------------------------------------------------------------- peak memory
# On CPU the process's peak RSS is reset by writing '5' to /proc/self/clear_refs and read
# as VmHWM after the work: ru_maxrss cannot be reset and usually still holds the
# import-time peak.

def proc_status_kib(field: str) -> int:
    """A `field:  N kB` line of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs",
                                                                  os.W_OK)


def reset_peak_rss() -> int:
    """Sets VmHWM to the current RSS; returns that RSS (KiB), the baseline of a rise."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kib("VmHWM")


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def glibc_returns_freed_memory_at_once() -> None:
    """Has glibc's malloc serve every block of 1 MiB or more by its own mapping, unmapped
    when freed (fixed thresholds instead of its adaptive ones), and return what its heap
    holds free now: the peak RSS of a later call then rises by what that call allocates
    instead of reusing memory an earlier one freed. It costs page faults on every large
    allocation, so timed runs leave it alone. No-op without glibc."""
    libc = _libc()
    if libc is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**20)
    libc.malloc_trim(0)


def peak_rise_in_fresh_process(script: str, argv, spec: str) -> float:
    """The peak memory rise (MiB) that `python script *argv --memory-of spec` prints on its
    last line: a benchmark measured in a fresh process, because memory the allocator
    keeps from earlier calls in this one hides part of a later call's rise. argv: this
    benchmark's arguments (None: sys.argv[1:])."""
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    out = subprocess.run([sys.executable, os.path.abspath(script), *argv, "--memory-of", spec],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def peak_memory_rise_mib(fn: Callable[[], object], device: str) -> float:
    """How far the peak memory rises above what is held before fn runs, in MiB (its
    result is kept until the peak is read): torch's peak allocation on CUDA, the
    process's peak RSS on the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    return peak_rss_rise_kib(fn) / 1024


def peak_rss_rise_kib(fn: Callable[[], object]) -> int:
    """How far the peak RSS rises above the current RSS while fn runs (its result is kept
    alive until the peak is read, so outputs count)."""
    base = reset_peak_rss()
    out = fn()
    peak = proc_status_kib("VmHWM")
    del out
    return peak - base


def per_step_main(doc: str, layers: Sequence[str], shapes: Dict[str, tuple],
                  build_fns: Callable[[str, tuple, int], Dict[str, Callable[[], object]]],
                  check: Callable | None = None, argv=None) -> None:
    """The command line of the per-decoder-step layer benchmarks (bench_layers.py,
    bench_compat.py): for each layer and shape (B, Tq, S, D), build_fns(layer, shape, seed)
    gives {"ours", "eager"} callables, sampled interleaved; medians divided by Tq."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--layers", default=",".join(layers), help=f"comma-separated: {','.join(layers)}")
    p.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated: {','.join(shapes)}")
    p.add_argument("--repeats", type=int, default=None, help="samples (default 40, 10 --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of sampling per row (default 6, 1.5 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the markdown table and machine info")
    args = p.parse_args(argv)
    repeats = args.repeats or (10 if args.quick else 40)
    budget = args.budget or (1.5 if args.quick else 6.0)
    chosen = [x for x in args.layers.split(",") if x]
    chosen_shapes = [x for x in args.shapes.split(",") if x]
    for name in chosen + chosen_shapes:
        if name not in layers and name not in shapes:
            p.error(f"unknown layer or shape {name!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import attention_ext

    info = print_benchmark_info("cpu", attention_ext.build_info(),
                                f"repeats={repeats} (budget {budget:g} s per row), float32, "
                                f"seed={args.seed}")
    headers = ["layer", "mode (B, Tq, S, D)", "samples", "ours ms/step", "eager ms/step",
               "ours/eager"]
    rows = []
    for name in chosen:
        for shape_name in chosen_shapes:
            shape = shapes[shape_name]
            torch.manual_seed(args.seed)
            fns = build_fns(name, shape, args.seed)
            samples = interleaved(fns, repeats, "cpu", budget_s=budget, check=check)
            med = {k: median(s) / shape[1] for k, s in samples.items()}
            row = [name, f"{shape_name} {shape}", str(len(samples["ours"])),
                   fmt_ms(med["ours"]), fmt_ms(med["eager"]),
                   fmt_ratio(med["ours"] / med["eager"])]
            rows.append(row)
            print("  ".join(row), flush=True)
    table = markdown_table(headers, rows)
    note = ("Medians of interleaved samples, per decoder step (train: forward + backward of "
            "the Tq steps, divided by Tq). ours/eager < 1 means ours is faster.")
    print("\n" + table + "\n\n" + note)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(f"- {k}: {v}" for k, v in info.items()))
            f.write("\n\n" + table + "\n\n" + note + "\n")
        print(f"wrote {args.output}")


def add_op_benchmark_args(p, *, shapes, modes, impls, quick_help: str, quick_budget: float,
                          quick_slow: float) -> None:
    """The options the op benchmarks (bench_dot.py, bench_additive.py) share; their
    sampling defaults depend on --quick and are filled in by finish_op_benchmark_args."""
    import argparse

    p.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated: {','.join(shapes)}")
    p.add_argument("--modes", default=",".join(modes), help=f"comma-separated: {','.join(modes)}")
    p.add_argument("--impls", default=",".join(impls), help=f"comma-separated: {','.join(impls)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="samples per implementation (default 40, 10 with --quick)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of sampling per configuration before stopping early "
                        f"(at least 3 samples; default 8, {quick_budget:g} with --quick)")
    p.add_argument("--slow", type=float, default=None,
                   help="an implementation whose warm-up call takes longer than this many "
                        f"seconds is sampled once (default 10, {quick_slow:g} with --quick)")
    p.add_argument("--need-weights", dest="need_weights", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="every implementation returns the attention weights (default: yes)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the markdown tables (and machine info)")
    p.set_defaults(_quick_budget=quick_budget, _quick_slow=quick_slow)


def parse_list(p, field: str, value: str, allowed) -> list:
    """A comma-separated option as a list, every item one of `allowed`."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        p.error(f"--{field}: unknown {bad}; choose from {list(allowed)}")
    return values


def print_op_benchmark_info(args, device: str, build_info: dict) -> Dict[str, str]:
    """The machine and the sampling settings, printed before an op benchmark's table."""
    return print_benchmark_info(device, build_info,
                                f"repeats={args.repeats} (budget {args.budget:g} s per row, "
                                f"1 sample for calls > {args.slow:g} s), "
                                f"need_weights={args.need_weights}, "
                                f"lengths uniform in [S/2, S], seed={args.seed}")


def write_output(path: str, info: Dict[str, str], text: str,
                 records: Optional[Dict[str, list]] = None) -> None:
    """--output: the machine info as a list, then the benchmark's markdown; with records
    (lists of dicts by table), also the machine info and records as JSON beside it
    (the same path with .json), which benchmarks/report.py reads."""
    with open(path, "w") as f:
        f.write("\n".join(f"- {k}: {v}" for k, v in info.items()))
        f.write("\n\n" + text + "\n")
    print(f"wrote {path}")
    if records is not None:
        import json

        json_path = os.path.splitext(path)[0] + ".json"
        with open(json_path, "w") as f:
            json.dump({"machine": info, "records": records}, f, indent=1)
        print(f"wrote {json_path}")


def finish_op_benchmark_args(p, args, *, shapes, modes, impls) -> None:
    """Sampling defaults for --quick, the lists parsed and checked."""
    if args.repeats is None:
        args.repeats = 10 if args.quick else 40
    if args.budget is None:
        args.budget = args._quick_budget if args.quick else 8.0
    if args.slow is None:
        args.slow = args._quick_slow if args.quick else 10.0
    args.shapes = parse_list(p, "shapes", args.shapes, shapes)
    args.modes = parse_list(p, "modes", args.modes, modes)
    args.impls = parse_list(p, "impls", args.impls, impls)
    if "ours" not in args.impls:
        p.error("--impls must include ours (the ratios are relative to it)")
