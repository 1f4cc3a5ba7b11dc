"""Merges that decide, entry by entry, which task vector to keep: arcee_fusion, RAM / RAM+,
MagMax, TALL masks + consensus merging, EMR-merging and PCB-merging.

All take ``base`` (one params pytree) and ``models`` (a list or a stacked pytree, leading model
axis) and work on task vectors ``tau_i = theta_i - base`` in float32.

* :func:`arcee_fusion` (mergekit): importance ``|tau| * KL(softmax(theta) || softmax(base))`` per
  row (last axis); keep the entries whose importance is >= median + 1.5 IQR of the tensor.
  *Difference*: mergekit estimates the quantiles from 10^6 randomly sampled entries on large tensors
  (not reproducible); we use the exact quantiles (same index rule, ``floor(q (n-1))``).
* :func:`ram` / :func:`ramplus_tl` (mergekit, "Reinforced Agent Merging", arXiv:2601.13572): an
  entry changed by one model only (``|tau| > epsilon``) is taken whole, an entry changed by several is
  averaged over those; RAM+ (tensor-local) scales each model's unique entries by
  ``1 + r * clip(shared_i / unique_i, 0, alpha)``.
* :func:`magmax` (Marczak et al., ECCV 2024): per entry, the task-vector value with the largest
  magnitude (a later model wins ties, as the reference's running ``>=``).
* :func:`tall_masks` / :func:`consensus` (Wang et al., ICML 2024, "Localizing Task Information"):
  ``m_t = |tau_t| > lambda |tau_MTL - tau_t|`` with ``tau_MTL = sum_t tau_t``; consensus merging keeps
  ``tau_MTL`` only where at least ``k`` masks agree.
* :func:`emr` (Huang et al., NeurIPS 2024, "EMR-Merging"): elect a unified task vector (sign of the
  sum — zeros count as negative, as the reference —, then the largest magnitude agreeing with it),
  plus a per-task mask and a per-task rescaler; :meth:`EMRResult.task_model` gives each task's model.
* :func:`pcb` (Du et al., NeurIPS 2024, "Parameter Competition Balancing"): intra-balancing
  ``exp(N * minmax(|tau_i|)^2)`` times inter-balancing ``tanh(tau_i * sum_j tau_j)``; keep the top
  ``pcb_ratio`` of each model's scores, min-max normalise them into weights, and take the weighted
  mean of the (outlier-clamped) task vectors. The reference works over the whole flattened model
  (``scope="global"``, our default); ``scope="tensor"`` does the same per tensor (streamable).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .methods import first
from .registry import inputs, merge_method, per_model

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["arcee_fusion", "ram", "ramplus_tl", "magmax", "tall_masks", "consensus", "emr", "EMRResult", "pcb"]


def _apply(base, stacked, fn):
    """``base + fn(path, tau)`` on every array leaf (tau: (N, ...) float32)."""
    def one(path, b, s):
        if not wtree.is_array(b):
            return b
        tau = s.astype(jnp.float32) - b.astype(jnp.float32)[None]
        return (b.astype(jnp.float32) + fn(path, tau)).astype(b.dtype)
    return wtree.map_with_path(one, base, stacked)


def _quantile_lower(x, q):
    """``sorted(x)[floor(q * (n - 1))]`` over the flattened array."""
    flat = jnp.sort(x.reshape(-1))
    return flat[int(q * (flat.shape[0] - 1))]


@merge_method("arcee_fusion", count=(1, 1), mergekit=True, paper="mergekit (Arcee Fusion)")
def arcee_fusion(base, models):
    """Keep the model's change only where its importance is an outlier (median + 1.5 IQR)."""
    model = first(models)

    def one(b, m):
        if not wtree.is_array(b):
            return b
        b32, m32 = b.astype(jnp.float32), m.astype(jnp.float32)
        if b.ndim == 0:
            return m
        p = jax.nn.softmax(m32, axis=-1) + 1e-8
        q = jax.nn.softmax(b32, axis=-1) + 1e-8
        kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
        imp = jnp.abs(m32 - b32) * kl
        q1, med, q3 = (_quantile_lower(imp, v) for v in (0.25, 0.5, 0.75))
        keep = imp >= med + 1.5 * (q3 - q1)
        return (b32 + (m32 - b32) * keep).astype(b.dtype)

    return jax.tree.map(one, base, model)


def _ram_parts(tau, epsilon):
    nz = jnp.abs(tau) > epsilon
    count = jnp.sum(nz, axis=0)
    tz = tau * nz
    return nz, count, tz


