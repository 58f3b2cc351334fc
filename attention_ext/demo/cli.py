"""The command line of ``python -m attention_ext.demo``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import ATTENTIONS, UserError

# What the demo imports beyond the core package: the optional extra "demo".
EXTRA = ("babel", "tqdm", "matplotlib")

# The training run's defaults.
TRAINING = {"attention": "bahdanau", "steps": 800, "batch_size": 128, "seed": 0}


def _integer(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attention_ext.demo",
        description="Trains a character-level Seq2Seq model with attention_ext's fused "
                    "attention to rewrite dates written in many locales (Babel's CLDR data) as "
                    "ISO 8601, then shows its accuracy on unseen dates, examples, greedy and "
                    "beam search results, its training speed against eager attention, and "
                    "attention heatmaps. With --load and --normalize, rewrites one date with "
                    "a saved model. Multi-process: torchrun --nproc_per_node=N -m "
                    "attention_ext.demo.")
    # The training options default to None so that giving one with --load is an error.
    p.add_argument("--attention", choices=ATTENTIONS,
                   help="the decoder and its score (default: bahdanau)")
    p.add_argument("--steps", type=_integer(1),
                   help=f"training steps (default: {TRAINING['steps']}, under 2 minutes on 2 "
                        f"CPU cores)")
    p.add_argument("--batch-size", type=_integer(1), default=TRAINING["batch_size"],
                   help=f"examples per step over all processes, also those of the speed "
                        f"comparison (default: {TRAINING['batch_size']})")
    p.add_argument("--seed", type=_integer(0),
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
    if args.load is not None:
        given = [f"--{name}" for name in ("attention", "steps", "seed")
                 if getattr(args, name) is not None]
        if given:
            p.error(f"{', '.join(given)}: these set up training, and --load trains nothing")
    if args.normalize is not None and args.save is not None:
        p.error("--save: --normalize saves nothing")
    if args.save is not None and not args.save.strip():
        p.error("--save: the path is empty")
    for name, default in TRAINING.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
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
        if device.index:
            raise UserError(f"--device {name!r}: the CPU has no index; say cpu")
        return torch.device("cpu")
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
    try:
        args = parse_args(argv)
        try:
            from . import run
        except ModuleNotFoundError as e:
            if e.name not in EXTRA:
                raise
            print(f"error: the demo needs the optional dependencies {', '.join(EXTRA)} "
                  f"({e.name} is missing); install them with: pip install "
                  f"'attention_ext[demo]'", file=sys.stderr)
            return 1
        return run.run(args, resolve_device(args.device))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()

