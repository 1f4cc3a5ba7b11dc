"""Permute one axis of a :class:`~.qarray.QArray` in its packed form, bit-exactly.

``permute_qarray(q, axis, index)`` is a QArray whose ``dequantize()`` equals
``jnp.take(q.dequantize(), index, axis=axis)`` bit for bit (gather semantics: new position i holds
old position ``index[i]``). The permutation-alignment pillar uses it to carry quantized weights
along Git Re-Basin-style neuron permutations without dequantizing. ``index`` may be traced (it is
never read on the host under ``jit``); every layout decision comes from q's static metadata.

With K = ``q.axis`` (the group axis) and the effective weight ``W = P · D + A B`` in the K-first
frame (``D`` the dequantized codes, ``P`` = ``diag(pre)`` or ``pre``, ``A B`` = ``lr_a @ lr_b``):

* another axis (e.g. the output axis of a kernel grouped along its inputs): codes are packed along
  K only, so the packed codes, and every child that has that axis at full length (grouped scale
  and zero, any4 tables, NVFP4's tensor scale if not a scalar), are gathered directly; size-1
  broadcast axes stay; ``lr_b`` is gathered on its matching factor; ``pre`` and ``g_idx`` live on
  K and stay. ``P · D[:, idx] = (P · D)[:, idx]`` and ``A · B[:, idx] = (A B)[:, idx]``;
* K with a (K, K) ``pre`` (an online rotation): ``(P D)[idx] = P[idx] D``, so only the rows of
  ``pre`` (and ``lr_a``) are gathered; codes, scales and groups stay as they are;
* K otherwise: codes are unpacked, gathered and repacked; a 1-D ``pre`` and the rows of ``lr_a``
  are gathered; per-tensor and per-channel scales (size 1 along K) stay. With groups
  (``0 < group_size < K``) the gathered rows no longer form contiguous runs, so the result is an
  **act-order** layout: scales and zeros stay, and ``g_idx[i]`` (the group of new position i)
  becomes ``index[i] // group_size``, or ``g_idx[index[i]]`` when q already had one. That is the
  ``g_idx`` of GPTQ's act-order (``desc_act``) checkpoints (Frantar et al., "GPTQ", ICLR 2023),
  which :func:`~.qarray._dequantize` reads; the fused kernel (:func:`~.matmul.kernel_supports`)
  does not take act-order layouts, so :func:`~.matmul.dot` falls back to dequantize + ``jnp.dot``,
  and exports to formats without a ``g_idx`` tensor refuse them.

Every piece is a gather of stored values or of the rows/columns of one operand of a product, so the
dequantization does the same float operations on the same operands: the result is exact, not
approximately equal (the product cases rely on a matmul computing each output element the same way
whatever its row/column position: true of XLA's CPU dot, which the tests check; GPU/TPU dots are
expected to behave alike but are not covered there). Layouts outside this (a child whose shape
matches none of these) raise :class:`~weightlab.errors.QuantizationError` naming the layout: they
are refused, never approximated.

``index``: 1-D integers of length ``q.shape[axis]``. Any in-range index gives the gather (repeats
included; permutations are the intended use); negative entries count from the end, as in NumPy.
A concrete index is checked (length, range); a traced one can only be checked for its length and
dtype, and out-of-range traced entries are clamped. Stacked QArrays (extra leading axes on the
children, as :meth:`QArray.dequantize` accepts) are permuted slice by slice with the same index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import QuantizationError
from .packing import pack, unpack
from .qarray import QArray, is_qarray

__all__ = ["permute_qarray"]


def permute_qarray(q: QArray, axis: int, index, *, take=None) -> QArray:
    """``q`` with axis ``axis`` gathered by ``index``: ``permute_qarray(q, a, i).dequantize()`` equals
    ``jnp.take(q.dequantize(), i, axis=a)`` bit for bit. Works under ``jit`` with ``index`` traced.

    ``take(x, axis, idx, name)`` replaces ``jnp.take`` for the children named ``name`` (``"codes"``,
    for the group axis the unpacked codes; ``"scale"``, ``"zero"``, ``"tensor_scale"``, ``"lut"``,
    ``"pre"``, ``"lr_a"``, ``"g_idx"``): :func:`weightlab.align.permute` passes the ring exchange of
    :mod:`weightlab.shard.permute` for children split over devices. ``lr_b`` (gathered through a
    reshape) always uses ``jnp.take``."""
    if not is_qarray(q):
        raise QuantizationError(f"permute_qarray needs a QArray, got {type(q).__name__}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -q.ndim <= axis < q.ndim:
        raise QuantizationError(f"permute_qarray: axis {axis!r} out of range for a QArray of shape {q.shape}")
    axis = int(axis) % q.ndim
    idx = _index(index, q, axis)
    if np.ndim(q.codes) > q.ndim:  # a stack of QArrays: same index for every slice
        if take is not None:
            raise QuantizationError("permute_qarray: take= is not supported for a stack of QArrays")
        return jax.vmap(lambda x: permute_qarray(x, axis, idx))(q)
    _check_children(q)
    take = take or (lambda x, ax, i, name: jnp.take(x, i, axis=ax))
    return _along_group_axis(q, idx, take) if axis == q.axis else _across(q, axis, idx, take)


def _index(index, q: QArray, axis: int):
    """Validated int32 gather index (static checks always, value checks only when concrete)."""
    def fail(msg):
        raise QuantizationError(f"permute_qarray: {msg} ({q!r})")

    return wtree.gather_index(index, q.shape[axis], axis, fail)


def _refuse(q: QArray, what: str):
    raise QuantizationError(f"permute_qarray: cannot permute {q!r} exactly: {what}")


def _check_children(q: QArray) -> None:
    """Shapes of ``pre``, ``lr_a``/``lr_b`` that :func:`~.qarray._effective` gives a meaning to."""
    k = q.shape[q.axis]
    if q.pre is not None and not (np.shape(q.pre) == (k,) or np.shape(q.pre) == (k, k)):
        _refuse(q, f"pre has shape {np.shape(q.pre)}; a ({k},) scale or a ({k}, {k}) transform is expected")
    if (q.lr_a is None) != (q.lr_b is None):
        _refuse(q, "only one of the low-rank factors lr_a, lr_b is set")
    if q.lr_a is not None:
        rest = q.size // max(k, 1)
        a, b = np.shape(q.lr_a), np.shape(q.lr_b)
        if len(a) != 2 or len(b) != 2 or a[0] != k or b != (a[1], rest):
            _refuse(q, f"low-rank factors lr_a {a}, lr_b {b} do not have the (K, r), (r, {rest}) layout")


def _take(x, child_axis: int, n: int, idx, q: QArray, name: str, take):
    """Gather a child along ``child_axis`` if it has the full length ``n`` there; size 1 broadcasts."""
    size = np.shape(x)[child_axis]
    if size == n:
        return take(x, child_axis, idx, name)
    if size == 1:
        return x
    _refuse(q, f"its {name} {tuple(np.shape(x))} has length {size} on the permuted axis (expected {n} or 1)")


def _grouped_child(x, axis: int, n: int, idx, q: QArray, name: str, take):
    """scale / zero / tensor_scale: grouped layout (ndim + 1), array layout (per tensor) or a scalar."""
    if x is None or np.ndim(x) == 0:
        return x
    if np.ndim(x) == q.ndim + 1:
        return _take(x, axis + (axis > q.axis), n, idx, q, name, take)
    if np.ndim(x) == q.ndim:
        return _take(x, axis, n, idx, q, name, take)
    _refuse(q, f"its {name} has shape {tuple(np.shape(x))}, neither grouped nor per-tensor")


def _across(q: QArray, axis: int, idx, take) -> QArray:
    """Permute an axis other than the group axis: every child is gathered where it has that axis."""
    n = q.shape[axis]
    if np.ndim(q.codes) != q.ndim or np.shape(q.codes)[axis] != n:
        _refuse(q, f"codes {tuple(np.shape(q.codes))} are not packed along axis {q.axis} only")
    new = {"codes": take(q.codes, axis, idx, "codes")}
    for name in ("scale", "zero", "tensor_scale"):
        new[name] = _grouped_child(getattr(q, name), axis, n, idx, q, name, take)
    if q.lut is not None:
        if np.ndim(q.lut) != q.ndim:
            _refuse(q, f"its lut {tuple(np.shape(q.lut))} is not in the array layout")
        new["lut"] = _take(q.lut, axis, n, idx, q, "lut", take)
    if q.lr_b is not None:  # (r, prod(rest)), rest = shape without the group axis, in order
        rest = tuple(s for i, s in enumerate(q.shape) if i != q.axis)
        b = q.lr_b.reshape((q.lr_b.shape[0],) + rest)
        new["lr_b"] = jnp.take(b, idx, axis=1 + axis - (axis > q.axis)).reshape(q.lr_b.shape)
    return q.replace(**new)


def _along_group_axis(q: QArray, idx, take) -> QArray:
    """Permute the group axis K (see the module docstring for the three layouts)."""
    a, k, g = q.axis, q.shape[q.axis], q.group_size
    new = {}
    if q.lr_a is not None:
        new["lr_a"] = take(q.lr_a, 0, idx, "lr_a")
    if q.pre is not None and np.ndim(q.pre) == 2:  # W = P D: (P D)[idx] = P[idx] D
        new["pre"] = take(q.pre, 0, idx, "pre")
        return q.replace(**new)
    if q.pre is not None:  # W = p * D: (p * D)[idx] = p[idx] * D[idx]
        new["pre"] = take(q.pre, 0, idx, "pre")
    codes = unpack(q.codes, q.fmt.bits, k, a)
    new["codes"] = pack(take(codes, a, idx, "codes"), q.fmt.bits, a).astype(q.codes.dtype)
    if q.g_idx is not None:
        new["g_idx"] = take(q.g_idx, 0, idx, "g_idx")
    elif 0 < g < k:  # contiguous groups become an act-order layout
        for name in ("scale", "zero"):
            x = getattr(q, name)
            if x is not None and (np.ndim(x) != q.ndim + 1 or np.shape(x)[a] != k // g):
                _refuse(q, f"its {name} {tuple(np.shape(x))} is not in the grouped layout of {k // g} groups")
        new["g_idx"] = idx // g
    else:  # per tensor / per channel: one scale along K, nothing moves
        for name in ("scale", "zero"):
            x = getattr(q, name)
            if x is not None and np.ndim(x) > 0 and np.shape(x)[a] != 1:
                _refuse(q, f"its {name} {tuple(np.shape(x))} varies along the group axis {a}")
    return q.replace(**new)
