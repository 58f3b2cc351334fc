"""Whole-model benchmark of location-sensitive attention: one Tacotron 2 training step
(tacotron2_model.py: teacher-forced forward + backward, float32) with each implementation
of the decoder's attention, all from the same weights.

Sizes: B 16, 150 characters, 400 frames on the CPU; B 64, 150 characters, 800 frames on a
GPU (--quick: B 4, 150, 100 and 2 steps, a smoke run). Text lengths are uniform in [N/2, N],
output lengths in [T/2, T]; the padded sizes are exactly N and T.

Implementations (IMPLEMENTATIONS: name -> a factory of NVIDIA/tacotron2's Attention
interface; the first is the reference of the ratios and of the weights):

  eager   tacotron2_model.Attention, plain PyTorch as NVIDIA/tacotron2 writes it
  ours    attention_ext.compat.tacotron2.Attention, the drop-in on the fused
          location_attention (the same state_dict keys, so it loads eager's weights)
  floor   tacotron2_model.UniformAttention, the mean of the memory in place of the
          attention: another model (its loss is not compared), whose step does all the
          work outside the attention and almost none inside. Its time and peak against
          eager's are the best ratios any attention implementation can reach

Figures per implementation:

  s/step      median of --steps training steps, sampled round-robin across the
              implementations after one untimed warm-up step each
  peak MiB    how far one step raises the peak memory above the weights and the batch
              (after a warm-up step, whose gradients are freed first as a training loop's
              zero_grad does): torch's max_memory_allocated on CUDA. On the CPU, where
              torch keeps no allocator statistics and tracemalloc sees only Python's own
              allocations, the peak RSS (VmHWM, reset through /proc/self/clear_refs) of a
              fresh process per implementation, with glibc told to return every freed
              block of 1 MiB or more at once (_common.glibc_returns_freed_memory_at_once):
              memory kept from the warm-up step would otherwise hide part of the rise
  saved MiB   the tensors autograd keeps for the backward, each storage once, weights
              included (tacotron2_model.saved_tensor_bytes), and the part saved inside the
              attention's forward: what a fused attention can shrink

--attention-alone times the decoder's attention by itself at the same sizes instead: the
attention layer's `frames` fed-back steps over the text (random queries in place of the
attention LSTM's), forward then backward, each implementation from the same weights,
medians of --steps runs round-robin; then one profiled run each, whose largest self times
(torch.profiler) say where the attention's time goes. Against the whole step's time it
gives the attention's share of the step.

Usage: python benchmarks/bench_tacotron2.py [--quick] [--attention-alone] [--device cuda]
                                            [--output FILE.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from tacotron2_model import (Attention, AttentionFactory, Tacotron2,  # noqa: E402
                             Tacotron2Config, UniformAttention, padding_mask,
                             parameter_count, saved_tensor_bytes, synthetic_batch,
                             train_step)

import attention_ext  # noqa: E402
from attention_ext.compat import tacotron2 as fused  # noqa: E402

IMPLEMENTATIONS: Dict[str, AttentionFactory] = {
    "eager": Attention,
    "ours": fused.Attention,
    "floor": UniformAttention,
}
# The implementations of another model, bounds rather than rivals: no loss comparison.
BOUNDS = {"floor"}
# (time, peak) ours/eager the issue asks for at the CPU's sizes (B 16, 150, 400).
TARGETS = {"time": 0.9, "peak": 0.7}
# (batch, chars, frames) by device kind
SIZES = {"cpu": (16, 150, 400), "cuda": (64, 150, 800)}
QUICK_SIZES = (4, 150, 100)
# The first losses of two implementations of the same weights differ by rounding only.
LOSS_RTOL = 1e-4
MIB = 2**20
NOTE = ("One Tacotron 2 training step (forward + backward, float32), medians of steps "
        "sampled round-robin. floor: the mean of the memory in place of the attention, "
        "the step's work outside the attention alone; its ratios are the best any "
        "attention implementation can reach. peak MiB: the step's rise of the peak above "
        "the weights and the batch, gradients included (CUDA: max_memory_allocated; CPU: "
        "peak RSS of a fresh process). saved "
        "MiB: tensors kept for the backward, each storage once, weights included; the "
        "attention's part is what its forward saves. X vs Y < 1: X needs less.")

ATTENTION_NOTE = ("The decoder's attention alone (--attention-alone): the attention layer's "
                  "fed-back steps over the text, one per frame, random queries in place of "
                  "the attention LSTM's, forward then backward (the memory layer once, as "
                  "the decoder calls it), medians of runs sampled round-robin. floor: the "
                  "mean of the memory, the work every implementation shares (the memory "
                  "layer, the context's products and the gradients of the memory).")


def build_models(impls: List[str], config: Tacotron2Config, device) -> Dict[str, Tacotron2]:
    """One model per implementation, every one with the weights of the first (built from
    the seed set before the call)."""
    models: Dict[str, Tacotron2] = {}
    for name in impls:
        model = Tacotron2(config, IMPLEMENTATIONS[name]).to(device)
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[name] = model
    return models


def check_losses(losses: Dict[str, torch.Tensor]) -> None:
    reference_name, reference = next(iter(losses.items()))
    for name, loss in losses.items():
        if name in BOUNDS:
            continue
        if not torch.allclose(loss, reference, rtol=LOSS_RTOL, atol=0):
            raise SystemExit(f"{name}: first training loss {float(loss):.6f} differs from "
                             f"{reference_name}'s {float(reference):.6f}")


def memory_child(args) -> None:
    """The child process of C.peak_rise_in_fresh_process: the peak RSS rise of one training
    step of implementation args.memory_of after a warm-up step, printed (MiB)."""
    C.glibc_returns_freed_memory_at_once()
    torch.manual_seed(args.seed)
    reference = args.impls[0]
    models = build_models(list(dict.fromkeys([reference, args.memory_of])), Tacotron2Config(),
                          "cpu")
    model = models[args.memory_of]
    del models
    batch = synthetic_batch(args.batch, args.chars, args.frames, seed=args.seed)
    train_step(model, batch, seed=args.seed)
    C.glibc_returns_freed_memory_at_once()
    print(peak_rise_mib(model, lambda: train_step(model, batch, seed=args.seed), "cpu"))


def peak_rise_mib(model: Tacotron2, step, device) -> float:
    """The peak memory rise of one training step over the weights and the batch: the
    previous step's gradients are freed first, as a training loop's zero_grad does before
    the forward, so that the rise includes the new ones."""
    model.zero_grad(set_to_none=True)
    return C.peak_memory_rise_mib(step, device)


def run(args, argv=None) -> List[dict]:
    """The records of every implementation (one dict each) at the sizes of args; argv: the
    command line a CPU memory child gets (None: sys.argv[1:])."""
    device, config = args.device, Tacotron2Config()
    torch.manual_seed(args.seed)
    models = build_models(args.impls, config, device)
    batch = synthetic_batch(args.batch, args.chars, args.frames, config=config,
                            seed=args.seed, device=device)
    steps = {name: (lambda m=model: train_step(m, batch, seed=args.seed))
             for name, model in models.items()}
    losses = {}
    for name, step in steps.items():
        losses[name] = step()
        C.sync(device)
    check_losses(losses)
    seconds = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            seconds[name].append(C.time_calls(step, 1, device))
    records = []
    for name, model in models.items():
        saved = saved_tensor_bytes(model, batch, seed=args.seed)
        if device.startswith("cuda"):
            peak = peak_rise_mib(model, steps[name], device)
        else:
            peak = C.peak_rise_in_fresh_process(__file__, argv, name)
        records.append(dict(implementation=name, batch=args.batch, chars=args.chars,
                            frames=args.frames, seconds=seconds[name],
                            median_s=C.median(seconds[name]), peak_mib=peak,
                            saved_mib=saved.total / MIB,
                            attention_saved_mib=saved.attention / MIB,
                            weights_saved_mib=saved.parameters / MIB,
                            first_loss=float(losses[name])))
        print(format_record(records[-1]), flush=True)
    return records


def attention_alone(args) -> tuple:
    """--attention-alone: (the records of every implementation, their profiles as text)."""
    device, c = args.device, Tacotron2Config()
    torch.manual_seed(args.seed)
    layers: Dict[str, torch.nn.Module] = {}
    for name in args.impls:
        layer = IMPLEMENTATIONS[name](c.attention_rnn_dim, c.encoder_embedding_dim,
                                      c.attention_dim, c.attention_location_n_filters,
                                      c.attention_location_kernel_size).to(device)
        if layers:
            layer.load_state_dict(next(iter(layers.values())).state_dict())
        layers[name] = layer
    batch = synthetic_batch(args.batch, args.chars, args.frames, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    memory = torch.randn(args.batch, args.chars, c.encoder_embedding_dim, generator=gen)
    memory = memory.to(device).requires_grad_()
    mask = padding_mask(batch.text_lengths, args.chars).to(device)
    queries = [torch.randn(args.batch, c.attention_rnn_dim, generator=gen).to(device)
               .requires_grad_() for _ in range(args.frames)]

    def run(layer):
        for t in (memory, *queries, *layer.parameters()):
            t.grad = None
        processed = layer.memory_layer(memory)
        weights = weights_cum = memory.new_zeros(args.batch, args.chars)
        total = memory.new_zeros(())
        for query in queries:
            context, weights = layer(query, memory, processed,
                                     torch.stack((weights, weights_cum), 1), mask)
            weights_cum = weights_cum + weights
            total = total + context.sum()
        total.backward()

    for layer in layers.values():
        run(layer)
    seconds = {name: [] for name in layers}
    for _ in range(args.steps):
        for name, layer in layers.items():
            seconds[name].append(C.time_calls(lambda: run(layer), 1, device))
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiles = []
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    for name, layer in layers.items():
        with torch.profiler.profile(activities=activities) as prof:
            run(layer)
            C.sync(device)
        profiles.append(f"{name}, one run under torch.profiler, the largest self times:\n\n"
                        "```\n" + prof.key_averages().table(
                            sort_by=sort_by, row_limit=8, max_name_column_width=60) + "```")
    records = [dict(implementation=name, batch=args.batch, chars=args.chars,
                    frames=args.frames, seconds=seconds[name], median_s=C.median(seconds[name]))
               for name in layers]
    return records, "\n\n".join(profiles)


def attention_table(records: List[dict]) -> str:
    reference = records[0]
    headers = ["implementation", "B, chars, steps of the decoder", "runs",
               "s (forward + backward)", f"time vs {reference['implementation']}"]
    rows = [[r["implementation"], f"{r['batch']}, {r['chars']}, {r['frames']}",
             str(len(r["seconds"])), f"{r['median_s']:.3f}",
             C.fmt_ratio(r["median_s"] / reference["median_s"])] for r in records]
    return C.markdown_table(headers, rows)


def format_record(r: dict) -> str:
    return (f"{r['implementation']}: {r['median_s']:.3f} s/step (steps "
            + " ".join(f"{s:.3f}" for s in r["seconds"])
            + f"), peak +{r['peak_mib']:.0f} MiB, saved {r['saved_mib']:.0f} MiB of which "
            f"attention {r['attention_saved_mib']:.0f}, loss {r['first_loss']:.6f}")


def table(records: List[dict], targets: bool) -> str:
    """The records as a markdown table; targets: add the issue's targets of ours against
    eager (at the CPU's sizes)."""
    reference = records[0]
    headers = ["implementation", "B, chars, frames", "steps", "s/step", "peak MiB",
               "saved MiB", "attention saved MiB (share)", "weights saved MiB", "first loss"]
    if len(records) > 1:
        headers += [f"time vs {reference['implementation']}",
                    f"peak vs {reference['implementation']}"]
    if targets:
        headers += ["target ours/eager"]
    rows = []
    for r in records:
        row = [r["implementation"], f"{r['batch']}, {r['chars']}, {r['frames']}",
               str(len(r["seconds"])), f"{r['median_s']:.3f}", f"{r['peak_mib']:.0f}",
               f"{r['saved_mib']:.0f}",
               f"{r['attention_saved_mib']:.0f} ({r['attention_saved_mib'] / r['saved_mib']:.0%})",
               f"{r['weights_saved_mib']:.0f}", f"{r['first_loss']:.6f}"]
        if len(records) > 1:
            row += [C.fmt_ratio(r["median_s"] / reference["median_s"]),
                    C.fmt_ratio(r["peak_mib"] / reference["peak_mib"])]
        if targets:
            row.append("; ".join(
                f"{what} <= {TARGETS[what]:.1f}: "
                + ("met" if r[key] / reference[key] <= TARGETS[what] else "MISSED")
                for what, key in (("time", "median_s"), ("peak", "peak_mib")))
                if r["implementation"] == "ours" else "-")
        rows.append(row)
    return C.markdown_table(headers, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None,
                   help=f"default {SIZES['cpu'][0]} on the CPU, {SIZES['cuda'][0]} on CUDA, "
                        f"{QUICK_SIZES[0]} with --quick")
    p.add_argument("--chars", type=int, default=None,
                   help=f"padded text length (default {SIZES['cpu'][1]})")
    p.add_argument("--frames", type=int, default=None,
                   help=f"padded mel frames (default {SIZES['cpu'][2]} on the CPU, "
                        f"{SIZES['cuda'][2]} on CUDA, {QUICK_SIZES[2]} with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per implementation (default 5, 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {QUICK_SIZES} and 2 steps unless given: a smoke run")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                   help=f"comma-separated: {','.join(IMPLEMENTATIONS)} (the first is the "
                        "reference of the ratios and the weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads (default: torch's, %(default)s here)")
    p.add_argument("--output", default=None,
                   help="write the markdown table and machine info to this .md (and the "
                        "records as JSON beside it); a folder: to "
                        "<folder>/tacotron2-<machine>-<date>.md")
    p.add_argument("--attention-alone", action="store_true",
                   help="time the decoder's attention by itself at the same sizes, with a "
                        "profile of each implementation (see the module's docstring)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = QUICK_SIZES if args.quick else SIZES["cuda" if cuda else "cpu"]
    for name, default in zip(("batch", "chars", "frames"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    for name in ("batch", "chars", "frames", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.impls = C.parse_list(p, "impls", args.impls, IMPLEMENTATIONS)
    if not args.impls:
        p.error("--impls: name at least one implementation")
    if args.impls[0] in BOUNDS:
        p.error(f"--impls: the first implementation is the reference of the losses and "
                f"the ratios; {args.impls[0]} is a bound, not an attention of the model")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if not cuda and not args.attention_alone and not C.peak_rss_supported():
        p.error("peak memory on the CPU needs a writable /proc/self/clear_refs (Linux)")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:  # the child process of a CPU peak measurement
        return memory_child(args)
    config = Tacotron2Config()
    model = (f"Tacotron 2, {parameter_count(Tacotron2(config)):,} parameters: "
             + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
    info = C.print_benchmark_info(
        args.device, attention_ext.build_info(),
        f"B={args.batch} chars={args.chars} frames={args.frames} float32, "
        f"steps={args.steps} after 1 warm-up, seed={args.seed}", extra={"model": model})
    if args.attention_alone:
        benchmark = "tacotron2_attention"
        records, profiles = attention_alone(args)
        text = attention_table(records) + "\n\n" + ATTENTION_NOTE + "\n\n" + profiles
    else:
        benchmark = "tacotron2"
        records = run(args, argv)
        # The targets are for the CPU at its sizes, ours against eager.
        targets = (not args.device.startswith("cuda") and args.impls[0] == "eager"
                   and "ours" in args.impls
                   and (args.batch, args.chars, args.frames) == SIZES["cpu"])
        text = table(records, targets) + "\n\n" + NOTE
    print("\n" + text)
    if args.output:
        path = args.output
        if os.path.isdir(path):
            path = C.result_stem(path, benchmark, args.device) + ".md"
        C.write_output(path, info, text, records={benchmark: records})


if __name__ == "__main__":
    main()
