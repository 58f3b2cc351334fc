"""Benchmark of the attention_ext.nn layers against their eager originals, per decoder step.

Each layer is timed against an eager PyTorch version of the same published formula that
shares its parameters (written as OpenNMT's GlobalAttention / TF-Addons write it: memory
projection computed once per batch, masked_fill(-inf) + softmax, bmm, Linear):
  decode   one inference step: a (B, D) query against a precomputed memory, no autograd
           (the precompute is outside the timed call, as a decoder loop reuses it)
  train    teacher forcing: precompute + a (B, Tq, D) query + backward to the query, the
           memory and every parameter; reported per decoder step (time / Tq)

All implementations run interleaved in one process; medians of per-call times; ratio
ours/eager (below 1: ours is faster). Lengths uniform in [S/2, S] (seeded).
On a shared machine (see the load average printed first) multi-threaded calls of a few ms
wait for a scheduler slice (docs/performance.md, "Shared cores"); --threads 1 then gives
the meaningful numbers.

Usage: python benchmarks/bench_layers.py [--quick] [--layers ...] [--output FILE]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from attention_ext.nn import BahdanauAttention, LuongAttention  # noqa: E402

# name -> (B, Tq, S, D): D is query_dim = memory_dim = units.
SHAPES = {"decode": (64, 1, 100, 512), "train": (32, 30, 50, 512)}
LAYERS = {
    "luong_dot": lambda D: LuongAttention(D, score="dot"),
    "luong_general": lambda D: LuongAttention(D, score="general"),
    "luong_concat": lambda D: LuongAttention(D, score="concat"),
    "bahdanau": lambda D: BahdanauAttention(D, D, D),
    "bahdanau_norm": lambda D: BahdanauAttention(D, D, D, normalize=True),
}


# ----------------------------------------------------------------------------- eager originals

def eager_precompute(layer, memory, lengths):
    """(memory, keys, valid (B, 1, S)) as the eager layers keep them per source batch."""
    S = memory.shape[1]
    valid = (torch.arange(S)[None, :] < lengths[:, None])[:, None, :]
    if isinstance(layer, BahdanauAttention):
        keys = layer.U(memory)
        if layer.b is not None:
            keys = keys + layer.b
    elif layer.score == "concat":
        keys = memory @ layer.W_a.weight[:, layer.query_dim:].t()
    else:
        keys = memory
    return memory, keys, valid


def eager_step(layer, query, pre):
    """The layer's formula in plain PyTorch; query (B, Tq, D) -> (output, weights)."""
    memory, keys, valid = pre
    if isinstance(layer, BahdanauAttention) or layer.score == "concat":
        if isinstance(layer, BahdanauAttention):
            wq, v = layer.W(query), layer.v
            if layer.normalize:
                v = layer.g * v / v.norm()
        else:
            wq, v = query @ layer.W_a.weight[:, : layer.query_dim].t(), layer.v_a
        scores = torch.tanh(wq[:, :, None, :] + keys[:, None, :, :]) @ v
    else:
        q = layer.W_a(query) if layer.score == "general" else query
        scores = torch.bmm(q, keys.transpose(1, 2))
    if isinstance(layer, LuongAttention) and layer.scale is not None:
        scores = scores * layer.scale
    if isinstance(layer, LuongAttention) and layer.g is not None:
        scores = layer.g * scores
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    context = torch.bmm(weights, memory)
    if isinstance(layer, LuongAttention) and layer.W_c is not None:
        context = torch.tanh(layer.W_c(torch.cat([context, query], dim=-1)))
    return context, weights


# ----------------------------------------------------------------------------- timing

def build_fns(layer, shape, seed):
    """{"ours", "eager"} -> zero-argument callables for one mode of `shape`."""
    B, Tq, S, D = shape
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn((B, Tq, D), generator=gen)
    memory = torch.randn((B, S, D), generator=gen)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen)
    params = list(layer.parameters())
    if Tq == 1:  # decode: one step against a memory precomputed outside the timed call
        q2 = query[:, 0]
        with torch.no_grad():
            pre_ours = layer.precompute(memory, lengths=lengths)
            pre_eager = eager_precompute(layer, memory, lengths)

        def ours():
            with torch.no_grad():
                return layer(q2, pre_ours)[0]

        def eager():
            with torch.no_grad():
                return eager_step(layer, q2[:, None], pre_eager)[0][:, 0]
        return {"ours": ours, "eager": eager}

    q = query.requires_grad_()
    m = memory.requires_grad_()
    g = torch.randn((B, Tq, D), generator=gen)

    def train(step):
        def run():
            out = step()
            return torch.autograd.grad(out, [q, m] + params, g)
        return run

    return {"ours": train(lambda: layer(q, layer.precompute(m, lengths=lengths))[0]),
            "eager": train(lambda: eager_step(layer, q, eager_precompute(layer, m, lengths))[0])}


def check_agreement(outs):
    """Ours and eager compute the same thing (guards the timings)."""
    a, b = outs["ours"], outs["eager"]
    a = [a] if isinstance(a, torch.Tensor) else list(a)
    b = [b] if isinstance(b, torch.Tensor) else list(b)
    for i, (x, y) in enumerate(zip(a, b)):
        err = (x - y).abs().max().item()
        if not err <= 1e-3 * max(1.0, y.abs().max().item()):
            raise SystemExit(f"ours and eager disagree (output {i}): max abs diff {err:.3g}")


def main(argv=None):
    def build(name, shape, seed):
        return build_fns(LAYERS[name](shape[3]), shape, seed)

    C.per_step_main(__doc__, list(LAYERS), SHAPES, build, check=check_agreement, argv=argv)


if __name__ == "__main__":
    main()