@merge_method("ram", mergekit=True, paper="arXiv:2601.13572 (Reinforced Agent Merging)")
def ram(base, models, *, epsilon: float = 1e-5):
    """RAM: unique changes kept whole, overlapping changes averaged over the models that made them."""
    stacked = models

    def fn(path, tau):
        nz, count, tz = _ram_parts(tau, epsilon)
        return jnp.sum(jnp.where(count == 1, tz, tz / jnp.maximum(count, 1)), axis=0)

    return _apply(base, stacked, fn)


@merge_method("ramplus_tl", mergekit=True, paper="arXiv:2601.13572 (RAM+, tensor-local)")
def ramplus_tl(base, models, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5):
    """RAM+: RAM with each model's unique entries scaled by ``1 + r * clip(shared/unique, 0, alpha)``."""
    stacked, n = models, wtree.num_models(models)

    def fn(path, tau):
        nz, count, tz = _ram_parts(tau, epsilon)
        axes = tuple(range(1, tau.ndim))
        shared = jnp.sum(nz & (count > 1)[None], axis=axes)
        unique = jnp.sum(nz & (count == 1)[None], axis=axes)
        lam = 1 + r * jnp.clip(shared / jnp.maximum(unique, epsilon), 0, alpha)
        lam = lam.reshape((n,) + (1,) * (tau.ndim - 1))
        return jnp.sum(jnp.where(count == 1, tz * lam, tz / jnp.maximum(count, 1)), axis=0)

    return _apply(base, stacked, fn)


@merge_method("magmax", paper="Marczak et al. 2024 (MagMax)")
def magmax(base, models, *, lambda_: float = 1.0):
    """MagMax: ``base + lambda * tau_{argmax_t |tau_t|}`` per entry (the last model wins ties)."""
    stacked, n = models, wtree.num_models(models)

    def fn(path, tau):
        rev = jnp.abs(tau[::-1])
        pick = n - 1 - jnp.argmax(rev, axis=0)  # first max from the end = last max
        return lambda_ * jnp.take_along_axis(tau, pick[None], axis=0)[0]

    return _apply(base, stacked, fn)


def _tall(base, stacked, tall_mask_lambda, multitask):
    """Per leaf ``(tau_MTL, TALL masks)``: the multi-task vector and ``|tau_t| > lambda |tau_MTL - tau_t|``."""
    if multitask is not None:
        wtree.check_compatible(base, multitask, names=("base_model", "multitask"))

    def one(b, s, *mt):
        if not wtree.is_array(b):
            return b
        b32 = b.astype(jnp.float32)
        tau = s.astype(jnp.float32) - b32[None]
        mtl = (mt[0].astype(jnp.float32) - b32) if mt else jnp.sum(tau, axis=0)
        return mtl, jnp.abs(tau) > tall_mask_lambda * jnp.abs(mtl[None] - tau)

    rest = (multitask,) if multitask is not None else ()
    return jax.tree.map(one, base, stacked, *rest)


def _pick(pairs, base, i):
    """Element ``i`` of the per-leaf pairs from :func:`_tall`, in ``base``'s structure."""
    return jax.tree.map(lambda b, p: p[i] if wtree.is_array(b) else b, base, pairs)


def tall_masks(base, models, *, tall_mask_lambda: float = 0.6, multitask=None):
    """Per-task boolean masks (a stacked pytree): ``|tau_t| > lambda * |tau_MTL - tau_t|``.

    ``multitask``: the merged model whose task vector is ``tau_MTL`` (default: task arithmetic,
    ``base + sum_t tau_t``)."""
    stacked = inputs(base, models, name="tall_masks").models
    return _pick(_tall(base, stacked, tall_mask_lambda, multitask), base, 1)


@merge_method("consensus", extras=("multitask",), paper="Wang et al. 2024 (TALL masks / consensus)")
def consensus(base, models, *, k: int = 2, tall_mask_lambda: float = 0.6, lambda_: float = 1.0, multitask=None):
    """Consensus merging: ``base + lambda * 1[#{t: m_t} >= k] * tau_MTL`` (drops "selfish" and
    "catastrophic" weights that fewer than ``k`` tasks use)."""
    stacked, n = models, wtree.num_models(models)
    if k > n:
        raise MergeError(f"consensus: k must be at most the number of models ({n}), got {k}")
    pairs = _tall(base, stacked, tall_mask_lambda, multitask)

    def one(b, p):
        if not wtree.is_array(b):
            return b
        mtl, m = p
        return (b.astype(jnp.float32) + lambda_ * mtl * (jnp.sum(m, axis=0) >= k)).astype(b.dtype)

    return jax.tree.map(one, base, pairs)


