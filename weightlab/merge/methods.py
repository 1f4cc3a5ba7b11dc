"""Named merge methods with mergekit's names, parameters and defaults, as short recipes over
:mod:`.steps`, each registered with :func:`~.registry.merge_method`.

Signature of every method: ``fn(base, models, *, key=None, **hp)``; ``models`` is a list of pytrees
or a stacked pytree (leading model axis, :func:`weightlab.tree.stack`). Per-model parameters
(``weight``, ``density``, ``gamma``, ``epsilon``) are a scalar or one value per model. ``lambda_``
is mergekit's ``lambda`` (both spellings work). Random methods need ``key``; masks use per-leaf keys
from the path and per-model keys from the model index, so results do not depend on leaf order or
device count.

Defaults (mergekit): task_arithmetic normalize=False; ties normalize=True; dare_* rescale (L1
match); della normalize=True, rescale; breadcrumbs gamma=0.01; della epsilon=0.15. Paper
variants: ``rescale="inverse"`` (DARE/DELLA's 1/p) and ``scope="global"`` (TIES/FusionBench
trimming over the whole model).
"""

from __future__ import annotations

import numpy as np

from .. import _lazy, tree as wtree
from ..errors import MergeError
from . import steps
from .params import check_hyperparameters
from .registry import Fast, inputs, merge_method, normalized_weights, per_model

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap", "karcher",
           "model_stock", "passthrough"]

_GTA = ("weight", "density", "gamma", "epsilon")


def first(stacked):
    """Model 0 of a stacked pytree."""
    return jax.tree.map(lambda x: x[0] if wtree.is_array(x) else x, stacked)


def _della_window(density, epsilon, n: int | None = None) -> None:
    """DELLA's keep probabilities ``density +- epsilon`` must stay inside (0, 1)."""
    n = n or max(int(np.size(density)), int(np.size(epsilon)), 1)
    dens, eps = per_model(density, n, "density"), per_model(epsilon, n, "epsilon")
    if np.any(dens < 1) and np.any((dens + eps >= 1) | (dens - eps <= 0)):
        raise MergeError(f"epsilon must keep density +- epsilon inside (0, 1), got density {dens.tolist()} and "
                         f"epsilon {eps.tolist()}")


def _check_della(hp: dict) -> None:
    _della_window(hp["density"], hp["epsilon"])


def _gta(base, stacked, *, weight=1.0, density=1.0, sparsification=None, consensus=None, normalize=False,
         rescale=None, lambda_=1.0, gamma=0.01, epsilon=0.15, key=None, scope: str = "tensor", threshold=None):
    """The task-vector pipeline on validated inputs (see :func:`generalized_task_arithmetic`)."""
    n = wtree.num_models(stacked)
    w, dens = per_model(weight, n, "weight"), per_model(density, n, "density")
    gam, eps = per_model(gamma, n, "gamma"), per_model(epsilon, n, "epsilon")
    norm = "l1" if rescale is True else (None if rescale is False else rescale)  # bool = mergekit's switch
    if sparsification in ("random", "della_magprune") and key is None and np.any(dens < 1):
        raise MergeError(f"{sparsification} sparsification is random: pass key=jax.random.key(...)")
    if sparsification == "della_magprune":
        _della_window(dens, eps, n)
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


def generalized_task_arithmetic(base, models, *, key=None, **hp):
    """task vectors -> sparsify -> weight -> (sign election) -> combine -> x lambda -> + base.

    The building block of the task-vector recipes (not a registered method: compose your own):
    ``sparsification`` None | "magnitude" | "magnitude_outliers" | "random" | "della_magprune";
    ``consensus`` None | "sum" | "count"; ``threshold``: per-model magnitude cut-offs (N,) used
    instead of per-tensor top-k (the streaming engine computes them on the host)."""
    if "lambda" in hp:
        hp["lambda_"] = hp.pop("lambda")
    check_hyperparameters("generalized_task_arithmetic", hp, set(_GTA))
    x = inputs(base, models, name="generalized_task_arithmetic")
    return _gta(x.base, x.models, key=key, **hp)


def _linear_applies(kw: dict, has_base: bool) -> bool:
    return not set(kw) - {"weight", "normalize"}


def _linear_fast(block: np.ndarray, kw: dict, has_base: bool):
    """In-place numpy ``linear`` in the block's dtype: the weights are normalised first (in float64),
    then ``sum_i (w_i / sum w) x_i`` is accumulated, so the sum cannot overflow before the division."""
    n = block.shape[0]
    w = per_model(kw.get("weight", 1.0), n, "weight")
    if kw.get("normalize", True):
        w = normalized_weights(w, n, "linear")
    w = w.astype(block.dtype)
    acc = block[0]
    acc *= w[0]
    for i in range(1, n):
        block[i] *= w[i]
        acc += block[i]
    return acc


