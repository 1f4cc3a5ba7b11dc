"""Matrix products with quantized weights: :func:`dot` (the fused Pallas kernel on GPU/TPU, dequantize
+ ``jnp.dot`` elsewhere) and :func:`prepare`, which repacks a QArray into the kernel's layout once
(the kernel in :mod:`weightlab.kernels.dequant_matmul` takes plain arrays and knows no QArray)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .packing import unpack
from .qarray import QArray, is_qarray

__all__ = ["dot", "prepare", "kernel_supports"]


def _mode(q: QArray) -> str:
    return "int" if q.fmt.kind == "int" else "lut"


def kernel_supports(q) -> bool:
    """Whether a QArray can use the fused kernel: 2-D, 4/8-bit int or 4-bit float-scaled tables, with
    contiguous groups (an act-order ``g_idx`` takes the dequantizing path)."""
    from ..kernels import dequant_matmul as dm

    return (is_qarray(q) and q.ndim == 2 and q.fmt.scale_kind == "float" and q.fmt.kind in ("int", "lut")
            and getattr(q, "g_idx", None) is None and dm.supports(q.fmt.bits, _mode(q), q.group_size))


def prepare(q: QArray, block_k: int | None = None):
    """The kernel layout (:class:`~weightlab.kernels.dequant_matmul.KernelWeights`) of a QArray, any axis."""
    from ..kernels import dequant_matmul as dm

    if not kernel_supports(q):
        raise ValueError(f"the dequant-matmul kernel does not support {q!r}")
    f = q.fmt
    codes = unpack(q.codes, f.bits, q.shape[q.axis], q.axis)
    scale = q.scale.reshape(q.scale.shape[0], q.scale.shape[2]) if q.axis == 0 else q.scale[:, :, 0]
    zero = None if q.zero is None else (q.zero.reshape(scale.shape) if q.axis == 0 else q.zero[:, :, 0])
    lut = q.lut
    if q.axis == 1:  # (out, in) -> (in, out)
        codes, scale = codes.T, scale.T
        zero = None if zero is None else zero.T
        lut = None if lut is None else lut.T
    if f.kind == "int" and f.symmetric:
        zero = jnp.full(scale.shape, 2 ** (f.bits - 1), jnp.float32)
    if f.kind == "lut" and lut is None:
        lut = jnp.asarray(np.asarray(f.lut, np.float32))
    return dm.pack_weights(codes, scale, zero, lut, bits=f.bits, group=q.group_size, mode=_mode(q), block_k=block_k)


def dot(x, q, *, use_kernel: bool | None = None):
    """``x @ W`` for a QArray ``W`` (contracting x's last axis with W's input axis).

    On GPU/TPU, formats the fused Pallas kernel supports (4/8-bit int, NF4/FP4/any4 with float group
    scales) go through :mod:`weightlab.kernels.dequant_matmul`; on CPU (or ``use_kernel=False``) the
    weight is dequantized and multiplied with ``jnp.dot``. Plain arrays are multiplied directly.
    Note: the kernel path repacks the QArray on every call; for serving, call :func:`prepare` once
    and reuse its result with ``dequant_matmul``.
    """
    if not is_qarray(q):
        return jnp.dot(x, q)
    from ..kernels import dequant_matmul as dm

    if use_kernel is None:
        use_kernel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    prepared = prepare(q) if use_kernel and kernel_supports(q) else None
    if prepared is not None and not dm.supports_platform(prepared):
        prepared = None  # e.g. groups of 64 on TPU (Mosaic needs 128-lane K blocks): the dequantizing path
    if prepared is not None:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xp = x2 if q.pre is None else (x2 * q.pre.astype(x.dtype) if q.pre.ndim == 1 else x2 @ q.pre.astype(x.dtype))
        y = dm.dequant_matmul(xp, prepared)
        if q.lr_a is not None:
            y = y + ((x2 @ q.lr_a.astype(x.dtype)) @ q.lr_b.astype(x.dtype)).astype(y.dtype)  # K-first frame
        return y.reshape(*lead, y.shape[-1])
    w = q.dequantize(x.dtype)
    return jnp.dot(x, w if q.axis == 0 else w.T)
