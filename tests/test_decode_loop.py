"""The ops inside a decoding loop, on every backend: no call reads a device value on the
host, a decode step (forward, or forward + backward of a training step) replays from a
CUDA graph with reference.py's values, lengths may stay on the CPU beside CUDA inputs, and
10,000 steps keep memory flat."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import (DEVICES, EMULATED_CUDA, HAS_CUDA, capture_cuda_graph, generator,
                     proc_rss_mib, randn)
from harness import OPS

GRAPH_MASKS = ("lengths64", "mask", "none")


# A decoding step's memory: one row per query row, or beams of 2 sharing each memory row.
MEMORIES = [pytest.param(None, id="own_memory"), pytest.param(("beams", 2), id="beams")]


def step_inputs(op, device, *, seed=0, mask_kind="lengths64", B=4, S=9, F=16, Dv=8,
                requires_grad=False, memory=None):
    """One decoder step's inputs as keyword arguments of the functional op: a (B, F) query
    (query_proj) against (B, S, F) keys (keys_proj), or (M, S, F) keys and a memory_index
    (in the masking dict) with memory=(kind, M)."""
    c = op.make_case(B=B, Tq=1, S=S, F=F, Dv=Dv, device=device, seed=seed, query_2d=True,
                     mask_kind=mask_kind, memory=memory)
    tensors = dict(c.inputs)
    for t in tensors.values():
        t.requires_grad_(requires_grad)
    masking = dict(lengths=c.lengths, mask=c.mask)
    if memory is not None:
        masking["memory_index"] = c.memory_index
    return tensors, masking


def call(op, impl, tensors, masking):
    fn = {"ours": op.functional, "ref": op.reference}[impl]
    return fn(*tensors.values(), **masking)


def training_step(op, impl, tensors, masking, g_ctx, g_w):
    """context, weights and the gradients of <context, g_ctx> + <weights, g_w>."""
    ctx, w = call(op, impl, tensors, masking)
    grads = torch.autograd.grad((ctx * g_ctx).sum() + (w * g_w).sum(), list(tensors.values()))
    return (ctx, w) + grads


# ------------------------------------------------------------------- no host reads

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("op", OPS)
def test_no_host_reads_of_device_values(op, memory, device):
    """Forward and backward with lengths on the device: no aten::item or
    _local_scalar_dense in the profile, and on a GPU no synchronising call (torch's sync
    debug mode raises on one). On the CPU this holds for the emulated CUDA code, whose
    lengths count as device values (the CPU kernels read their host lengths directly)."""
    if device == "cpu" and not EMULATED_CUDA:
        pytest.skip("the CPU kernels' lengths are host values; the emulated build runs this")
    tensors, masking = step_inputs(op, device, requires_grad=True, memory=memory)
    gen = generator(5)
    g_ctx, g_w = randn((4, 8), gen, device=device), randn((4, 9), gen, device=device)
    training_step(op, "ours", tensors, masking, g_ctx, g_w)  # warm-up outside the checks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        training_step(op, "ours", tensors, masking, g_ctx, g_w)
    names = [e.name for e in prof.events()]
    assert any("attention_ext::" in n for n in names), "the profile missed the op"
    host_reads = [n for n in names if n in ("aten::item", "aten::_local_scalar_dense")]
    assert not host_reads, host_reads
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            training_step(op, "ours", tensors, masking, g_ctx, g_w)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------- CUDA graphs

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("mask_kind", GRAPH_MASKS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_replays_a_decode_step(op, mask_kind, memory, train):
    """A step captured once, then replayed on new inputs copied into its static buffers:
    the outputs (and gradients) match reference.py on those inputs."""
    static, masking = step_inputs(op, "cuda", seed=1, mask_kind=mask_kind, requires_grad=train,
                                  memory=memory)
    gen = generator(6)
    g_ctx, g_w = randn((4, 8), gen, device="cuda"), randn((4, 9), gen, device="cuda")

    def step():
        if train:
            return training_step(op, "ours", static, masking, g_ctx, g_w)
        return call(op, "ours", static, masking)

    graph, outs = capture_cuda_graph(step)

    for seed in (2, 3):
        fresh, fresh_masking = step_inputs(op, "cuda", seed=seed, mask_kind=mask_kind,
                                           requires_grad=train, memory=memory)
        with torch.no_grad():
            for name, t in fresh.items():
                static[name].copy_(t)
            for name, t in fresh_masking.items():
                if t is not None:
                    masking[name].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        want = (training_step(op, "ref", fresh, fresh_masking, g_ctx, g_w) if train
                else call(op, "ref", fresh, fresh_masking))
        for got, expected in zip(outs, want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- lengths' device

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_cpu_lengths_with_cuda_inputs(op):
    """Lengths on the CPU (as pack_padded_sequence takes them) beside CUDA inputs: the same
    values as lengths on the GPU, forward and backward; out of range, a ValueError from
    the host check."""
    tensors, masking = step_inputs(op, "cuda", requires_grad=True)
    gen = generator(7)
    g_ctx, g_w = randn((4, 8), gen, device="cuda"), randn((4, 9), gen, device="cuda")
    on_gpu = training_step(op, "ours", tensors, masking, g_ctx, g_w)
    cpu_lengths = masking["lengths"].cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the copy to the GPU must not wait for it
    try:
        on_cpu = training_step(op, "ours", tensors, dict(lengths=cpu_lengths), g_ctx, g_w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(on_cpu, on_gpu):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    bad = masking["lengths"].cpu().clone()
    bad[1] = 10
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S\] = \[0, 9\]"):
        call(op, "ours", tensors, dict(lengths=bad))


# Device values the kernels check as they read them: (query rows, argument, message).
DEVICE_CHECKED = [
    pytest.param(2, "lengths=torch.tensor([2, 6], device='cuda')", "lengths must lie in [0, S]",
                 id="lengths"),
    pytest.param(3, "memory_index=torch.tensor([0, 2, 1], device='cuda')",
                 "memory_index must lie in [0, M)", id="memory_index"),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("rows,argument,message", DEVICE_CHECKED)
@pytest.mark.parametrize("op", OPS)
def test_out_of_range_device_values_fail_on_the_device(op, rows, argument, message):
    """Lengths and memory_index on the GPU are checked by the kernels (no host wait): a
    length > S or an index >= M (here M = 2) fails the launch with a device-side assertion
    naming the argument. It leaves the CUDA context unusable, so it runs in a subprocess."""
    fn = op.pick(dot="dot_attention(x, k", additive="additive_attention(x, k, k[0, 0], k")
    code = ("import torch, attention_ext\n"
            f"x = torch.randn({rows}, 8, device='cuda'); k = torch.randn(2, 5, 8, device='cuda')\n"
            f"attention_ext.{fn}, {argument})\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out, out[-2000:]


# ------------------------------------------------------------------- memory

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_decode_steps_keep_memory_flat(op, device):
    """10,000 decode steps (100 under the emulation, whose launches switch 128 fibers per
    block): the CUDA allocator's memory is the same after as before, the process's
    resident memory on the CPU within 32 MiB."""
    if device == "cpu" and "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer keeps freed memory in quarantine: resident memory grows")
    steps = 100 if EMULATED_CUDA else 10_000
    tensors, masking = step_inputs(op, device, B=16, S=40, F=64, Dv=64)
    for _ in range(20):
        call(op, "ours", tensors, masking)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = proc_rss_mib()
    for _ in range(steps):
        ctx, w = call(op, "ours", tensors, masking)
    del ctx, w
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    else:
        assert proc_rss_mib() - before < 32
