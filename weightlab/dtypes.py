"""Bit widths and true storage sizes of dtypes (NumPy and ml_dtypes only: no JAX).

``numpy``/``jax`` report ``itemsize == 1`` for sub-byte dtypes (int4, uint2, float4_e2m1fn ...);
everything in weightlab that reports sizes (``tree.true_nbytes``, ``QArray.nbytes``,
``weightlab info``) goes through :func:`bits` and :func:`true_bytes` instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bits", "true_bytes", "is_floating"]


def bits(dtype) -> int:
    """Storage bits of one element: 4 for int4/uint4/float4, 8 for int8, 16 for bfloat16 ..."""
    import ml_dtypes  # deferred: its extension takes ~0.5 s to load and the CLI parser reads this module

    dt = np.dtype(dtype)
    if dt.kind == "V" or dt.kind in "iu":
        for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
            try:
                return int(info(dt).bits)
            except (ValueError, TypeError):
                continue
    return dt.itemsize * 8


def true_bytes(shape, dtype) -> int:
    """Bytes ``shape`` x ``dtype`` really occupies, sub-byte elements counted by their bits."""
    return (int(np.prod(shape, dtype=np.int64)) * bits(dtype) + 7) // 8


def is_floating(dtype) -> bool:
    """NumPy float dtypes and ml_dtypes' bfloat16/float8 (which NumPy does not class as floating)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.floating):
        return True
    import ml_dtypes

    try:
        ml_dtypes.finfo(dt)
        return True
    except (ValueError, TypeError):
        return False
