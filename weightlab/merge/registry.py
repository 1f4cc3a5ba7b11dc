"""The merge registry: every merge method is one decorated function with one signature,

    fn(base, models, *, key=None, **hp) -> merged params

``base`` is a params pytree (``None`` for methods that merge the models only), ``models`` a list of
pytrees or a stacked pytree (leading model axis). :func:`merge_method` wraps the function with the
shared input path — QArray inputs dequantized, lists stacked, the method's model-count and base
rules, structure/shape checks against the base, mergekit's ``lambda`` spelling, unknown or missing
hyper-parameters, NaN/Inf by one jitted reduction per tree — so the body receives a validated
stacked pytree. It registers the method with the facts every consumer reads: the package
namespace (``merge.ties``), :func:`transform` (the method as a :class:`~weightlab.WeightTransform`
taking ``models=``), the streaming YAML engine (model-count rule, per-model parameters, numpy fast
path, host top-k), the CLI's method list and the README/docs tables.

Hyper-parameter values are checked against the one schema (:mod:`.params`) before any work, and a
method's ``check`` hook (e.g. linear's weights summing to zero) runs on the values with the
defaults filled in. float64 inputs: JAX's default (x64 off) computes in float32, so the result is
float32; the wrapper says so with a ``UserWarning`` (enable ``jax_enable_x64`` to keep float64).

This module and the method modules load without JAX (:mod:`weightlab._lazy`), so validating a
YAML config or running a linear merge never imports it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .. import _lazy
from ..errors import MergeError, MissingExtraError, StructureMismatchError
from ..registry import Registry
from .params import check_hyperparameters, check_schema_covers

jax = _lazy.module("jax")

__all__ = ["METHODS", "merge_method", "inputs", "check_count", "per_model", "transform", "mergekit_names", "dequantized",
           "Fast", "normalized_weights", "precheck"]

METHODS = Registry("merge", modules=("weightlab.merge.methods", "weightlab.merge.spherical", "weightlab.merge.masking",
                                     "weightlab.merge.subspace", "weightlab.merge.continual", "weightlab.merge.fisher",
                                     "weightlab.merge.regression", "weightlab.merge.learned"))
_IMPLICIT = ("base", "models", "key", "threshold")


def per_model(v, n: int, name: str) -> np.ndarray:
    """A hyper-parameter given once or once per model, as float64 (n,)."""
    try:
        a = np.broadcast_to(np.asarray(v, np.float64), (n,)) if np.ndim(v) == 0 else np.asarray(v, np.float64)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number or one number per model, got {v!r}") from None
    if a.shape != (n,):
        raise MergeError(f"{name} needs one value or {n} values (one per model), got {np.shape(v)}")
    return a


#: A weight sum this small relative to sum |w| cannot be normalised by (the normalised weights would
#: exceed 1e6 in magnitude: float32 results would be noise).
ZERO_SUM = 1e-6


def normalized_weights(weight, n: int | None, name: str) -> np.ndarray:
    """``weight`` (one value or one per model) divided by its sum, in float64; a :class:`MergeError`
    when the sum is ~0 (``|sum w| <= 1e-6 * sum |w|``). ``n=None``: as many models as values."""
    w = per_model(weight, n if n is not None else max(int(np.size(weight)), 1), "weight")
    total = float(w.sum())
    if not abs(total) > ZERO_SUM * float(np.abs(w).sum()):
        raise MergeError(f"{name}: the weights {w.tolist()} sum to zero or nearly ({total:.3g}); cannot normalise "
                         "by their sum (change the weights, or turn normalisation off)")
    return w / total


class Fast(NamedTuple):
    """A method's in-place numpy evaluation for the streaming engine: ``applies(kw, has_base)`` says
    whether ``run(block, kw, has_base)`` handles these keyword arguments (else the JAX path runs);
    ``run`` works in the block's dtype (float32, or float64 for float64 checkpoints)."""
    applies: Callable[[dict, bool], bool]
    run: Callable[[np.ndarray, dict, bool], np.ndarray]


def dequantized(x):
    """``x`` with every QArray leaf replaced by its float array (lists of trees handled)."""
    from .. import tree as wtree

    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(dequantized(e) for e in x)
    leaves = jax.tree.leaves(x, is_leaf=wtree.is_atomic)
    if not any(wtree.is_atomic(leaf) for leaf in leaves):
        return x
    return jax.tree.map(lambda q: q.dequantize() if wtree.is_atomic(q) else q, x, is_leaf=wtree.is_atomic)


class Inputs(NamedTuple):
    base: Any
    models: Any  # stacked, leading model axis
    n: int


def check_count(name: str, base_rule: str, count, n: int, where: str | None = None) -> None:
    """The model-count rule of a method (its registry entry's ``base``/``count``) against ``n``
    models (besides the base, unless the base is unused); ``where`` prefixes the error (a config line)."""
    lo, hi = count
    if n < lo or (hi is not None and n > hi):
        rule = f"exactly {lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        noun = "model" if hi == 1 else "models"
        what = noun if base_rule == "unused" else f"{noun} besides the base"
        raise MergeError(f"{where + ': ' if where else ''}{name} merges {rule} {what}, got {n}")


