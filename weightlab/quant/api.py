"""The plain-function face of the quantization pillar: :func:`quantize` a params tree with any
registered method (or any quantizer transform), calibrating it when it needs data.

Everything here is a recipe of the pillar's transforms: ``quantize(params, "gptq", apply_fn=f,
batches=b)`` is ``select(DEFAULT_SELECT, quant.gptq())`` applied with the ``stats=`` that
:func:`~weightlab.quant.calibrate.capture` measures, layer after layer (``sequential``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax

from .. import tree as wtree
from ..core import WeightTransform, apply_once, select as select_leaves
from ..errors import MissingExtraError, QuantizationError, QuantizationParameterError
from .formats import DEFAULT_SELECT
from .qarray import QArray, is_qarray
from .registry import METHODS, transform

__all__ = ["DEFAULT_SELECT", "quantize", "quantize_array", "dequantize"]



def quantize_array(w, method: str = "rtn", *, path: str = "", stats=None, **hp) -> QArray:
    """Quantize one array with a registered method: the method's transform on a one-leaf tree, so
    the same validation (layout, dtype, already quantized, statistics, NaN/Inf) runs first."""
    return apply_once(transform(method, **hp), {path: w}, stats=None if stats is None else {path: stats})[path]


def quantize(params, method: str | WeightTransform = "rtn", *, select: wtree.SelectorLike = DEFAULT_SELECT,
             stats: dict | None = None, apply_fn: Callable | None = None, batches: Iterable[Any] | None = None,
             sequential: bool = True, row_mask: Callable | None = None, key: jax.Array | None = None, **hp):
    """Quantize the leaves ``select`` picks; other leaves come back untouched.

    ``method``: a registered name (``"rtn"``, ``"hqq"``, ``"any4"``, ``"gptq"``, ``"awq"``) with its
    hyper-parameters ``hp``, or any quantizer transform (``quant.lorc(quant.rotate(quant.gptq(bits=3)),
    rank=8)``). Calibrated methods need ``stats`` (from :func:`~weightlab.quant.capture`) or
    ``apply_fn(params, batch)`` and ``batches``; with ``sequential`` (GPTQ's "true sequential")
    each weight's statistics are measured with every earlier weight (in execution order) already
    quantized. ``key`` feeds random steps (rotations). Every selected leaf is validated before any
    is quantized.
    """
    if isinstance(method, WeightTransform):
        if hp:
            raise QuantizationParameterError(f"hyper-parameters {sorted(hp)} go to the transform's factory "
                                             "(quant.rtn(bits=3)), not to quantize() with a transform")
        t, calibrated = method, stats is not None or apply_fn is not None
    else:
        t, calibrated = transform(method, **hp), METHODS[method].calibrated
    sel = wtree.selector(select)
    if not calibrated:
        return apply_once(select_leaves(sel, t), params, key=key)
    if stats is None:
        if apply_fn is None or batches is None:
            raise MissingExtraError(f"{method if isinstance(method, str) else 'this quantizer'} is calibrated: "
                                    "pass apply_fn= and batches= (or stats=quant.capture(...))")
        batches = list(batches)
        if not batches:
            raise QuantizationError("calibration needs at least one batch")
        return _calibrated(t, params, sel, apply_fn, batches, sequential, row_mask, key)
    return apply_once(select_leaves(sel, t), params, stats=stats, key=key)


def _calibrated(t, params, sel, apply_fn, batches, sequential, row_mask, key):
    from .calibrate import Capturer, matmul_weights

    chosen = sel.paths(params)
    if not chosen:
        raise QuantizationError(f"selector {sel!r} matches no weight leaf")
    order = matmul_weights(apply_fn, params, batches[0])
    missing = [p for p in chosen if p not in order]
    if missing:
        raise MissingExtraError(f"calibration batches never reach '{missing[0]}' as a matmul operand "
                                f"({len(missing)} selected weights unreached); select fewer weights")
    targets = [p for p in order if p in set(chosen)]
    cap = Capturer(apply_fn, params, batches[0], select=lambda p: p in set(targets), row_mask=row_mask)
    whole = select_leaves(sel, t)
    abstract = jax.eval_shape(lambda: cap(params, batches[:1]))  # shapes and axes of the statistics, no work
    _dry_run(whole, params, abstract, key)                      # every check of every layer, before calibrating
    bad = wtree.nonfinite(pairs=[(p, x) for p, x in wtree.flatten_with_paths(params)[0] if p in set(targets)])
    if bad:
        raise QuantizationError(f"'{bad[0]}': NaN/Inf values; refusing to quantize")
    stats = cap(params, batches)
    if not sequential:
        return apply_once(whole, params, stats=stats, key=key)
    current = params
    for i, p in enumerate(targets):
        if i:
            stats = cap(dequantize(current), batches)
        one = select_leaves(f"^{re.escape(p)}$", t)
        current = apply_once(one, current, stats={p: stats[p]}, key=key)
    return current


def _dry_run(t, params, stats, key) -> None:
    """Run every check of ``t`` on abstract arrays (``jax.eval_shape``): typed errors, no work."""
    pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
    arrays = [i for i, (_, x) in enumerate(pairs) if wtree.is_array(x)]

    def run(xs, st):
        leaves = [x for _, x in pairs]
        for i, x in zip(arrays, xs):
            leaves[i] = x
        return [x for x in jax.tree.leaves(apply_once(t, treedef.unflatten(leaves), stats=st, key=key)) if wtree.is_array(x)]

    jax.eval_shape(run, [pairs[i][1] for i in arrays], stats)


def dequantize(tree, dtype=None):
    """Replace every :class:`QArray` in ``tree`` by its float array."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_qarray(x) else x, tree, is_leaf=is_qarray)
