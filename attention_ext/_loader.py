"""Loads the compiled extension after checking this CPU can run it."""
from ._cpu_capability import supported

import torch  # noqa: F401  (the extension links against libtorch; load it first)

from . import _C

if not supported(_C.cpu_capability):
    raise ImportError(
        f"attention_ext was compiled for the {_C.cpu_capability} CPU capability, which this "
        "CPU lacks; rebuild here (pip install --no-build-isolation -e .) or build a portable "
        "binary with ATTENTION_EXT_CPU_CAPABILITY=DEFAULT"
    )
