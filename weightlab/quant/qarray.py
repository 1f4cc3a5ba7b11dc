"""``QArray``: a quantized weight as a pytree node.

Children (arrays, so they jit, shard, vmap and save like any leaf; ``None`` when unused):
``codes`` (packed b-bit codes, uint8 or uint32 for 3/5/6/7 bits), ``scale`` (per group, in the
grouped layout ``shape[:a] + (n_groups, 1) + shape[a+1:]``), ``zero`` (asymmetric formats),
``lut`` (learned per-row tables, any4), ``tensor_scale`` (NVFP4's FP32 second-level scale),
``pre`` (an input transform: a (K,) vector of per-input-channel factors, as AWQ's 1/s, or a (K, K)
rotation, as QuaRot/QuIP's online Hadamard) and ``lr_a``/``lr_b`` (a low-rank correction, LoRC /
QERA) and ``g_idx`` (act-order: an int32 (K,) vector giving the group of every position along the
group axis, as GPTQ's ``desc_act`` without static groups assigns them; without it position i is in
group ``i // group_size``). With K the input axis, the effective weight is ``W = P · dequant(codes) +
lr_a @ lr_b`` where ``P = diag(pre)`` or ``pre``, so ``x @ W = (x ∘ pre) @ dequant + (x @ lr_a) @ lr_b``.
Static metadata: original shape and dtype, format, group size and group axis ``a``.

Paths of the children are ``<leaf path>/codes``, ``<leaf path>/scale`` ... so selection and
checkpoints work unchanged; ``weightlab.tree.true_nbytes`` of the children is the true size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..dtypes import true_bytes
from . import grid
from .formats import Format
from .packing import unpack

__all__ = ["QArray", "is_qarray", "grouped_shape", "scale_values"]

_CHILDREN = ("codes", "scale", "zero", "lut", "tensor_scale", "pre", "lr_a", "lr_b", "g_idx")


def grouped_shape(shape: tuple[int, ...], axis: int, group: int) -> tuple[int, ...]:
    """``shape`` with axis ``axis`` split into (n_groups, group)."""
    return shape[:axis] + (shape[axis] // group, group) + shape[axis + 1:]


def scale_values(fmt: Format, scale, tensor_scale=None):
    """Decode a stored scale to float32 (E8M0 exponents, FP8 scales times the tensor scale)."""
    if fmt.scale_kind == "e8m0":
        return jnp.exp2(scale.astype(jnp.float32) - 127.0)
    s = scale.astype(jnp.float32)
    return s * tensor_scale.astype(jnp.float32) if tensor_scale is not None else s


@jax.tree_util.register_pytree_with_keys_class
class QArray:
    """A quantized array. ``dequantize()`` returns the float array it stands for."""

    __weightlab_atomic__ = True  # select/partition treat it as one weight leaf (weightlab.tree.is_atomic)

    def __init__(self, codes, scale, zero=None, lut=None, tensor_scale=None, pre=None, lr_a=None, lr_b=None,
                 g_idx=None, *, shape, dtype, fmt: Format, group_size: int, axis: int):
        self.codes, self.scale, self.zero, self.lut, self.tensor_scale = codes, scale, zero, lut, tensor_scale
        self.pre, self.lr_a, self.lr_b, self.g_idx = pre, lr_a, lr_b, g_idx
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.fmt, self.group_size, self.axis = fmt, int(group_size), int(axis)

    # --- pytree protocol
    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in _CHILDREN]
        return children, (self.shape, self.dtype.name, self.fmt, self.group_size, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, fmt, group, axis = aux
        obj = object.__new__(cls)
        (obj.codes, obj.scale, obj.zero, obj.lut, obj.tensor_scale, obj.pre, obj.lr_a, obj.lr_b,
         obj.g_idx) = children
        obj.shape, obj.dtype, obj.fmt, obj.group_size, obj.axis = shape, np.dtype(_dtype(dtype)), fmt, group, axis
        return obj

    # --- array-like facts
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """True bytes of the packed representation (codes + scales + zeros + tables)."""
        return sum(true_bytes(np.shape(c), c.dtype) for c in (getattr(self, n) for n in _CHILDREN) if c is not None)

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight including scales, zeros and tables (b_eff)."""
        return 8 * self.nbytes / max(self.size, 1)

    def dequantize(self, dtype=None):
        """The float array this stands for (``dtype`` defaults to the original dtype). Works with
        extra leading (batch) axes on the children, e.g. a stack of quantized models."""
        extra = self.codes.ndim - self.ndim
        if extra > 0:
            return jax.vmap(lambda q: q.dequantize(dtype))(self)
        return _effective(self, _dequantize(self)).astype(dtype or self.dtype)

    def replace(self, **children) -> "QArray":
        """A copy with some children replaced (e.g. ``pre=``, ``lr_a=``, ``lr_b=``)."""
        vals = {n: getattr(self, n) for n in _CHILDREN}
        vals.update(children)
        return QArray(*(vals[n] for n in _CHILDREN), shape=self.shape, dtype=self.dtype, fmt=self.fmt,
                      group_size=self.group_size, axis=self.axis)

    def __jax_array__(self):  # lets jnp functions accept a QArray (dequantizes)
        return self.dequantize()

    def spec(self) -> dict:
        """JSON-able static description (stored in checkpoint metadata)."""
        return {"shape": list(self.shape), "dtype": self.dtype.name, "format": self.fmt.to_json(),
                "group_size": self.group_size, "axis": self.axis,
                "children": [n for n in _CHILDREN if getattr(self, n) is not None]}

    @classmethod
    def from_spec(cls, spec: dict, children: dict[str, Any]) -> "QArray":
        return cls(*(children.get(n) for n in _CHILDREN), shape=tuple(spec["shape"]), dtype=_dtype(spec["dtype"]),
                   fmt=Format.from_json(spec["format"]), group_size=spec["group_size"], axis=spec["axis"])

    def __getitem__(self, index):
        """``q[index]`` = ``q.dequantize()[index]``: the float values at ``index`` (any NumPy/JAX index),
        not a QArray. Packed codes share bytes and scales span groups, so a slice of the codes is in
        general no QArray of the slice; this dequantizes the whole array first (cost: one dense copy)."""
        return self.dequantize()[index]

    __iter__ = None  # no sequence protocol through __getitem__ (JAX clamps indices: it would never stop)

    def _layout(self) -> str:
        g = "tensor" if self.group_size == 0 else (
            "channel" if self.group_size == self.shape[self.axis] else f"g{self.group_size}")
        return f"{self.fmt.name} {g} axis={self.axis}" + (" act-order" if self.g_idx is not None else "")

    def __repr__(self) -> str:
        dense = int(np.prod(self.shape)) * self.dtype.itemsize
        try:
            size = f", {self.nbytes / 1024:.1f} KiB vs {dense / 1024:.1f} KiB ({self.bits_per_weight:.2f} bits/weight)"
        except Exception:  # abstract children under tracing
            size = ""
        return f"QArray({self._layout()}, shape={self.shape} {self.dtype.name}{size})"

    def __rich_repr__(self):
        """rich's pretty printer: the layout, shape and dtype, then the children that are set."""
        yield "layout", self._layout()
        yield "shape", self.shape
        yield "dtype", self.dtype.name
        for n in _CHILDREN:
            c = getattr(self, n)
            if c is not None:
                yield n, f"{np.dtype(c.dtype).name}{tuple(np.shape(c))}"

    def __treescope_repr__(self, path, subtree_renderer):
        """treescope rendering: a constructor call with the static layout and every child that is set
        (arrays rendered by treescope itself, so they expand and show their values)."""
        from treescope import repr_lib

        attrs = {n: getattr(self, n) for n in _CHILDREN if getattr(self, n) is not None}
        attrs.update(shape=self.shape, dtype=self.dtype, fmt=self.fmt, group_size=self.group_size, axis=self.axis)
        return repr_lib.render_object_constructor(object_type=type(self), attributes=attrs, path=path,
                                                  subtree_renderer=subtree_renderer)


