"""Attention heatmaps: source characters against output characters, as PNG files."""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
from matplotlib import font_manager, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font


@functools.lru_cache(maxsize=1)
def _fonts() -> Tuple[List[str], frozenset]:
    """The sans-serif families matplotlib is set to use that are installed, then any Noto
    Sans family (it falls back from one to the next per glyph), and the characters they have
    between them."""
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    families = [name for name in rcParams["font.sans-serif"] if name in installed]
    families += sorted(n for n in installed if n.startswith("Noto Sans") and n not in families)
    chars = set()
    for name in families:
        path = font_manager.findfont(font_manager.FontProperties(family=name),
                                     fallback_to_default=False)
        chars.update(map(chr, FT2Font(path).get_charmap()))
    return families, frozenset(chars)


def drawable(text: str) -> bool:
    """Whether the installed fonts have every character of text."""
    return set(text) <= _fonts()[1] | {" "}


def _label(token: str) -> str:
    return {" ": "\u2423", "\u202f": "\u2423", "\u00a0": "\u2423"}.get(token, token)


def save_heatmap(weights: torch.Tensor, source: Sequence[str], output: Sequence[str],
                 title: str, path: str) -> str:
    """weights (len(output), len(source)) as a heatmap at path (PNG); returns path."""
    families = _fonts()[0]
    fig = Figure(figsize=(max(4.0, 0.32 * len(source) + 1.5), 0.32 * len(output) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(weights.float().numpy(), cmap="viridis", aspect="auto", vmin=0.0,
                      vmax=1.0)
    ax.set_xticks(range(len(source)), [_label(t) for t in source], family=families)
    for label, token in zip(ax.get_xticklabels(), source):
        if len(token) > 1:  # the locale tag
            label.set_rotation(90)
    ax.set_yticks(range(len(output)), list(output), family=families)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(title, family=families, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
