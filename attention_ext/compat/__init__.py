"""Drop-in replacements for attention layers of other projects, built on the fused ops.

* :class:`GlobalAttention` — OpenNMT-py's ``onmt.modules.GlobalAttention``.
* :class:`BahdanauAttention` — the PyTorch seq2seq translation tutorial's layer.

Their parameter names and shapes match the originals, so state_dicts load unchanged.
"""
from .opennmt import GlobalAttention
from .tutorial import BahdanauAttention

__all__ = ["GlobalAttention", "BahdanauAttention"]