def _task_arithmetic_applies(kw: dict, has_base: bool) -> bool:
    return has_base and not kw.get("normalize") and not set(kw) - {"weight", "lambda_", "normalize"}


def _task_arithmetic_fast(block: np.ndarray, kw: dict, has_base: bool):
    """In-place numpy plain task arithmetic in the block's dtype (base first in ``block``)."""
    base, models = block[0], block[1:]
    w = per_model(kw.get("weight", 1.0), models.shape[0], "weight") * float(kw.get("lambda_", 1.0))
    for i in range(models.shape[0]):
        models[i] -= base
        models[i] *= w[i].astype(block.dtype)
    for i in range(models.shape[0]):
        base += models[i]
    return base


def _check_linear(hp: dict) -> None:
    if hp["normalize"]:
        normalized_weights(hp["weight"], None, "linear")


@merge_method("task_arithmetic", per_model_params=_GTA, mergekit=True,
              fast=Fast(_task_arithmetic_applies, _task_arithmetic_fast),
              paper="Ilharco et al. 2023")
def task_arithmetic(base, models, *, weight=1.0, lambda_=1.0, normalize=False):
    """Task arithmetic: ``base + lambda * sum_i weight_i (theta_i - base)``."""
    return _gta(base, models, weight=weight, lambda_=lambda_, normalize=normalize)


@merge_method("ties", per_model_params=_GTA, mergekit=True, host_topk=True, paper="Yadav et al. 2023")
def ties(base, models, *, weight=1.0, density=1.0, lambda_=1.0, normalize=True, rescale=False, consensus="sum",
         scope="tensor", threshold=None):
    """TIES: trim each task vector to its top ``density``, elect signs by mass, disjoint mean."""
    return _gta(base, models, weight=weight, density=density, sparsification="magnitude", consensus=consensus,
                normalize=normalize, rescale=rescale, lambda_=lambda_, scope=scope, threshold=threshold)


@merge_method("dare_ties", per_model_params=_GTA, mergekit=True, paper="Yu et al. 2024")
def dare_ties(base, models, *, key=None, weight=1.0, density=1.0, lambda_=1.0, normalize=False, rescale=True):
    """DARE random drop + rescale, then TIES sign election."""
    return _gta(base, models, weight=weight, density=density, sparsification="random", consensus="sum",
                normalize=normalize, rescale=rescale, lambda_=lambda_, key=key)


@merge_method("dare_linear", per_model_params=_GTA, mergekit=True, paper="Yu et al. 2024")
def dare_linear(base, models, *, key=None, weight=1.0, density=1.0, lambda_=1.0, normalize=False, rescale=True):
    """DARE random drop + rescale, then a weighted sum of task vectors."""
    return _gta(base, models, weight=weight, density=density, sparsification="random", normalize=normalize,
                rescale=rescale, lambda_=lambda_, key=key)


