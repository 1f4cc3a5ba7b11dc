"""Named merge methods with mergekit's names, parameters and defaults, as short recipes over
:mod:`.steps`.

Inputs: ``base`` is one params pytree; ``models`` is a *stacked* pytree (leading model axis, see
:func:`weightlab.tree.stack`) or a list of pytrees (stacked for you). Per-model parameters
(``weight``, ``density``, ``gamma``, ``epsilon``) are a scalar or one value per model. ``lambda_``
is mergekit's ``lambda``. Random methods need ``key``; masks use per-leaf keys from the path and
per-model keys from the model index, so results do not depend on leaf order or device count.

Defaults (mergekit): task_arithmetic normalize=False; ties normalize=True; dare_* rescale (L1
match); della normalize=True, rescale; breadcrumbs gamma=0.01; della epsilon=0.15. Paper
variants: ``rescale="inverse"`` (DARE/DELLA's 1/p) and ``scope="global"`` (TIES/FusionBench
trimming over the whole model).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import MergeError
from . import steps

__all__ = ["generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap", "karcher",
           "model_stock", "passthrough"]


def _stacked(models) -> Any:
    if isinstance(models, (list, tuple)):
        if not models:
            raise MergeError("no models to merge")
        return wtree.stack(models)
    return models


def _per_model(v, n: int, name: str) -> np.ndarray:
    a = np.broadcast_to(np.asarray(v, np.float64), (n,)) if np.ndim(v) == 0 else np.asarray(v, np.float64)
    if a.shape != (n,):
        raise MergeError(f"{name} needs one value or {n} values (one per model), got {np.shape(v)}")
    return a


def _check(base, stacked, *, density=None, need_base=True):
    n = wtree.num_models(stacked)
    if n == 0:
        raise MergeError("no models to merge")
    if need_base:
        wtree.check_compatible(base, jax.tree.map(lambda x: x[0] if wtree.is_array(x) else x, stacked),
                               names=("base_model", "models"))
    for p, x in wtree.flatten_with_paths(stacked)[0]:
        if wtree.is_array(x) and not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x, np.float32))):
            raise MergeError(f"'{p}': NaN/Inf in the models; refusing to merge")
    if density is not None:
        d = _per_model(density, n, "density")
        if np.any(d <= 0) or np.any(d > 1):
            raise MergeError(f"density must be in (0, 1], got {density}")
    return n


def _lambda(lambda_, kw):
    if "lambda" in kw:
        lambda_ = kw.pop("lambda")
    if kw:
        raise MergeError(f"unknown parameters {sorted(kw)}")
    return lambda_


def generalized_task_arithmetic(base, models, *, weight=1.0, density=1.0, sparsification=None, consensus=None,
                                normalize=False, rescale=None, lambda_=1.0, gamma=0.01, epsilon=0.15, key=None,
                                scope: str = "tensor", threshold=None, **kw):
    """task vectors -> sparsify -> weight -> (sign election) -> combine -> x lambda -> + base.

    ``threshold``: per-model magnitude cut-offs (N,) for ``magnitude`` sparsification, used instead
    of per-tensor top-k (entries with |delta| >= threshold are kept; the streaming engine computes
    them on the host, per tensor or over the whole model)."""
    lambda_ = _lambda(lambda_, kw)
    stacked = _stacked(models)
    n = _check(base, stacked, density=density)
    w, dens = _per_model(weight, n, "weight"), _per_model(density, n, "density")
    gam, eps = _per_model(gamma, n, "gamma"), _per_model(epsilon, n, "epsilon")
    norm = "l1" if rescale is True else (None if rescale is False else rescale)  # bool = mergekit's switch
    if sparsification in ("random", "della_magprune") and key is None and np.any(dens < 1):
        raise MergeError(f"{sparsification} sparsification is random: pass key=jax.random.key(...)")
    if sparsification == "della_magprune" and np.any((dens + eps >= 1) | (dens - eps <= 0)) and np.any(dens < 1):
        raise MergeError("epsilon must keep density +- epsilon inside (0, 1)")
    if scope not in ("tensor", "global"):
        raise MergeError(f"scope must be 'tensor' or 'global', got {scope!r}")
    thresholds = None if threshold is None else jnp.asarray(threshold, jnp.float32).reshape(n)
    if scope == "global" and sparsification == "magnitude" and thresholds is None:
        deltas = [s - b[None] for (p, b), s in zip(wtree.flatten_with_paths(base)[0], jax.tree.leaves(stacked))
                  if wtree.is_array(b)]
        thresholds = jnp.stack([steps.global_thresholds([d[i:i + 1] for d in deltas], dens[i])[0] for i in range(n)])

    def one(path, b, s):
        if not wtree.is_array(b):
            return b
        delta = (s - b[None]).astype(jnp.float32)
        keys = None
        if key is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(wtree.leaf_key(key, path, "merge"), i))(jnp.arange(n))
        parts = []
        for i in range(n):
            parts.append(steps.sparsify(delta[i:i + 1], sparsification, float(dens[i]),
                                        keys=None if keys is None else keys[i:i + 1], gamma=float(gam[i]),
                                        epsilon=float(eps[i]), rescale_norm=norm,
                                        threshold=None if thresholds is None else thresholds[i:i + 1]))
        delta = jnp.concatenate(parts) if n > 1 else parts[0]
        wb = jnp.asarray(w, jnp.float32).reshape((n,) + (1,) * (delta.ndim - 1))
        weighted = delta * wb
        mask = steps.consensus_mask(weighted, consensus) if consensus else None
        mixed = steps.combine(weighted, wb, mask, normalize)
        return (b.astype(jnp.float32) + lambda_ * mixed).astype(b.dtype)

    return wtree.map_with_path(one, base, stacked)


def task_arithmetic(base, models, *, weight=1.0, lambda_=1.0, normalize=False, **kw):
    """Ilharco et al. 2023: ``base + lambda * sum_i weight_i (theta_i - base)``."""
    return generalized_task_arithmetic(base, models, weight=weight, lambda_=lambda_, normalize=normalize, **kw)


def ties(base, models, *, weight=1.0, density=1.0, lambda_=1.0, normalize=True, rescale=False, consensus="sum",
         scope="tensor", **kw):
    """TIES (Yadav et al. 2023): trim to the top ``density``, elect signs by mass, disjoint mean."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, sparsification="magnitude",
                                       consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
                                       scope=scope, **kw)


