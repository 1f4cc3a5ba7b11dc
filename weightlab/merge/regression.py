"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023): for every linear layer, the weight minimising ``Σ_i ||X_i W - X_i W_i||²`` over the
models' own layer inputs ``X_i``, i.e. ``W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i`` with ``G_i = X_iᵀX_i`` and
``G̃ = α G + (1-α) diag(G)`` (the paper's shrinkage of off-diagonal entries, α = 0.9 by default).
Other parameters are averaged. The Gram matrices come from :func:`weightlab.quant.capture`, which
traces any ``apply_fn`` — no per-architecture code.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import MergeError

__all__ = ["regmean", "regmean_from_grams"]


def regmean_from_grams(models: Sequence[Any], grams: Sequence[dict], *, alpha: float = 0.9, axes: dict | None = None,
                       weight=1.0):
    """Merge with given Gram matrices: ``grams[i][path]`` is model i's (K, K) input Gram for the
    weight at ``path`` (its input axis ``axes[path]``, default 0). Leaves without a Gram are averaged
    with ``weight``."""
    if not models or len(models) != len(grams):
        raise MergeError("regmean needs one set of Gram matrices per model")
    if not 0 <= alpha <= 1:
        raise MergeError(f"alpha must be in [0, 1], got {alpha}")
    for i, m in enumerate(models[1:], 1):
        wtree.check_compatible(models[0], m, names=("model[0]", f"model[{i}]"))
    lam = np.broadcast_to(np.asarray(weight, np.float64), (len(models),))
    flats = [wtree.to_flat_dict(m) for m in models]
    out = {}
    for p, x in flats[0].items():
        if not wtree.is_array(x):
            out[p] = x
            continue
        if all(p in g for g in grams) and np.ndim(x) == 2:
            ax = (axes or {}).get(p, 0)
            ws = [jnp.asarray(f[p], jnp.float32) if ax == 0 else jnp.asarray(f[p], jnp.float32).T for f in flats]
            gs = []
            for g in grams:
                gm = jnp.asarray(g[p], jnp.float32)
                gs.append(alpha * gm + (1 - alpha) * jnp.diag(jnp.diagonal(gm)))
            lhs = sum(gs)
            rhs = sum(g @ w for g, w in zip(gs, ws))
            sol = jnp.linalg.solve(lhs + 1e-8 * jnp.mean(jnp.diagonal(lhs)) * jnp.eye(lhs.shape[0]), rhs)
            out[p] = (sol if ax == 0 else sol.T).astype(x.dtype)
        else:
            out[p] = (sum(l * jnp.asarray(f[p], jnp.float32) for l, f in zip(lam, flats)) / lam.sum()).astype(x.dtype)
    pairs, treedef = wtree.flatten_with_paths(models[0])
    return treedef.unflatten([out[p] for p, _ in pairs])


def regmean(apply_fn: Callable, models: Sequence[Any], datasets: Sequence[Iterable[Any]], *, alpha: float = 0.9,
            select_re: str | None = None, row_mask: Callable | None = None):
    """RegMean over ``models`` (pytrees of one architecture), each with its own calibration batches."""
    import re

    from ..quant.calibrate import capture

    if len(models) != len(datasets):
        raise MergeError("regmean needs one dataset per model")
    sel = (lambda p: re.search(select_re, p) is not None) if select_re else None
    stats = [capture(apply_fn, m, list(d), select=sel, row_mask=row_mask) for m, d in zip(models, datasets)]
    grams = [{p: s.xtx for p, s in st.items()} for st in stats]
    axes = {p: s.axis for p, s in stats[0].items()}
    return regmean_from_grams(models, grams, alpha=alpha, axes=axes)
