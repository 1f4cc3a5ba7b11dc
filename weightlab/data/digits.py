"""scikit-learn's bundled 8x8 digits (1797 images), optional: needs ``scikit-learn``."""

from __future__ import annotations

import numpy as np

from ..errors import DependencyMissingError

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """``{"x": (N,64) f32 in [0,1], "y", "x_test", "y_test"}`` with a seeded shuffle split."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError:  # pragma: no cover
        raise DependencyMissingError("load_digits needs scikit-learn: pip install scikit-learn") from None
    d = _ld()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return {"x": x[tr], "y": y[tr], "x_test": x[te], "y_test": y[te]}
