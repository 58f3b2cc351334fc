"""The demo's checkpoint: a Seq2Seq checkpoint whose metadata holds what the demo needs
beyond the weights (its vocabularies, locales and year window), checked at load."""
from __future__ import annotations

from typing import List

import torch

from ..seq2seq import Seq2Seq, Vocabulary
from . import dates as D
from . import ATTENTIONS, UserError

CHECKPOINT_FORMAT = "attention_ext.demo/2"


def save(model: Seq2Seq, path: str, source: Vocabulary, target: Vocabulary,
         attention: str) -> None:
    metadata = {"format": CHECKPOINT_FORMAT, "attention": attention,
                "source": source.to_dict(), "target": target.to_dict(),
                "locales": list(D.LOCALES), "first_year": D.FIRST_YEAR}
    try:
        model.save(path, metadata)
    except (OSError, RuntimeError) as e:
        raise UserError(f"--save {path!r}: {e}") from None
    print(f"saved the model to {path}")


def load(path: str, device: torch.device):
    """(model, source vocabulary, target vocabulary, locales) of the demo's checkpoint at
    path, the model on device and ready to decode."""
    try:
        model = Seq2Seq.load(path, map_location=device)
    except ValueError as e:
        raise UserError(f"--load: {e}") from None
    meta = model.metadata
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--load {path!r}: a Seq2Seq checkpoint, but not one saved by this "
                        f"demo (it lacks the demo's vocabularies and locales)")
    if meta.get("first_year") != D.FIRST_YEAR:
        raise UserError(f"--load {path!r}: saved for the years from {meta.get('first_year')}, "
                        f"this demo reads two-digit years from {D.FIRST_YEAR}")
    try:
        source, target = (_vocabulary(meta, key) for key in ("source", "target"))
        locales = _strings(meta, "locales")
        fits = (meta.get("attention") in ATTENTIONS
                and len(source) == model.encoder.vocab_size
                and len(target) == model.decoder.vocab_size
                and (target.bos_idx, target.eos_idx) == (model.bos_idx, model.eos_idx)
                and all(D.locale_token(name) in source for name in locales))
    except (TypeError, ValueError) as e:
        raise UserError(f"--load {path!r}: the demo's metadata is invalid: {e}") from None
    if not fits:
        raise UserError(f"--load {path!r}: the demo's metadata does not fit the model (its "
                        f"attention, vocabularies or locales)")
    return model, source, target, locales


def _vocabulary(meta: dict, key: str) -> Vocabulary:
    try:
        return Vocabulary.from_dict(meta.get(key))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def _strings(meta: dict, key: str) -> List[str]:
    value = meta.get(key)
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{key} must be a non-empty list of strings")
    return value
