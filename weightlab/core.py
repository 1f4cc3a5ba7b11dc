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

from . import _lazy, tree as wtree
from .errors import MissingExtraError, NoMatchError, PartitionError, StructureMismatchError, UsageError

jax = _lazy.module("jax")        # deferred: pillar registries import this module without JAX
optax = _lazy.module("optax")

Params = Any
State = Any

__all__ = [
    "WeightTransform", "EmptyState", "MaskedNode", "identity", "stateless", "per_leaf", "chain",
    "select", "partition", "mask_extras", "TREE_EXTRAS", "as_optax", "from_optax", "apply_once",
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
    """Stateless transform applying ``fn(leaf, path=..., key=...)`` to every weight leaf (arrays,
    and atomic nodes such as a QArray, which ``fn`` receives whole).

    ``key`` is :func:`weightlab.tree.leaf_key` of the ``key`` extra, the leaf's path and ``salt``
    (``None`` when no key was passed; with ``needs_key=True`` that is a :class:`MissingExtraError`).
    Other leaves (functions, ``None`` ...) pass through.
    """

    def apply(params, state, **extras):
        base = extras.get("key")
        if needs_key and base is None:
            raise MissingExtraError("this transform is random: call apply(..., key=jax.random.key(n))")

        def one(path, x):
            if not wtree.is_weight(x):
                return x
            k = None if base is None else wtree.leaf_key(base, path, salt)
            return fn(x, path=path, key=k)

        return wtree.map_with_path(one, params, is_leaf=wtree.is_atomic), state

    return WeightTransform(_empty_init, apply)


def _check_transform(t, where: str) -> None:
    """:class:`UsageError` when ``t`` is not a weight transform (caught when a recipe is built, not
    deep inside its first ``apply``); an optax transformation gets a pointer to :func:`from_optax`."""
    if isinstance(t, WeightTransform):
        return
    if hasattr(t, "init") and hasattr(t, "update") and not hasattr(t, "apply"):
        raise UsageError(f"{where}: got an optax transformation; wrap it with weightlab.from_optax(...)")
    if not (hasattr(t, "init") and hasattr(t, "apply") and callable(t.init) and callable(t.apply)):
        raise UsageError(f"{where}: expected a WeightTransform (init/apply), got {type(t).__name__} {t!r:.80}")


def chain(*transforms: WeightTransform) -> WeightTransform:
    """Apply transforms in order; the state is the tuple of their states.

    Extras are passed unchanged to every step (a random step should use its own ``salt`` so two
    random steps in one chain draw independent numbers). ``chain()`` is the identity, and
    ``chain(chain(a, b), c)`` gives the same weights as ``chain(a, chain(b, c))``.
    """
    for i, t in enumerate(transforms):
        _check_transform(t, f"chain(...) argument {i}")

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

TREE_EXTRAS = ("grads", "models", "reference", "fishers")
"""Extras that must mirror the params (or be a list of params-shaped trees): ``select``/``partition``
hide the same leaves in them, and a mismatch is a typed error naming the first differing path."""


class SelectState(NamedTuple):
    inner: Any


class _View(NamedTuple):
    """The params flattened to weight leaves (arrays and atomic nodes such as QArray)."""
    paths: list
    leaves: list
    treedef: Any


def _view(params) -> _View:
    pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
    return _View([p for p, _ in pairs], [x for _, x in pairs], treedef)


def _hide(view: _View, keep) -> Any:
    """The params with unselected leaves replaced by MaskedNode (the inner transform cannot see them)."""
    return view.treedef.unflatten([x if k else MaskedNode() for x, k in zip(view.leaves, keep)])


def _weight_paths(tree) -> list[str]:
    """Paths of the weight leaves (arrays, atomic nodes) of a tree; ``None``/functions do not count."""
    return [p for p, x in wtree.flatten_with_paths(tree, is_leaf=wtree.is_atomic)[0] if wtree.is_weight(x)]


def _mirror(view: _View, value) -> str | None:
    """'tree' if ``value`` has the params' weight-leaf paths, 'list' for a list/tuple of such trees.
    Only weight leaves count, so equinox's ``filter_grad`` output (``None`` for the activation)
    mirrors the module it came from."""
    want = set(p for p, x in zip(view.paths, view.leaves) if wtree.is_weight(x))

    def same(v):
        try:
            got = _weight_paths(v)
        except Exception:  # path collisions etc.: not a mirror
            return False
        return len(got) == len(want) and set(got) == want

    if value is None or not want:
        return None
    if same(value):
        return "tree"
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields") and value and all(same(v) for v in value):
        return "list"
    return None


def _hide_like(view: _View, value, keep):
    """``value`` with MaskedNode at every path the params hide (by path, so the containers may differ
    in their non-weight leaves: equinox's ``filter_grad`` puts ``None`` where the module has a
    function, and both become MaskedNode, so the hidden trees match)."""
    hidden = {p for p, k in zip(view.paths, keep) if not k}
    pairs, treedef = wtree.flatten_with_paths(value, is_leaf=lambda x: x is None or wtree.is_atomic(x))
    return treedef.unflatten([MaskedNode() if p in hidden else x for p, x in pairs])


def _check_tree_extra(view: _View, name: str, value) -> None:
    """A TREE_EXTRAS value that mirrors nothing: name the first path where it differs."""
    one = value[0] if isinstance(value, (list, tuple)) and value and not hasattr(value, "_fields") else value
    try:
        got = _weight_paths(one)
    except Exception as e:
        raise StructureMismatchError("", "a tree like the params", f"{type(e).__name__}: {e}", what=f"{name}=") from None
    want = [p for p, x in zip(view.paths, view.leaves) if wtree.is_weight(x)]
    gs, ws = set(got), set(want)
    for p in want:
        if p not in gs:
            raise StructureMismatchError(p, "a leaf (as in the params)", f"missing from {name}=", what=f"{name}=")
    for p in got:
        if p not in ws:
            raise StructureMismatchError(p, "no leaf (absent from the params)", f"an extra leaf in {name}=",
                                         what=f"{name}=")
    raise StructureMismatchError("", "one leaf per params leaf", f"repeated paths in {name}=", what=f"{name}=")


def mask_extras(params, keep, extras: Mapping[str, Any]) -> dict:
    """``extras`` with the leaves where ``keep`` (a list over the params' weight leaves) is False
    hidden in every extra that mirrors the params (a params-shaped tree, or a list/tuple of them,
    as ``models=``); other extras pass unchanged. The names in :data:`TREE_EXTRAS` must mirror the
    params or a :class:`~weightlab.errors.StructureMismatchError` names the first differing path."""
    view = params if isinstance(params, _View) else _view(params)
    out = {}
    for name, v in extras.items():
        kind = _mirror(view, v)
        if kind == "tree":
            out[name] = _hide_like(view, v, keep)
        elif kind == "list":
            out[name] = type(v)(_hide_like(view, e, keep) for e in v)
        else:
            if name in TREE_EXTRAS and v is not None:
                _check_tree_extra(view, name, v)
            out[name] = v
    return out


def _restore(view: _View, out: list, sub, keep) -> None:
    """Write the inner transform's outputs for the kept leaves into ``out`` (a leaf list). Outputs
    may change type (array -> QArray): ``sub`` is read up to the params' weight leaves."""
    try:
        new = view.treedef.flatten_up_to(sub)
    except (ValueError, TypeError) as e:
        raise StructureMismatchError("", "the inner transform to return the tree it was given",
                                     f"another structure ({e})") from None
    for i, (k, x) in enumerate(zip(keep, new)):
        if k:
            out[i] = x


def _keep(view: _View, sel: wtree.Selector) -> list:
    return [bool(wtree.is_weight(x) and sel(p, x)) for p, x in zip(view.paths, view.leaves)]


def select(selector: wtree.SelectorLike, inner: WeightTransform, *, strict: bool = True) -> WeightTransform:
    """Apply ``inner`` only to the weight leaves whose path matches ``selector``.

    ``selector``: anything :func:`weightlab.tree.selector` accepts (a regex searched in the path, a
    list of regexes, a predicate ``fn(path)`` / ``fn(path, leaf)``, a :class:`~weightlab.tree.Selector`).
    The inner transform sees the same tree with unmatched leaves replaced by an empty
    :class:`MaskedNode` (paths unchanged), and so do extras that mirror the params (``grads=``,
    ``models=``, ``reference=`` ..., see :func:`mask_extras`). A quantized leaf (QArray) is one leaf:
    selected or hidden whole. The inner transform may change a selected leaf's type (array ->
    QArray). Unmatched leaves come back as the same objects. With ``strict`` a selector that
    matches no leaf raises :class:`NoMatchError` (a typo should not silently do nothing).
    """
    sel = wtree.selector(selector)
    _check_transform(inner, f"select({sel!r}, ...)")

    def _mask(view):
        keep = _keep(view, sel)
        if strict and not any(keep):
            sample = ", ".join(view.paths[:5])
            raise NoMatchError(f"selector {sel!r} matches no weight leaf (paths look like: {sample})")
        return keep

    def init(params):
        view = _view(params)
        return SelectState(inner.init(_hide(view, _mask(view))))

    def apply(params, state, **extras):
        view = _view(params)
        keep = _mask(view)
        extras = mask_extras(view, keep, extras)
        new_sub, inner_state = inner.apply(_hide(view, keep), state.inner, **extras)
        out = list(view.leaves)
        _restore(view, out, new_sub, keep)
        return view.treedef.unflatten(out), SelectState(inner_state)

    return WeightTransform(init, apply)


def _has_hidden(view: _View) -> bool:
    """Whether the tree holds MaskedNode placeholders (it is the view of an enclosing select)."""
    leaves = jax.tree_util.tree_leaves(view.treedef.unflatten(view.leaves), is_leaf=lambda x: isinstance(x, MaskedNode))
    return any(isinstance(x, MaskedNode) for x in leaves)


def _labels(view: _View, transforms: Mapping[str, WeightTransform], labels, default, strict: bool) -> list:
    """Group label of every weight leaf (None for non-weight leaves); errors for 0 or 2+ claims."""
    regex_keys = labels is None
    if callable(labels):
        fn = labels
    elif labels is not None:  # a pytree of labels
        pairs = dict(wtree.flatten_with_paths(labels, is_leaf=lambda x: x is None or isinstance(x, str))[0])
        fn = lambda p, x: pairs.get(p)
    else:
        sels = {name: wtree.selector(name) for name in transforms}

        def fn(p, x):
            hits = [name for name, s in sels.items() if s(p, x)]
            if len(hits) > 1:
                raise PartitionError(f"leaf '{p}' is claimed by several groups: {hits}")
            return hits[0] if hits else None

    out = []
    for p, x in zip(view.paths, view.leaves):
        if not wtree.is_weight(x):
            out.append(None)
            continue
        lab = fn(p, x)
        if lab is None:
            if default is None:
                raise PartitionError(f"leaf '{p}' belongs to no group of {list(transforms)} "
                                     "(pass default=identity() to leave such leaves alone)")
            lab = "__default__"
        elif lab not in transforms:
            raise PartitionError(f"leaf '{p}' has label {lab!r}, which has no transform")
        out.append(lab)
    if regex_keys and strict and not _has_hidden(view):  # under an outer select a group may be empty
        unused = [name for name in transforms if name not in out]
        if unused:
            raise NoMatchError(f"partition group {unused[0]!r} matches no weight leaf (paths look like: "
                               f"{', '.join(view.paths[:5])})")
    return out


def partition(transforms: Mapping[str, WeightTransform], labels=None, *,
              default: WeightTransform | None = None, strict: bool = True) -> WeightTransform:
    """Different transforms for disjoint groups of leaves (like ``optax.multi_transform``).

    Without ``labels`` the keys of ``transforms`` are selectors (regexes on paths). ``labels`` may
    instead be a function ``(path, leaf) -> name`` or a pytree of names. Every weight leaf must
    belong to exactly one group: a leaf in none (and no ``default``) or in several raises
    :class:`PartitionError`, and (with ``strict``) a regex group that matches nothing raises
    :class:`NoMatchError`, before any transform runs. Each group sees only its leaves, in the params
    and in every extra that mirrors them; groups may change their leaves' types (mixed precision:
    ``partition({"attn/.*kernel$": quant.rtn(bits=4), "mlp/.*kernel$": quant.rtn(bits=8)},
    default=identity())``).
    The state is a dict of the groups' states.
    """
    if not isinstance(transforms, Mapping):
        raise UsageError(f"partition(...) takes a mapping {{selector or label: transform}}, got {type(transforms).__name__}")
    groups = dict(transforms)
    for name, t in groups.items():
        _check_transform(t, f"partition group {name!r}")
        if labels is None:
            wtree.selector(name)  # a bad regex fails here, quoting the user's text
    if default is not None:
        _check_transform(default, "partition default")
        groups["__default__"] = default

    def _masks(view):
        labs = _labels(view, transforms, labels, default, strict)
        return {name: [lab == name for lab in labs] for name in groups}

    def init(params):
        view = _view(params)
        masks = _masks(view)
        return {name: t.init(_hide(view, masks[name])) for name, t in groups.items()}

    def apply(params, state, **extras):
        view = _view(params)
        masks = _masks(view)
        out, new_state = list(view.leaves), {}
        for name, t in groups.items():
            keep = masks[name]
            if not any(keep):
                new_state[name] = state[name]
                continue
            sub, new_state[name] = t.apply(_hide(view, keep), state[name], **mask_extras(view, keep, extras))
            _restore(view, out, sub, keep)
        return view.treedef.unflatten(out), new_state

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
    _check_transform(t, "as_optax(...)")

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
        raise UsageError(f"from_optax: mode must be 'step' or 'map', got {mode!r}")
    if not (hasattr(gt, "init") and hasattr(gt, "update")):
        raise UsageError(f"from_optax: expected an optax GradientTransformation, got {type(gt).__name__}")
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
    _check_transform(t, "apply_once(...)")
    if extras.get("key") is not None:
        wtree.check_key(extras["key"])
    return t.apply(params, t.init(params), **extras)[0]
