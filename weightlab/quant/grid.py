"""The quantization grid: how a group of weights gets its scale (and zero), and how weights map to
codes and back. Every quantizer (RTN, HQQ, GPTQ, AWQ, QAT) and :class:`~weightlab.quant.QArray`'s
dequantization use these functions, so a format means the same thing everywhere.

Per group (``wg`` grouped weights, ``red`` the axes of one group), for a :class:`~.formats.Format`:

* int, symmetric (codes ``c - 2^(b-1)`` in ``[-2^(b-1), 2^(b-1) - 1]``): ``s = max(max(w⁺) /
  (2^(b-1) - 1), max(w⁻) / 2^(b-1))``, the smallest step at which the positive side fits the 2^(b-1)-1
  positive codes and the negative side the 2^(b-1) negative ones. All 2^b codes are usable, the
  error stays <= s/2 without clipping, and the grid is **idempotent**: a group already on the grid
  gets the same scale back, so ``fake_quant(fake_quant(w)) == fake_quant(w)`` bit for bit. (GPTQ's
  and qwix's ``s = max|w| / (2^(b-1) - 1/2)`` is not: the -2^(b-1) code grows the scale by 16/15 on
  every re-projection, which made QAT through ``as_optax`` diverge.)
* int, asymmetric: ``s = (max - min) / (2^b - 1)`` over the range widened to include 0, ``z =
  round(-min / s)`` (GPTQ's convention; the integer zero point fits in b bits). The stored scale is
  rounded *down*, so both end codes are reached (and re-fitting gives the same grid); the one
  weight at the clipped end may then be off by half a step plus that rounding;
* fixed tables (NF4, FP4): ``s = max|w| / max|table|``, code = nearest entry (ties to the smaller);
  MXFP4: ``s = 2^(floor(log2 max|w|) - 2)`` stored as E8M0; NVFP4: block scale ``max|w| / 6`` in FP8
  E4M3 times a per-tensor FP32 scale ``max|W| / (448 * 6)`` rounded up to 13 significant bits;
* FP8: ``s = max|w| / fp8_max``, codes are the FP8 bit patterns.

Scales are rounded to their storage dtype *before* encoding, so codes are optimal for the stored
scale. float32 scales are kept to 16 significant bits and NVFP4's tensor scale to 13, so that code x
scale is exact in float32 and the grid stays idempotent for float32 weights with any scale dtype
(for bf16/f16 weights the dequantized values are rounded to the weight dtype, which is not).
``ratio`` shrinks the range (AWQ's clipping search).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .formats import Format

__all__ = ["Grid", "fit", "encode", "values", "decode", "fake", "table_nearest", "rows_nearest"]


class Grid(NamedTuple):
    """The fitted grid of a set of groups (all arrays in the grouped layout, keepdims)."""

    stored: jax.Array                     # scale as stored (scale dtype, E8M0 uint8, or FP8)
    scale: jax.Array                      # float32 scale for encoding/decoding (incl. tensor scale)
    zero: Optional[jax.Array] = None      # stored zero point (asymmetric int), else None
    tensor_scale: Optional[jax.Array] = None  # NVFP4's FP32 second-level scale


def _short(x, keep: int, up: bool = False):
    """float32 ``x`` (>= 0) with only ``keep`` significant bits (round to nearest, or up)."""
    drop = 24 - keep
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    add = jnp.uint32((1 << drop) - 1) if up else jnp.uint32(1 << (drop - 1))
    b = (b + add) & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _store(s, scale_dtype, down: bool = False):
    """Round a float32 scale to its storage dtype (float32: 16 significant bits, see the module doc);
    ``down``: never above ``s`` (the asymmetric grid needs it to reach both of its end codes)."""
    dt = jnp.dtype(scale_dtype)
    if dt.itemsize >= 4:
        if down:
            b = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32) & jnp.uint32(0xFFFFFF00)
            return jax.lax.bitcast_convert_type(b, jnp.float32).astype(dt)
        return _short(s, 16).astype(dt)
    r = s.astype(dt)
    if down:
        r = jnp.where(r.astype(jnp.float32) > s, jnp.nextafter(r, jnp.zeros_like(r)), r)
    return r


def _sym_steps(fmt: Format) -> tuple[int, int]:
    half = 2 ** (fmt.bits - 1)
    return half - 1, half  # positive codes, negative codes


def fit(wg, red, fmt: Format, scale_dtype=jnp.float16, ratio=1.0) -> Grid:
    """Scales (and zeros) of every group of ``wg`` (float32, grouped) reducing over ``red``."""
    if fmt.scale_kind == "e8m0":
        amax = jnp.max(jnp.abs(wg), axis=red, keepdims=True) * ratio
        e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - math.floor(math.log2(fmt.qmax)),
                      -127.0)
        stored = jnp.clip(e + 127, 0, 254).astype(jnp.uint8)
        return Grid(stored, jnp.exp2(stored.astype(jnp.float32) - 127))
    if fmt.scale_kind == "fp8_e4m3":
        amax = jnp.max(jnp.abs(wg), axis=red, keepdims=True) * ratio
        t_amax = jnp.max(jnp.abs(wg)) * ratio
        ts = jnp.where(t_amax > 0, _short(t_amax / (448.0 * fmt.qmax), 13, up=True), 1.0).astype(jnp.float32)
        stored = (amax / fmt.qmax / ts).astype(jnp.float8_e4m3fn)
        return Grid(stored, stored.astype(jnp.float32) * ts, None, ts)
    if fmt.kind == "int" and fmt.symmetric:
        pos, neg = _sym_steps(fmt)
        s = jnp.maximum(jnp.max(jnp.maximum(wg, 0.0), axis=red, keepdims=True) / pos,
                        jnp.max(jnp.maximum(-wg, 0.0), axis=red, keepdims=True) / neg) * ratio
        stored = _store(s, scale_dtype)
        return Grid(stored, stored.astype(jnp.float32))
    if fmt.kind == "int":
        mn = jnp.minimum(jnp.min(wg, axis=red, keepdims=True), 0.0) * ratio
        mx = jnp.maximum(jnp.max(wg, axis=red, keepdims=True), 0.0) * ratio
        stored = _store((mx - mn) / (2 ** fmt.bits - 1), scale_dtype, down=True)
        s = stored.astype(jnp.float32)
        z = jnp.clip(jnp.round(-mn / jnp.where(s == 0, 1.0, s)), 0, 2 ** fmt.bits - 1)
        return Grid(stored, s, z.astype(scale_dtype))
    amax = jnp.max(jnp.abs(wg), axis=red, keepdims=True) * ratio
    stored = _store(amax / fmt.qmax, scale_dtype)
    return Grid(stored, stored.astype(jnp.float32))


def table_nearest(x, table: np.ndarray):
    """Index of the nearest entry of a fixed ``table`` for every x (ties -> smaller value)."""
    vals, first = np.unique(np.asarray(table, np.float32), return_index=True)
    mids = jnp.asarray((vals[1:] + vals[:-1]) / 2)
    return jnp.asarray(first.astype(np.uint8))[jnp.searchsorted(mids, x, side="left")]


def rows_nearest(x, tables, axis: int):
    """Nearest entry of per-row tables (any4). x: values in the array's layout; tables: the array's
    shape with ``axis`` replaced by 2^b."""
    xt = jnp.moveaxis(x, axis, -1)
    tt = jnp.moveaxis(tables, axis, -1)
    d = jnp.abs(xt[..., :, None] - tt[..., None, :])
    return jnp.moveaxis(jnp.argmin(d, axis=-1).astype(jnp.uint8), -1, axis)


def _zero(z):
    return None if z is None else z.astype(jnp.float32)


def encode(wg, fmt: Format, scale, zero=None):
    """Codes (uint8, the layout of ``wg``) for float32 ``scale`` (and stored ``zero``), broadcastable."""
    safe = jnp.where(scale == 0, 1.0, scale)
    if fmt.kind == "int":
        if fmt.symmetric:
            pos, neg = _sym_steps(fmt)
            return (jnp.clip(jnp.round(wg / safe), -neg, pos) + neg).astype(jnp.uint8)
        return jnp.clip(jnp.round(wg / safe) + _zero(zero), 0, 2 ** fmt.bits - 1).astype(jnp.uint8)
    if fmt.kind == "fp8":
        dt = getattr(jnp, fmt.fp8_dtype)
        m = float(ml_dtypes.finfo(np.dtype(getattr(ml_dtypes, fmt.fp8_dtype))).max)
        return jax.lax.bitcast_convert_type(jnp.clip(wg / safe, -m, m).astype(dt), jnp.uint8)
    if fmt.lut is None:
        raise ValueError(f"{fmt.name} learns its table per row: use rows_nearest with the table")
    x = jnp.clip(wg / safe, -fmt.qmax, fmt.qmax)
    return table_nearest(x, np.asarray(fmt.lut, np.float32))


def values(codes, fmt: Format, lut=None, axis: int = 0):
    """Unscaled float32 values of codes (before the zero point and the scale). ``lut``: a learned
    per-row table (any4), shaped like the codes with ``axis`` replaced by 2^b."""
    if fmt.kind == "int":
        c = codes.astype(jnp.float32)
        return c - 2 ** (fmt.bits - 1) if fmt.symmetric else c
    if fmt.kind == "fp8":
        return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), getattr(jnp, fmt.fp8_dtype)).astype(jnp.float32)
    if lut is not None:
        table = jnp.moveaxis(lut.astype(jnp.float32), axis, -1)
        idx = jnp.moveaxis(codes.astype(jnp.int32), axis, -1)
        return jnp.moveaxis(jnp.take_along_axis(table, idx, axis=-1), -1, axis)
    return jnp.asarray(np.asarray(fmt.lut, np.float32))[codes.astype(jnp.int32)]


def decode(codes, fmt: Format, scale, zero=None, lut=None, axis: int = 0):
    """Dequantized float32 values ``(values(codes) - zero) * scale`` (shapes broadcastable)."""
    v = values(codes, fmt, lut, axis)
    if zero is not None and fmt.kind == "int" and not fmt.symmetric:
        v = v - zero.astype(jnp.float32)
    return v * scale


def fake(wg, red, fmt: Format, scale_dtype=jnp.float16, ratio=1.0):
    """``decode(encode(wg))`` on the grid :func:`fit` gives (float32, grouped layout)."""
    g = fit(wg, red, fmt, scale_dtype, ratio)
    return decode(encode(wg, fmt, g.scale, g.zero), fmt, g.scale, g.zero)
