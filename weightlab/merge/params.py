"""The one schema of merge hyper-parameters: each parameter's type and range, declared once.

Both faces read it: the shared wrapper every method goes through (:func:`.registry.merge_method`;
a bad value is a :class:`MergeError` naming the method and the parameter, before any work) and the
YAML validator (:mod:`.config`; the same error with the config's ``source:line``, for every value
inside gradient lists and filter conditions). A method whose range differs overrides the shared
entry in :data:`OVERRIDES`. Registering a method with a parameter that has no entry here fails, so
no parameter goes unchecked.

Kinds: ``float`` (finite; optional range, open or closed ends), ``int``, ``bool`` (a real boolean:
YAML ``true``/``false``, never ``maybe`` or ``1``), ``choice`` (one of a fixed set, compared by type
and value, so ``1`` is not ``True``), ``selector`` (a ``select=`` value: in YAML a regex string) and
``object`` (Python-only data such as ``apply_fn``). Loads without JAX.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import sys
from typing import Any

import numpy as np

from ..errors import MergeError, RegistryError

__all__ = ["Param", "SCHEMA", "OVERRIDES", "spec", "problem", "check_hyperparameters", "check_schema_covers"]


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str  # "float" | "int" | "bool" | "choice" | "selector" | "object"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        if self.kind == "selector":
            return "a tensor-name regex"
        if self.kind == "object":
            return "a Python object"
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return what

    def accepts(self, v: Any, *, yaml: bool = False) -> bool:
        if self.kind == "object":
            return not yaml
        if self.kind == "selector":
            if yaml or isinstance(v, str):
                return isinstance(v, str) and _is_regex(v)
            return True  # callables, Selectors, lists: weightlab.tree.selector checks them (typed)
        if isinstance(v, np.generic):
            v = v.item()
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return any(type(v) is type(c) and v == c for c in self.choices)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return False
        if self.kind == "int" and not isinstance(v, numbers.Integral):
            return False
        x = float(v)
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _show(c) -> str:
    return {True: "true", False: "false", None: "null"}[c] if c is None or isinstance(c, bool) else repr(c)


def _is_regex(s: str) -> bool:
    try:
        re.compile(s)
    except re.error:
        return False
    return True


_FRACTION = Param("float", 0.0, 1.0, lo_open=True)  # (0, 1]
_UNIT = Param("float", 0.0, 1.0)  # [0, 1]
_NONNEG = Param("float", 0.0)
_POS = Param("float", 0.0, lo_open=True)
_BOOL = Param("bool")
_REAL = Param("float")

#: Every merge hyper-parameter (Python spelling: ``lambda_``), shared by the methods that take it.
SCHEMA: dict[str, Param] = {
    "weight": _REAL,  # negative weights subtract a model (task negation)
    "density": _FRACTION,
    "gamma": Param("float", 0.0, 1.0, hi_open=True),
    "epsilon": Param("float", 0.0, 1.0, hi_open=True),  # DELLA's spread around density
    "lambda_": _REAL,
    "normalize": _BOOL,
    "rescale": Param("choice", choices=(True, False, "l1", "l2", "linf", "inverse")),
    "consensus": Param("choice", choices=("sum", "count", None)),
    "scope": Param("choice", choices=("tensor", "global")),
    "select_topk": _FRACTION,
    "t": _UNIT,
    "max_iter": Param("int", 1),
    "tol": _POS,
    "filter_wise": _BOOL,
    "nuslerp_flatten": _BOOL,
    "nuslerp_row_wise": _BOOL,
    "normalize_weights": _BOOL,
    "eps": _NONNEG,  # a stabiliser added to norms / Fishers (0: none)
    "r": _NONNEG,
    "alpha": _UNIT,
    "k": Param("int", 0),
    "tall_mask_lambda": _NONNEG,
    "pcb_ratio": _FRACTION,
    "common_space_fraction": _UNIT,
    "select": Param("selector"),
    "steps": Param("int", 0),
    "lr": _POS,
    "input_axis": Param("choice", choices=(0, 1)),
    "granularity": Param("choice", choices=("task", "layer")),
    "init": _UNIT,
    "optimizer": Param("object"),
    "apply_fn": Param("object"),
    "int8_mask": _BOOL,  # mergekit's memory switch: accepted and ignored
}

#: Per-method ranges that differ from the shared entry.
OVERRIDES: dict[str, dict[str, Param]] = {
    "nearswap": {"t": _NONNEG},  # a distance threshold, not an interpolation factor
    "ram": {"epsilon": _NONNEG},  # a magnitude threshold
    "ramplus_tl": {"epsilon": _NONNEG, "alpha": _NONNEG},  # alpha clips shared/unique ratios
}


def spec(method: str, name: str) -> Param | None:
    """The schema entry of ``method``'s parameter ``name`` (Python spelling), or None."""
    return OVERRIDES.get(method, {}).get(name) or SCHEMA.get(name)


