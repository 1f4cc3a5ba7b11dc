"""The learned-optimizer registry: every optimizer (learned or hand-designed variant) is one decorated
factory returning an ``optax.GradientTransformationExtraArgs``.

``@lopt_method(name, kind=, paper=, needs_loss=)`` records the facts the rest of the library reads:
``kind`` is ``"learned"`` (meta-parameters, :mod:`.perparam`, :mod:`.hierarchical`) or ``"variant"``
(a hand-designed update rule from the seed papers, :mod:`.variants`); ``needs_loss`` says whether
``update`` must be called with ``loss=`` (then calling it without raises
:class:`~weightlab.errors.MissingExtraError`): ``False``, ``True``, or a string naming the option
that makes it required (``"use_loss=True"``). :func:`optimizer` builds any of them by name,
:func:`transform` turns one into a :class:`~weightlab.WeightTransform` (``apply(params, state,
grads=g)`` takes one step, through :func:`weightlab.from_optax`), and :func:`markdown_table` is the
docs' table.
"""

from __future__ import annotations

from typing import Callable

from ..errors import UsageError
from ..registry import Registry

__all__ = ["METHODS", "lopt_method", "optimizer", "transform", "markdown_table"]

METHODS = Registry("lopt", modules=("weightlab.lopt.perparam", "weightlab.lopt.hierarchical",
                                    "weightlab.lopt.variants"))
_KINDS = ("learned", "variant")


def lopt_method(name: str, *, kind: str, paper: str = "", needs_loss: bool | str = False
                ) -> Callable[[Callable], Callable]:
    """Register ``fn(**hp) -> optax.GradientTransformationExtraArgs`` as optimizer ``name``."""
    if kind not in _KINDS:
        raise UsageError(f"lopt_method {name!r}: kind must be one of {_KINDS}, got {kind!r}")
    if not isinstance(needs_loss, (bool, str)):
        raise UsageError(f"lopt_method {name!r}: needs_loss must be a bool or the option that makes it required, "
                         f"got {needs_loss!r}")
    return METHODS.register(name, kind=kind, paper=paper, needs_loss=needs_loss)


def _needs_loss_cell(e) -> str:
    if isinstance(e.needs_loss, str):
        return f"with `{e.needs_loss}`"
    return "yes" if e.needs_loss else "no"


def _check_hp(name: str, hp: dict) -> None:
    known = METHODS[name].parameters
    unknown = sorted(set(hp) - set(known))
    if unknown:
        raise UsageError(f"lopt method {name!r}: unknown parameter(s) {unknown}; it takes {sorted(known)}")


def optimizer(name: str, *args, **hp):
    """Optimizer ``name`` (any entry of :data:`METHODS`) built with ``hp``; unknown names and
    parameters are errors with suggestions."""
    if not isinstance(name, str):
        raise UsageError(f"lopt.optimizer: the name must be a string, got {type(name).__name__}")
    entry = METHODS[name]
    _check_hp(name, hp)
    return entry.fn(*args, **hp)


def transform(name: str, *args, **hp):
    """Optimizer ``name`` as a :class:`~weightlab.WeightTransform`: ``apply(params, state, grads=g,
    **extras)`` returns the stepped params (``loss=`` and other extras reach the optimizer)."""
    from ..core import from_optax

    return from_optax(optimizer(name, *args, **hp))


def markdown_table() -> str:
    """The docs' table of optimizers (README and docs/learned_optimizers.md)."""
    return METHODS.table([("optimizer", lambda e: f"`{e.name}`"), ("kind", lambda e: e.kind),
                          ("needs `loss=`", _needs_loss_cell),
                          ("parameters", lambda e: ", ".join(f"`{p}`" for p in e.parameters)),
                          ("paper", lambda e: e.paper), ("what it does", lambda e: e.summary)])
