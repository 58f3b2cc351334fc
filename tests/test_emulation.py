"""The CPU emulation of CUDA's execution model itself (csrc/cuda/emulation.h), on what the
attention kernels rely on, and that the test build's ops are the emulated CUDA code.

Only the test build has it: `make test-emulated` (ATTENTION_EXT_EMULATE_CUDA=1). There every
other test of the suite runs the CUDA host code and kernels through the ops' CPU kernels.
"""
import subprocess
import sys

import pytest
import torch

from helpers import EMULATED_CUDA, generator
from harness import DOT

pytestmark = pytest.mark.skipif(
    not EMULATED_CUDA,
    reason="the emulation is only in the test build: run `make test-emulated`",
)

OPS = torch.ops.attention_ext


def assert_stops_the_process(code: str, message: str):
    """Running `code` in a fresh interpreter stops it, with `message` on stderr."""
    proc = subprocess.run([sys.executable, "-c", "import torch, attention_ext\n" + code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_ops_are_the_emulated_cuda_code():
    """Lengths on the kernels' device are checked by the CUDA kernels as they read them: the
    error comes from the emulated launch, not from a host-side check."""
    case = DOT.make_case(B=2, Tq=1, S=5, D=8, seed=3)
    bad = torch.tensor([2, 6])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S\] \(a device-side check"):
        OPS.dot_attention(case.query, case.keys, case.values, bad, None, 1.0, True)


def test_shared_memory_barriers_and_shfl_down():
    """A block sum through __shfl_down_sync, __shared__ and two __syncthreads (3 blocks,
    the last one partial)."""
    x = torch.randn(300, generator=generator(26))
    got = OPS._emulation_block_sum(x)
    padded = torch.cat([x, x.new_zeros(84)]).view(3, 128).double().sum(1)
    expected = padded.repeat_interleave(128)[:300].float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_race_between_threads_shows_in_one_of_the_orders():
    """Thread 0 of each block writes a __shared__ value that every thread then reads, with
    no barrier between: a race. Even blocks resume their threads in thread order, where
    the race goes unseen; odd blocks in reverse order, where threads 31 .. 1 read the
    value before thread 0 writes it (the previous block's) and only thread 0 reads its own."""
    x = torch.tensor([10.0, 11.0, 12.0, 13.0])
    got = OPS._emulation_unsynchronised_broadcast(x).view(4, 32)
    for block in (0, 2):
        assert (got[block] == x[block]).all()
    for block in (1, 3):
        assert got[block, 0] == x[block]
        assert (got[block, 1:] == x[block - 1]).all()


@pytest.mark.parametrize("kernel,message", [
    ("early_exit_shuffle", "shuffle mask names a lane that did not take part"),
    ("divergent_wait", "deadlock: every live thread of the block waits"),
], ids=["exited_lane", "deadlock"])
def test_undefined_behaviour_stops_the_process(kernel, message):
    """Undefined behaviour on a GPU (a shuffle naming a lane that returned; lanes waiting
    at different rendezvous, which hangs a GPU) must stop the emulation with a message,
    not return a value or hang."""
    assert_stops_the_process(f"torch.ops.attention_ext._emulation_{kernel}()", message)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_wmma_tiles(dtype):
    """out = a b^T + c through the emulated tensor-core tiles (nvcuda::wmma): 3 x 2 tiles of
    16 x 16 over two steps of 16 along K, two warps per block, the last block's second warp
    without a tile. The products of 16-bit values are exact in float32, so only the float32
    sums of 32 terms round."""
    g = generator(27)
    a = torch.randn(48, 32, generator=g).to(dtype)
    b = torch.randn(32, 32, generator=g).to(dtype)
    c = torch.randn(48, 32, generator=g)
    got = OPS._emulation_wmma_matmul(a, b, c)
    expected = a.double() @ b.double().T + c.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)


def tf32(x):
    """x (float32) rounded to TF32's 10 explicit mantissa bits, to nearest with ties away
    from zero (cvt.rna.tf32.f32)."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_wmma_tf32_tiles():
    """float32 inputs on the TF32 tiles (16 x 16 x 8, rounded by __float_to_tf32): the
    products of TF32 values are exact in float32, so the result is the float64 product of
    the rounded inputs up to the float32 sums; it differs from the exact product."""
    g = generator(28)
    a = torch.randn(48, 32, generator=g)
    b = torch.randn(32, 32, generator=g)
    c = torch.randn(48, 32, generator=g)
    # Ties: a mantissa whose dropped 13 bits are exactly half rounds away from zero.
    a[0, 0] = torch.tensor([0x3F801000], dtype=torch.int32).view(torch.float32)
    a[0, 1] = -a[0, 0]
    assert tf32(a[:1, :2]).tolist() == [[1 + 2 ** -10, -(1 + 2 ** -10)]]
    got = OPS._emulation_wmma_matmul(a, b, c).double()
    expected = tf32(a).double() @ tf32(b).double().T + c.double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    exact = a.double() @ b.double().T + c.double()
    assert (got - exact).abs().max() > 1e-4


def test_wmma_refuses_a_misaligned_tile():
    """A tile pointer that is not 32-byte aligned is undefined on a GPU: the emulation stops."""
    assert_stops_the_process(
        "a = torch.zeros(16 * 16 + 1, dtype=torch.float16)[1:].view(16, 16)\n"
        "b = torch.zeros(16, 16, dtype=torch.float16)\n"
        "torch.ops.attention_ext._emulation_wmma_matmul(a, b, torch.zeros(16, 16))\n",
        "wmma: pointer not 32-byte aligned")


def test_async_copies_land_at_the_wait_of_their_group():
    """cp.async as on a GPU: a copy may land as late as the wait that covers its group, so
    the emulation lands it there and fills its destination with NaNs until then. Two
    groups: waiting with none in flight lands both; with one in flight, only the first."""
    x = torch.randn(256, generator=generator(29))
    torch.testing.assert_close(OPS._emulation_async_copy(x, 0), x, rtol=0, atol=0)
    partial = OPS._emulation_async_copy(x, 1)
    torch.testing.assert_close(partial[:128], x[:128], rtol=0, atol=0)
    assert partial[128:].isnan().all()


def test_async_copy_refuses_a_misaligned_address():
    """A 16-byte cp.async from an address that is not 16-byte aligned is undefined on a
    GPU: the emulation stops."""
    assert_stops_the_process(
        "torch.ops.attention_ext._emulation_async_copy(torch.zeros(257)[1:], 0)\n",
        "cp.async: an address not aligned to the copy's size")
