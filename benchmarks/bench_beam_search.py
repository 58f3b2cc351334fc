"""Beam search with the beams sharing the encoder memory (memory_index) vs tiling it.

One Seq2Seq (bidirectional LSTM encoder, LSTM decoder, hidden 512, vocabulary 8000,
randomly initialised) decodes B = 64 sources of S = 50 tokens with beam 5 for a fixed
number of steps (min_len = max_len, so every variant does the same work):

- ``memory_index``: attention_ext.seq2seq's beam search; the layer's memory (and its
  projection) is precomputed once per sentence and every beam reads it in place.
- ``tile once``: the beams read copies of their sentence's memory, tiled beam times at the
  start and gathered again only when sentences finish (OpenNMT-py, JoeyNMT).
- ``tile every step``: the copies are gathered again at every step, as the beams are
  reordered (fairseq's reorder_encoder_out).

The search starts from the encoder's outputs (memory and final state), computed once
beforehand: the encoder is the same in every variant. Time: medians of interleaved runs.
Memory: the rise of the peak above the memory held before the search (CPU: the process's
peak RSS; CUDA: torch's peak allocation), which includes the memory's copies (tiling
variants), the step's activations and the hypotheses.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import attention_ext  # noqa: E402
from attention_ext.nn import PrecomputedMemory  # noqa: E402
from attention_ext.seq2seq import (BahdanauDecoder, Encoder, LengthPenalty,  # noqa: E402
                                   LuongDecoder, Seq2Seq)
from attention_ext.seq2seq.search import beam_search  # noqa: E402


class TiledMemory:
    """A decoder whose beams attend copies of their sentence's memory: the baseline. It
    gathers the copies for the rows' memory_index when the rows change (``every_step``:
    at every step), then calls the real decoder with one memory row per query row."""

    def __init__(self, decoder, every_step: bool):
        self.decoder, self.every_step = decoder, every_step
        self.vocab_size = decoder.vocab_size
        self.tiled, self.rows = None, -1

    def init_state(self, encoder_state, memory_index=None):
        self.tiled, self.rows = None, -1
        return self.decoder.init_state(encoder_state, memory_index)

    def step(self, tokens, state, memory: PrecomputedMemory):
        index = state.memory_index
        if self.every_step or index.shape[0] != self.rows:
            def gather(t):
                return None if t is None else t.index_select(0, index.to(t.device))

            values = gather(memory.values)
            keys = values if memory.keys is memory.values else gather(memory.keys)
            self.tiled = PrecomputedMemory(values, keys, gather(memory.lengths),
                                           gather(memory.mask), memory.owner)
            self.rows = index.shape[0]
        logits, weights, new = self.decoder.step(tokens, state._replace(memory_index=None),
                                                 self.tiled)
        return logits, weights, new._replace(memory_index=index)


def build(kind: str, H: int, V: int, device, dtype) -> Seq2Seq:
    enc = Encoder(V, H, H, num_layers=2, bidirectional=True)
    dec = (BahdanauDecoder(V, H, H, num_layers=2) if kind == "bahdanau"
           else LuongDecoder(V, H, H, num_layers=2, score="dot"))
    return Seq2Seq(enc, dec).to(device=device, dtype=dtype).eval()


def searches(args, kind, steps, device, dtype):
    """The beam search of each variant on one model and batch: {name: callable}."""
    torch.manual_seed(args.seed)
    model = build(kind.split("-")[0], args.hidden, args.vocab, device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    src = torch.randint(3, args.vocab, (args.batch, args.src_len), generator=gen).to(device)
    lengths = torch.randint(args.src_len // 2, args.src_len + 1, (args.batch,), generator=gen)
    lengths[0] = args.src_len
    variants = {"memory_index": model.decoder,
                "tile once": TiledMemory(model.decoder, every_step=False),
                "tile every step": TiledMemory(model.decoder, every_step=True)}

    # The encoder runs once, before: every variant shares it, and a search takes its
    # outputs, as a toolkit's beam search does.
    with torch.no_grad():
        memory, state = model.encode(src, lengths)

    def search(dec):
        @torch.no_grad()
        def run():
            return beam_search(dec, memory, state, bos_idx=model.bos_idx,
                               eos_idx=model.eos_idx, beam_size=args.beam, max_len=steps,
                               length_penalty=LengthPenalty(), n_best=1, min_len=steps)
        return run

    return {name: search(dec) for name, dec in variants.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="bahdanau,luong-dot")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src-len", type=int, default=50)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default 50, 10 --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 2 --quick)")
    p.add_argument("--quick", action="store_true", help="10 steps, 2 rounds (about a minute on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the markdown table and machine info")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (10 if args.quick else 50)
    repeats = args.repeats or (2 if args.quick else 5)
    device, dtype = args.device, torch.float32
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: no CUDA device here")
    if not device.startswith("cuda") and not C.peak_rss_supported():
        p.error("peak memory on the CPU needs a writable /proc/self/clear_refs (Linux)")

    if args.memory_of:  # the child process of C.peak_rise_in_fresh_process
        kind, variant = args.memory_of.split(":")
        fns = searches(args, kind, steps, device, dtype)
        print(C.peak_memory_rise_mib(fns[variant], device))
        return

    info = C.print_benchmark_info(device, attention_ext.build_info(),
                                  f"B={args.batch} S={args.src_len} hidden={args.hidden} "
                                  f"vocab={args.vocab} beam={args.beam} steps={steps} "
                                  f"float32, rounds={repeats}, seed={args.seed}")
    headers = ["model", "variant", "ms / search", "x memory_index", "peak rise MiB",
               "x memory_index (memory)"]
    rows = []
    for kind in [m for m in args.models.split(",") if m]:
        if kind not in ("bahdanau", "luong-dot"):
            p.error(f"unknown model {kind!r} (bahdanau, luong-dot)")
        fns = searches(args, kind, steps, device, dtype)
        outs = {name: fn() for name, fn in fns.items()}
        for name, out in outs.items():  # the same hypotheses whatever holds the memory
            for b in range(args.batch):
                if not torch.equal(out.hypotheses[b][0], outs["memory_index"].hypotheses[b][0]):
                    raise SystemExit(f"{kind}: {name} decoded sentence {b} differently")
        del outs
        samples = C.interleaved(fns, repeats, device, target_s=0.0, min_repeats=repeats)
        med = {k: C.median(s) for k, s in samples.items()}
        mem = {name: C.peak_rise_in_fresh_process(__file__, argv, f"{kind}:{name}")
               for name in fns}
        for name in fns:
            row = [kind, name, C.fmt_ms(med[name]),
                   C.fmt_ratio(med[name] / med["memory_index"]), f"{mem[name]:.1f}",
                   C.fmt_ratio(mem[name] / mem["memory_index"])]
            rows.append(row)
            print("  ".join(row), flush=True)
    table = C.markdown_table(headers, rows)
    note = ("Medians of interleaved runs of the search from the encoder's outputs. "
            "x memory_index > 1: the variant takes that many times memory_index's time "
            "or peak memory rise.")
    print("\n" + table + "\n\n" + note)
    if args.output:
        C.write_output(args.output, info, table + "\n\n" + note)


if __name__ == "__main__":
    main()
