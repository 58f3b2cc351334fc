"""The demo's data: dates written out in many locales by Babel from the Unicode CLDR data
(offline), paired with their ISO 8601 form, at the character level.

Every source starts with its locale's tag token, which makes numeric formats unambiguous
(05/06/26 is 6 May in en_US and 5 June in fr_FR), and years stay inside a 100-year window,
which makes two-digit years unambiguous too. The split is by date: no date of the test set
is written in any form during training.
"""
from __future__ import annotations

import datetime
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from babel import Locale, dates

from ..seq2seq import Vocabulary, pad_batch

# 44 locales, 19 of them in 13 non-Latin scripts (Cyrillic, Greek, Hebrew, Arabic,
# Devanagari, Bengali, Tamil, Thai, Georgian, Armenian, Ethiopic, Han, Hangul).
LOCALES = (
    "en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "es_MX", "it_IT", "pt_BR", "pt_PT", "nl_NL",
    "sv_SE", "da_DK", "nb_NO", "fi_FI", "pl_PL", "cs_CZ", "hu_HU", "ro_RO", "hr_HR", "tr_TR",
    "id_ID", "vi_VN", "lt_LT", "ca_ES", "sw_KE",
    "ru_RU", "uk_UA", "bg_BG", "sr_RS", "el_GR", "he_IL", "ar_EG", "fa_IR", "hi_IN", "bn_BD",
    "ta_IN", "th_TH", "ka_GE", "hy_AM", "am_ET", "zh_CN", "zh_TW", "ja_JP", "ko_KR",
)

# CLDR's four standard lengths, two skeletons (the locale's own order and punctuation for
# these fields) and two fixed patterns (the locale's names in a foreign order).
FORMATS = (
    ("standard", "full"), ("standard", "long"), ("standard", "medium"), ("standard", "short"),
    ("skeleton", "yMMMEd"), ("skeleton", "yMd"),
    ("pattern", "d MMMM y"), ("pattern", "EEE d MMM yy"),
)

# Two-digit years name the year of this window that ends in them.
FIRST_YEAR = 1950
LAST_YEAR = FIRST_YEAR + 99

# The split does not depend on the training seed, so every run and checkpoint shares one
# test set.
SPLIT_SEED = 20261123
TEST_FRACTION = 0.05

NOISE_RATE = 0.3

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
TARGET_CHARACTERS = "0123456789-"
TARGET_LENGTH = len("yyyy-mm-dd") + 1  # and the end token


def write_date(date: datetime.date, locale: Locale, fmt: Tuple[str, str]) -> str:
    """date in locale's words, in one of FORMATS."""
    kind, spec = fmt
    if kind == "skeleton":
        return dates.format_skeleton(spec, date, locale=locale)
    return dates.format_date(date, spec, locale=locale)


def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _neighbour(text: str, i: int, step: int) -> str:
    """The nearest character from i in direction step that is neither punctuation nor a
    format control (the bidirectional marks Arabic puts around separators)."""
    i += step
    while 0 <= i < len(text) and (unicodedata.category(text[i]) == "Cf"
                                  or _is_punctuation(text[i])):
        i += step
    return text[i] if 0 <= i < len(text) else ""


def drop_punctuation(text: str) -> str:
    """text without its punctuation, except separators between two digits (removing the
    dots of 1.12.26 would make it 11226, which also reads as 11.2.26; the same holds for
    a run of marks such as the ")-(" of (23)-(11))."""
    kept = [ch for i, ch in enumerate(text)
            if not _is_punctuation(ch)
            or (_neighbour(text, i, -1).isdigit() and _neighbour(text, i, 1).isdigit())]
    return re.sub("  +", " ", "".join(kept)).strip()


def change_case(text: str, rng: random.Random) -> str:
    return rng.choice((str.upper, str.lower, str.title))(text)


def add_spaces(text: str, rng: random.Random) -> str:
    """One run of spaces made longer, or a space added after a punctuation mark; digit runs
    are never split."""
    spots = [i for i, ch in enumerate(text) if ch == " " or _is_punctuation(ch)]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[: i + 1] + " " * rng.randint(1, 2) + text[i + 1:]


def add_noise(text: str, rng: random.Random) -> str:
    """A noisy variant: one to three of random case, dropped punctuation, extra spaces."""
    kinds = [k for k in ("case", "punctuation", "spaces") if rng.random() < 0.5] or [
        rng.choice(("case", "punctuation", "spaces"))]
    noisy = text
    if "punctuation" in kinds:
        noisy = drop_punctuation(noisy)
    if "case" in kinds:
        noisy = change_case(noisy, rng)
    if "spaces" in kinds or noisy == text:  # case and punctuation may change nothing
        noisy = add_spaces(noisy, rng)
    return noisy


