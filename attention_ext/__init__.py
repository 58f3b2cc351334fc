"""Fused attention for RNN sequence-to-sequence models (Luong and Bahdanau)."""
from ._loader import _C  # noqa: F401  (loads the operators into torch.ops.attention_ext)
from . import _op_registrations  # noqa: F401  (fake kernels and autograd of the ops)
from . import reference  # noqa: F401
from .functional import additive_attention, dot_attention, location_attention
from . import nn  # noqa: F401  (layers on top of the functional ops)
from . import compat  # noqa: F401  (drop-in replacements of published layers)

__version__ = _C.__version__

__all__ = [
    "dot_attention", "additive_attention", "location_attention", "nn", "compat", "reference",
    "build_info", "__version__",
]


def build_info() -> dict:
    """What this binary was built with: version, CUDA kernels, CPU vector capability, and
    whether the CUDA kernels are also built as emulated CPU test ops."""
    return {
        "version": _C.__version__,
        "with_cuda": bool(_C.with_cuda),
        "cpu_capability": _C.cpu_capability,
        "emulated_cuda": bool(_C.emulated_cuda),
    }
