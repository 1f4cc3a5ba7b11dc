"""Quantization-aware training: straight-through fake quantization and LSQ learnable scales.

* :func:`fake_quant` — the forward pass sees ``dequant(quant(w))``, the backward pass treats
  rounding as the identity (straight-through estimator, Bengio et al. 2013), so the float "master"
  weights are trained by any optax optimizer. :func:`qat` is the same as a
  :class:`~weightlab.WeightTransform` (use it inside ``apply_fn``, with :func:`weightlab.select`, or
  as a projection after every optimizer step: ``optax.chain(optax.adam(lr), wl.as_optax(quant.qat()))``;
  the grid is idempotent, so re-projecting weights already on it changes nothing).
* :func:`lsq_fake_quant` — LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the
  step size ``s`` is a trainable parameter; ``w_q = s · round(clip(w / s, -Q_n, Q_p))`` with the
  straight-through round and the paper's gradient scale ``1 / sqrt(N · Q_p)`` on ``s``.
  :func:`lsq_init` creates the step sizes (per group, from ``2·mean|w|/sqrt(Q_p)`` as in the paper).
* :func:`qat_apply_fn` wraps a model's ``apply_fn`` so that the selected weights are fake-quantized
  on the way in: train it with optax as usual, then quantize the trained weights for real.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .. import tree as wtree
from ..core import WeightTransform, per_leaf, select as select_leaves
from .formats import DEFAULT_SELECT, DEFAULTS, get_format
from .rounding import build, group, quantize_rtn, resolve_layout

__all__ = ["fake_quant", "qat", "lsq_init", "lsq_fake_quant", "lsq_export", "qat_apply_fn"]


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant(w, fmt=DEFAULTS["fmt"], bits=DEFAULTS["bits"], group_size=DEFAULTS["group_size"],
               axis=DEFAULTS["axis"], **kwargs):
    """``dequant(quant_rtn(w))`` in the forward pass, identity gradient in the backward pass."""
    q = quantize_rtn(jax.lax.stop_gradient(w), fmt, bits, group_size, axis, **kwargs).dequantize(w.dtype)
    return w + jax.lax.stop_gradient(q - w)


def qat(**kwargs) -> WeightTransform:
    """Fake quantization (:func:`fake_quant`, RTN grid, straight-through gradient) of every weight leaf
    it sees; keyword arguments as :func:`~weightlab.quant.rounding.quantize_rtn` (``fmt``, ``bits``,
    ``group_size``, ``axis``, ``scale_dtype``). Weights stay float arrays of their dtype."""
    def fq(x, path, key):
        del key
        return fake_quant(x, **kwargs)

    return per_leaf(fq)


def lsq_init(params, *, bits: int = 4, group_size=128, axis=None, select: wtree.SelectorLike = DEFAULT_SELECT):
    """Initial LSQ step sizes for the 2-D leaves ``select`` picks: a dict {path: (G, 1, N)}."""
    qp = 2 ** (bits - 1) - 1
    fmt = get_format("int", bits)
    sel = wtree.selector(select)
    out = {}
    for p, x in wtree.flatten_with_paths(params)[0]:
        if wtree.is_array(x) and x.ndim == 2 and sel(p, x):
            ax, g = resolve_layout(x.shape, fmt, group_size, axis, p)
            wg, red = group(x, ax, g)
            out[p] = 2 * jnp.mean(jnp.abs(wg), axis=red, keepdims=True) / jnp.sqrt(qp)
    return out


def lsq_fake_quant(w, s, *, bits: int = 4, group_size=128, axis=None):
    """LSQ fake quantization of ``w`` with trainable step sizes ``s`` (grouped layout)."""
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    ax, g = resolve_layout(w.shape, get_format("int", bits), group_size, axis)
    wg, _ = group(w, ax, g)
    gscale = 1.0 / jnp.sqrt(w.size * qp / max(s.size, 1))
    s_eff = s * gscale + jax.lax.stop_gradient(s - s * gscale)  # value s, gradient scaled by gscale
    return (_round_ste(jnp.clip(wg / s_eff, -qn, qp)) * s_eff).reshape(w.shape).astype(w.dtype)


def qat_apply_fn(apply_fn: Callable, *, select: wtree.SelectorLike = DEFAULT_SELECT, lsq: bool = False,
                 **kwargs) -> Callable:
    """``apply_fn`` with the selected weights fake-quantized. With ``lsq=True`` the new function
    takes ``(params, steps, batch)`` where ``steps`` comes from :func:`lsq_init`."""
    if not lsq:
        t = select_leaves(select, qat(**kwargs))
        return lambda params, batch: apply_fn(t.apply(params, t.init(params))[0], batch)

    def f(params, steps, batch):
        fq = wtree.map_with_path(lambda p, x: lsq_fake_quant(x, steps[p], **kwargs) if p in steps else x, params)
        return apply_fn(fq, batch)

    return f


def lsq_export(params, steps: dict, *, bits: int = 4, group_size=128, axis=None, scale_dtype=jnp.float32):
    """Turn LSQ-trained weights and step sizes into real QArrays (symmetric int, codes
    ``round(clip(w/s)) + 2^(b-1)``), matching :func:`lsq_fake_quant`'s forward pass exactly."""
    fmt = get_format("int", bits)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1

    def one(p, x):
        if p not in steps:
            return x
        ax, g = resolve_layout(x.shape, fmt, group_size, axis, p)
        wg, _ = group(x, ax, g)
        s = steps[p].astype(scale_dtype)
        codes = (jnp.clip(jnp.round(wg / s.astype(jnp.float32)), -qn, qp) + qn).astype(jnp.uint8)
        return build(jnp.asarray(x), fmt, ax, g, codes, s)

    return wtree.map_with_path(one, params)
