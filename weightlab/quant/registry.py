"""The quantizer registry, and the one leaf-wise transform every registered method becomes.

A method is a function quantizing one weight, registered where it is defined::

    @method("rtn", formats="every fixed format", paper="...")
    def quantize_rtn(w, *, fmt=..., bits=..., group_size=..., axis=None, ..., path="", stats=None) -> QArray

and ``transform("rtn", bits=4)`` (also spelled ``quant.rtn(bits=4)``) is a
:class:`~weightlab.WeightTransform` that replaces every weight leaf it sees by a QArray. Wrap it in
:func:`weightlab.select` / :func:`weightlab.partition` to choose leaves, so one recipe can give each
part of a model its own method and precision. Calibrated methods (``calibrated=True``: GPTQ, AWQ)
read the ``stats=`` extra (from :func:`weightlab.quant.capture`, keyed by path). Before any leaf is
quantized, every leaf is validated: already quantized, bad layout/format/dtype (the method is traced
on the leaf's abstract shape, so each method's own checks run without doing the work), missing
statistics, and NaN/Inf (one jitted reduction for the whole tree). Errors name the path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from .. import tree as wtree
from ..core import EmptyState, WeightTransform
from ..errors import AlreadyQuantizedError, MissingExtraError, QuantizationError, QuantizationParameterError
from ..registry import Registry

__all__ = ["METHODS", "method", "transform", "leafwise", "check_quantizable", "check_parameters"]

METHODS = Registry("quant", modules=("weightlab.quant.rounding", "weightlab.quant.halfquad", "weightlab.quant.lut",
                                     "weightlab.quant.second_order", "weightlab.quant.act_aware"))
_IMPLICIT = ("w", "path", "stats", "key")


def method(name: str, *, formats: str, paper: str, calibrated: bool = False, params_of: Callable | None = None):
    """Register a leaf quantizer ``fn(w, *, path="", stats=None, **hp) -> QArray`` (``stats``: the
    :class:`~weightlab.quant.calibrate.Stats` of that leaf, for ``calibrated`` methods)."""
    def deco(fn):
        info = dict(formats=formats, paper=paper, calibrated=calibrated, implicit=_IMPLICIT)
        if params_of is not None:
            info["params_of"] = params_of
        return METHODS.register(name, **info)(fn)

    return deco


_INT, _REAL, _BOOL = (int,), (int, float), (bool,)
PARAM_TYPES: dict[str, tuple[tuple, str]] = {
    # name: (accepted Python types, what the message calls it); None is accepted where the default is None
    "bits": (_INT, "an integer"), "iters": (_INT, "an integer"), "n_grid": (_INT, "an integer"),
    "block_size": (_INT, "an integer"), "axis": (_INT, "an integer axis"),
    "damp": (_REAL, "a number"), "p": (_REAL, "a number"), "beta": (_REAL, "a number"),
    "kappa": (_REAL, "a number"), "max_shrink": (_REAL, "a number"),
    "symmetric": (_BOOL, "True or False"), "act_order": (_BOOL, "True or False"),
    "static_groups": (_BOOL, "True or False"), "clip": (_BOOL, "True or False"),
    "fmt": ((str,), "a format name such as 'int', 'uint', 'nf4' (or a Format)"),
    "group_size": ((int, str), "a positive integer, 'auto', 'channel' or 'tensor'"),
    "scale_dtype": ((str,), "a dtype name such as 'float16'"),
}
"""The type of every quantizer hyper-parameter that has a fixed one, checked when a transform is
built (``quant.rtn(bits="4")`` fails there, not deep inside the first call). Ranges and
combinations are checked by the method on the leaf's abstract shape (:func:`check_quantizable`)."""


def _type_ok(k: str, v) -> bool:
    from .formats import Format

    if k not in PARAM_TYPES or v is None or (k == "fmt" and isinstance(v, Format)):
        return True
    if k == "scale_dtype" and not isinstance(v, str):
        return hasattr(v, "dtype") or isinstance(v, type)  # jnp.float16 / np.dtype spellings
    types, _ = PARAM_TYPES[k]
    return isinstance(v, types) and (bool in types or not isinstance(v, bool))


