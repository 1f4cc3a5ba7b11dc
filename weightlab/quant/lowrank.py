"""Low-rank correction of the quantization error: LoRC and QERA.

LoRC (Yao et al., "ZeroQuant-V2", 2023): the rank-r truncated SVD of ``E = W - Ŵ`` added back,
``W_eff = Ŵ + A B``. QERA (Zhang et al., "QERA: an Analytical Framework for Quantization Error
Reconstruction", ICLR 2025): the same rank budget chosen to minimise the *output* error
``E_x ||x (E - A B)||²`` instead, whose closed form with ``R = E[xᵀx]`` is
``A B = R^{-1/2} · SVD_r(R^{1/2} E)``. A (K, r) and B (r, N) are stored in the QArray (``lr_a``,
``lr_b``, in the input-axis-first frame), so ``x @ W_eff = x @ Ŵ + (x A) B``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..errors import QuantizationError
from .qarray import QArray

__all__ = ["lorc", "qera"]


def _kfirst(q: QArray, w):
    w = jnp.asarray(w, jnp.float32)
    base = q.replace(lr_a=None, lr_b=None).dequantize(jnp.float32)
    return (w, base) if q.axis == 0 else (w.T, base.T)


def _check(q, rank, path):
    if q.ndim != 2:
        raise QuantizationError(f"'{path}': low-rank correction needs a 2-D weight")
    if not 0 < rank <= min(q.shape):
        raise QuantizationError(f"'{path}': rank {rank} outside 1..{min(q.shape)}")


def lorc(q: QArray, w, rank: int = 16, *, dtype=jnp.float16, path: str = "") -> QArray:
    """Add the rank-``rank`` truncated SVD of ``W - dequant(q)`` to ``q``."""
    _check(q, rank, path)
    wk, base = _kfirst(q, w)
    u, s, vt = jnp.linalg.svd(wk - base, full_matrices=False)
    return q.replace(lr_a=(u[:, :rank] * s[:rank]).astype(dtype), lr_b=vt[:rank].astype(dtype))


def qera(q: QArray, w, xtx, rank: int = 16, *, damp: float = 1e-6, dtype=jnp.float16, path: str = "") -> QArray:
    """Activation-aware low-rank correction with ``xtx`` = E[xᵀx] (K, K) (QERA's exact solution)."""
    _check(q, rank, path)
    wk, base = _kfirst(q, w)
    r = jnp.asarray(xtx, jnp.float32)
    r = r + damp * jnp.mean(jnp.diagonal(r)) * jnp.eye(r.shape[0])
    evals, evecs = jnp.linalg.eigh(r)
    evals = jnp.maximum(evals, 1e-12)
    r_half = (evecs * jnp.sqrt(evals)) @ evecs.T
    r_ihalf = (evecs / jnp.sqrt(evals)) @ evecs.T
    u, s, vt = jnp.linalg.svd(r_half @ (wk - base), full_matrices=False)
    a = r_ihalf @ (u[:, :rank] * s[:rank])
    return q.replace(lr_a=a.astype(dtype), lr_b=vt[:rank].astype(dtype))
