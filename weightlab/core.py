"""The weight-transform protocol and its combinators.

A :class:`WeightTransform` is a pair of pure functions, built by a factory that closes over the
hyper-parameters (the pattern of ``optax.GradientTransformation``)::

    state = t.init(params)
    new_params, state = t.apply(params, state, **extras)

``extras`` are keyword arguments a step may need (``key=`` for randomness, ``grads=`` for an
optimizer step, ``batch=`` for data-driven steps); every ``apply`` accepts ``**extras`` and ignores
the ones it does not use, so steps compose with :func:`chain` without plumbing.

Rules every transform follows:

* pure and jit-able: no hidden state, randomness only from the ``key`` extra folded per leaf path
  (:func:`weightlab.tree.leaf_key`), so results do not depend on leaf order or device count;
* non-array leaves (equinox's functions, ``None`` ...) pass through untouched;
* leaves it does not select are returned as the very same objects (bit-identical, unconverted).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import optax

from . import tree as wtree
from .errors import MissingExtraError, NoMatchError, PartitionError

Params = Any
State = Any

__all__ = [
    "WeightTransform", "EmptyState", "MaskedNode", "identity", "stateless", "per_leaf", "chain",
    "select", "partition", "as_optax", "from_optax", "apply_once",
]


class WeightTransform(NamedTuple):
    """``init(params) -> state`` and ``apply(params, state, **extras) -> (params, state)``."""

    init: Callable[[Params], State]
    apply: Callable[..., tuple[Params, State]]


class EmptyState(NamedTuple):
    """State of stateless transforms."""


class MaskedNode(NamedTuple):
    """Stands in for a leaf a transform must not see (an empty pytree: it has no leaves)."""


def _empty_init(params):
    del params
    return EmptyState()


def identity() -> WeightTransform:
    """Returns the weights unchanged (the unit of :func:`chain`)."""

    def apply(params, state, **extras):
        del extras
        return params, state

    return WeightTransform(_empty_init, apply)


def stateless(fn: Callable[..., Params]) -> WeightTransform:
    """Wrap ``fn(params, **extras) -> params`` as a transform with empty state."""

    def apply(params, state, **extras):
        return fn(params, **extras), state

    return WeightTransform(_empty_init, apply)


def per_leaf(fn: Callable[..., Any], *, salt: str = "", needs_key: bool = False) -> WeightTransform:
    """Stateless transform applying ``fn(leaf, path=..., key=...)`` to every array leaf.

    ``key`` is :func:`weightlab.tree.leaf_key` of the ``key`` extra, the leaf's path and ``salt``
    (``None`` when no key was passed; with ``needs_key=True`` that is a :class:`MissingExtraError`).
    Non-array leaves pass through.
    """

    def apply(params, state, **extras):
        base = extras.get("key")
        if needs_key and base is None:
            raise MissingExtraError("this transform is random: call apply(..., key=jax.random.key(n))")

        def one(path, x):
            if not wtree.is_array(x):
                return x
            k = None if base is None else wtree.leaf_key(base, path, salt)
            return fn(x, path=path, key=k)

        return wtree.map_with_path(one, params), state

    return WeightTransform(_empty_init, apply)


def chain(*transforms: WeightTransform) -> WeightTransform:
    """Apply transforms in order; the state is the tuple of their states.

    Extras are passed unchanged to every step (a random step should use its own ``salt`` so two
    random steps in one chain draw independent numbers). ``chain()`` is the identity, and
    ``chain(chain(a, b), c)`` gives the same weights as ``chain(a, chain(b, c))``.
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def apply(params, state, **extras):
        new_state = []
        for t, s in zip(transforms, state):
            params, s = t.apply(params, s, **extras)
            new_state.append(s)
        return params, tuple(new_state)

    return WeightTransform(init, apply)


# ---------------------------------------------------------------------------- select / partition

class SelectState(NamedTuple):
    inner: Any


def _hide(params, keep):
    """Replace leaves whose mask is False by MaskedNode (the inner transform cannot see them)."""
    return jax.tree.map(lambda x, k: x if k else MaskedNode(), params, keep)


def _restore(params, new_sub, keep):
    """Put the inner transform's outputs back; unselected leaves are the original objects."""
    return jax.tree.map(lambda x, new, k: new if k else x, params, new_sub, keep)


def select(selector: wtree.Selector, inner: WeightTransform, *, strict: bool = True) -> WeightTransform:
    """Apply ``inner`` only to the array leaves whose path matches ``selector``.

    ``selector`` is a regex searched in the path (``"attn/(query|key)/kernel$"``), a list of regexes,
    or ``pred(path, leaf) -> bool``. The inner transform sees the same tree with unmatched leaves
    replaced by an empty :class:`MaskedNode`, so paths are unchanged. Unmatched leaves come back as
    the same objects. With ``strict`` a selector that matches no array leaf raises
    :class:`NoMatchError` (a typo should not silently do nothing).
    """
    pred = wtree.predicate(selector)

    def _mask(params):
        keep = wtree.mask(params, pred)
        if strict and not any(jax.tree.leaves(keep)):
            sample = ", ".join(wtree.paths(params)[:5])
            raise NoMatchError(f"selector {selector!r} matches no array leaf (paths look like: {sample})")
        return keep

    def init(params):
        return SelectState(inner.init(_hide(params, _mask(params))))

    def apply(params, state, **extras):
        keep = _mask(params)
        new_sub, inner_state = inner.apply(_hide(params, keep), state.inner, **extras)
        return _restore(params, new_sub, keep), SelectState(inner_state)

    return WeightTransform(init, apply)


