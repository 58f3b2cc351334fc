"""pytest's hooks and fixtures for the attention_ext tests. What tests import (devices,
seeded inputs, the tolerance rule, the split-S knob) is helpers.py's; the ops' harness is
harness.py's."""
from __future__ import annotations

import pytest
import torch

from helpers import EMULATED_CUDA, forced_splits_set


def pytest_collection_modifyitems(config, items):
    """Tests about the CPU kernels alone (marker cpu_kernels) have nothing to test where the
    CUDA code takes their place."""
    if not EMULATED_CUDA:
        return
    skip = pytest.mark.skip(reason="about the CPU kernels; this build runs the emulated CUDA code")
    for item in items:
        if "cpu_kernels" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def forced_splits(request):
    """Parametrised indirectly with a number of source splits: forced for the test."""
    with forced_splits_set(request.param) as n:
        yield n


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