def inputs(base, models, *, name: str = "merge", base_rule: str = "required", count=(1, None)) -> Inputs:
    """The shared input path of every merge (see the module docstring). A list or tuple is a list of
    models, unless a base is given and the list is itself shaped like the base (a stacked tree whose
    root is a list); without a base, pass such stacks as a list of models instead."""
    from .. import tree as wtree

    if models is None:
        raise MergeError(f"{name}: no models to merge")
    as_list = isinstance(models, (list, tuple)) and not hasattr(models, "_fields")
    if as_list and base is not None and models:  # a stacked tree whose root is a list (params = [W0, W1])?
        bpaths = wtree.paths(base)
        if wtree.paths(models) == bpaths and any(wtree.paths(m) != bpaths for m in models):
            as_list = False
    if as_list:
        if not models:
            raise MergeError(f"{name}: no models to merge")
        models = dequantized(list(models))
        stacked = wtree.stack(models)  # checks every model against the first (typed, names the path)
    else:
        stacked = dequantized(models)
    if base_rule == "required" and base is None:
        raise MergeError(f"{name} needs a base model (the first argument)")
    if base_rule == "unused" and base is not None:
        raise MergeError(f"{name} merges the models only: pass base=None and list every model in models")
    base = None if base is None else dequantized(base)
    if base is not None and not isinstance(models, (list, tuple)):
        sp, bp = wtree.flatten_with_paths(stacked)[0], wtree.flatten_with_paths(base)[0]
        if len(sp) == len(bp) and all(np.shape(x) == np.shape(y) for (_, x), (_, y) in zip(sp, bp)):
            raise MergeError(f"{name}: models looks like a single model (no leading model axis); pass a list of "
                             "models, e.g. [model], or a stacked pytree (weightlab.tree.stack)")
    try:
        n = wtree.num_models(stacked)
    except (ValueError, StructureMismatchError) as e:
        raise MergeError(f"{name}: models must be a list of pytrees or a stacked pytree with a leading model axis "
                         f"({e})") from None
    if base is not None:
        first = jax.tree.map(lambda x: x[0] if wtree.is_array(x) else x, stacked)
        wtree.check_compatible(base, first, names=("base_model", "models"))
    check_count(name, base_rule, count, n)
    bad = wtree.nonfinite(stacked) + (wtree.nonfinite(base) if base is not None else [])
    if bad:
        raise MergeError(f"'{bad[0]}': NaN/Inf in the models; refusing to merge ({name})")
    return Inputs(base, stacked, n)


def merge_method(name: str | None = None, *, base: str = "required", count=(1, None), per_model_params=(),
                 mergekit: bool = False, stream: bool = True, stream_kwargs=(), host_topk: bool = False,
                 fast: Fast | None = None, extras: Sequence[str] = (), continual=None, whole_model: bool = False,
                 check: Callable[[dict], None] | None = None, paper: str = ""):
    """Register ``fn(base, models, *, key=None, **hp)`` as a merge method (see the module docstring).

    ``base``: "required" | "optional" | "unused"; ``count``: (min, max or None) models besides the
    base; ``per_model_params``: hyper-parameters given once or once per model (YAML: per-model
    ``parameters``); ``stream``: works tensor by tensor (the YAML engine may use it); ``stream_kwargs``:
    what the engine always passes (HF ``(out, in)`` layouts ...); ``host_topk``: the engine computes
    magnitude cut-offs on the host and passes ``threshold=``; ``fast``: a :class:`Fast` in-place numpy
    evaluation for the engine; ``extras``: data inputs the transform takes as apply-time extras
    (``fishers=``, ``grams=``); ``continual``: ``(init, step)`` for methods that fold models in one at
    a time (the transform keeps their state);
    ``whole_model``: the method runs the model (``apply_fn``), so it cannot work on a part of it
    (its transform refuses to run under ``select``/``partition``); ``check(hp)``: a validation of the
    hyper-parameter values together (defaults filled in) beyond the per-value schema of :mod:`.params`,
    run before any work by the Python API and, per tensor, at plan time by the YAML engine.
    """
    if base not in ("required", "optional", "unused"):
        raise ValueError(f"base must be 'required', 'optional' or 'unused', got {base!r}")

    def deco(fn):
        key_name = name or fn.__name__
        sig = inspect.signature(fn)
        known = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
        required = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and p.default is p.empty}
        defaults = {n: p.default for n, p in sig.parameters.items()
                    if p.kind == p.KEYWORD_ONLY and p.default is not p.empty and n not in _IMPLICIT}
        check_schema_covers(key_name, known - set(_IMPLICIT) - set(extras))
        per = frozenset(per_model_params)

        @functools.wraps(fn)
        def wrapper(base_model, models, *, key=None, **hp):
            if "key" in known:
                hp["key"] = key  # deterministic methods accept and ignore it (one signature for all)
            if "lambda" in hp:
                if "lambda_" in hp:
                    raise MergeError(f"{key_name}: give 'lambda' or 'lambda_', not both")
                hp["lambda_"] = hp.pop("lambda")
            unknown = sorted(set(hp) - known)
            if unknown:
                shown = sorted(known - set(_IMPLICIT))
                raise MergeError(f"{key_name} has no parameter {unknown[0]!r} (it takes {shown})")
            missing = sorted(required - set(hp))
            if missing:
                raise MergeError(f"{key_name} needs the parameter {missing[0]!r}")
            check_hyperparameters(key_name, hp, per)
            if check is not None:
                check({**defaults, **{k: v for k, v in hp.items() if k != "key"}})
            _warn_float64(key_name, base_model, models)
            x = inputs(base_model, models, name=key_name, base_rule=base, count=count)
            return fn(x.base, x.models, **hp)

        wrapper.__wrapped__ = fn
        METHODS.register(key_name, base=base, count=tuple(count), per_model=frozenset(per_model_params),
                         mergekit=mergekit, stream=stream, stream_kwargs=tuple(stream_kwargs), host_topk=host_topk,
                         fast=fast, extras=tuple(extras), continual=continual, paper=paper, params_of=fn, doc_of=fn,
                         random="key" in known, whole_model=whole_model,
                         implicit=_IMPLICIT + tuple(extras), required=frozenset(required), check=check,
                         defaults=defaults)(wrapper)
        return wrapper

    return deco


