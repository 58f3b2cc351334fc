"""Fuzzer for the ops' argument handling, run as a subprocess by test_robustness.py (a crash
there must not take pytest down with it). Calls every op (dot, additive, location), through
the functional API and torch.ops, forward and backward, with random and mostly invalid
arguments: wrong ranks and sizes, integer/bool/complex dtypes, meta tensors, negative and
overflowing lengths, windows and memory indices, even and empty convolutions, empty
tensors, non-tensors. Every call must return or raise a Python exception; the process
prints how many did which and exits 0.

usage: python fuzz_ops.py SEED CALLS
"""
import random
import sys

import torch

import attention_ext as ae

OPS = torch.ops.attention_ext
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.bool, torch.complex64]


def rand_tensor(rng, *, rank=None, dtype=None):
    rank = rng.choice([0, 1, 2, 3, 3, 3, 4]) if rank is None else rank
    shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rank)]
    dtype = dtype or rng.choice(DTYPES[:4] * 3 + DTYPES[4:])
    device = "meta" if rng.random() < 0.05 else "cpu"
    if dtype == torch.bool:
        return torch.rand(shape, device=device) < 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-3, 6, shape, dtype=dtype, device=device)
    t = torch.randn(shape, dtype=dtype, device=device)
    if t.dim() >= 2 and rng.random() < 0.2:
        t = t.transpose(-1, -2)
    return t


def bad_integers(kind, shape):
    """The wrong integer tensors every index argument may get: negative, past any size, or
    floating point; None for another kind."""
    if kind == "negative":
        return torch.full(shape, -1, dtype=torch.int64)
    if kind == "huge":
        return torch.full(shape, 2**40, dtype=torch.int64)
    if kind == "float":
        return torch.zeros(shape)
    return None


def rand_lengths(rng, B):
    kind = rng.choice(["none", "ok", "negative", "huge", "float", "shape", "int32"])
    if kind == "none":
        return None
    if kind in ("negative", "huge", "float"):
        return bad_integers(kind, (B,))
    if kind == "shape":
        return torch.ones(B + 1, 2, dtype=torch.int64)
    lengths = torch.randint(0, 4, (B,))
    return lengths.int() if kind == "int32" else lengths


def rand_mask(rng, B, S):
    kind = rng.choice(["none", "none", "ok", "shape", "dtype"])
    if kind == "none":
        return None
    if kind == "shape":
        return torch.ones(B, S + 1, dtype=torch.bool)
    if kind == "dtype":
        return torch.ones(B, S)
    return torch.rand(B, S) < 0.5


def plausible_dot(rng):
    B, Tq, S, D = (rng.choice([0, 1, 2, 3]) for _ in range(4))
    dt = rng.choice(DTYPES[:4])
    q, k = torch.randn(B, Tq, D, dtype=dt), torch.randn(B, S, D, dtype=dt)
    v = None if rng.random() < 0.5 else torch.randn(B, S, rng.choice([1, 2]), dtype=dt)
    return q, k, v, B, S


def fuzz_dot(rng):
    if rng.random() < 0.5:
        q, k, v, B, S = plausible_dot(rng)
        # Corrupt one argument.
        which = rng.randrange(3)
        if which == 0:
            q = rand_tensor(rng)
        elif which == 1:
            k = rand_tensor(rng)
        else:
            v = rand_tensor(rng)
    else:
        q, k, v = rand_tensor(rng), rand_tensor(rng), (None if rng.random() < 0.3 else rand_tensor(rng))
        B, S = (k.shape[0], k.shape[1]) if k.dim() >= 2 else (1, 1)
    lengths, mask = rand_lengths(rng, B), rand_mask(rng, B, S)
    scale = rng.choice([None, 1.0, 0.5, float("nan"), float("inf"), -2.0, "x"])
    if rng.random() < 0.5:
        ctx, w = ae.dot_attention(q, k, v, lengths=lengths, mask=mask, scale=scale)
        (ctx.sum() + (0 if w is None else w.sum())).float()
    else:
        s = 1.0 if not isinstance(scale, float) else scale
        ctx, w, lse = OPS.dot_attention(q, k, v, lengths, mask, s, rng.random() < 0.5)
        gw = torch.randn_like(w) if w.numel() and rng.random() < 0.5 else None
        OPS._dot_attention_backward(torch.randn_like(ctx), gw, q, k, v, lengths, mask, s,
                                    lse if rng.random() < 0.8 else rand_tensor(rng))


