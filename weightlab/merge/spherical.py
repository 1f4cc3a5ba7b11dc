"""Spherical merges beyond two-model ``slerp``: ``nuslerp`` and ``multislerp`` (mergekit's names,
parameters and defaults).

* :func:`nuslerp` (mergekit "NuSLERP"): slerp between exactly two models with the interpolation
  factor taken from their weights, ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0). With
  a ``base`` it interpolates the two *task vectors* and adds the base back. The angle is measured over
  the whole tensor (``flatten=True``, the default), or per vector along the last axis, or along the
  first axis (``row_wise=True``; mergekit's name, its code normalises along axis 0).
* :func:`multislerp` (Goddard 2024, "multislerp"): barycentric interpolation of N >= 2 tensors on
  the hypersphere: unit directions are averaged with the (normalised) weights, the tangent-space
  mean is mapped back with the exponential map, and the result is scaled by the weighted mean norm.
  With a ``base`` it works on task vectors. Because the tangent vectors are taken at the weighted
  Euclidean mean, their weighted sum vanishes when the weights sum to one, so the result is the
  normalised weighted mean direction times the weighted mean norm; we compute exactly what mergekit
  does, including its ``eps`` placement.

Difference from mergekit: where multislerp's weighted mean direction is ~0 with more than two
inputs, mergekit raises at merge time; we raise a :class:`MergeError` naming the tensor only when
the arrays are concrete (inside ``jit`` the result is the linear fallback).
"""

from __future__ import annotations

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .registry import merge_method, normalized_weights, per_model

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["nuslerp", "multislerp"]


def _nuslerp_tensor(t, v0, v1, axis, flatten, eps=1e-8):
    shape = v0.shape
    if flatten or v0.ndim == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        a, b = jnp.moveaxis(v0, axis, -1), jnp.moveaxis(v1, axis, -1)
    ua = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    ub = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    cos = jnp.sum(ua * ub, axis=-1, keepdims=True)
    theta = jnp.arccos(jnp.clip(cos, -1, 1))
    sin = jnp.sin(theta)
    colinear = jnp.abs(sin) < eps
    safe = jnp.where(colinear, 1.0, sin)
    res = jnp.where(colinear, (1 - t) * a + t * b,
                    (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / safe)
    if not (flatten or v0.ndim == 0):
        res = jnp.moveaxis(res, -1, axis)
    return res.reshape(shape)


@merge_method("nuslerp", base="optional", count=(2, 2), per_model_params=("weight",), mergekit=True,
              paper="mergekit (NuSLERP)")
def nuslerp(base, models, *, weight, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False):
    """Slerp two models (or their task vectors from ``base``) at ``t = w_1 / (w_0 + w_1)``.

    ``weight``: two numbers (required, as in mergekit). ``nuslerp_flatten`` measures one angle per
    tensor; otherwise per vector along the last axis, or along axis 0 with ``nuslerp_row_wise``.
    """
    w = per_model(weight, 2, "weight")
    t = 0.5 if abs(w.sum()) < 1e-6 else float(w[1] / w.sum())
    axis = 0 if nuslerp_row_wise else -1

    def one(path, s, *b):
        if not wtree.is_array(s):
            return s
        x = s.astype(jnp.float32)
        if b:
            b0 = b[0].astype(jnp.float32)
            out = b0 + _nuslerp_tensor(t, x[0] - b0, x[1] - b0, axis, nuslerp_flatten)
        else:
            out = _nuslerp_tensor(t, x[0], x[1], axis, nuslerp_flatten)
        return out.astype(s.dtype)

    if base is None:
        return wtree.map_with_path(one, models)
    return wtree.map_with_path(one, models, base)


def _check_multislerp(hp: dict) -> None:
    if hp["normalize_weights"]:
        normalized_weights(hp["weight"], None, "multislerp")


@merge_method("multislerp", base="optional", per_model_params=("weight",), mergekit=True, check=_check_multislerp,
              paper="Goddard 2024")
def multislerp(base, models, *, weight=1.0, normalize_weights: bool = True, eps: float = 1e-8):
    """Barycentric interpolation of N models on the hypersphere (per tensor), optionally of their
    task vectors from ``base``; ``weight``: one number or one per model."""
    n = wtree.num_models(models)
    w = normalized_weights(weight, n, "multislerp") if normalize_weights else per_model(weight, n, "weight")
    wj = jnp.asarray(w, jnp.float32)

    def one(path, s, *b):
        if not wtree.is_array(s):
            return s
        if n == 1:
            return s[0]
        x = s.astype(jnp.float32)
        if b:
            x = x - b[0].astype(jnp.float32)[None]
        flat = x.reshape(n, -1)
        norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
        units = flat / (norms + eps)
        mean = jnp.sum(units * wj[:, None], axis=0)
        mnorm = jnp.linalg.norm(mean)
        if n > 2 and not isinstance(mnorm, jax.core.Tracer) and float(mnorm) < eps:
            raise MergeError(f"'{path}': multislerp's weighted mean direction is zero (antipodal inputs "
                             "with balancing weights); change the weights")
        mean_u = mean / jnp.where(mnorm < eps, 1.0, mnorm)
        dots = jnp.sum(units * mean_u, axis=1, keepdims=True)
        tangent = jnp.sum((units - dots * mean_u) * wj[:, None], axis=0)
        tn = jnp.linalg.norm(tangent) + eps
        res = (mean_u * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)) * jnp.sum(norms[:, 0] * wj)
        lin = jnp.sum(flat * wj[:, None], axis=0)
        res = jnp.where(mnorm < eps, lin, res).reshape(s.shape[1:])
        if b:
            res = res + b[0].astype(jnp.float32)
        return res.astype(s.dtype)

    if base is None:
        return wtree.map_with_path(one, models)
    return wtree.map_with_path(one, models, base)
