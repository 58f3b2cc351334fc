"""attention_ext.build_info() and operator registration."""
import torch

import attention_ext
from attention_ext._cpu_capability import CAPABILITY_FLAGS, supported

OP_NAMES = ["attention_ext::dot_attention", "attention_ext::_dot_attention_backward"]


def test_build_info_keys():
    info = attention_ext.build_info()
    assert set(info) >= {"version", "with_cuda", "cpu_capability"}
    assert info["version"] == attention_ext.__version__
    assert isinstance(info["version"], str) and info["version"].count(".") >= 2
    assert isinstance(info["with_cuda"], bool)
    assert info["cpu_capability"] in CAPABILITY_FLAGS
    assert supported(info["cpu_capability"])  # the loader refuses otherwise


def test_ops_registered():
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        if attention_ext.build_info()["with_cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    assert "dot_attention" in dir(torch.ops.attention_ext)


def test_public_api():
    assert set(attention_ext.__all__) >= {"dot_attention", "reference", "build_info"}
    assert attention_ext.dot_attention.__doc__
