"""Token ids in and out of the models: a vocabulary, a batch padded from sequences of ids,
and decoded outputs cut at the end token."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor


class Vocabulary:
    """Token strings <-> ids. The special tokens given come first, in the order pad, bos,
    eos, unk (``None`` leaves one out), then ``tokens`` in their order.

    A source vocabulary needs neither bos nor eos (``Vocabulary(chars, bos=None,
    eos=None)``); a target vocabulary needs both. Both start with the padding token, so they
    share pad_idx 0, as ``Seq2Seq`` requires. Without ``unk``, an unknown token is an error.

        tgt = Vocabulary("0123456789-")
        ids = tgt.encode("2026-12-07")        # no bos or eos: Seq2Seq.loss adds them
        tgt.decode(model.greedy_decode(src, src_lengths, max_len=11)[0].tolist())
    """

    def __init__(self, tokens: Iterable[str], *, pad: str = "<pad>", bos: Optional[str] = "<s>",
                 eos: Optional[str] = "</s>", unk: Optional[str] = None):
        if pad is None:
            raise ValueError("pad must be a token: padding fills every batch")
        specials = {name: token for name, token in
                    (("pad", pad), ("bos", bos), ("eos", eos), ("unk", unk)) if token is not None}
        self.tokens: List[str] = list(specials.values()) + list(tokens)
        self.ids: Dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            if not isinstance(token, str):
                raise TypeError(f"tokens must be strings, got {token!r}")
            if token in self.ids:
                raise ValueError(f"tokens must be distinct (the special tokens included), "
                                 f"got {token!r} twice")
            self.ids[token] = i
        self.specials = specials
        self.pad_idx = self.ids[pad]
        self.bos_idx = None if bos is None else self.ids[bos]
        self.eos_idx = None if eos is None else self.ids[eos]
        self.unk_idx = None if unk is None else self.ids[unk]

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.ids

    def id(self, token: str) -> int:
        """token's id; unk_idx for an unknown token, an error without unk."""
        found = self.ids.get(token, self.unk_idx)
        if found is None:
            raise ValueError(f"token {token!r} is not in the vocabulary, which has no unk token")
        return found

    def encode(self, tokens: Iterable[str]) -> List[int]:
        """The ids of tokens (a string is a sequence of one-character tokens)."""
        return [self.id(token) for token in tokens]

    def decode(self, ids: Iterable[int]) -> List[str]:
        """The tokens of ids up to the first eos, without pad and bos."""
        skip = {self.pad_idx, self.bos_idx}
        out = []
        for i in ids:
            if i == self.eos_idx:
                break
            if i not in skip:
                out.append(self.tokens[i])
        return out

    def to_dict(self) -> dict:
        """Plain values (``Seq2Seq.save``'s metadata takes them); ``from_dict`` reads them."""
        rest = self.tokens[len(self.specials):]
        return {"tokens": rest, **{name: self.specials.get(name)
                                   for name in ("pad", "bos", "eos", "unk")}}

    @classmethod
    def from_dict(cls, state: dict) -> "Vocabulary":
        if not isinstance(state, dict) or not isinstance(state.get("tokens"), list):
            raise ValueError(f"a vocabulary's dict holds its tokens and special tokens, got "
                             f"{state!r:.80}")
        return cls(state["tokens"], **{name: state.get(name) for name in
                                       ("pad", "bos", "eos", "unk")})

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, specials {self.specials})"


def pad_batch(sequences: Sequence[Sequence[int]], pad_idx: int,
              device: Union[str, torch.device, None] = None) -> Tuple[Tensor, Tensor]:
    """Sequences of token ids as one batch: the ids (B, T) in int64, pad_idx past each
    sequence's end, T the longest length, and the lengths (B,) in int64."""
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one sequence")
    lengths = [len(s) for s in sequences]
    ids = torch.full((len(sequences), max(lengths)), pad_idx, dtype=torch.long)
    for row, sequence in zip(ids, sequences):
        row[:len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return ids.to(device), torch.tensor(lengths, dtype=torch.long, device=device)


def until_eos(output, eos_idx: int):
    """Token id lists of a decoding's output, each cut before its first eos_idx: for
    greedy_decode's (B, L) tensor, one list per row; for a BeamSearchResult, one list of
    n_best lists per sentence."""
    if isinstance(output, Tensor):
        if output.dim() != 2:
            raise ValueError(f"output must be greedy_decode's (B, L) tensor, got "
                             f"{tuple(output.shape)}")
        return [_cut(row, eos_idx) for row in output.tolist()]
    hypotheses = getattr(output, "hypotheses", None)
    if hypotheses is None:
        raise TypeError(f"output must be greedy_decode's tensor or a BeamSearchResult, got "
                        f"{type(output).__name__}")
    return [[_cut(h.tolist(), eos_idx) for h in hyps] for hyps in hypotheses]


def _cut(ids: List[int], eos_idx: int) -> List[int]:
    return ids[:ids.index(eos_idx)] if eos_idx in ids else ids