def _dtype(name):
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def _effective(q: QArray, base):
    """Apply the input transform and low-rank correction (see the module docstring)."""
    if q.pre is None and q.lr_a is None:
        return base
    w = jnp.moveaxis(base, q.axis, 0)  # (K, ...)
    if q.pre is not None:
        p = q.pre.astype(jnp.float32)
        w = p.reshape((-1,) + (1,) * (w.ndim - 1)) * w if p.ndim == 1 else jnp.tensordot(p, w, axes=1)
    if q.lr_a is not None:
        w = w + (q.lr_a.astype(jnp.float32) @ q.lr_b.astype(jnp.float32)).reshape(w.shape)
    return jnp.moveaxis(w, 0, q.axis)


def _per_position(x, q: QArray):
    """A grouped-layout child (n_groups, 1 along the axis) gathered to every position: row i gets
    group ``g_idx[i]`` (act-order)."""
    return jnp.take(x, q.g_idx.astype(jnp.int32), axis=q.axis).reshape(q.shape)


def _dequantize(q: QArray):
    codes = unpack(q.codes, q.fmt.bits, q.shape[q.axis], q.axis)
    v = grid.values(codes, q.fmt, q.lut, q.axis)
    s = scale_values(q.fmt, q.scale, q.tensor_scale)
    if q.g_idx is not None and q.group_size != 0:  # act-order: groups are not contiguous
        if q.zero is not None:
            v = v - _per_position(q.zero.astype(jnp.float32), q)
        return v * _per_position(s, q)
    if q.group_size == 0:  # per tensor
        z = q.zero.astype(jnp.float32) if q.zero is not None else 0.0
        return (v - z) * s
    v = v.reshape(grouped_shape(q.shape, q.axis, q.group_size))
    if q.zero is not None:
        v = v - q.zero.astype(jnp.float32)
    return (v * s).reshape(q.shape)