def dare_ties(base, models, *, weight=1.0, density=1.0, key=None, lambda_=1.0, normalize=False, rescale=True, **kw):
    """DARE (Yu et al. 2024) random drop + rescale, then TIES sign election."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, sparsification="random",
                                       consensus="sum", normalize=normalize, rescale=rescale, lambda_=lambda_,
                                       key=key, **kw)


def dare_linear(base, models, *, weight=1.0, density=1.0, key=None, lambda_=1.0, normalize=False, rescale=True, **kw):
    """DARE random drop + rescale, then a weighted sum of task vectors."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, sparsification="random",
                                       normalize=normalize, rescale=rescale, lambda_=lambda_, key=key, **kw)


def breadcrumbs(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0, normalize=False, rescale=False,
                **kw):
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest ``gamma`` and the smallest."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, gamma=gamma,
                                       sparsification="magnitude_outliers", normalize=normalize, rescale=rescale,
                                       lambda_=lambda_, **kw)


def breadcrumbs_ties(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0, normalize=False,
                     rescale=False, **kw):
    """Breadcrumbs sparsification with TIES sign election."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, gamma=gamma,
                                       sparsification="magnitude_outliers", consensus="sum", normalize=normalize,
                                       rescale=rescale, lambda_=lambda_, **kw)


def della(base, models, *, weight=1.0, density=1.0, epsilon=0.15, key=None, lambda_=1.0, normalize=True,
          rescale=True, **kw):
    """DELLA (Deep et al. 2024): magnitude-ranked drop probabilities, rescale, sign election."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, epsilon=epsilon,
                                       sparsification="della_magprune", consensus="sum", normalize=normalize,
                                       rescale=rescale, lambda_=lambda_, key=key, **kw)


def della_linear(base, models, *, weight=1.0, density=1.0, epsilon=0.15, key=None, lambda_=1.0, normalize=False,
                 rescale=True, **kw):
    """DELLA sparsification, weighted sum without sign election."""
    return generalized_task_arithmetic(base, models, weight=weight, density=density, epsilon=epsilon,
                                       sparsification="della_magprune", normalize=normalize, rescale=rescale,
                                       lambda_=lambda_, key=key, **kw)


