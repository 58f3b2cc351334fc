"""The command line of ``python -m attention_ext.demo``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import ATTENTIONS

DEFAULT_STEPS = 800
DEFAULT_BATCH = 128


class UserError(Exception):
    """A mistake in the command line or in what it names: printed without a traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attention_ext.demo",
        description="Trains a character-level Seq2Seq model with attention_ext's fused "
                    "attention to rewrite dates written in 44 locales (Babel's CLDR data) as "
                    "ISO 8601, then shows its accuracy on unseen dates, examples, greedy and "
                    "beam search results, its training speed against eager attention, and "
                    "attention heatmaps. With --load and --normalize, rewrites one date with "
                    "a saved model. Multi-process: torchrun --nproc_per_node=N -m "
                    "attention_ext.demo.")
    p.add_argument("--attention", choices=ATTENTIONS, default="bahdanau",
                   help="the decoder and its score (default: bahdanau)")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"training steps (default: {DEFAULT_STEPS}, under 2 minutes on 2 "
                        f"CPU cores)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH,
                   help=f"examples per step over all processes (default: {DEFAULT_BATCH})")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the weights and the training examples (default: 0)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="where the heatmaps go (default: ./demo-out)")
    p.add_argument("--save", metavar="CKPT", help="save the trained model at CKPT")
    p.add_argument("--load", metavar="CKPT",
                   help="use the model saved at CKPT instead of training one")
    p.add_argument("--normalize", metavar="TEXT",
                   help="with --load: rewrite TEXT (a date written in --locale) as ISO 8601")
    p.add_argument("--locale", help="the locale TEXT is written in, e.g. de_DE")
    return p


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.normalize is not None and args.load is None:
        p.error("--normalize needs --load CKPT (a model saved by a run with --save)")
    if (args.normalize is None) != (args.locale is None):
        p.error("--normalize and --locale go together")
    if args.normalize is not None and not args.normalize.strip():
        p.error("--normalize: the text is empty")
    return args


def resolve_device(name: Optional[str]) -> torch.device:
    import attention_ext

    if name is None:
        cuda = torch.cuda.is_available() and attention_ext.build_info()["with_cuda"]
        return torch.device("cuda" if cuda else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {name!r}: the demo runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: no CUDA device is available here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name!r}: this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s)")
    if not attention_ext.build_info()["with_cuda"]:
        raise UserError(f"--device {name!r}: this build of attention_ext has no CUDA kernels "
                        f"(rebuild it with a CUDA build of torch)")
    return device


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        from . import run  # babel, tqdm and matplotlib: the optional extra "demo"
    except ImportError as e:
        print(f"error: the demo needs the optional dependencies babel, tqdm and matplotlib "
              f"({e}); install them with: pip install 'attention_ext[demo]'", file=sys.stderr)
        return 1
    try:
        return run.run(args, resolve_device(args.device))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()

