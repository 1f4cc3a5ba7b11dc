"""Round-to-nearest (RTN) quantization into every :mod:`formats` format, plus the shared pieces
(validation, grouping, scale computation, encoding) that HQQ, any4, GPTQ and AWQ reuse.

Per group of ``group_size`` consecutive weights along ``axis`` (``"auto"``, the default, = the
format's block size or 128; ``None`` = one group per channel, i.e. the whole axis; ``0`` = one scale
for the tensor). ``axis`` defaults to -2, the input axis of a (in, out) kernel; use -1 for
PyTorch/Hugging Face (out, in) weights:

* int, symmetric: ``s = max|w| / (2^(b-1) - 1/2)``, ``c = clip(round(w/s), -2^(b-1), 2^(b-1)-1)``
  (all 2^b codes are used, as in GPTQ's symmetric mode and qwix; the error stays <= s/2);
* int, asymmetric: ``s = (max - min) / (2^b - 1)`` over the group's range widened to include 0
  (GPTQ's convention, so the integer zero point fits), ``z = round(-min/s)``, ``c = clip(round(w/s) + z)``;
* table formats (NF4, FP4): ``s = max|w| / max|table|``, ``c`` = nearest table entry (ties to the
  smaller value); MXFP4: ``s = 2^(floor(log2 max|w|) - 2)`` stored as E8M0; NVFP4: block scale
  ``max|w|/6`` stored in FP8 E4M3 relative to a per-tensor FP32 scale ``max|W| / (448·6)``;
* FP8: ``s = max|w| / fp8_max``, codes are the FP8 bit patterns (round to nearest even).

Scales are rounded to ``scale_dtype`` *before* encoding, so codes are optimal for the stored scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..errors import AlreadyQuantizedError, QuantizationError
from .formats import Format, format_for
from .packing import pack
from .qarray import QArray, grouped_shape, is_qarray

__all__ = ["resolve_layout", "validate_leaf", "check_finite", "quantize_rtn", "encode", "table_nearest"]


def resolve_layout(shape, fmt: Format, group_size, axis, path: str = "") -> tuple[int, int]:
    """(normalised axis, group size) for a leaf; 0 means per-tensor. Raises on bad combinations."""
    ndim = len(shape)
    if ndim == 0:
        raise QuantizationError(f"'{path}': cannot quantize a scalar")
    if axis is None:
        axis = -2 if ndim >= 2 else 0
    if not -ndim <= axis < ndim:
        raise QuantizationError(f"'{path}': axis {axis} out of range for shape {tuple(shape)}")
    axis %= ndim
    n = shape[axis]
    if group_size == "auto":  # the default: the format's block, else 128
        group_size = fmt.block_size or 128
    if fmt.block_size is not None:
        if group_size not in (None, fmt.block_size, "block"):
            raise QuantizationError(f"'{path}': {fmt.name} has a fixed block size {fmt.block_size}, got {group_size}")
        group_size = fmt.block_size
    if group_size == "tensor" or group_size == 0:
        return axis, 0
    g = n if group_size in (None, "channel", -1) else int(group_size)
    if g <= 0 or n % g:
        raise QuantizationError(
            f"'{path}': group size {g} does not divide axis {axis} of shape {tuple(shape)} (length {n})")
    return axis, g


def validate_leaf(path: str, w, fmt: Format, group_size, axis) -> tuple[int, int]:
    """Typed errors before any work: QArray input, non-float, bad layout, NaN/Inf (when concrete)."""
    if is_qarray(w):
        raise AlreadyQuantizedError(f"'{path}' is already quantized ({w.fmt.name}); dequantize it first")
    dt = np.dtype(w.dtype)
    if not (jnp.issubdtype(dt, jnp.floating)):
        raise QuantizationError(f"'{path}': only float weights can be quantized, found dtype {dt}")
    layout = resolve_layout(tuple(w.shape), fmt, group_size, axis, path)
    if not isinstance(w, jax.core.Tracer):
        check_finite(path, w)
    return layout


def check_finite(path: str, w) -> None:
    """QuantizationError naming the path if a concrete array holds NaN/Inf."""
    finite = np.isfinite(np.asarray(w, np.float32))
    if not finite.all():
        raise QuantizationError(f"'{path}': {int((~finite).sum())} NaN/Inf values; refusing to quantize")


def _group(w, axis: int, g: int):
    """float32 grouped view and the axes to reduce for per-group statistics."""
    w = w.astype(jnp.float32)
    if g == 0:
        return w, tuple(range(w.ndim))
    return w.reshape(grouped_shape(tuple(w.shape), axis, g)), (axis + 1,)


def table_nearest(x, table: np.ndarray):
    """Index of the nearest entry of a fixed ``table`` for every x (ties -> smaller value)."""
    vals, first = np.unique(np.asarray(table, np.float32), return_index=True)
    mids = jnp.asarray((vals[1:] + vals[:-1]) / 2)
    return jnp.asarray(first.astype(np.uint8))[jnp.searchsorted(mids, x, side="left")]


def _rows_nearest(x, tables, axis: int):
    """Nearest entry of per-row tables. x: grouped values (layout of the array), tables: the array's
    shape with ``axis`` replaced by 2^b (sorted not required)."""
    xt = jnp.moveaxis(x, axis, -1)
    tt = jnp.moveaxis(tables, axis, -1)
    d = jnp.abs(xt[..., :, None] - tt[..., None, :])
    return jnp.moveaxis(jnp.argmin(d, axis=-1).astype(jnp.uint8), -1, axis)


def encode(wg, fmt: Format, s, zero=None):
    """Codes (uint8, grouped layout) of grouped weights ``wg`` for float scale ``s`` (and zero)."""
    safe = jnp.where(s == 0, 1.0, s)
    if fmt.kind == "int":
        if fmt.symmetric:
            half = 2 ** (fmt.bits - 1)
            return (jnp.clip(jnp.round(wg / safe), -half, half - 1) + half).astype(jnp.uint8)
        return jnp.clip(jnp.round(wg / safe) + zero, 0, 2 ** fmt.bits - 1).astype(jnp.uint8)
    if fmt.kind == "fp8":
        dt = getattr(jnp, fmt.fp8_dtype)
        m = float(ml_dtypes.finfo(np.dtype(getattr(ml_dtypes, fmt.fp8_dtype))).max)
        return jax.lax.bitcast_convert_type(jnp.clip(wg / safe, -m, m).astype(dt), jnp.uint8)
    x = jnp.clip(wg / safe, -fmt.qmax, fmt.qmax)
    return table_nearest(x, np.asarray(fmt.lut, np.float32))


def _scales(wg, red, fmt: Format, scale_dtype):
    """(stored scale, float scale for encoding, stored zero or None, tensor_scale or None)."""
    amax = jnp.max(jnp.abs(wg), axis=red, keepdims=True)
    if fmt.scale_kind == "e8m0":
        e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - math.floor(math.log2(fmt.qmax)),
                      -127.0)
        stored = jnp.clip(e + 127, 0, 254).astype(jnp.uint8)
        return stored, jnp.exp2(stored.astype(jnp.float32) - 127), None, None
    if fmt.scale_kind == "fp8_e4m3":
        t_amax = jnp.max(jnp.abs(wg))
        ts = jnp.where(t_amax > 0, t_amax / (448.0 * fmt.qmax), 1.0).astype(jnp.float32)
        stored = (amax / fmt.qmax / ts).astype(jnp.float8_e4m3fn)
        return stored, stored.astype(jnp.float32) * ts, None, ts
    if fmt.kind == "int" and not fmt.symmetric:
        # range widened to include 0 (as GPTQ's quantizer does) so the integer zero point fits in b bits
        mn = jnp.minimum(jnp.min(wg, axis=red, keepdims=True), 0.0)
        mx = jnp.maximum(jnp.max(wg, axis=red, keepdims=True), 0.0)
        stored = ((mx - mn) / (2 ** fmt.bits - 1)).astype(scale_dtype)
        s = stored.astype(jnp.float32)
        z = jnp.clip(jnp.round(-mn / jnp.where(s == 0, 1.0, s)), 0, 2 ** fmt.bits - 1)
        return stored, s, z.astype(scale_dtype), None
    stored = (amax / fmt.qmax).astype(scale_dtype)
    return stored, stored.astype(jnp.float32), None, None


def build(w, fmt: Format, axis: int, g: int, codes_grouped, stored_scale, zero=None, lut=None, tensor_scale=None):
    """Pack grouped codes and assemble the QArray."""
    codes = codes_grouped.reshape(w.shape)
    return QArray(pack(codes, fmt.bits, axis), stored_scale, zero, lut, tensor_scale, shape=w.shape, dtype=w.dtype,
                  fmt=fmt, group_size=g, axis=axis)


def quantize_rtn(w, fmt="int", bits: int | None = 4, group_size="auto", axis=None, *, scale_dtype=jnp.float16,
                 symmetric: bool | None = None, path: str = "") -> QArray:
    """Quantize one array by round-to-nearest. See the module docstring for the formulas."""
    fmt = format_for(fmt, bits, symmetric)
    if fmt.lut is None and fmt.kind == "lut":
        raise QuantizationError(f"'{path}': {fmt.name} learns its table; use weightlab.quant.any4")
    axis, g = validate_leaf(path, w, fmt, group_size, axis)
    wg, red = _group(jnp.asarray(w), axis, g)
    stored, s, zero, ts = _scales(wg, red, fmt, scale_dtype)
    return build(w, fmt, axis, g, encode(wg, fmt, s, None if zero is None else zero.astype(jnp.float32)),
                 stored, zero, None, ts)
