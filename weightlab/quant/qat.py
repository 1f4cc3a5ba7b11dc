"""Quantization-aware training: straight-through fake quantization and LSQ learnable scales.

* :func:`fake_quant` — the forward pass sees ``dequant(quant(w))``, the backward pass treats
  rounding as the identity (straight-through estimator, Bengio et al. 2013), so the float "master"
  weights are trained by any optax optimizer. :func:`fake_quantizer` is the same as a
  :class:`~weightlab.WeightTransform` (use it inside ``apply_fn`` or with :func:`weightlab.select`).
* :func:`lsq_fake_quant` — LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the
  step size ``s`` is a trainable parameter; ``w_q = s · round(clip(w / s, -Q_n, Q_p))`` with the
  straight-through round and the paper's gradient scale ``1 / sqrt(N · Q_p)`` on ``s``.
  :func:`lsq_init` creates the step sizes (per group, from ``2·mean|w|/sqrt(Q_p)`` as in the paper).
* :func:`qat_apply_fn` wraps a model's ``apply_fn`` so that the selected weights are fake-quantized
  on the way in: train it with optax as usual, then quantize the trained weights for real.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp

from .. import tree as wtree
from ..core import WeightTransform, per_leaf, select
from .rtn import _group, quantize_rtn, resolve_layout
from .formats import get_format

__all__ = ["fake_quant", "fake_quantizer", "lsq_init", "lsq_fake_quant", "lsq_export", "qat_apply_fn"]


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant(w, fmt="int", bits=4, group_size="auto", axis=None, **kwargs):
    """``dequant(quant_rtn(w))`` in the forward pass, identity gradient in the backward pass."""
    q = quantize_rtn(jax.lax.stop_gradient(w), fmt, bits, group_size, axis, **kwargs).dequantize(w.dtype)
    return w + jax.lax.stop_gradient(q - w)


def fake_quantizer(**kwargs) -> WeightTransform:
    """A weight transform applying :func:`fake_quant` to every array leaf it sees."""
    return per_leaf(lambda x, path, key: fake_quant(x, **kwargs))


def lsq_init(params, *, bits: int = 4, group_size=128, axis=None, select_re: str = r"kernel$"):
    """Initial LSQ step sizes for the 2-D leaves matching ``select_re``: a dict {path: (G, 1, N)}."""
    qp = 2 ** (bits - 1) - 1
    fmt = get_format("int", bits)
    out = {}
    for p, x in wtree.flatten_with_paths(params)[0]:
        if wtree.is_array(x) and x.ndim == 2 and re.search(select_re, p):
            ax, g = resolve_layout(x.shape, fmt, group_size, axis, p)
            wg, red = _group(jnp.asarray(x), ax, g)
            out[p] = 2 * jnp.mean(jnp.abs(wg), axis=red, keepdims=True) / jnp.sqrt(qp)
    return out


def lsq_fake_quant(w, s, *, bits: int = 4, group_size=128, axis=None):
    """LSQ fake quantization of ``w`` with trainable step sizes ``s`` (grouped layout)."""
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    ax, g = resolve_layout(w.shape, get_format("int", bits), group_size, axis)
    wg, _ = _group(w, ax, g)
    gscale = 1.0 / jnp.sqrt(w.size * qp / max(s.size, 1))
    s_eff = s * gscale + jax.lax.stop_gradient(s - s * gscale)  # value s, gradient scaled by gscale
    return (_round_ste(jnp.clip(wg / s_eff, -qn, qp)) * s_eff).reshape(w.shape).astype(w.dtype)


def qat_apply_fn(apply_fn: Callable, *, select_re: str = r"kernel$", lsq: bool = False, **kwargs) -> Callable:
    """``apply_fn`` with the selected weights fake-quantized. With ``lsq=True`` the new function
    takes ``(params, steps, batch)`` where ``steps`` comes from :func:`lsq_init`."""
    if not lsq:
        t = select(lambda p, x: x.ndim == 2 and re.search(select_re, p) is not None, fake_quantizer(**kwargs))
        return lambda params, batch: apply_fn(t.apply(params, t.init(params))[0], batch)

    def f(params, steps, batch):
        fq = wtree.map_with_path(lambda p, x: lsq_fake_quant(x, steps[p], **kwargs) if p in steps else x, params)
        return apply_fn(fq, batch)

    return f


def lsq_export(params, steps: dict, *, bits: int = 4, group_size=128, axis=None, scale_dtype=jnp.float32):
    """Turn LSQ-trained weights and step sizes into real QArrays (symmetric int, codes
    ``round(clip(w/s)) + 2^(b-1)``), matching :func:`lsq_fake_quant`'s forward pass exactly."""
    from .rtn import build

    fmt = get_format("int", bits)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1

    def one(p, x):
        if p not in steps:
            return x
        ax, g = resolve_layout(x.shape, fmt, group_size, axis, p)
        wg, _ = _group(jnp.asarray(x), ax, g)
        s = steps[p].astype(scale_dtype)
        codes = (jnp.clip(jnp.round(wg / s.astype(jnp.float32)), -qn, qp) + qn).astype(jnp.uint8)
        return build(jnp.asarray(x), fmt, ax, g, codes, s)

    return wtree.map_with_path(one, params)
