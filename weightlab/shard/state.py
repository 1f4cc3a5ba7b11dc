"""Shardings for optimizer and transform *state*: every accumulator follows the parameter it belongs to.

``jax.jit(opt.init)`` on sharded params returns *replicated* state (zeros have no data dependence
on the params, so nothing propagates their sharding: measured for ``optax.adam`` and ``small_fc``
alike), which multiplies optimizer memory by the number of devices. :func:`state_shardings` gives
each state leaf the sharding of the parameter whose path its own path ends with:

* same shape as the parameter: the parameter's spec (Adam's ``mu``/``nu``, momenta);
* the parameter's shape behind extra leading axes (small_fc's ``(4, *shape)`` momenta, stacks):
  the spec behind replicated leading axes;
* a vector over the matrix view's rows or columns (Adafactor-style factors): that axis's spec where
  the parameter is a matrix; for a square matrix the state's path decides (a path segment ``row``
  or ending in ``_row``, as small_fc's ``row`` and optax's ``v_row``, takes the rows' spec;
  otherwise the columns');
* anything else (step counts, scalars, per-tensor states): replicated.

:func:`init` is ``jax.jit(opt.init)`` with those out-shardings, for optax transforms and
WeightTransforms alike.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import tree as wtree
from .rules import partition_specs

__all__ = ["state_shardings", "init"]


def _spec_for(shape, pshape, pspec, path: str = "") -> P:
    pspec = list(pspec) + [None] * (len(pshape) - len(pspec))
    shape, pshape = tuple(shape), tuple(pshape)
    if shape == pshape:
        return P(*pspec)
    extra = len(shape) - len(pshape)
    if extra > 0 and shape[extra:] == pshape:
        return P(*([None] * extra), *pspec)
    if len(shape) == 1 and len(pshape) >= 2:
        rows = math.prod(pshape[:-1])
        row_named = any(seg.lower() == "row" or seg.lower().endswith("_row") for seg in path.split("/"))
        if shape[0] == rows and len(pshape) == 2 and (row_named or shape[0] != pshape[-1]):
            return P(pspec[0])
        if shape[0] == pshape[-1]:
            return P(pspec[-1])
    return P(*([None] * len(shape)))


def state_shardings(state: Any, params: Any, mesh: Mesh, rules=(), *, indivisible: str = "error") -> Any:
    """A NamedSharding per leaf of ``state`` (arrays or ``jax.eval_shape`` output), following the
    parameter each leaf belongs to (see the module docstring)."""
    pspecs = wtree.to_flat_dict(partition_specs(params, rules, mesh, indivisible=indivisible))
    pshapes = {k: tuple(v.shape) for k, v in wtree.to_flat_dict(params).items() if wtree.is_array(v)}
    by_len = sorted(pspecs, key=len, reverse=True)  # the longest matching parameter path wins

    def one(path, x):
        if not wtree.is_array(x):
            return None
        for pp in by_len:
            if pp in pshapes and (path == pp or path.endswith("/" + pp)):
                return NamedSharding(mesh, _spec_for(x.shape, pshapes[pp], pspecs[pp], path[:len(path) - len(pp)]))
        return NamedSharding(mesh, P(*([None] * len(x.shape))))

    return wtree.map_with_path(one, state)


def init(opt, params: Any, mesh: Mesh, rules=(), *, indivisible: str = "error") -> Any:
    """``opt.init(params)`` (an optax transform or a WeightTransform) compiled with out-shardings from
    :func:`state_shardings`: the state is born sharded like the params, never replicated first."""
    from .rules import named_shardings
    from .run import place

    placed = place(params, named_shardings(params, mesh, rules, indivisible=indivisible))
    shapes = jax.eval_shape(opt.init, placed)
    out = state_shardings(shapes, params, mesh, rules, indivisible=indivisible)
    return jax.jit(opt.init, out_shardings=out)(placed)