def fuzz_additive(rng):
    B, Tq, S, A, Dv = (rng.choice([0, 1, 2, 3]) for _ in range(5))
    dt = rng.choice(DTYPES[:4])
    args = [torch.randn(B, Tq, A, dtype=dt), torch.randn(B, S, A, dtype=dt),
            torch.randn(A, dtype=dt), torch.randn(B, S, Dv, dtype=dt)]
    for i in range(4):
        if rng.random() < 0.3:
            args[i] = rand_tensor(rng, rank=rng.choice([None, args[i].dim()]))
    lengths, mask = rand_lengths(rng, B), rand_mask(rng, B, S)
    if rng.random() < 0.5:
        ctx, w = ae.additive_attention(*args, lengths=lengths, mask=mask)
        ctx.sum()
    else:
        ctx, w, lse = OPS.additive_attention(*args, lengths, mask, rng.random() < 0.5)
        gw = torch.randn_like(w) if w.numel() and rng.random() < 0.5 else None
        OPS._additive_attention_backward(torch.randn_like(ctx), gw, *args, lengths, mask,
                                         lse if rng.random() < 0.8 else rand_tensor(rng))


def rand_window(rng, B, S):
    kind = rng.choice(["none", "ok", "int32", "outside", "reversed", "huge", "float", "shape",
                       "meta"])
    if kind == "none":
        return None
    if kind == "outside":
        return torch.tensor([[-1, S + 1]] * B, dtype=torch.int64)
    if kind == "reversed":
        return torch.tensor([[S, 0]] * B, dtype=torch.int64)
    if kind in ("huge", "float"):
        return bad_integers(kind, (B, 2))
    if kind == "shape":
        return torch.zeros(B + 1, 3, dtype=torch.int64)
    ends = torch.randint(0, S + 1, (B, 2)).sort(dim=1).values
    if kind == "meta":
        return ends.to("meta")
    return ends.int() if kind == "int32" else ends


def rand_memory_index(rng, B, M):
    kind = rng.choice(["none", "ok", "negative", "huge", "float", "shape"])
    if kind == "none":
        return None
    if kind in ("negative", "huge", "float"):
        return bad_integers(kind, (B,))
    if kind == "shape":
        return torch.zeros(B + 1, dtype=torch.int64)
    return torch.randint(0, max(M, 1), (B,))


def fuzz_location(rng):
    """A valid call of random (often empty) sizes two times in five; otherwise every
    argument may be wrong."""
    valid = rng.random() < 0.4
    B, S, A, Dv, C, F = (rng.choice([0, 1, 2, 3]) for _ in range(6))
    K = rng.choice([1, 3, 5, 31] if valid else [0, 1, 2, 3, 5, 31])
    dt = rng.choice(DTYPES[:4])
    args = [torch.randn(B, A, dtype=dt), torch.randn(B, S, A, dtype=dt),
            torch.rand(B, C, S, dtype=dt), torch.randn(F, C, K, dtype=dt),
            torch.randn(A, F, dtype=dt), torch.randn(A, dtype=dt), torch.randn(B, S, Dv, dtype=dt)]
    if valid:
        lengths = rng.choice([None, torch.randint(0, S + 1, (B,))])
        mask = None
        window = rng.choice([None, torch.randint(0, S + 1, (B, 2)).sort(dim=1).values])
        memory_index = rng.choice([None, torch.randint(0, max(B, 1), (B,))])
        score_bias = rng.choice([None, torch.randn(1, dtype=dt)])
        scale = rng.choice([1.0, 0.5, -2.0, 0.0])
        normalization = rng.choice(["softmax", "sigmoid"])
    else:
        for i in range(len(args)):
            if rng.random() < 0.15:
                args[i] = rand_tensor(rng, rank=rng.choice([None, args[i].dim()]))
        lengths, mask = rand_lengths(rng, B), rand_mask(rng, B, S)
        window, memory_index = rand_window(rng, B, S), rand_memory_index(rng, B, B)
        score_bias = rng.choice([None, torch.randn(1, dtype=dt), rand_tensor(rng)])
        scale = rng.choice([1.0, float("nan"), float("inf")])
        normalization = rng.choice(["softmax", "sigmoid", "tanh"])
    if rng.random() < 0.5:
        ctx, w = ae.location_attention(
            *args, lengths=lengths, mask=mask, window=window, score_bias=score_bias,
            scale=scale, normalization=normalization, memory_index=memory_index)
        ctx.sum()
    else:
        sigmoid = normalization == "sigmoid"
        ctx, w, lse = OPS.location_attention(*args, lengths, mask, window, score_bias, scale,
                                             sigmoid, rng.random() < 0.5, memory_index)
        gw = torch.randn_like(w) if w.numel() and rng.random() < 0.5 else None
        OPS._location_attention_backward(
            torch.randn_like(ctx), gw, *args, lengths, mask, window, score_bias, scale, sigmoid,
            lse if valid or rng.random() < 0.8 else rand_tensor(rng), memory_index)


def main(seed, calls):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    returned = raised = 0
    for _ in range(calls):
        try:
            rng.choice([fuzz_dot, fuzz_additive, fuzz_location])(rng)
            returned += 1
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
            raised += 1
    print(f"fuzz: {calls} calls, {returned} returned, {raised} raised")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
