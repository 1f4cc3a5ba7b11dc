"""Round-to-nearest (RTN) quantization into every fixed format, and the layout helpers (validation,
grouping, QArray assembly) every quantizer shares. The grid itself (scales, zeros, codes) is
:mod:`.grid`.

Per group of ``group_size`` consecutive weights along ``axis`` (``"auto"``, the default, = the
format's block size or 128; ``None``/``"channel"`` = one group per channel, i.e. the whole axis;
``0``/``"tensor"`` = one scale for the tensor). ``axis`` defaults to -2, the input axis of a (in, out)
kernel; use -1 for PyTorch/Hugging Face (out, in) weights. Defaults: :data:`.formats.DEFAULTS`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..errors import AlreadyQuantizedError, QuantizationError
from . import grid
from .formats import DEFAULTS, Format, format_for
from .packing import pack
from .qarray import QArray, grouped_shape, is_qarray
from .registry import method

__all__ = ["resolve_layout", "validate_leaf", "group", "build", "quantize_rtn"]


def resolve_layout(shape, fmt: Format, group_size, axis, path: str = "") -> tuple[int, int]:
    """(normalised axis, group size) for a leaf; 0 means per-tensor. Raises on bad combinations."""
    ndim = len(shape)
    if ndim == 0:
        raise QuantizationError(f"'{path}': cannot quantize a scalar")
    if axis is None:
        axis = -2 if ndim >= 2 else 0
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise QuantizationError(f"'{path}': axis {axis!r} out of range for shape {tuple(shape)}")
    axis %= ndim
    n = shape[axis]
    if group_size == "auto":  # the default: the format's block, else 128
        group_size = fmt.block_size or 128
    if fmt.block_size is not None:
        if group_size not in (None, fmt.block_size, "block"):
            raise QuantizationError(f"'{path}': {fmt.name} has a fixed block size {fmt.block_size}, got {group_size}")
        group_size = fmt.block_size
    if group_size == "tensor" or (isinstance(group_size, (int, np.integer)) and group_size == 0):
        return axis, 0
    if group_size in (None, "channel", -1):
        g = n
    elif isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool):
        g = int(group_size)
    else:
        raise QuantizationError(f"'{path}': group_size must be a positive integer, 'auto', 'channel' (None) or "
                                f"'tensor' (0), got {group_size!r}")
    if g <= 0 or n % g:
        raise QuantizationError(
            f"'{path}': group size {g} does not divide axis {axis} of shape {tuple(shape)} (length {n})")
    return axis, g


def validate_leaf(path: str, w, fmt: Format, group_size, axis) -> tuple[int, int]:
    """Typed errors before any work (QArray input, non-float, bad layout); returns (axis, group).
    Finiteness is checked once per tree by the transform (:func:`weightlab.tree.nonfinite`)."""
    if is_qarray(w):
        raise AlreadyQuantizedError(f"'{path}' is already quantized ({w.fmt.name}); dequantize it first")
    dt = np.dtype(w.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise QuantizationError(f"'{path}': only float weights can be quantized, found dtype {dt}")
    return resolve_layout(tuple(w.shape), fmt, group_size, axis, path)


def group(w, axis: int, g: int):
    """float32 grouped view of ``w`` and the axes to reduce for per-group statistics."""
    w = jnp.asarray(w).astype(jnp.float32)
    if g == 0:
        return w, tuple(range(w.ndim))
    return w.reshape(grouped_shape(tuple(w.shape), axis, g)), (axis + 1,)


def build(w, fmt: Format, axis: int, g: int, codes_grouped, stored_scale, zero=None, lut=None, tensor_scale=None):
    """Pack codes (grouped or array layout) and assemble the QArray for the float array ``w``."""
    codes = codes_grouped.reshape(w.shape)
    return QArray(pack(codes, fmt.bits, axis), stored_scale, zero, lut, tensor_scale, shape=w.shape, dtype=w.dtype,
                  fmt=fmt, group_size=g, axis=axis)


@method("rtn", formats="int2-8 (sym/asym), nf4, fp4_e2m1, fp8_e4m3/e5m2, mxfp4, nvfp4",
        paper="round to nearest (the baseline of GPTQ/AWQ tables)")
def quantize_rtn(w, fmt=DEFAULTS["fmt"], bits: int | None = DEFAULTS["bits"], group_size=DEFAULTS["group_size"],
                 axis=DEFAULTS["axis"], *, scale_dtype=DEFAULTS["scale_dtype"], symmetric: bool | None = None,
                 path: str = "", stats=None) -> QArray:
    """Round-to-nearest onto the format's grid, one scale (and zero) per group (grid: :mod:`.grid`)."""
    del stats
    fmt = format_for(fmt, bits, symmetric)
    if fmt.lut is None and fmt.kind == "lut":
        raise QuantizationError(f"'{path}': {fmt.name} learns its table; use weightlab.quant.any4")
    axis, g = validate_leaf(path, w, fmt, group_size, axis)
    wg, red = group(w, axis, g)
    gr = grid.fit(wg, red, fmt, scale_dtype)
    return build(w, fmt, axis, g, grid.encode(wg, fmt, gr.scale, gr.zero), gr.stored, gr.zero, None, gr.tensor_scale)