def precheck(name: str, kw: dict) -> None:
    """The method's ``check`` hook on ``kw`` with its defaults filled in (the YAML engine calls it
    for every planned tensor)."""
    entry = METHODS[name]
    if entry.check is not None:
        entry.check({**entry.defaults, **kw})


def _warn_float64(name: str, *trees) -> None:
    if jax.config.jax_enable_x64:
        return
    for t in trees:
        if t is not None and any(getattr(x, "dtype", None) == np.float64 for x in jax.tree.leaves(t)):
            warnings.warn(f"{name}: float64 inputs are merged and returned as float32 (JAX's x64 mode is off; "
                          "jax.config.update('jax_enable_x64', True) keeps float64)", UserWarning, stacklevel=3)
            return


def mergekit_names() -> list[str]:
    """mergekit's method names, as registered."""
    return METHODS.names(mergekit=True)


def transform(name: str, **hp):
    """Merge method ``name`` as a :class:`~weightlab.WeightTransform`: ``apply(params, state,
    models=..., key=...)`` merges ``models`` (a list or stacked pytree) with ``params`` as the base
    (methods whose base is unused merge the models only and replace ``params``; optional-base methods
    use ``params`` as the base). Data inputs (``fishers=``, ``grams=`` ...) are extras too, and
    everything params-shaped is masked by ``select``/``partition``, so ``partition({"attn/":
    transform("ties", density=0.3), "mlp/": transform("linear")}, default=identity())`` is one
    recipe. Continual methods (OPCM) keep their running state in the transform's state."""
    from ..core import EmptyState, WeightTransform

    entry = METHODS[name]
    bad = sorted(set(hp) - set(entry.parameters) - {"lambda"})
    if bad:
        raise MergeError(f"{name} has no parameter {bad[0]!r} (it takes {sorted(entry.parameters)})")
    spelled = {("lambda_" if k == "lambda" else k): v for k, v in hp.items()}
    check_hyperparameters(name, spelled, entry.per_model)
    precheck(name, spelled)
    if entry.continual is not None:
        init, step = entry.continual
        return WeightTransform(init, lambda params, state, **ex: step(params, state, _models(name, ex), **hp))

    def apply(params, state, **ex):
        if entry.whole_model and _has_masked(params):
            raise MergeError(f"{name} evaluates the whole model with apply_fn: it cannot run on the part a "
                             "select/partition leaves visible")
        kw = dict(hp, **{k: ex[k] for k in entry.extras if ex.get(k) is not None})
        if entry.random and ex.get("key") is not None:
            kw["key"] = ex["key"]
        return entry.fn(None if entry.base == "unused" else params, _models(name, ex), **kw), state

    return WeightTransform(lambda params: EmptyState(), apply)


def _has_masked(tree) -> bool:
    from ..core import MaskedNode

    return any(isinstance(x, MaskedNode) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, MaskedNode)))


def _models(name, extras):
    if extras.get("models") is None:
        raise MissingExtraError(f"merge transform {name!r} needs apply(params, state, models=[...] or a stacked tree)")
    return extras["models"]


def markdown_table() -> str:
    """The README/docs table of every merge method (generated; a test checks the committed copies)."""
    def models(e):
        lo, hi = e.count
        n = str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        return {"required": f"base + {n}", "optional": f"{n} (+ optional base)", "unused": n}[e.base]

    return METHODS.table([
        ("method", lambda e: f"`{e.name}`"),
        ("what it does", lambda e: e.summary),
        ("models", models),
        ("YAML / streamed", lambda e: "yes" if e.stream else "Python only"),
        ("mergekit name", lambda e: "yes" if e.mergekit else "—"),
        ("reference", lambda e: e.paper),
    ])
