"""Fits the rational tanh of csrc/include/attention_ext/math.h (run: python fit_tanh.py).

tanh(x) ~ x P(x^2) / Q(x^2), deg P = deg Q = 4, Q(0) = 1, on [0, CLAMP]. Loeb's
linearisation (divide the residual x P - tanh Q by the previous Q) with Lawson's weights
(multiply each point's weight by its error) converges to a near-minimax absolute error.
Prints the float32 coefficients and their float32 error, evaluated as the kernels do.
"""
import numpy as np

CLAMP = 8.5
DEG_P, DEG_Q = 4, 4


def fit(iters: int = 120):
    x = np.concatenate([np.linspace(0, CLAMP, 20000),
                        CLAMP * (1 - np.cos(np.linspace(0, np.pi / 2, 20000)))])
    x = np.unique(x)[1:]
    y, z = np.tanh(x), x * x
    q_prev, weight = np.ones_like(x), np.ones_like(x)
    for _ in range(iters):
        a = np.concatenate([np.stack([x * z**i for i in range(DEG_P + 1)], 1),
                            np.stack([-y * z**i for i in range(1, DEG_Q + 1)], 1)], 1)
        w = np.sqrt(weight)
        sol, *_ = np.linalg.lstsq(a / q_prev[:, None] * w[:, None], y / q_prev * w, rcond=None)
        p, q = sol[:DEG_P + 1], np.concatenate([[1.0], sol[DEG_P + 1:]])
        q_prev = np.polyval(q[::-1], z)
        err = np.abs(x * np.polyval(p[::-1], z) / q_prev - y)
        weight = weight * err
        weight /= weight.sum()
    return p.astype(np.float32), q.astype(np.float32)


def tanh32(p, q, x):
    x = np.clip(x, -CLAMP, CLAMP).astype(np.float32)
    z = x * x
    num, den = p[-1], q[-1]
    for c in p[-2::-1]:
        num = num * z + c
    for c in q[-2::-1]:
        den = den * z + c
    return x * num / den


if __name__ == "__main__":
    p, q = fit()
    print("P:", [repr(float(c)) for c in p])
    print("Q:", [repr(float(c)) for c in q])
    xs = np.linspace(-10, 10, 4_000_001, dtype=np.float32)
    err = np.abs(tanh32(p, q, xs).astype(np.float64) - np.tanh(xs.astype(np.float64)))
    print(f"max abs error (float32 evaluation) {err.max():.3e}")
