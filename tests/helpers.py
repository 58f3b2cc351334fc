"""What the attention_ext tests import: devices, seeded inputs, the tolerance rule and the
split-S knob. pytest's hooks and fixtures are conftest.py's; the ops' harness (cases, running
ours and reference.py) and the layers' (ours against an eager peer) are harness.py's.

Tolerance rule (flash-attention style):
  * the oracle is the eager reference run in float64 on the very same (already rounded)
    inputs: reference.py for the ops; for a layer, its eager peer (test_nn's published
    formulas, eager_layers.py's OpenNMT-py and tutorial layers) with the same parameters;
  * float64: ours must match the oracle to ~1e-9 relative to the magnitudes;
  * float32: max|ours - oracle| <= max(1e-5 * max(1, max|oracle|), 2 * max|ref32 - oracle|);
  * float16/bfloat16: max|ours - oracle| <= 2 * max|ref_lowp - oracle| + eps, where
    ref_lowp is the eager reference run in the low dtype (the error a user gets from eager
    PyTorch) and eps = max(1e-3, half an ulp at max|oracle|) covers a reference error of ~0.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import attention_ext

# ----------------------------------------------------------------------------- devices

HAS_CUDA = torch.cuda.is_available() and bool(attention_ext.build_info()["with_cuda"])

# The test build (make test-emulated): the ops' CPU kernels are the CUDA host code and
# kernels under the CPU emulation, so every "cpu" case below runs the CUDA code.
EMULATED_CUDA = bool(attention_ext.build_info()["emulated_cuda"])

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build"),
        ],
    ),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def case_ids(params) -> list:
    """Test ids of a list of (name, kwargs) cases."""
    return [p[0] for p in params]


# ----------------------------------------------------------------------------- inputs

def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, gen: torch.Generator, dtype=torch.float32, device="cpu", scale=1.0):
    """Seeded standard normal, drawn in float32 on the CPU (same values on every device)."""
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def make_lengths(B: int, S: int, gen: torch.Generator, dtype=torch.int64, device="cpu"):
    """Random lengths in [0, S], with 0 (an empty row) and S (a full row) both present."""
    lengths = torch.randint(0, S + 1, (B,), generator=gen, dtype=torch.int64)
    if B >= 2:
        lengths[0] = 0
        lengths[-1] = S
    elif B == 1:
        lengths[0] = min(S, max(1, S // 2))
    return lengths.to(device=device, dtype=dtype)


def make_mask(B: int, S: int, gen: torch.Generator, device="cpu"):
    """Random bool mask (True = attend) with an all-False row and an all-True row."""
    mask = torch.rand((B, S), generator=gen) < 0.7
    if B >= 2:
        mask[0] = False
        mask[-1] = True
    elif B == 1 and S > 0:
        mask[0, 0] = True
    return mask.to(device)


MASK_KINDS = ["none", "lengths64", "lengths32", "mask"]


def make_masking(kind: str, B: int, S: int, gen, device="cpu"):
    """(lengths, mask) for one of MASK_KINDS."""
    if kind == "none":
        return None, None
    if kind == "lengths64":
        return make_lengths(B, S, gen, torch.int64, device), None
    if kind == "lengths32":
        return make_lengths(B, S, gen, torch.int32, device), None
    if kind == "mask":
        return None, make_mask(B, S, gen, device)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- gradients, rule

def upstream_grad(out: torch.Tensor, gen: torch.Generator, case_dtype: torch.dtype):
    """A seeded gradient for `out`: drawn in float32, rounded to the case's dtype, then in
    out's. A run in another dtype (the float64 oracle) so differentiates the same loss as
    the low-precision run; drawn straight in float64 it would differ by g's rounding, up to
    half an ulp of bfloat16 in every gradient however exact the kernel."""
    return randn(out.shape, gen, case_dtype, out.device).to(out.dtype)


def check_single_step(forward, backward, query, gen):
    """A (B, F) query is one decoder step: forward(query) -> (context, weights, lse) gives
    per-row tensors without the Tq dimension, and backward(g_ctx, g_w, query, lse) -> grads
    (the query's first) takes gradients of those shapes, all with the very values of the
    (B, 1, F) query's call. Returns the upstream gradients and both lse for further checks."""
    ctx, w, lse = forward(query)
    ctx3, w3, lse3 = forward(query[:, None])
    assert ctx.dim() == 2 and w.dim() == 2 and lse.shape == query.shape[:1]
    for got, want in ((ctx, ctx3), (w, w3), (lse, lse3)):
        torch.testing.assert_close(got, want.squeeze(1), rtol=0, atol=0)
    g_ctx = randn(ctx.shape, gen, device=query.device)
    g_w = randn(w.shape, gen, device=query.device)
    grads = backward(g_ctx, g_w, query, lse)
    grads3 = backward(g_ctx[:, None], g_w[:, None], query[:, None], lse3)
    assert grads[0].shape == query.shape
    torch.testing.assert_close(grads[0], grads3[0].squeeze(1), rtol=0, atol=0)
    for got, want in zip(grads[1:], grads3[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    return g_ctx, g_w, lse, lse3


def _amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def tolerance(dtype: torch.dtype, oracle: torch.Tensor, ref_err: float) -> float:
    mag = max(1.0, _amax(oracle))
    if dtype == torch.float64:
        return 1e-9 * mag
    if dtype == torch.float32:
        return max(1e-5 * mag, 2.0 * ref_err)
    # The floor covers a reference error that happens to be ~0: 1e-3, or half an ulp of
    # the largest output (the rounding of the result itself), whichever is larger.
    return 2.0 * ref_err + max(1e-3, 0.5 * torch.finfo(dtype).eps * mag)


def assert_rule(name: str, got, ref_lowp, oracle, dtype):
    """The tolerance rule above on one output; also checks shape, dtype and finiteness."""
    if oracle is None:
        assert got is None, f"{name}: expected None"
        return
    assert got is not None, f"{name}: got None"
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        return
    oracle = oracle.double().cpu()
    err = (got.double().cpu() - oracle).abs().max().item()
    ref_err = (ref_lowp.double().cpu() - oracle).abs().max().item()
    tol = tolerance(dtype, oracle, ref_err)
    assert err <= tol, (
        f"{name} ({dtype_id(dtype)}): max|ours - oracle| = {err:.3g} > tol {tol:.3g} "
        f"(max|reference.py in {dtype_id(dtype)} - oracle| = {ref_err:.3g})"
    )


def assert_rule_float64(name: str, got, oracle):
    """The tolerance rule on a float64 result whose oracle, the eager reference in float64,
    is also its yardstick."""
    assert_rule(name, got, oracle, oracle, torch.float64)


# ----------------------------------------------------------------------------- split-S knob

# The product build's test hook (attention_ext._C._testing) forces the kernels' number of
# source splits (0: automatic). Tests reach it only through the three helpers below.

def forced_splits_now() -> int:
    """The number of source splits the kernels are forced to now (0: automatic)."""
    return attention_ext._C._testing.forced_splits()


@contextmanager
def forced_splits_set(n: int):
    """Forces n source splits inside the block; always restores automatic (0). A negative
    n raises ValueError."""
    attention_ext._C._testing.set_forced_splits(n)
    try:
        assert forced_splits_now() == n
        yield n
    finally:
        attention_ext._C._testing.set_forced_splits(0)


def on_device(kw: dict, device) -> dict:
    """An op's keyword arguments with every tensor moved to `device`, but lengths, which stay
    on the CPU (accepted beside inputs on any device and checked on the host, so a bad
    value raises at the call; on a GPU, lengths there are checked by the kernels)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "lengths" else v
            for k, v in kw.items()}


def capture_cuda_graph(step):
    """(graph, outputs) of step() captured in a CUDA graph, after two runs on a side stream
    (capture needs the lazy initialisations done and the current stream left alone)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def proc_rss_mib() -> float:
    """The process's resident memory (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not in /proc/self/status")
