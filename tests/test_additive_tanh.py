"""The CPU kernels' vectorised float32 tanh (attention_ext._C._testing.tanh_float32, the
function they apply) against torch.tanh: within 1.5e-7 absolute everywhere (about an ulp
of 1; it measures 9e-8, torch's own float32 tanh 3e-8), correctly rounded to +-1 where
tanh saturates, exact at the special values, odd-symmetric, and the same on vector tails.
A tanh a few ulp off near +-1 (3.5e-7), times a large v against saturated projections,
gives gradients at twice the parity tolerance (test_parity's saturated case)."""
import math

import pytest
import torch

import attention_ext

pytestmark = pytest.mark.cpu_kernels

TOL = 1.5e-7


def tanh32(x):
    return attention_ext._C._testing.tanh_float32(x)


def _max_err(x: torch.Tensor):
    """(max |tanh32 - torch.tanh| in float32, max |tanh32 - tanh| against the float64 truth,
    the x where the latter is reached)."""
    got = tanh32(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    err32 = (got - torch.tanh(x)).abs()
    err64 = (got.double() - torch.tanh(x.double())).abs()
    i = int(err64.argmax())
    return err32.max().item(), err64.max().item(), x[i].item()


def test_dense_sweep():
    """8M evenly spaced points over [-20, 20] (step 5e-6: every region of the fit, the clamp
    and beyond) plus a log sweep of tiny to huge magnitudes."""
    x = torch.linspace(-20.0, 20.0, 8_000_001, dtype=torch.float32)
    e32, e64, at = _max_err(x)
    assert e32 <= TOL, f"max |tanh32 - torch.tanh| = {e32:.3g} (float64 truth: {e64:.3g} at x = {at})"
    assert e64 <= TOL, f"max |tanh32 - tanh| = {e64:.3g} at x = {at}"
    mags = torch.logspace(-40, 38, 200_001, dtype=torch.float64).float()
    x = torch.cat([mags, -mags])
    e32, e64, at = _max_err(x)
    assert e32 <= TOL and e64 <= TOL, f"log sweep: error {e64:.3g} at x = {at}"


def _every_float(lo, hi):
    a = torch.tensor([lo], dtype=torch.float32).view(torch.int32).item()
    b = torch.tensor([hi], dtype=torch.float32).view(torch.int32).item()
    return torch.arange(a, b + 1, dtype=torch.int32).view(torch.float32)


def test_every_float_where_the_error_peaks_and_at_the_clamp():
    """Every float32 in [0.5, 2] and in [8.5, 10.5] (bit patterns, no gaps): where the
    error is largest, and around the clamp at 10."""
    for lo, hi in ((0.5, 2.0), (8.5, 10.5)):
        x = _every_float(lo, hi)
        for xs in (x, -x):
            e32, e64, at = _max_err(xs)
            assert e32 <= TOL and e64 <= TOL, f"error {e64:.3g} at x = {at}"


def test_saturation_is_exactly_one():
    """Where torch's float32 tanh has long rounded to +-1 (from |x| = 9.01), so does ours:
    every saturated term of an additive score then carries no bias."""
    x = _every_float(9.5, 12.0)
    assert torch.equal(torch.tanh(x), torch.ones_like(x))
    assert torch.equal(tanh32(x), torch.ones_like(x))
    assert torch.equal(tanh32(-x), -torch.ones_like(x))


def test_special_values():
    tiny = torch.finfo(torch.float32).tiny  # smallest normal
    denorm = 1e-45  # smallest subnormal
    big = torch.finfo(torch.float32).max
    inf, nan = math.inf, math.nan
    x = torch.tensor([0.0, -0.0, tiny, -tiny, denorm, -denorm, 1e-30, -1e-30, 1e-8, -1e-8,
                      20.0, -20.0, 1e4, -1e4, 1e30, -1e30, big, -big, inf, -inf, nan],
                     dtype=torch.float32)
    got = tanh32(x)
    want = torch.tanh(x)
    finite = ~torch.isnan(x)
    assert ((got[finite] - want[finite]).abs() <= TOL).all(), list(zip(x.tolist(), got.tolist()))
    # tanh(+-0) is +-0, sign included, and tiny inputs are not flushed to the wrong sign.
    assert got[0].item() == 0.0 and not torch.signbit(got[0])
    assert got[1].item() == 0.0 and torch.signbit(got[1])
    assert (torch.signbit(got[2:10]) == torch.signbit(x[2:10])).all()
    # +-inf -> +-1 (to within the promise), NaN -> NaN.
    assert abs(got[-3].item() - 1.0) <= TOL and abs(got[-2].item() + 1.0) <= TOL
    assert torch.isnan(got[-1])
    assert not torch.isnan(got[:-1]).any()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1001, 4099])
def test_odd_lengths(n):
    """Lengths around every vector width (4, 8, 16 lanes, unrolled x2/x4): the tail must be
    as accurate as the body, and NaN/inf in the tail handled like in the body."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=gen) * 24 - 12).float()
    got = tanh32(x)
    assert got.shape == (n,)
    if n:
        assert (got - torch.tanh(x)).abs().max().item() <= TOL
        # Special values at the very end (in the tail) and at the start (in the body).
        for pos in (0, n - 1):
            y = x.clone()
            y[pos] = math.nan
            r = tanh32(y)
            assert torch.isnan(r[pos]) and not torch.isnan(r[torch.arange(n) != pos]).any()
            y[pos] = -math.inf
            assert abs(tanh32(y)[pos].item() + 1.0) <= TOL


def test_odd_symmetric():
    """tanh32(-x) == -tanh32(x) bitwise: the kernels' scores and gradients then have
    no sign bias."""
    x = torch.linspace(0.0, 20.0, 2_000_001, dtype=torch.float32)
    x = torch.cat([x, torch.logspace(-40, 38, 10_001, dtype=torch.float64).float()])
    pos, neg = tanh32(x), tanh32(-x)
    assert torch.equal(neg, -pos)