def linear(models, *, weight=1.0, normalize=True):
    """Weighted average (Wortsman et al., model soups 2022): ``sum w_i theta_i / sum w_i``."""
    stacked = _stacked(models)
    n = _check(None, stacked, need_base=False)
    w = jnp.asarray(_per_model(weight, n, "weight"), jnp.float32)

    def one(s):
        if not wtree.is_array(s):
            return s
        wb = w.reshape((n,) + (1,) * (s.ndim - 1))
        r = steps.model_sum(wb * s.astype(jnp.float32))
        return (r / jnp.sum(w) if normalize else r).astype(s.dtype)

    return jax.tree.map(one, stacked)


def sce(base, models, *, select_topk=1.0, **kw):
    """SCE (Wan et al., FuseChat 2024): keep the ``select_topk`` fraction of entries with the largest
    variance across models, elect signs, weight each model by its mean squared task vector."""
    if kw:
        raise MergeError(f"unknown parameters {sorted(kw)}")
    stacked = _stacked(models)
    n = _check(base, stacked)

    def one(b, s):
        if not wtree.is_array(b):
            return b
        tv = (s - b[None]).astype(jnp.float32)
        if select_topk < 1:
            var = jnp.var(tv, axis=0)
            k = int(jnp.count_nonzero(var) * select_topk)
            flat = jnp.abs(var).reshape(-1)
            keep = steps._topk_mask(flat, k).reshape(var.shape) if k > 0 else jnp.zeros(var.shape, bool)
            tv = tv * keep[None]
        erase = steps.consensus_mask(tv, "sum")
        wts = jnp.mean(tv ** 2, axis=tuple(range(1, tv.ndim)))
        tot = jnp.sum(wts)
        wts = jnp.where(jnp.abs(tot) < 1e-6, jnp.ones_like(wts) / n, wts / jnp.where(tot == 0, 1, tot))
        ew = wts.reshape((n,) + (1,) * (tv.ndim - 1)) * erase
        merged = steps.model_sum(tv * ew) / jnp.maximum(steps.model_sum(ew), 1e-6)
        return (b.astype(jnp.float32) + merged).astype(b.dtype)

    return jax.tree.map(one, base, stacked)


def _slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    a, b = v0.astype(jnp.float32), v1.astype(jnp.float32)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    ua = jnp.where(na > eps, a / jnp.where(na > eps, na, 1), a)
    ub = jnp.where(nb > eps, b / jnp.where(nb > eps, nb, 1), b)
    dot = jnp.sum(ua * ub)
    theta0 = jnp.arccos(jnp.clip(dot, -1, 1))
    sin0 = jnp.sin(theta0)
    s0 = jnp.sin(theta0 - theta0 * t) / jnp.where(sin0 == 0, 1, sin0)
    s1 = jnp.sin(theta0 * t) / jnp.where(sin0 == 0, 1, sin0)
    return jnp.where(jnp.abs(dot) > dot_threshold, (1 - t) * a + t * b, s0 * a + s1 * b)


def slerp(base, other, *, t=0.5):
    """Spherical interpolation per tensor between ``base`` (t=0) and ``other`` (t=1); falls back to
    linear interpolation when the tensors are nearly colinear (|cos| > 0.9995), as mergekit."""
    wtree.check_compatible(base, other, names=("base_model", "model"))
    return jax.tree.map(lambda a, b: _slerp(t, a, b).astype(a.dtype) if wtree.is_array(a) else a, base, other)


def nearswap(base, other, *, t):
    """NearSwap: take ``other``'s value where it is within ``t`` of ``base``'s, interpolating by
    ``clip(t / |base - other|, 0, 1)``."""
    wtree.check_compatible(base, other, names=("base_model", "model"))

    def one(a, b):
        if not wtree.is_array(a):
            return a
        w = jnp.clip(t / jnp.maximum(jnp.abs(a - b).astype(jnp.float32), 1e-6), 0, 1)
        return (w * b + (1 - w) * a).astype(a.dtype)

    return jax.tree.map(one, base, other)


