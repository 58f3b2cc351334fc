"""Drop-in replacements for attention layers of other projects, built on the fused ops.

* :class:`GlobalAttention` — OpenNMT-py's ``onmt.modules.GlobalAttention``.
* :class:`BahdanauAttention` — the PyTorch seq2seq translation tutorial's layer.
* :class:`tacotron2.Attention` — NVIDIA/tacotron2's location-sensitive ``Attention``.
* :class:`AttLoc` — ESPnet's location-aware ``AttLoc``.
* :class:`LocationAwareAttention` — SpeechBrain's ``LocationAwareAttention``.

Their parameter names and shapes match the originals, so state_dicts load unchanged.
"""
from . import tacotron2
from .espnet import AttLoc
from .opennmt import GlobalAttention
from .speechbrain import LocationAwareAttention
from .tutorial import BahdanauAttention

__all__ = ["GlobalAttention", "BahdanauAttention", "tacotron2", "AttLoc",
           "LocationAwareAttention"]
