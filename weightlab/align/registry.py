"""The alignment registry: every matcher is one decorated function, and :func:`transform` makes any
of them a :class:`~weightlab.WeightTransform`.

A matcher finds permutations of model B's units (``params_b``) that best match model A
(``params_a``), for a :class:`~weightlab.align.Spec`, and returns :class:`~weightlab.align.Perms`.
Its ``data`` fact says what else it needs: ``None`` (weights only), ``"activations"``
(``apply_fn`` and ``batches``), ``"loss"`` (``loss_fn`` and ``batches``), ``"optional-loss"``.
The registry is what the package namespace, ``transform(name)``, the CLI's ``--method`` choices
and the docs' method table read.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .. import _lazy
from ..errors import AlignError, MissingExtraError
from ..registry import Registry

jax = _lazy.module("jax")

__all__ = ["METHODS", "align_method", "transform", "AlignState", "run_method", "markdown_table", "as_batches"]


def as_batches(batches, what: str = "batches") -> list | None:
    """``batches`` as a list (read once, so a generator can be reused): an array or a dict is one
    batch (``[x]``), not a sequence of rows or keys; None stays None."""
    if batches is None:
        return None
    if hasattr(batches, "shape") or isinstance(batches, dict):
        return [batches]
    try:
        return list(batches)
    except TypeError:
        raise AlignError(f"{what} must be a list (or iterable) of input batches, got {type(batches).__name__}") from None

METHODS = Registry("align", modules=("weightlab.align.matching", "weightlab.align.activation",
                                     "weightlab.align.soft"))
_DATA = (None, "activations", "loss", "optional-loss")
_IMPLICIT = ("spec", "params_a", "params_b", "key", "apply_fn", "batches", "loss_fn")


def align_method(name: str, *, data: str | None = None, paper: str = "") -> Callable[[Callable], Callable]:
    """Register ``fn(spec, params_a, params_b, ..., *, key=None, **hp) -> Perms`` as matcher ``name``."""
    if data not in _DATA:
        raise AlignError(f"align_method {name!r}: data must be one of {_DATA}, got {data!r}")
    return METHODS.register(name, data=data, paper=paper, implicit=_IMPLICIT)


class AlignState(NamedTuple):
    """The permutations found by the last ``apply`` (None before the first) and their objective."""

    perms: Any = None
    objective: Any = None

    def __repr__(self) -> str:
        if self.perms is None:
            return "AlignState(no alignment yet)"
        return f"AlignState({len(self.perms)} groups, objective={self.objective})"


def _check_hp(name: str, hp: dict) -> None:
    entry = METHODS[name]
    known = entry.parameters
    unknown = sorted(set(hp) - set(known))
    if unknown:
        raise AlignError(f"align method {name!r}: unknown parameter(s) {unknown}; it takes {sorted(known)}")


def run_method(name: str, spec, params_a, params_b, *, key=None, apply_fn=None, loss_fn=None, batches=None, **hp):
    """Call matcher ``name`` with the data its registry entry asks for (typed errors when missing)."""
    entry = METHODS[name]
    _check_hp(name, hp)
    batches = as_batches(batches)
    if entry.data == "activations":
        if apply_fn is None or batches is None:
            raise MissingExtraError(f"align method {name!r} needs apply_fn= and batches= (activations on data)")
        return entry.fn(spec, apply_fn, params_a, params_b, batches, key=key, **hp)
    if entry.data == "loss":
        if loss_fn is None or batches is None:
            raise MissingExtraError(f"align method {name!r} needs loss_fn= and batches=")
        return entry.fn(spec, params_a, params_b, loss_fn, batches, key=key, **hp)
    if entry.data == "optional-loss":
        return entry.fn(spec, params_a, params_b, loss_fn=loss_fn, batches=batches, key=key, **hp)
    return entry.fn(spec, params_a, params_b, key=key, **hp)


def _visible_spec(spec, params):
    """``spec`` restricted to the leaves ``params`` has (``select`` hides the others); a group that
    moves a hidden leaf cannot be applied to the visible ones alone."""
    from .. import tree as wtree
    from .spec import Spec

    paths = {p for p, _ in wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0]}
    hidden = [p for p in spec.axes if p not in paths]
    if not hidden:
        return spec
    for p in hidden:
        for g in spec.leaves_of(p):
            raise AlignError(f"align.transform: group '{g}' also moves '{p}', which select/partition hides; permuting "
                             "only the visible leaves would change the function (select every leaf it moves, or "
                             "spec.pin the group)")
    return Spec({p: ax for p, ax in spec.axes.items() if p in paths}, spec.groups, spec.report)


def transform(method: str = "weight_matching", spec=None, *, apply_fn: Callable | None = None,
              loss_fn: Callable | None = None, **hp):
    """Matcher ``method`` as a :class:`~weightlab.WeightTransform`: ``apply(params, state, *,
    reference, key=None, batches=None)`` permutes ``params`` to match ``reference`` (a params-shaped
    extra, so ``select``/``partition`` mask it alike) and keeps the permutations in
    :class:`AlignState`. ``spec`` defaults to :func:`~weightlab.align.infer_spec` on ``apply_fn``
    and the first batch. ``hp``: the matcher's own parameters (checked now)."""
    from ..core import WeightTransform

    if not isinstance(method, str) or method not in METHODS:
        METHODS[str(method)]  # raises with suggestions
    _check_hp(method, hp)

    def init(params):
        return AlignState()

    def apply(params, state, *, reference=None, key=None, batches=None, **_):
        from .infer import infer_spec
        from .spec import permute

        if reference is None:
            raise MissingExtraError("align.transform: apply needs reference= (the model to align params to)")
        s = spec
        batches = as_batches(batches)
        if s is None:
            if apply_fn is None or not batches:
                raise MissingExtraError("align.transform: without spec=, give apply_fn= (to the factory) and batches= "
                                        "(to apply) so the spec can be inferred")
            s = infer_spec(apply_fn, params, batches[0])
        s = _visible_spec(s, params)
        perms = run_method(method, s, reference, params, key=key, apply_fn=apply_fn, loss_fn=loss_fn,
                           batches=batches, **hp)
        return permute(s, perms, params), AlignState(dict(perms), getattr(perms, "objective", None))

    return WeightTransform(init, apply)


def markdown_table() -> str:
    """The docs' table of matchers (README and docs/alignment.md, kept equal by a test)."""
    needs = {None: "the two models' weights", "activations": "`apply_fn`, `batches`",
             "loss": "`loss_fn`, `batches`", "optional-loss": "weights; or `loss_fn`, `batches`"}
    return METHODS.table([("method", lambda e: f"`{e.name}`"), ("needs", lambda e: needs[e.data]),
                          ("parameters", lambda e: ", ".join(f"`{p}`" for p in e.parameters)),
                          ("paper", lambda e: e.paper), ("what it does", lambda e: e.summary)])