def all_dates() -> List[datetime.date]:
    first, last = datetime.date(FIRST_YEAR, 1, 1), datetime.date(LAST_YEAR, 12, 31)
    return [first + datetime.timedelta(days=i) for i in range((last - first).days + 1)]


def split_dates() -> Tuple[List[datetime.date], List[datetime.date]]:
    """(train, test) dates of the window; the test dates are a fixed random TEST_FRACTION."""
    days = all_dates()
    random.Random(SPLIT_SEED).shuffle(days)
    n_test = int(len(days) * TEST_FRACTION)
    return sorted(days[n_test:]), sorted(days[:n_test])


@dataclass(frozen=True)
class Example:
    locale: str
    text: str
    iso: str


class DateWriter:
    """Draws examples: a date from ``days``, a locale, a format, and a noisy variant at
    NOISE_RATE."""

    def __init__(self, days: Sequence[datetime.date], locales: Sequence[str] = LOCALES):
        self.days = list(days)
        self.locales = list(locales)
        self._parsed = {name: Locale.parse(name) for name in self.locales}

    def example(self, rng: random.Random) -> Example:
        date = rng.choice(self.days)
        locale = rng.choice(self.locales)
        text = write_date(date, self._parsed[locale], rng.choice(FORMATS))
        if rng.random() < NOISE_RATE:
            text = add_noise(text, rng)
        return Example(locale, text, date.isoformat())

    def examples(self, n: int, rng: random.Random) -> List[Example]:
        return [self.example(rng) for _ in range(n)]


def locale_token(locale: str) -> str:
    return f"<{locale}>"


def source_vocabulary(locales: Sequence[str] = LOCALES) -> Vocabulary:
    """Padding, unknown, one tag per locale, then every character that the formats and the
    noise can write in these locales (case variants included): all month and weekday names
    appear in the first week of every month of a year."""
    chars = set(TARGET_CHARACTERS)
    days = [datetime.date(2024, m, d) for m in range(1, 13) for d in range(1, 8)]
    for name in locales:
        locale = Locale.parse(name)
        for fmt in FORMATS:
            for day in days:
                text = write_date(day, locale, fmt)
                for variant in (text, text.upper(), text.lower(), text.title()):
                    chars.update(variant)
    return Vocabulary([locale_token(n) for n in locales] + sorted(chars), pad=PAD, bos=None,
                      eos=None, unk=UNK)


def target_vocabulary() -> Vocabulary:
    return Vocabulary(TARGET_CHARACTERS, pad=PAD, bos=BOS, eos=EOS)


@dataclass
class Batch:
    """Seq2Seq.loss's arguments: src (B, S) ids, the locale tag first, and src_lengths (B,);
    tgt (B, T) the ISO characters (neither bos nor eos), and tgt_lengths (B,)."""

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt: torch.Tensor
    tgt_lengths: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.src, self.src_lengths, self.tgt,
                                              self.tgt_lengths)))


def encode_sources(pairs: Sequence[Tuple[str, str]], vocab: Vocabulary):
    """(locale, text) pairs -> src (B, S) and src_lengths (B,)."""
    return pad_batch([[vocab.id(locale_token(locale))] + vocab.encode(text)
                      for locale, text in pairs], vocab.pad_idx)


def encode_batch(examples: Sequence[Example], source: Vocabulary, target: Vocabulary) -> Batch:
    src, src_lengths = encode_sources([(e.locale, e.text) for e in examples], source)
    tgt, tgt_lengths = pad_batch([target.encode(e.iso) for e in examples], target.pad_idx)
    return Batch(src, src_lengths, tgt, tgt_lengths)


def decode_target(ids: Sequence[int], target: Vocabulary) -> str:
    """Characters up to the end token."""
    return "".join(target.decode(ids))


def script(text: str) -> str:
    """The Unicode script of text's first letter, as its character name begins (LATIN,
    CYRILLIC, ARABIC, CJK, HANGUL, ...)."""
    for ch in text:
        if ch.isalpha():
            return unicodedata.name(ch, "UNKNOWN").split()[0]
    return "NONE"


def locale_script(locale: str) -> str:
    """The script of locale's month names."""
    return script(dates.get_month_names("wide", locale=locale)[1])