@merge_method("breadcrumbs", per_model_params=_GTA, mergekit=True, paper="Davari & Belilovsky 2024")
def breadcrumbs(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0, normalize=False, rescale=False):
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest entries, keep ``density``."""
    return _gta(base, models, weight=weight, density=density, gamma=gamma, sparsification="magnitude_outliers",
                normalize=normalize, rescale=rescale, lambda_=lambda_)


@merge_method("breadcrumbs_ties", per_model_params=_GTA, mergekit=True, paper="Davari & Belilovsky 2024")
def breadcrumbs_ties(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0, normalize=False,
                     rescale=False):
    """Breadcrumbs sparsification with TIES sign election."""
    return _gta(base, models, weight=weight, density=density, gamma=gamma, sparsification="magnitude_outliers",
                consensus="sum", normalize=normalize, rescale=rescale, lambda_=lambda_)


@merge_method("della", per_model_params=_GTA, mergekit=True, check=_check_della, paper="Deep et al. 2024")
def della(base, models, *, key=None, weight=1.0, density=1.0, epsilon=0.15, lambda_=1.0, normalize=True,
          rescale=True):
    """DELLA: magnitude-ranked drop probabilities, rescale, sign election."""
    return _gta(base, models, weight=weight, density=density, epsilon=epsilon, sparsification="della_magprune",
                consensus="sum", normalize=normalize, rescale=rescale, lambda_=lambda_, key=key)


@merge_method("della_linear", per_model_params=_GTA, mergekit=True, check=_check_della, paper="Deep et al. 2024")
def della_linear(base, models, *, key=None, weight=1.0, density=1.0, epsilon=0.15, lambda_=1.0, normalize=False,
                 rescale=True):
    """DELLA sparsification, weighted sum without sign election."""
    return _gta(base, models, weight=weight, density=density, epsilon=epsilon, sparsification="della_magprune",
                normalize=normalize, rescale=rescale, lambda_=lambda_, key=key)


@merge_method("linear", base="unused", per_model_params=("weight",), mergekit=True,
              fast=Fast(_linear_applies, _linear_fast), check=_check_linear, paper="Wortsman et al. 2022 (model soups)")
def linear(base, models, *, weight=1.0, normalize=True):
    """Weighted average ``sum w_i theta_i / sum w_i`` (``normalize=False``: the weighted sum).

    The weights are normalised first (float64), then the weighted sum is accumulated in float32, so
    large weights cannot overflow it; weights summing to ~0 are refused (``|sum w| <= 1e-6 sum |w|``)."""
    n = wtree.num_models(models)
    w64 = normalized_weights(weight, n, "linear") if normalize else per_model(weight, n, "weight")
    w = jnp.asarray(w64, jnp.float32)

    def one(s):
        if not wtree.is_array(s):
            return s
        wb = w.reshape((n,) + (1,) * (s.ndim - 1))
        return steps.model_sum(wb * s.astype(jnp.float32)).astype(s.dtype)

    return jax.tree.map(one, models)


@merge_method("sce", mergekit=True, paper="Wan et al. 2024 (FuseChat)")
def sce(base, models, *, select_topk=1.0):
    """SCE: keep the ``select_topk`` fraction of entries with the largest variance across models,
    elect signs, weight each model by its mean squared task vector."""
    n = wtree.num_models(models)

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

    return jax.tree.map(one, base, models)


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


@merge_method("slerp", count=(1, 1), mergekit=True, paper="Shoemake 1985; mergekit")
def slerp(base, models, *, t):
    """Spherical interpolation per tensor from ``base`` (t=0) to the one model (t=1); linear when the
    tensors are nearly colinear (|cos| > 0.9995), as mergekit."""
    other = first(models)
    return jax.tree.map(lambda a, b: _slerp(t, a, b).astype(a.dtype) if wtree.is_array(a) else a, base, other)


@merge_method("nearswap", count=(1, 1), mergekit=True, paper="mergekit")
def nearswap(base, models, *, t):
    """NearSwap: take the model's value where it is within ``t`` of ``base``'s, interpolating by
    ``clip(t / |base - other|, 0, 1)``."""
    other = first(models)

    def one(a, b):
        if not wtree.is_array(a):
            return a
        w = jnp.clip(t / jnp.maximum(jnp.abs(a - b).astype(jnp.float32), 1e-6), 0, 1)
        return (w * b + (1 - w) * a).astype(a.dtype)

    return jax.tree.map(one, base, other)


@merge_method("karcher", base="unused", per_model_params=("weight",), mergekit=True,
              check=lambda hp: normalized_weights(hp["weight"], None, "karcher"), paper="Karcher 1977; mergekit")
def karcher(base, models, *, weight=1.0, max_iter: int = 10, tol: float = 1e-5):
    """Riemannian (Karcher) mean of the unit directions, scaled by the weighted mean of the norms
    (mergekit's ``karcher``: fixed-point iterations on the sphere, equal weights; ``weight`` is our
    extension, normalised to sum to 1)."""
    n = wtree.num_models(models)
    alphas = jnp.asarray(normalized_weights(weight, n, "karcher"), jnp.float32)

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
        first_valid = units[jnp.argmax(valid)]
        u = jnp.where(nu < tol, first_valid, u / jnp.where(nu < tol, 1, nu))

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

    return jax.tree.map(one, models)


@merge_method("model_stock", count=(2, None), mergekit=True, paper="Jang et al. 2024")
def model_stock(base, models, *, filter_wise: bool = False):
    """Model Stock: interpolate the average of >= 2 fine-tunes towards the base by
    ``t = N cos / (1 + (N - 1) cos)``, cos = mean pairwise cosine of their offsets from the base."""
    n = wtree.num_models(models)

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

    return jax.tree.map(one, base, models)


@merge_method("passthrough", base="unused", count=(1, 1), mergekit=True, paper="mergekit (frankenmerges via slices)")
def passthrough(base, models):
    """The one model unchanged (layer stacking comes from the YAML engine's ``slices``)."""
    return first(models)
