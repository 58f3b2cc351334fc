"""Runs the benchmarks and writes a report of the run into benchmarks/results.

The report is <name>.md (the machine, then every benchmark's table), <name>.json (the
same tables as rows, and the end-to-end records) and <name>.png (the end-to-end
speedups), where <name> is <benchmark>-<machine>-<date> (e.g.
seq2seq-cpu-intel-xeon-2c-2026-11-28; the benchmark is "report" when the run holds
several, and a later run of the same day gets -2, -3, ...). `make bench` runs it.

Each benchmark runs in its own process (as `python benchmarks/bench_X.py --output ...`),
so one's compiled graphs and allocator state do not touch the next one's timings.

Usage: python benchmarks/report.py [--quick] [--device cpu|cuda] [--benchmarks a,b]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

# name -> (script, what the report calls it, devices it runs on)
BENCHMARKS = {
    "seq2seq": ("bench_seq2seq.py", "End-to-end seq2seq models", ("cpu", "cuda")),
    "dot": ("bench_dot.py", "Dot attention", ("cpu", "cuda")),
    "additive": ("bench_additive.py", "Additive attention", ("cpu",)),
    "location": ("bench_location.py", "Location-sensitive attention", ("cpu", "cuda")),
    "layers": ("bench_layers.py", "Layers", ("cpu",)),
    "compat": ("bench_compat.py", "Drop-ins", ("cpu",)),
    "beam_search": ("bench_beam_search.py", "Beam search: memory_index vs tiling",
                    ("cpu", "cuda")),
    "cuda": ("bench_cuda.py", "CUDA ops (graph and loop times)", ("cuda",)),
}

# With --quick, on top of each benchmark's own --quick: shorter sampling of the op
# benchmarks and one model of the beam search, so that the report takes about 5 minutes
# on 2 CPU cores.
QUICK_EXTRA = {"dot": ["--budget", "1"], "additive": ["--budget", "1"],
               "beam_search": ["--models", "bahdanau"]}


def markdown_tables(text: str) -> list:
    """The markdown tables of a benchmark's output, as {"headers", "rows"} of cell strings."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            def cells(line):
                return [c.strip() for c in line.strip().strip("|").split("|")]
            headers, rows = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            tables.append({"headers": headers, "rows": rows})
        else:
            i += 1
    return tables


def without_machine_info(text: str) -> str:
    """A benchmark's --output without its leading '- key: value' list (the report has it
    once)."""
    lines = text.splitlines()
    while lines and (lines[0].startswith("- ") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines)


def plot_speedups(records: list, path: str) -> None:
    """Bars of ours' throughput over each baseline's, per model and task (one panel per
    baseline and dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [b for b in ("eager", "compiled") if any(b in r["rate"] for r in records)]
    dtypes = sorted({r["dtype"] for r in records})
    models = list(dict.fromkeys(r["model"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    panels = [(b, d) for d in dtypes for b in baselines]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.6 * len(models)),
                                                      3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(tasks)
    for ax, (baseline, dtype) in zip(axes[:, 0], panels):
        for k, task in enumerate(tasks):
            xs, ys = [], []
            for m, model in enumerate(models):
                for r in records:
                    if (r["model"], r["task"], r["dtype"]) == (model, task, dtype) and \
                            baseline in r["rate"]:
                        xs.append(m + (k - (len(tasks) - 1) / 2) * width)
                        ys.append(r["rate"]["ours"] / r["rate"][baseline])
            bars = ax.bar(xs, ys, width, label=task)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylabel(f"speedup vs {baseline}")
        ax.set_title(f"attention_ext vs {baseline} attention, whole model, {dtype}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated: {','.join(BENCHMARKS)} (default: those for the "
                        "device)")
    p.add_argument("--quick", action="store_true",
                   help="every benchmark's --quick (fewer samples and cases)")
    p.add_argument("--results", default=os.path.join(HERE, "results"),
                   help="the folder of the reports (default benchmarks/results)")
    args = p.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    chosen = C.parse_list(p, "benchmarks", args.benchmarks or ",".join(
        n for n, b in BENCHMARKS.items() if kind in b[2]), BENCHMARKS)
    for name in chosen:
        if kind not in BENCHMARKS[name][2]:
            p.error(f"--benchmarks: {name} does not run on {kind}")
    os.makedirs(args.results, exist_ok=True)
    base = C.result_stem(args.results, chosen[0] if len(chosen) == 1 else "report",
                         args.device)

    import attention_ext

    info = C.machine_info(args.device, attention_ext.build_info())
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["command"] = " ".join(["python benchmarks/report.py", *(argv or sys.argv[1:])])
    sections, data = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            script, title, _ = BENCHMARKS[name]
            out = os.path.join(tmp, name + ".md")
            cmd = [sys.executable, os.path.join(HERE, script), "--output", out]
            cmd += (["--quick", *QUICK_EXTRA.get(name, [])]) if args.quick else []
            if name in ("seq2seq", "dot", "location", "beam_search"):
                cmd += ["--device", args.device]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - start
            with open(out) as f:
                text = without_machine_info(f.read())
            sections.append(f"## {title} (`benchmarks/{script}`, {seconds:.0f} s)\n\n{text}")
            data[name] = {"seconds": seconds, "tables": markdown_tables(text)}
            records = os.path.join(tmp, name + ".json")
            if os.path.exists(records):
                with open(records) as f:
                    data[name]["records"] = json.load(f)["records"]

    with open(base + ".md", "w") as f:
        f.write(f"# Benchmarks on {info.get('cuda device', info['cpu'])}\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n")
        f.write("\n\n".join(sections) + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "benchmarks": data}, f, indent=1)
    written = [base + ".md", base + ".json"]
    seq2seq = data.get("seq2seq", {}).get("records", {}).get("seq2seq")
    if seq2seq:
        plot_speedups(seq2seq, base + ".png")
        written.append(base + ".png")
    print("wrote " + ", ".join(os.path.relpath(w) for w in written))


if __name__ == "__main__":
    main()
