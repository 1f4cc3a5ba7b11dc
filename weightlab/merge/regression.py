"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023): for every linear layer, the weight minimising ``Σ_i ||X_i W - X_i W_i||²`` over the
models' own layer inputs ``X_i``, i.e. ``W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i`` with ``G_i = X_iᵀX_i`` and
``G̃ = α G + (1-α) diag(G)`` (the paper's shrinkage of off-diagonal entries, α = 0.9 by default).
Other parameters are averaged. The Gram matrices come from :func:`weightlab.quant.capture`, which
traces any ``apply_fn`` — no per-architecture code.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .registry import merge_method, normalized_weights, per_model

jnp = _lazy.module("jax.numpy")

__all__ = ["regmean", "regmean_grams"]


def _gram(g, path):
    """(Gram matrix, input axis of the weight) from a capture ``Stats`` or a plain (K, K) array."""
    if hasattr(g, "xtx"):
        return jnp.asarray(g.xtx, jnp.float32), g.axis
    return jnp.asarray(g, jnp.float32), 0


@merge_method("regmean", base="unused", per_model_params=("weight",), stream=False, extras=("grams",),
              check=lambda hp: normalized_weights(hp["weight"], None, "regmean"),
              paper="Jin et al. 2023 (RegMean)")
def regmean(base, models, *, grams: Sequence[dict], alpha: float = 0.9, weight=1.0):
    """RegMean: per linear layer ``W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i``; other leaves weight-averaged.

    ``grams[i][path]``: model i's input Gram of the weight at ``path`` — a ``quant.capture`` Stats
    (its input axis included) or a (K, K) array for an (in, out) kernel; :func:`regmean_grams`
    measures them. Leaves without a Gram in every model are averaged with ``weight``."""
    n = wtree.num_models(models)
    if len(grams) != n:
        raise MergeError(f"regmean needs one set of Gram matrices per model: {len(grams)} for {n} models")
    lam = per_model(weight, n, "weight")

    def one(p, x):
        if not wtree.is_array(x):
            return x
        ws = [x[i].astype(jnp.float32) for i in range(n)]
        if np.ndim(x) == 3 and all(p in g for g in grams):
            gs, ax = [], 0
            for g in grams:
                gm, ax = _gram(g[p], p)
                gs.append(alpha * gm + (1 - alpha) * jnp.diag(jnp.diagonal(gm)))
            ws = ws if ax == 0 else [w.T for w in ws]
            lhs = sum(gs)
            rhs = sum(g @ w for g, w in zip(gs, ws))
            sol = jnp.linalg.solve(lhs + 1e-8 * jnp.mean(jnp.diagonal(lhs)) * jnp.eye(lhs.shape[0]), rhs)
            return (sol if ax == 0 else sol.T).astype(x.dtype)
        return (sum(float(l) * w for l, w in zip(lam, ws)) / lam.sum()).astype(x.dtype)

    return wtree.map_with_path(one, models)


def regmean_grams(apply_fn: Callable, models: Sequence[Any], datasets: Sequence[Iterable[Any]], *,
                  select: wtree.SelectorLike = None, row_mask: Callable | None = None) -> list[dict]:
    """Each model's input Gram matrices on its own calibration batches (traced, any ``apply_fn``):
    the ``grams=`` of :func:`regmean`."""
    from ..quant.calibrate import capture

    if len(models) != len(datasets):
        raise MergeError("regmean_grams needs one dataset per model")
    return [capture(apply_fn, m, list(d), select=select, row_mask=row_mask) for m, d in zip(models, datasets)]