def karcher(models, *, weight=1.0, max_iter: int = 10, tol: float = 1e-5):
    """Riemannian (Karcher) mean of the unit directions, scaled by the weighted mean of the norms
    (mergekit's ``karcher``: fixed-point iterations on the sphere, equal weights; ``weight`` is our
    extension, normalised to sum to 1)."""
    stacked = _stacked(models)
    n = _check(None, stacked, need_base=False)
    alphas = jnp.asarray(_per_model(weight, n, "weight"), jnp.float32)
    alphas = alphas / jnp.sum(alphas)

    def one(s):
        if not wtree.is_array(s):
            return s
        x = s.reshape(n, -1).astype(jnp.float32)
        norms = jnp.linalg.norm(x, axis=1)
        valid = norms > tol
        units = jnp.where(valid[:, None], x / jnp.where(valid, norms, 1)[:, None], 0.0)
        a = jnp.where(valid, alphas, 0.0)
        a = a / jnp.where(jnp.sum(a) == 0, 1, jnp.sum(a))
        u = jnp.sum(a[:, None] * units, axis=0)
        nu = jnp.linalg.norm(u)
        first = units[jnp.argmax(valid)]
        u = jnp.where(nu < tol, first, u / jnp.where(nu < tol, 1, nu))

        def body(_, carry):
            u, done = carry
            dots = jnp.clip(units @ u, -1, 1)
            th = jnp.arccos(dots)
            coef = jnp.where(th < tol, 0.0, a * th / jnp.where(th < tol, 1, jnp.sin(th)))
            tvec = jnp.sum(coef[:, None] * (units - dots[:, None] * u[None]), axis=0)
            nt = jnp.linalg.norm(tvec)
            stop = done | (nt < tol)
            new = jnp.cos(nt) * u + jnp.sin(nt) * tvec / jnp.where(nt == 0, 1, nt)
            nn = jnp.linalg.norm(new)
            new = jnp.where(nn > tol, new / jnp.where(nn > tol, nn, 1), new)
            return jnp.where(stop, u, new), stop

        u, _ = jax.lax.fori_loop(0, max_iter, body, (u, jnp.array(False)))
        scale = jnp.sum(alphas * norms)  # every model's norm counts, zero ones included (as mergekit)
        out = jnp.where(jnp.any(valid), scale * u, jnp.zeros_like(u))
        return out.reshape(s.shape[1:]).astype(s.dtype)

    return jax.tree.map(one, stacked)


def model_stock(base, models, *, filter_wise: bool = False):
    """Model Stock (Jang et al. 2024): interpolate the average of >= 2 fine-tunes towards the base
    by ``t = N cos / (1 + (N - 1) cos)``, cos = mean pairwise cosine of their offsets from the base."""
    stacked = _stacked(models)
    n = _check(base, stacked)
    if n < 2:
        raise MergeError("model_stock needs at least two fine-tuned models besides the base")

    def one(b, s):
        if not wtree.is_array(b):
            return b
        w0 = b.astype(jnp.float32)
        ws = s.astype(jnp.float32)
        if filter_wise:
            w0v = w0[None] if w0.ndim == 1 else w0
            off = (ws[:, None] if w0.ndim == 1 else ws) - w0v[None]
            off = off.reshape(n, w0v.shape[0], -1)
        else:
            off = (ws - w0[None]).reshape(n, 1, -1)
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                num = jnp.sum(off[i] * off[j], axis=-1)
                den = jnp.maximum(jnp.linalg.norm(off[i], axis=-1) * jnp.linalg.norm(off[j], axis=-1), 1e-6)
                cos.append(jnp.clip(num / den, -1, 1))
        c = jnp.mean(jnp.stack(cos), axis=0)[:, None]  # (rows, 1)
        t = n * c / (1 + (n - 1) * c)
        avg = jnp.mean(ws, axis=0)
        shape = (w0.shape[0], -1) if (filter_wise and w0.ndim > 1) else (1, -1)
        out = t * avg.reshape(shape) + (1 - t) * w0.reshape(shape)
        return out.reshape(b.shape).astype(b.dtype)

    return jax.tree.map(one, base, stacked)


def passthrough(model):
    """Returns the (single) model unchanged (mergekit's passthrough; slices come with the YAML engine)."""
    return model

