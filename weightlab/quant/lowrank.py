"""Low-rank correction of the quantization error: LoRC and QERA.

As transforms, :func:`lorc` and :func:`qera` wrap any quantizer transform (``quant.lorc(quant.rtn(bits=3),
rank=8)``): the inner quantizer runs, then each QArray it produced gets the correction computed from
the original weight (QERA reads ``R`` from the ``stats=`` extra). :func:`add_lorc` / :func:`add_qera`
correct one QArray.

LoRC (Yao et al., "ZeroQuant-V2", 2023): the rank-r truncated SVD of ``E = W - Ŵ`` added back,
``W_eff = Ŵ + A B``. QERA (Zhang et al., "QERA: an Analytical Framework for Quantization Error
Reconstruction", ICLR 2025): the same rank budget chosen to minimise the *output* error
``E_x ||x (E - A B)||²`` instead, whose closed form with ``R = E[xᵀx]`` is
``A B = R^{-1/2} · SVD_r(R^{1/2} E)``. A (K, r) and B (r, N) are stored in the QArray (``lr_a``,
``lr_b``, in the input-axis-first frame), so ``x @ W_eff = x @ Ŵ + (x A) B``.
"""

from __future__ import annotations

import jax.numpy as jnp

import numpy as np

from .. import tree as wtree
from ..core import WeightTransform
from ..errors import MissingExtraError, QuantizationError
from .qarray import QArray, is_qarray

__all__ = ["lorc", "qera", "add_lorc", "add_qera"]


def _kfirst(q: QArray, w):
    w = jnp.asarray(w, jnp.float32)
    base = q.replace(lr_a=None, lr_b=None).dequantize(jnp.float32)
    return (w, base) if q.axis == 0 else (w.T, base.T)


def _check(q, rank, path):
    if len(q.shape) != 2:
        raise QuantizationError(f"'{path}': low-rank correction needs a 2-D weight, found shape {tuple(q.shape)}")
    if not isinstance(rank, (int, np.integer)) or not 0 < rank <= min(q.shape):
        raise QuantizationError(f"'{path}': rank {rank!r} outside 1..{min(q.shape)}")


def add_lorc(q: QArray, w, rank: int = 16, *, dtype=jnp.float16, path: str = "") -> QArray:
    """Add the rank-``rank`` truncated SVD of ``W - dequant(q)`` to ``q``."""
    _check(q, rank, path)
    wk, base = _kfirst(q, w)
    u, s, vt = jnp.linalg.svd(wk - base, full_matrices=False)
    return q.replace(lr_a=(u[:, :rank] * s[:rank]).astype(dtype), lr_b=vt[:rank].astype(dtype))


def add_qera(q: QArray, w, xtx, rank: int = 16, *, damp: float = 1e-6, dtype=jnp.float16, path: str = "") -> QArray:
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


def _corrected(inner: WeightTransform, correct, name: str, needs_stats: bool, rank) -> WeightTransform:
    def apply(params, state, **extras):
        stats = extras.get("stats")
        pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
        todo = [(i, p) for i, (p, x) in enumerate(pairs) if wtree.is_array(x)]
        for i, p in todo:  # validate before the inner quantizer does any work
            _check(pairs[i][1], rank, p)
            if needs_stats and (stats is None or p not in stats):
                raise MissingExtraError(f"'{p}': {name} needs E[xᵀx] from the stats= extra (quant.capture)")
        out, state = inner.apply(params, state, **extras)
        leaves = treedef.flatten_up_to(out)
        for i, p in todo:
            if is_qarray(leaves[i]):
                leaves[i] = correct(leaves[i], pairs[i][1], p, None if stats is None else stats.get(p))
        return treedef.unflatten(leaves), state

    return WeightTransform(inner.init, apply)


def lorc(inner: WeightTransform, rank: int = 16, *, dtype=jnp.float16) -> WeightTransform:
    """``inner`` followed by LoRC on every weight it quantized (see the module docstring)."""
    return _corrected(inner, lambda q, w, p, st: add_lorc(q, w, rank, dtype=dtype, path=p), "lorc", False, rank)


def qera(inner: WeightTransform, rank: int = 16, *, damp: float = 1e-6, dtype=jnp.float16) -> WeightTransform:
    """``inner`` followed by QERA on every weight it quantized; needs the ``stats=`` extra."""
    def correct(q, w, p, st):
        return add_qera(q, w, st.xtx / jnp.maximum(st.n, 1), rank, damp=damp, dtype=dtype, path=p)

    return _corrected(inner, correct, "qera", True, rank)
