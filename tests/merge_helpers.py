"""Shared helpers of the merge method tests: random base + fine-tunes, float64 comparison."""

import numpy as np


def make(n=3, seed=0, shapes=((8, 6), (5,)), scale=0.3, sparse=0.0):
    rng = np.random.default_rng(seed)
    base = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    ms = []
    for _ in range(n):
        m = {}
        for k, v in base.items():
            d = rng.standard_normal(v.shape) * scale
            if sparse:
                d = d * (rng.random(v.shape) > sparse)
            m[k] = (v + d).astype(np.float32)
        ms.append(m)
    return base, ms


def f64(x):
    return np.asarray(x, np.float64)


def close(a, b, tol=1e-4):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=tol, atol=tol, err_msg=k)
