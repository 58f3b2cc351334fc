"""Benchmark of the attention_ext.compat drop-ins against the layers they replace, per
decoder step: OpenNMT-py's GlobalAttention and the PyTorch seq2seq tutorial's
BahdanauAttention, both in eager PyTorch as their projects write them
(tests/eager_layers.py), loaded with the same state_dict.

  decode  one inference step, no autograd: a (B, D) query (OpenNMT) / (B, 1, H) (tutorial,
          whose layer recomputes Ua(keys) at every step; ours reuses it)
  train   teacher forcing with backward to the inputs and every parameter: OpenNMT's layer
          on a (B, Tq, D) query; the tutorial's called once per step in a loop, as its
          decoder does; reported per step (time / Tq)

Interleaved in one process, medians, ratio ours/eager (below 1: ours is faster). OpenNMT
rows mask with src_len uniform in [S/2, S]; the tutorial has no mask.

Usage: python benchmarks/bench_compat.py [--quick] [--layers ...] [--output FILE]
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The baselines are the tests' eager layers (tests/eager_layers.py), which are not installed.
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import _common as C  # noqa: E402
from bench_layers import check_agreement  # noqa: E402
from eager_layers import EagerGlobalAttention, EagerTutorialBahdanau  # noqa: E402

from attention_ext.compat import BahdanauAttention, GlobalAttention  # noqa: E402

SHAPES = {"decode": (64, 1, 100, 512), "train": (32, 30, 50, 512)}
LAYERS = {
    "onmt_dot": (lambda D: GlobalAttention(D, attn_type="dot"),
                 lambda D: EagerGlobalAttention(D, attn_type="dot")),
    "onmt_general": (lambda D: GlobalAttention(D, attn_type="general"),
                     lambda D: EagerGlobalAttention(D, attn_type="general")),
    "onmt_mlp": (lambda D: GlobalAttention(D, attn_type="mlp"),
                 lambda D: EagerGlobalAttention(D, attn_type="mlp")),
    "tutorial": (BahdanauAttention, EagerTutorialBahdanau),
}


def build_fns(name, shape, seed):
    """{"ours", "eager"} -> zero-argument callables for one mode of `shape`."""
    B, Tq, S, D = shape
    torch.manual_seed(seed)
    make_ours, make_eager = LAYERS[name]
    ours, eager = make_ours(D), make_eager(D)
    eager.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn((B, Tq, D), generator=gen)
    memory = torch.randn((B, S, D), generator=gen)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen)
    tutorial = name == "tutorial"

    def step(layer, q):
        if tutorial:
            return layer(q, memory)[0]
        return layer(q, memory, lengths)[0]

    if Tq == 1:
        q1 = query if tutorial else query[:, 0]

        def decode(layer):
            def run():
                with torch.no_grad():
                    return step(layer, q1)
            return run
        return {"ours": decode(ours), "eager": decode(eager)}

    g = torch.randn((B, Tq, D), generator=gen)

    def train(layer):
        params = list(layer.parameters())

        def run():
            q = query.detach().requires_grad_()
            m = memory.detach().requires_grad_()
            if tutorial:  # one call per decoder step, as the tutorial's decoder makes
                out = torch.cat([layer(q[:, t:t + 1], m)[0] for t in range(Tq)], 1)
            else:
                out = layer(q, m, lengths)[0]
            return torch.autograd.grad(out, [q, m] + params, g)
        return run
    return {"ours": train(ours), "eager": train(eager)}


def main(argv=None):
    C.per_step_main(__doc__, list(LAYERS), SHAPES, build_fns, check=check_agreement, argv=argv)


if __name__ == "__main__":
    main()