def check_parameters(name: str, hp: dict) -> None:
    """:class:`QuantizationParameterError` (a TypeError naming the method) for unknown
    hyper-parameters and values of the wrong type."""
    entry = METHODS[name]
    known = entry.parameters
    bad = [k for k in hp if k not in known]
    if bad:
        raise QuantizationParameterError(f"{name} does not take {bad}; it takes {list(known)}")
    for k, v in hp.items():
        if not _type_ok(k, v):
            raise QuantizationParameterError(f"{name}: {k} must be {PARAM_TYPES[k][1]}, got {v!r} "
                                             f"({type(v).__name__})")


def check_quantizable(path: str, x, quantize_leaf: Callable[[Any], Any]) -> None:
    """Raise the typed error ``quantize_leaf(x)`` would raise, without doing the work: QArrays are
    refused, and the method is traced on an abstract copy of ``x`` (``jax.eval_shape``), which runs
    all its layout/format/dtype checks from the shape alone. One mechanism for every method."""
    if wtree.is_atomic(x):
        name = getattr(getattr(x, "fmt", None), "name", type(x).__name__)
        raise AlreadyQuantizedError(f"'{path}' is already quantized ({name}); dequantize it first")
    jax.eval_shape(quantize_leaf, jax.ShapeDtypeStruct(tuple(x.shape), x.dtype))


def leafwise(leaf_fn: Callable, *, name: str, calibrated: bool = False) -> WeightTransform:
    """A stateless transform applying ``leaf_fn(w, path=..., stats=...)`` to every weight leaf it
    sees, after validating all of them (see the module docstring)."""

    def apply(params, state, **extras):
        stats = extras.get("stats")
        pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
        todo = [(i, p, x) for i, (p, x) in enumerate(pairs) if wtree.is_weight(x)]
        if calibrated:
            if stats is None:
                raise MissingExtraError(f"{name} is calibrated: call apply(..., stats=quant.capture(apply_fn, "
                                        "params, batches)) or use quant.quantize(..., apply_fn=, batches=)")
            missing = [p for _, p, x in todo if not wtree.is_atomic(x) and p not in stats]
            if missing:
                raise MissingExtraError(f"'{missing[0]}' is selected for {name} but stats= has no entry for it "
                                        f"({len(missing)} selected leaves without statistics; the calibration "
                                        "batches never reach them as a matmul operand, or they were not captured)")
        leaf = {p: functools.partial(leaf_fn, path=p, stats=stats[p] if calibrated else None) for _, p, _ in todo}
        for _, p, x in todo:
            check_quantizable(p, x, leaf[p])
        bad = wtree.nonfinite(pairs=[(p, x) for _, p, x in todo])
        if bad:
            raise QuantizationError(f"'{bad[0]}': NaN/Inf values; refusing to quantize ({len(bad)} such leaves)")
        leaves = [x for _, x in pairs]
        for i, p, x in todo:
            leaves[i] = leaf[p](x)
        return treedef.unflatten(leaves), state

    return WeightTransform(lambda params: EmptyState(), apply)


def transform(name: str, **hp) -> WeightTransform:
    """The registered method ``name`` with hyper-parameters ``hp`` as a :class:`WeightTransform`."""
    entry = METHODS[name]
    check_parameters(name, hp)
    return leafwise(functools.partial(entry.fn, **hp), name=name, calibrated=entry.calibrated)


def factory(name: str) -> Callable[..., WeightTransform]:
    """``quant.<name>(**hp)``: the public factory of a registered method (docstring from the method)."""
    def make(**hp) -> WeightTransform:
        return transform(name, **hp)

    entry = METHODS[name]
    make.__name__ = make.__qualname__ = name
    make.__doc__ = (f"{entry.summary}\n\nReturns a WeightTransform replacing every weight leaf it sees by a QArray "
                    f"({'needs the stats= extra; ' if entry.calibrated else ''}hyper-parameters: "
                    f"{', '.join(entry.parameters)}). Paper: {entry.paper}.")
    return make



def markdown_table() -> str:
    """The README/docs table of every quantization method (generated; a test checks the committed copies)."""
    return METHODS.table([
        ("method", lambda e: f"`quant.{e.name}`"),
        ("what it does", lambda e: e.summary),
        ("formats", lambda e: e.formats),
        ("needs", lambda e: "`stats=` (calibration)" if e.calibrated else "nothing (data-free)"),
        ("reference", lambda e: e.paper),
    ])
