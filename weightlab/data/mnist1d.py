"""MNIST-1D, generated locally with the ``mnist1d`` package.

Greydanus & Steinbach, "Scaling down deep learning with MNIST-1D" (ICML 2024). We call only
``mnist1d.data.make_dataset`` (the generator), never its download path. Default arguments give the
paper's split: 4000 train / 1000 test signals of length 40, 10 classes.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["load_mnist1d"]


@functools.lru_cache(maxsize=4)
def _generate(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    saved = np.random.get_state()  # make_dataset seeds numpy's global RNG; leave it as we found it
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(saved)
    out = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int32),
           "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int32)}
    for v in out.values():
        v.setflags(write=False)
    return out


def load_mnist1d(seed: int = 42, num_samples: int = 5000) -> dict[str, np.ndarray]:
    """``{"x": (N,40) f32, "y": (N,) i32, "x_test", "y_test"}`` (80/20 split), read-only arrays.

    Deterministic in ``seed``; cached per process.
    """
    return dict(_generate(int(seed), int(num_samples)))