class EMRResult(NamedTuple):
    """EMR-merging output: one unified task vector, a mask per task (stacked, leading task axis) and
    a rescaler per task. ``task_model(i)`` = ``base + rescalers[i] * masks[i] * unified``."""
    base: Any
    unified: Any
    masks: Any
    rescalers: jax.Array

    def task_model(self, i: int):
        r = self.rescalers[i]

        def one(b, u, m):
            if not wtree.is_array(b):
                return b
            return (b.astype(jnp.float32) + r * u * m[i]).astype(b.dtype)

        return jax.tree.map(one, self.base, self.unified, self.masks)


def emr(base, models) -> EMRResult:
    """Elect, Mask & Rescale: tuning-free per-task models sharing one unified task vector."""
    x = inputs(base, models, name="emr")
    base, stacked, n = x.base, x.models, x.n
    leaves_b, treedef = jax.tree.flatten(base)
    unified, masks = [], []
    before = after = jnp.zeros((n,), jnp.float32)
    for b, s in zip(leaves_b, jax.tree.leaves(stacked)):
        if not wtree.is_array(b):
            unified.append(b)
            masks.append(b)
            continue
        tau = s.astype(jnp.float32) - b.astype(jnp.float32)[None]
        flag = jnp.where(jnp.sum(tau, axis=0) > 0, 1.0, -1.0)
        mask = tau * flag[None] > 0
        u = jnp.max(jnp.abs(tau) * mask, axis=0) * flag
        axes = tuple(range(1, tau.ndim))
        before = before + jnp.mean(jnp.abs(tau), axis=axes)
        after = after + jnp.mean(jnp.abs(u[None] * mask), axis=axes)
        unified.append(u)
        masks.append(mask)
    return EMRResult(base, jax.tree.unflatten(treedef, unified), jax.tree.unflatten(treedef, masks),
                     before / jnp.where(after == 0, 1.0, after))


def _minmax(x):
    lo, hi = jnp.min(x, axis=1, keepdims=True), jnp.max(x, axis=1, keepdims=True)
    return (x - lo) / jnp.where(hi > lo, hi - lo, 1.0)


def _clamp_rows(x, lo_ratio, hi_ratio):
    d = x.shape[1]
    srt = jnp.sort(x, axis=1)
    lo = srt[:, int(d * lo_ratio)][:, None]
    hi = srt[:, max(int(d * (1 - hi_ratio) - 1), 0)][:, None]
    return jnp.clip(x, lo, hi)


def _pcb_flat(tau, w, ratio):
    """PCB over task vectors flattened to (N, D); returns the merged (D,) vector."""
    n = tau.shape[0]
    mag = _clamp_rows(jnp.abs(tau), 1e-4, 1e-4)
    clamped = jnp.sign(tau) * mag
    intra = jnp.exp(n * _minmax(mag) ** 2)
    inter = jnp.tanh(tau * jnp.sum(tau, axis=0, keepdims=True))
    scale = _minmax(_clamp_rows(intra * inter, 1 - ratio, 0.0))
    return jnp.sum(w[:, None] * clamped * scale, axis=0) / jnp.maximum(jnp.sum(scale, axis=0), 1e-12)


@merge_method("pcb", per_model_params=("weight",), stream_kwargs=(("scope", "tensor"),),
              paper="Du et al. 2024 (PCB-merging)")
def pcb(base, models, *, pcb_ratio: float = 0.1, weight=1.0, lambda_: float = 1.0, scope: str = "global"):
    """PCB-merging: ``base + lambda * sum_i w_i s_i tau_i / sum_i s_i`` with balanced scores s_i.

    ``pcb_ratio``: fraction of each model's entries that keep a non-zero score. ``weight``: per-model
    coefficients (the paper searches them with an evolution strategy; 1 = plain PCB)."""
    stacked, n = models, wtree.num_models(models)
    w = jnp.asarray(per_model(weight, n, "weight"), jnp.float32)
    if scope == "tensor":
        return _apply(base, stacked, lambda p, tau: lambda_ * _pcb_flat(tau.reshape(n, -1), w, pcb_ratio)
                      .reshape(tau.shape[1:]))
    flat_b, _ = wtree.flatten_with_paths(base)
    flat_s = jax.tree.leaves(stacked)
    arrays = [(b, s) for (p, b), s in zip(flat_b, flat_s) if wtree.is_array(b)]
    tau = jnp.concatenate([(s.astype(jnp.float32) - b.astype(jnp.float32)[None]).reshape(n, -1)
                           for b, s in arrays], axis=1)
    merged = lambda_ * _pcb_flat(tau, w, pcb_ratio)
    sizes = np.cumsum([b.size for b, _ in arrays])[:-1]
    parts = iter(jnp.split(merged, sizes))
    return jax.tree.map(lambda b: (b.astype(jnp.float32) + next(parts).reshape(b.shape)).astype(b.dtype)
                        if wtree.is_array(b) else b, base)