def problem(method: str, name: str, value: Any, *, yaml: bool = False) -> str | None:
    """What is wrong with one value of ``method``'s parameter ``name`` (None: nothing)."""
    p = spec(method, name)
    if p is None or p.accepts(value, yaml=yaml):
        return None
    shown = {True: "true", False: "false", None: "null"}[value] if yaml and (value is None or isinstance(value, bool)) \
        else repr(value)
    hint = ""
    if yaml and isinstance(value, str) and p.kind in ("float", "int"):
        try:
            float(value)
            hint = " (YAML reads it as a string: write exponents with a sign and a dot, e.g. 1.0e+3)"
        except ValueError:
            pass
    return f"must be {p.describe()}, got {shown}{hint}"


def _is_tracer(v) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(v, jax.core.Tracer)


def _plain(v):
    """A concrete 0-d array (numpy or JAX) as its Python scalar; anything else unchanged."""
    if hasattr(v, "shape") and not _is_tracer(v) and np.ndim(v) == 0:
        return np.asarray(v).item()
    return v


def check_hyperparameters(method: str, hp: dict, per_model: frozenset | set = frozenset()) -> None:
    """Reject bad hyper-parameter values of ``method`` (Python API): a :class:`MergeError` naming the
    method and the parameter. Per-model parameters may be one value or a 1-D sequence of values.
    Traced values (inside ``jit``) cannot be checked and pass."""
    for name, v in hp.items():
        p = spec(method, name)
        if p is None or (p.kind in ("object", "selector") and not isinstance(v, str)) or _is_tracer(v):
            continue
        v = _plain(v)
        if name in per_model and (isinstance(v, (list, tuple)) or np.ndim(v) > 0):
            vals = list(v) if isinstance(v, (list, tuple)) else (list(v) if np.ndim(v) == 1 else None)
            if vals is None or any(isinstance(x, (list, tuple)) or np.ndim(x) > 0 for x in vals):
                raise MergeError(f"{method}: parameter {_yaml_name(name)!r} must be one value or a flat list of values "
                                 f"(one per model), got {v!r}")
            for i, x in enumerate(vals):
                bad = None if _is_tracer(x) else problem(method, name, _plain(x))
                if bad:
                    raise MergeError(f"{method}: parameter {_yaml_name(name)!r} (model {i}) {bad}")
            continue
        bad = problem(method, name, v)
        if bad:
            raise MergeError(f"{method}: parameter {_yaml_name(name)!r} {bad}")


def _yaml_name(name: str) -> str:
    return "lambda" if name == "lambda_" else name


def check_schema_covers(method: str, names) -> None:
    """Registration-time check: every parameter of a new method has a schema entry."""
    missing = sorted(n for n in names if spec(method, n) is None)
    if missing:
        raise RegistryError(f"merge method {method!r}: parameter(s) {missing} have no entry in "
                            "weightlab.merge.params.SCHEMA (declare their type and range there)")
