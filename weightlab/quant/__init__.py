"""weightlab.quant: quantized arrays, formats and data-free quantizers as weight transforms.

>>> q = quant.quantize(params, method="rtn", fmt="int", bits=4, group_size=128)   # kernels -> QArray
>>> t = wl.select(r"attn/.*/kernel$", quant.quantizer("hqq", bits=3, group_size=64))
>>> dense = quant.dequantize(q)

Data-free methods (per array, also as transforms): ``rtn`` (every format in :mod:`.formats`),
``hqq`` (Badri & Shaji 2023), ``any4`` (Elhoushi et al. 2025). Calibration-based (model level, from
any ``apply_fn`` via the traced :mod:`.calibrate` capture): :func:`gptq`, :func:`awq`; corrections:
:mod:`.rotate` (random Hadamard of any size), :mod:`.lowrank` (LoRC, QERA); training: :mod:`.qat`
(STE, LSQ). All leaves are validated (format, group size, dtype, NaN/Inf, already quantized) before
any is quantized; errors name the leaf path.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp

from .. import io as wio
from ..io.safetensors import QARRAY_KEY, qarray_specs
from .. import tree as wtree
from ..core import WeightTransform, apply_once, select
from ..errors import AlreadyQuantizedError, QuantizationError
from .formats import FORMATS, Format, get_format
from .hqq import quantize_hqq
from .lut import quantize_any4
from .qarray import QArray, is_qarray
from .rtn import check_finite, quantize_rtn
from .gptq import gptq, gptq_quantize
from .awq import awq, awq_quantize
from .calibrate import Stats, capture, matmul_weights
from .rotate import random_hadamard, rotate_quantize
from .lowrank import lorc, qera
from . import qat

__all__ = ["QArray", "Format", "FORMATS", "get_format", "quantize_rtn", "quantize_hqq", "quantize_any4", "METHODS",
           "gptq", "gptq_quantize", "awq", "awq_quantize", "Stats", "capture", "matmul_weights", "random_hadamard",
           "rotate_quantize", "lorc", "qera", "qat", "quantize_array", "check_quantizable", "quantizer", "quantize", "dequantize", "dot", "save", "load", "is_qarray", "METADATA_KEY"]

METHODS: dict[str, Callable[..., QArray]] = {"rtn": quantize_rtn, "hqq": quantize_hqq, "any4": quantize_any4}
METADATA_KEY = QARRAY_KEY


def _method(method: str, kwargs: dict) -> Callable[..., QArray]:
    if method not in METHODS:
        raise QuantizationError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    fn = METHODS[method]
    params = inspect.signature(fn).parameters
    bad = [k for k in kwargs if k not in params or k in ("w", "path")]
    if bad:
        raise TypeError(f"{method} does not take {bad}; it takes {[p for p in params if p not in ('w', 'path')]}")
    return fn


def quantize_array(w, method: str = "rtn", *, path: str = "", **kwargs) -> QArray:
    """Quantize one array with ``method`` (``rtn``/``hqq``/``any4``) and its keyword arguments."""
    return _method(method, kwargs)(w, path=path, **kwargs)


def check_quantizable(path: str, x, quantize_leaf: Callable[[Any], Any]) -> None:
    """Raise the typed error ``quantize_leaf(x)`` would raise, without doing the work: already
    quantized leaves are refused, and the method is traced on an abstract copy of ``x``
    (``jax.eval_shape``), which runs all its layout/format/dtype checks from the shape alone. One
    mechanism for every method, so a new method needs no validation code of its own here."""
    if is_qarray(x):
        raise AlreadyQuantizedError(f"'{path}' is already quantized ({x.fmt.name}); dequantize it first")
    if path.endswith("/codes") and np.dtype(x.dtype) in (np.uint8, np.uint32):
        raise AlreadyQuantizedError(f"'{path[:-6]}' looks already quantized (its codes were selected)")
    jax.eval_shape(quantize_leaf, jax.ShapeDtypeStruct(tuple(x.shape), x.dtype))
    if not isinstance(x, (jax.ShapeDtypeStruct, jax.core.Tracer)):
        check_finite(path, x)


def _check_all(params, fn, kwargs):
    """Validate every leaf before quantizing any (typed errors naming the path)."""
    for p, x in wtree.flatten_with_paths(params, is_leaf=is_qarray)[0]:
        if is_qarray(x) or wtree.is_array(x):
            check_quantizable(p, x, lambda w, p=p: fn(w, path=p, **kwargs))


def quantizer(method: str = "rtn", **kwargs) -> WeightTransform:
    """A transform replacing every array leaf it sees by a :class:`QArray` (wrap it in
    :func:`weightlab.select` to choose leaves). Keyword arguments go to the method
    (``fmt``, ``bits``, ``group_size``, ``axis``, ``scale_dtype``, ``iters`` ...)."""
    fn = _method(method, kwargs)

    def init(params):
        del params
        return ()

    def apply(params, state, **extras):
        _check_all(params, fn, kwargs)
        out = wtree.map_with_path(lambda p, x: fn(x, path=p, **kwargs) if wtree.is_array(x) else x, params)
        return out, state

    return WeightTransform(init, apply)


def quantize(params, method: str = "rtn", *, select_re: str | None = r"kernel$", min_ndim: int = 2, **kwargs):
    """Quantize the float leaves with ``ndim >= min_ndim`` whose path matches ``select_re``
    (default: every ``.../kernel``). Other leaves are returned untouched."""
    rx = re.compile(select_re) if select_re else None
    pred = lambda p, x: x.ndim >= min_ndim and (rx is None or rx.search(p) is not None)
    return apply_once(select(pred, quantizer(method, **kwargs)), params)


def dot(x, q, *, use_kernel: bool | None = None):
    """``x @ W`` for a QArray ``W`` (contracting x's last axis with W's input axis).

    On GPU/TPU, formats the fused Pallas kernel supports (4/8-bit int, NF4/FP4/any4 with float group
    scales) go through :mod:`weightlab.kernels.dequant_matmul`; on CPU (or ``use_kernel=False``) the
    weight is dequantized and multiplied with ``jnp.dot``. Plain arrays are multiplied directly.
    Note: the kernel path repacks the QArray on every call; for serving, call
    ``kernels.dequant_matmul.prepare`` once and reuse its result.
    """
    if not is_qarray(q):
        return jnp.dot(x, q)
    from ..kernels import dequant_matmul as dm

    if use_kernel is None:
        use_kernel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    if use_kernel and dm.supports(q):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xp = x2 if q.pre is None else (x2 * q.pre.astype(x.dtype) if q.pre.ndim == 1 else x2 @ q.pre.astype(x.dtype))
        y = dm.dequant_matmul(xp, dm.prepare(q))
        if q.lr_a is not None:
            y = y + ((x2 @ q.lr_a.astype(x.dtype)) @ q.lr_b.astype(x.dtype)).astype(y.dtype)  # K-first frame
        return y.reshape(*lead, y.shape[-1])
    w = q.dequantize(x.dtype)
    return jnp.dot(x, w if q.axis == 0 else w.T)


def dequantize(tree, dtype=None):
    """Replace every :class:`QArray` in ``tree`` by its float array."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_qarray(x) else x, tree, is_leaf=is_qarray)


def save(path, tree, *, metadata: dict | None = None, overwrite: bool = False):
    """Save a tree with QArrays to safetensors; the QArray layouts go in the header metadata, so
    :func:`load` rebuilds them without a template."""
    specs = {p: x.spec() for p, x in wtree.flatten_with_paths(tree, is_leaf=is_qarray)[0] if is_qarray(x)}
    meta = dict(metadata or {})
    meta[METADATA_KEY] = json.dumps(specs, sort_keys=True)
    return wio.save(path, tree, metadata=meta, overwrite=overwrite)


def load(path, like: Any = None):
    """Load a checkpoint written by :func:`save` (or any safetensors file) with its QArrays."""
    if like is not None:
        return wio.load(path, like=like)
    with wio.open_checkpoint(path) as c:
        specs = qarray_specs(c.metadata)
        flat = {k: jnp.asarray(c[k]) for k in c.keys()}
    for p, spec in specs.items():
        children = {n: flat.pop(f"{p}/{n}") for n in spec["children"]}
        flat[p] = QArray.from_spec(spec, children)
    return wtree.from_flat_dict(flat)
