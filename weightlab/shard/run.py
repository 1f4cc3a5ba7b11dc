"""Run any :class:`~weightlab.WeightTransform` on a mesh: ``jit`` with shardings from path rules.

``shard.jit(t, mesh, rules)`` is itself a WeightTransform: ``apply(params, state, **extras)``
places the params by ``rules`` (checking every leaf first: a rule that does not fit is a
ShardingError naming the leaf and mesh axis before anything is computed), runs ``t.apply`` under
``jax.jit`` and constrains the new params to the shardings the same rules give the *output*
(quantized leaves included: their codes, scales and zeros follow :mod:`.qarray`) and the new
state to the params' shardings (:mod:`.state`: an optimizer's accumulators stay sharded). Extras that are
arrays or pytrees of arrays (``key``, ``grads``, ``stats``, ``batch``) are traced arguments; others
(``apply_fn``, strings) are static, and each combination of static extras compiles once.
While the transform is traced, :func:`current` names the mesh and rules, so code inside it that
moves data between devices (alignment's permutations) follows the same layout without being told.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
from jax.sharding import Mesh

from .. import tree as wtree
from ..core import WeightTransform, _check_transform
from .rules import named_shardings
from .state import state_shardings

__all__ = ["jit", "put", "place", "constrain", "current"]

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("weightlab_shard_jit", default=None)


def current():
    """``(mesh, rules)`` of the :func:`jit` whose transform is being traced, else ``None``.

    Functions that move data between devices read it, so a transform run under ``shard.jit`` needs
    no ``mesh=`` of its own: :func:`weightlab.align.permute` then reorders the axes the rules split
    by the ring exchange of :mod:`.permute`. (Matching itself runs on the host and is refused under
    ``jit``; it reads sharded params outside it.)"""
    return _ACTIVE.get()


@contextlib.contextmanager
def _active(mesh, rules):
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def put(x, s):
    """``x`` placed with sharding ``s``. Across processes (a sharding spanning other hosts' devices),
    a host value (the same on every process) is cut into this process's shards."""
    if s is None or x is None:
        return x
    if not s.is_fully_addressable and not (isinstance(x, jax.Array) and not x.is_fully_addressable):
        import numpy as np

        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.device_put(x, s)


def place(tree: Any, shardings: Any) -> Any:
    """``put`` each array of ``tree`` with the matching sharding (``None``: left as is)."""
    return jax.tree.map(put, tree, shardings, is_leaf=lambda v: v is None)


def constrain(tree: Any, shardings: Any) -> Any:
    """``with_sharding_constraint`` on each array of ``tree`` (inside ``jit``)."""
    return jax.tree.map(lambda x, s: x if s is None or x is None else jax.lax.with_sharding_constraint(x, s),
                        tree, shardings, is_leaf=lambda v: v is None)


def _like_params(value, params, in_sh, mesh):
    """Place an extra shaped like the params (``grads``, ``fishers``), a list of such trees, or a
    stack of them (leading model axis: ``models``) with the params' shardings (the stack axis
    replicated); anything else is left as it is."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    pdef = jax.tree.structure(params)
    if isinstance(value, (list, tuple)) and value and all(jax.tree.structure(v) == pdef for v in value):
        return type(value)(_like_params(v, params, in_sh, mesh) for v in value)
    if jax.tree.structure(value) != pdef:
        return value
    shapes_p = [tuple(x.shape) for x in jax.tree.leaves(params)]
    shapes_v = [tuple(x.shape) for x in jax.tree.leaves(value)]
    if shapes_v == shapes_p:
        return place(value, in_sh)
    if all(len(v) == len(q) + 1 and v[1:] == q for v, q in zip(shapes_v, shapes_p)):
        stacked = jax.tree.map(lambda s: None if s is None else NamedSharding(mesh, P(None, *s.spec)), in_sh,
                               is_leaf=lambda v: v is None)
        return place(value, stacked)
    return value


def _dynamic(v) -> bool:
    leaves = jax.tree.leaves(v)
    return bool(leaves) and all(wtree.is_array(x) or isinstance(x, jax.Array) for x in leaves)


def jit(transform: WeightTransform, mesh: Mesh, rules=None, *, indivisible: str | None = None,
        out_rules=None) -> WeightTransform:
    """``transform`` run under ``jax.jit`` on ``mesh`` with params placed by ``rules`` and results
    constrained to the shardings ``out_rules`` (default: ``rules``) give them. ``rules=None``: the
    :func:`~weightlab.shard.defaults.default_rules` of the params (with ``indivisible="replicate"``)."""
    _check_transform(transform, "shard.jit")
    compiled: dict = {}

    def rules_for(params):
        if rules is None:
            from .defaults import default_rules

            return default_rules(params), indivisible or "replicate"
        return rules, indivisible or "error"

    def apply(params, state, **extras):
        r, ind = rules_for(params)
        in_sh = named_shardings(params, mesh, r, indivisible=ind)  # every leaf checked before any work
        dyn = {k: _like_params(v, params, in_sh, mesh) for k, v in extras.items() if _dynamic(v)}
        static = tuple(sorted((k, id(v)) for k, v in extras.items() if k not in dyn))
        statics = {k: v for k, v in extras.items() if k not in dyn}

        def f(p, s, ex):
            with _active(mesh, r):
                return transform.apply(p, s, **ex, **statics)

        out_params, out_state = jax.eval_shape(f, params, state, dyn)
        out_sh = named_shardings(out_params, mesh, r if out_rules is None else out_rules, indivisible=ind)
        st_sh = state_shardings(out_state, params, mesh, r, indivisible=ind)
        # The compiled function closes over out_sh/st_sh and the static extras: all three are in the key.
        ck = (static,) + tuple((jax.tree.structure(t, is_leaf=lambda v: v is None), str(jax.tree.leaves(t)))
                               for t in (out_sh, st_sh))
        if ck not in compiled:
            if len(compiled) > 32:
                compiled.clear()

            def g(p, s, ex, out_sh=out_sh, st_sh=st_sh):
                new, s2 = f(p, s, ex)
                return constrain(new, out_sh), constrain(s2, st_sh)

            compiled[ck] = (jax.jit(g), statics)  # statics kept alive: their ids stay theirs
        with mesh:
            return compiled[ck][0](place(params, in_sh), state, dyn)

    return WeightTransform(transform.init, apply)