def _labels(params, transforms: Mapping[str, WeightTransform], labels, default) -> Any:
    """Pytree of group labels (None for non-array leaves); errors for 0 or 2+ claims."""
    if callable(labels):
        fn = labels
    elif labels is not None:  # a pytree of labels
        pairs = dict(wtree.flatten_with_paths(labels)[0])
        fn = lambda p, x: pairs.get(p)
    else:
        preds = {name: wtree.predicate(name) for name in transforms}

        def fn(p, x):
            hits = [name for name, pr in preds.items() if pr(p, x)]
            if len(hits) > 1:
                raise PartitionError(f"leaf '{p}' is claimed by several groups: {hits}")
            return hits[0] if hits else None

    def one(p, x):
        if not wtree.is_array(x):
            return None
        lab = fn(p, x)
        if lab is None:
            if default is None:
                raise PartitionError(f"leaf '{p}' belongs to no group of {list(transforms)} "
                                     "(pass default=identity() to leave such leaves alone)")
            return "__default__"
        if lab not in transforms:
            raise PartitionError(f"leaf '{p}' has label {lab!r}, which has no transform")
        return lab

    return wtree.map_with_path(one, params)


def partition(transforms: Mapping[str, WeightTransform], labels=None, *,
              default: WeightTransform | None = None) -> WeightTransform:
    """Different transforms for disjoint groups of leaves (like ``optax.multi_transform``).

    Without ``labels`` the keys of ``transforms`` are regexes on paths. ``labels`` may instead be a
    function ``(path, leaf) -> name`` or a pytree of names. Every array leaf must belong to exactly
    one group: a leaf in none (and no ``default``) or in several raises :class:`PartitionError`
    before any transform runs. The state is a dict of the groups' states.
    """
    groups = dict(transforms)
    if default is not None:
        groups["__default__"] = default

    def _masks(params):
        labs = _labels(params, transforms, labels, default)
        return {name: jax.tree.map(lambda l, n=name: l == n, labs, is_leaf=lambda x: x is None)
                for name in groups}

    def init(params):
        return {name: t.init(_hide(params, m)) for (name, t), m in zip(groups.items(), _masks(params).values())}

    def apply(params, state, **extras):
        masks = _masks(params)
        out, new_state = params, {}
        for name, t in groups.items():
            sub, new_state[name] = t.apply(_hide(params, masks[name]), state[name], **extras)
            out = _restore(out, sub, masks[name])
        return out, new_state

    return WeightTransform(init, apply)


# --------------------------------------------------------------------------------- optax bridges

def as_optax(t: WeightTransform) -> optax.GradientTransformationExtraArgs:
    """Use a weight transform as a step of an optax chain.

    The step sees the would-be new weights ``params + updates``, applies ``t`` to them and returns
    the update that lands there: ``t(params + updates) - params``. Typical use: project onto a
    quantization grid or a constraint set after every optimizer step. ``t`` must keep the tree's
    structure and dtypes (a quantizer that returns packed arrays cannot be an optax step). Note that
    ``optax.apply_updates`` then recomputes ``params + update`` in floating point, which can differ
    from ``t``'s output by rounding (one ulp).
    """

    def update(updates, state, params=None, **extras):
        if params is None:
            raise MissingExtraError("as_optax(...) needs params: call update(updates, state, params)")
        target = optax.apply_updates(params, updates)
        new, state = t.apply(target, state, **extras)
        wtree.check_compatible(params, new, names=("params", "transformed params"))
        delta = jax.tree.map(lambda n, p: (n - p).astype(p.dtype) if wtree.is_array(p) else p, new, params)
        return delta, state

    return optax.GradientTransformationExtraArgs(t.init, update)


def from_optax(gt: optax.GradientTransformation, *, mode: str = "step") -> WeightTransform:
    """Use an optax transformation where a weight transform is expected.

    ``mode="step"``: ``apply(params, state, grads=g)`` takes one optimizer step,
    ``params + gt.update(g, state, params)``, so e.g. ``chain(from_optax(optax.adam(1e-3)),
    project)`` is a projected-gradient step. ``mode="map"``: the weights themselves are fed through
    ``gt`` as if they were updates (``optax.clip``, ``optax.scale`` ... become weight maps).
    """
    if mode not in ("step", "map"):
        raise ValueError(f"mode must be 'step' or 'map', got {mode!r}")
    takes_extras = isinstance(gt, optax.GradientTransformationExtraArgs)

    def apply(params, state, **extras):
        grads = extras.pop("grads", None)
        extras = extras if takes_extras else {}
        if mode == "map":
            return gt.update(params, state, params, **extras)
        if grads is None:
            raise MissingExtraError("from_optax(..., mode='step') needs apply(params, state, grads=...)")
        updates, state = gt.update(grads, state, params, **extras)
        return optax.apply_updates(params, updates), state

    return WeightTransform(gt.init, apply)


def apply_once(t: WeightTransform, params: Params, **extras) -> Params:
    """``t.apply(params, t.init(params), **extras)[0]`` for one-shot transforms (quantize, merge)."""
    return t.apply(params, t.init(params), **extras)[0]
