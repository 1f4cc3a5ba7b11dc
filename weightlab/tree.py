"""Pytree utilities keyed by stable string paths.

Every leaf of a parameter pytree gets a path such as ``encoder/layer_0/attn/query/kernel``: the keys
from the root to the leaf joined by ``/`` (dict keys and attribute names as written, sequence
indices as decimal numbers). The same model gives the same paths whether it is held as a plain
dict, flax linen params, a ``flax.nnx.State`` (the ``Variable`` wrapper adds nothing to the path),
an equinox module, lists/tuples or a registered dataclass. Selection, error messages and per-leaf
random keys all use these paths, so they never depend on leaf order or container flavour.
"""

from __future__ import annotations

import re
import sys
import zlib
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np

from . import _lazy
from .dtypes import true_bytes
from .errors import (DTypeMismatchError, PathCollisionError, SelectorError, ShapeMismatchError, StructureMismatchError,
                     UsageError)

jax = _lazy.module("jax")  # deferred: the merge registry and a linear merge load this without JAX
jnp = _lazy.module("jax.numpy")

PyTree = Any
Predicate = Callable[[str, Any], bool]

SEP = "/"

__all__ = [
    "keystr", "flatten_with_paths", "paths", "to_flat_dict", "from_flat_dict", "map_with_path",
    "Selector", "SelectorLike", "selector", "mask", "is_atomic", "is_weight", "stack", "unstack", "num_models", "check_key", "leaf_key", "leaf_keys", "check_compatible",
    "is_array", "nonfinite", "true_nbytes", "tree_nbytes", "param_count", "describe", "gather_index",
]


# ----------------------------------------------------------------------------------------- paths

def _key_to_str(k) -> str:
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        return str(k.key)
    if isinstance(k, tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, tu.GetAttrKey):
        return k.name
    if isinstance(k, tu.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def keystr(keypath: Iterable[Any]) -> str:
    """Format a jax key path (tuple of DictKey/SequenceKey/GetAttrKey/...) as ``a/b/0/c``."""
    return SEP.join(_key_to_str(k) for k in keypath)


def _wrapper_types() -> tuple[type, ...]:
    """Leaf wrappers that must not add a path component (flax.nnx ``Variable``/``VariableState``).

    Looked up lazily in ``sys.modules`` so that weightlab never imports flax just to format a path.
    """
    mod = sys.modules.get("flax.nnx")
    if mod is None:
        return ()
    out = []
    for name in ("Variable", "VariableState"):
        t = vars(mod).get(name)  # not getattr: flax 0.12 answers 'VariableState' with a deprecation warning
        if isinstance(t, type):
            out.append(t)
    return tuple(out)


def _unwrap(var, is_leaf) -> list[tuple[tuple, Any]]:
    """The leaves under one wrapper with their key paths *below its own key*: a ``Variable``
    flattens to its one child under ``GetAttrKey('value')``, and that component is dropped whatever
    the child is (an array, or a pytree node such as a QArray: ``kernel/codes``, not
    ``kernel/value/codes``). A wrapper that ever holds several children keeps their keys."""
    children, _ = jax.tree_util.tree_flatten_with_path(var, is_leaf=lambda y: y is not var)
    drop = len(children) == 1
    out = []
    for ckp, child in children:
        below, _ = jax.tree_util.tree_flatten_with_path(child, is_leaf=is_leaf)
        out.extend(((() if drop else tuple(ckp)) + tuple(ikp), leaf) for ikp, leaf in below)
    return out


def flatten_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
    """Flatten ``tree`` into ``([(path, leaf), ...], treedef)``.

    Leaves come in ``jax.tree.leaves`` order, so ``treedef.unflatten([leaf for _, leaf in pairs])``
    rebuilds the tree. Raises :class:`PathCollisionError` if two leaves format to the same path.
    """
    wrappers = _wrapper_types()

    def _is_leaf(x):
        return (bool(wrappers) and isinstance(x, wrappers)) or (is_leaf is not None and is_leaf(x))

    try:
        outer, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    except ValueError as e:  # JAX sorts dict keys; {0: ..., "0": ...} cannot be sorted
        if "sorting" not in str(e):
            raise
        raise PathCollisionError(f"a dict mixes key types that cannot be ordered (e.g. 0 and '0'): {e.__cause__ or e}; "
                                 "use one key type per dict") from None
    pairs: list[tuple[str, Any]] = []
    for kp, x in outer:
        if wrappers and isinstance(x, wrappers):
            pairs.extend((keystr(tuple(kp) + ikp), leaf) for ikp, leaf in _unwrap(x, is_leaf))
        else:
            pairs.append((keystr(kp), x))
    treedef = jax.tree_util.tree_structure(tree, is_leaf=is_leaf)
    if treedef.num_leaves != len(pairs):  # pragma: no cover - defensive
        raise StructureMismatchError("", f"{treedef.num_leaves} leaves", f"{len(pairs)} paths")
    seen: dict[str, int] = {}
    for i, (p, _) in enumerate(pairs):
        if p in seen:
            raise PathCollisionError(
                f"leaves #{seen[p]} and #{i} both have path '{p}'; rename one key "
                "(e.g. mixing int and str dict keys, or a key containing '/')")
        seen[p] = i
    return pairs, treedef


def paths(tree: PyTree) -> list[str]:
    """The path of every leaf, in leaf order."""
    return [p for p, _ in flatten_with_paths(tree)[0]]


def to_flat_dict(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` in leaf order."""
    return dict(flatten_with_paths(tree)[0])


def from_flat_dict(flat: dict[str, Any], like: PyTree | None = None, *, check: bool = True) -> PyTree:
    """Inverse of :func:`to_flat_dict`.

    Without ``like`` the result is nested ``dict``s keyed by the path components (strings). With
    ``like`` the leaves are placed into ``like``'s exact structure (dicts, lists, nnx.State, ...);
    missing or extra paths raise :class:`StructureMismatchError`, and with ``check`` a leaf whose
    shape or dtype differs from ``like``'s raises the shape/dtype error naming the path.
    """
    if like is None:
        out: dict = {}
        for p, v in flat.items():
            node = out
            parts = p.split(SEP)
            for part in parts[:-1]:
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, dict):
                    raise PathCollisionError(f"'{p}' descends into leaf '{part}'")
                node = nxt
            if parts[-1] in node:
                raise PathCollisionError(f"path '{p}' is both a leaf and a subtree")
            node[parts[-1]] = v
        return out
    pairs, treedef = flatten_with_paths(like)
    want = {p for p, _ in pairs}
    extra = [p for p in flat if p not in want]
    if extra:
        raise StructureMismatchError(extra[0], "no such leaf in the target structure", "an extra tensor")
    leaves = []
    for p, ref in pairs:
        if p not in flat:
            raise StructureMismatchError(p, "a tensor", "missing")
        v = flat[p]
        if check and is_array(ref):
            if tuple(np.shape(v)) != tuple(np.shape(ref)):
                raise ShapeMismatchError(p, np.shape(ref), np.shape(v))
            if np.dtype(v.dtype) != np.dtype(ref.dtype):
                raise DTypeMismatchError(p, np.dtype(ref.dtype), np.dtype(v.dtype))
        leaves.append(v)
    return treedef.unflatten(leaves)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
                  is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """``fn(path, leaf, *rest_leaves)`` for every leaf; ``rest`` trees must share ``tree``'s structure
    (up to ``tree``'s leaves: with ``is_leaf=is_atomic`` a QArray in ``tree`` is one leaf)."""
    pairs, treedef = flatten_with_paths(tree, is_leaf=is_leaf)
    rest_leaves = []
    for i, r in enumerate(rest):
        if is_leaf is not None:
            rest_leaves.append(treedef.flatten_up_to(r))
            continue
        rl, rdef = jax.tree_util.tree_flatten(r)
        if rdef != treedef:
            check_compatible(tree, r, shapes=False, dtypes=False, names=("tree", f"rest[{i}]"))
        rest_leaves.append(rl)
    out = [fn(p, x, *(rl[i] for rl in rest_leaves)) for i, (p, x) in enumerate(pairs)]
    return treedef.unflatten(out)


# ------------------------------------------------------------------------------------- selection

class Selector:
    """Which leaves a function touches: the one selection type of every public weightlab API.

    Built by :func:`selector` from a regex searched in the path (``"attn/(query|key)/kernel$"``), a
    list of regexes (any may match), a predicate on the path (``fn(path)`` or ``fn(path, leaf)``), or
    ``None`` (everything). Selectors combine with ``&``, ``|`` and ``~``, and :func:`selector` adds
    ``exclude=`` and ``min_ndim=`` (so ``selector("kernel$", exclude="embed", min_ndim=2)`` is one
    value that every function taking ``select=`` understands). ``sel(path, leaf) -> bool``.
    """

    __slots__ = ("_fn", "_desc")

    def __init__(self, fn: Callable[[str, Any], bool], desc: str):
        self._fn, self._desc = fn, desc

    def __call__(self, path: str, leaf: Any = None) -> bool:
        return bool(self._fn(path, leaf))

    def __and__(self, other) -> "Selector":
        o = selector(other)
        return Selector(lambda p, x: self._fn(p, x) and o._fn(p, x), f"({self._desc} & {o._desc})")

    def __or__(self, other) -> "Selector":
        o = selector(other)
        return Selector(lambda p, x: self._fn(p, x) or o._fn(p, x), f"({self._desc} | {o._desc})")

    def __invert__(self) -> "Selector":
        return Selector(lambda p, x: not self._fn(p, x), f"~{self._desc}")

    def __repr__(self) -> str:
        return f"Selector({self._desc})"

    def paths(self, tree: PyTree) -> list[str]:
        """Paths of the array (or atomic) leaves of ``tree`` this selects, in leaf order."""
        return [p for p, x in flatten_with_paths(tree, is_leaf=is_atomic)[0] if is_weight(x) and self(p, x)]


SelectorLike = Union[Selector, str, re.Pattern, Sequence[str], Callable[..., bool], None]


def _arity(fn) -> int:
    import inspect

    try:
        ps = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return 2
    return 2 if var or len(ps) >= 2 else 1


def _compile(rx, what="selector") -> re.Pattern:
    if isinstance(rx, re.Pattern):
        return rx
    try:
        return re.compile(rx)
    except re.error as e:
        raise SelectorError(f"{what} {rx!r} is not a valid regular expression: {e}") from None


def selector(spec: SelectorLike = None, *, exclude: SelectorLike = None, min_ndim: int | None = None) -> Selector:
    """Normalise anything a ``select=`` argument accepts into a :class:`Selector` (see there).

    ``exclude`` removes what it matches; ``min_ndim`` keeps only leaves with at least that many
    axes. A bad regex or an unsupported type raises :class:`~weightlab.errors.SelectorError`.
    """
    if isinstance(spec, Selector):
        sel = spec
    elif spec is None:
        sel = Selector(lambda p, x: True, "all")
    elif isinstance(spec, (str, re.Pattern)):
        rx = _compile(spec)
        sel = Selector(lambda p, x: rx.search(p) is not None, repr(rx.pattern))
    elif callable(spec):
        fn = spec if _arity(spec) == 2 else (lambda p, x, f=spec: f(p))
        sel = Selector(fn, getattr(spec, "__name__", "predicate"))
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, (str, re.Pattern)) for s in spec):
        rxs = [_compile(s) for s in spec]
        sel = Selector(lambda p, x: any(r.search(p) for r in rxs), repr([r.pattern for r in rxs]))
    else:
        raise SelectorError(f"a selector is a regex string, a non-empty list of them, a predicate fn(path) / "
                            f"fn(path, leaf), a Selector or None; got {spec!r}")
    if exclude is not None:
        sel = sel & ~selector(exclude)
    if min_ndim is not None:
        k = int(min_ndim)
        sel = sel & Selector(lambda p, x: np.ndim(x) >= k if x is not None else True, f"ndim>={k}")
    return sel


def mask(tree: PyTree, spec: SelectorLike) -> PyTree:
    """Pytree of Python bools over the *weight leaves* of ``tree`` (arrays and atomic nodes such as
    QArray, see :func:`is_atomic`): True where the selector matches the leaf's path."""
    sel = selector(spec)
    return map_with_path(lambda p, x: bool(is_weight(x) and sel(p, x)), tree, is_leaf=is_atomic)


# ---------------------------------------------------------------------------- stacks of models

def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack N models with identical structure into one pytree whose leaves have a leading axis N.

    This is the input format of every merge (``vmap`` over models, per-model coefficients). All
    models are checked against the first (structure, shapes, dtypes) before anything is stacked.
    """
    if not isinstance(trees, (list, tuple)):
        raise UsageError(f"stack() takes a list of models, got {type(trees).__name__}")
    trees = list(trees)
    if not trees:
        raise UsageError("stack() needs at least one model, got an empty list")
    for i, t in enumerate(trees[1:], start=1):
        check_compatible(trees[0], t, names=("model[0]", f"model[{i}]"))
    return jax.tree.map(lambda *xs: jnp.stack(xs) if is_array(xs[0]) else xs[0], *trees)


def num_models(stacked: PyTree) -> int:
    """Size of the leading (model) axis of a stacked pytree; all array leaves must agree."""
    sizes = {p: np.shape(x)[0] for p, x in flatten_with_paths(stacked)[0] if is_array(x) and np.ndim(x)}
    if not sizes:
        raise ValueError("stacked pytree has no array leaves with a leading axis")
    n = next(iter(sizes.values()))
    for p, s in sizes.items():
        if s != n:
            raise ShapeMismatchError(p, (n, "..."), (s, "..."))
    return int(n)


def unstack(stacked: PyTree, n: int | None = None) -> list[PyTree]:
    """Inverse of :func:`stack`: a list of N pytrees."""
    n = num_models(stacked) if n is None else n
    return [jax.tree.map(lambda x, i=i: x[i] if is_array(x) else x, stacked) for i in range(n)]


# ------------------------------------------------------------------------------------ randomness

def _path_hash(path: str, salt: str = "") -> int:
    return zlib.crc32(f"{salt}\x00{path}".encode()) & 0x7FFFFFFF


def check_key(key: Any, what: str = "key") -> None:
    """:class:`UsageError` unless ``key`` is a JAX PRNG key: a typed key (``jax.random.key(n)``) or
    a raw ``uint32[2]`` one (``jax.random.PRNGKey(n)``), possibly traced. A plain int seed is the
    usual mistake, and is named as such."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        raise UsageError(f"{what}= must be a JAX PRNG key, got the int {key}; pass {what}=jax.random.key({key})")
    dt = getattr(key, "dtype", None)
    if dt is None:
        raise UsageError(f"{what}= must be a JAX PRNG key (jax.random.key(n)), got {type(key).__name__}")
    if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
        return
    if np.dtype(dt) != np.uint32 or tuple(np.shape(key))[-1:] != (2,):
        raise UsageError(f"{what}= must be a JAX PRNG key (jax.random.key(n)), got an array of "
                         f"{np.dtype(dt)}{list(np.shape(key))}")


def leaf_key(key: jax.Array, path: str, salt: str = "") -> jax.Array:
    """Key for one leaf: ``fold_in(key, crc32(salt, path))``.

    Depends only on the base key, the path and the salt: never on leaf order, which other leaves
    exist, or device count. Use distinct ``salt`` values for independent random steps.
    """
    check_key(key)
    return jax.random.fold_in(key, _path_hash(path, salt))


def leaf_keys(key: jax.Array, tree: PyTree, salt: str = "") -> PyTree:
    """A pytree of per-leaf keys (see :func:`leaf_key`) with ``tree``'s structure."""
    return map_with_path(lambda p, _: leaf_key(key, p, salt), tree)


# ----------------------------------------------------------------------------- structure checks

def is_array(x: Any) -> bool:
    """True for jax arrays (and tracers), numpy arrays and ``jax.ShapeDtypeStruct``."""
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, np.generic))


def is_atomic(x: Any) -> bool:
    """True for pytree nodes that stand for *one* weight and must be selected, hidden and replaced
    whole (a quantized array's codes, scales and zeros are one leaf to ``select``/``partition``).
    A class opts in with the class attribute ``__weightlab_atomic__ = True`` (the ground layer
    knows no pillar's types)."""
    return getattr(type(x), "__weightlab_atomic__", False) is True


def is_weight(x: Any) -> bool:
    """An array leaf or an atomic weight node (:func:`is_atomic`)."""
    return is_array(x) or is_atomic(x)


def _leaf_desc(x) -> str:
    if is_array(x):
        return f"array{tuple(np.shape(x))} {np.dtype(x.dtype)}"
    return type(x).__name__


def check_compatible(a: PyTree, b: PyTree, *more: PyTree, shapes: bool = True, dtypes: bool = True,
                     names: Sequence[str] | None = None) -> None:
    """Raise a typed error naming the first path where the trees differ; return None if they agree.

    Checks, in order: the set of paths (missing/extra leaf), container kinds, array-vs-other
    leaves, then (optionally) shapes and dtypes. ``expected`` always refers to the first tree.
    """
    trees = (a, b) + more
    names = list(names) if names else ["tree[0]"] + [f"tree[{i}]" for i in range(1, len(trees))]
    ref_pairs, ref_def = flatten_with_paths(a)
    ref_paths = [p for p, _ in ref_pairs]
    for t, name in zip(trees[1:], names[1:]):
        pairs, tdef = flatten_with_paths(t)
        got = [p for p, _ in pairs]
        if got != ref_paths:
            gs, rs = set(got), set(ref_paths)
            for p in ref_paths:
                if p not in gs:
                    raise StructureMismatchError(p, f"a leaf in {names[0]}", f"missing from {name}")
            for p in got:
                if p not in rs:
                    raise StructureMismatchError(p, f"no leaf (absent from {names[0]})", f"an extra leaf in {name}")
            raise StructureMismatchError("", f"leaf order of {names[0]}", f"another order in {name}")
        if tdef != ref_def:
            raise StructureMismatchError("", f"{names[0]} containers {ref_def}", f"{name} containers {tdef}")
        for (p, x), (_, y) in zip(ref_pairs, pairs):
            if is_array(x) != is_array(y):
                raise StructureMismatchError(p, _leaf_desc(x), f"{_leaf_desc(y)} in {name}")
            if not is_array(x):
                continue
            if shapes and tuple(np.shape(x)) != tuple(np.shape(y)):
                raise ShapeMismatchError(p, np.shape(x), np.shape(y))
            if dtypes and np.dtype(x.dtype) != np.dtype(y.dtype):
                raise DTypeMismatchError(p, np.dtype(x.dtype), np.dtype(y.dtype))


def _concrete_float(x) -> bool:
    return (is_array(x) and not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))
            and jnp.issubdtype(x.dtype, jnp.inexact))


@_lazy.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite(tree: PyTree = None, *, pairs: list | None = None, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """Paths of the float array leaves that hold NaN or Inf.

    One jitted reduction over all leaves and one host fetch of a bool per leaf, so it also runs on
    sharded arrays (the flags come back replicated). Abstract leaves (tracers under ``jit``,
    ``ShapeDtypeStruct``) cannot be checked and are skipped. Give either ``tree`` or ``pairs``, a
    list of ``(path, leaf)`` (never guessed from a tree's shape: a list of ``(W, b)`` layers is a tree)."""
    if pairs is None:
        pairs = flatten_with_paths(tree, is_leaf=is_leaf)[0]
    todo = [(p, x) for p, x in pairs if _concrete_float(x)]
    on_device = [(p, x) for p, x in todo if isinstance(x, jax.Array)]
    flags = dict(zip([p for p, _ in on_device], np.asarray(_finite_flags([x for _, x in on_device])))) \
        if on_device else {}
    bad = []
    for p, x in todo:  # host (numpy) arrays are checked where they are
        ok = flags[p] if p in flags else bool(np.isfinite(np.asarray(x)).all())
        if not ok:
            bad.append(p)
    return bad


# ------------------------------------------------------------------------------------ accounting

def true_nbytes(x) -> int:
    """Bytes a leaf really occupies: sub-byte dtypes (int4, uint2, float4...) count their bits.

    ``jax.Array.nbytes`` counts one byte per int4 element; this does not.
    """
    if not is_array(x):
        return 0
    return true_bytes(np.shape(x), x.dtype)


def tree_nbytes(tree: PyTree) -> int:
    """Sum of :func:`true_nbytes` over all leaves."""
    return sum(true_nbytes(x) for x in jax.tree.leaves(tree))


def param_count(tree: PyTree) -> int:
    """Number of scalar elements over all array leaves."""
    return sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree) if is_array(x))


def describe(tree: PyTree) -> list[tuple[str, tuple, str, int]]:
    """``[(path, shape, dtype, true_bytes)]`` for every array leaf."""
    return [(p, tuple(np.shape(x)), str(np.dtype(x.dtype)), true_nbytes(x))
            for p, x in flatten_with_paths(tree)[0] if is_array(x)]


def gather_index(index, n: int, axis: int, fail: Callable[[str], Any]):
    """``index`` as the int32 gather index of an axis of length ``n``, negative entries counted from
    the end (as ``jnp.take``). Shape (``(n,)``) and integer dtype are always checked, the range only
    when ``index`` is concrete (a traced one is clamped). ``fail(message)`` raises the caller's typed
    error (alignment's and quantization's permutations share these checks)."""
    if isinstance(index, (list, tuple, range)):
        index = np.asarray(index)
    shape = np.shape(index)
    if len(shape) != 1:
        fail(f"the index must be 1-D, found shape {tuple(shape)}")
    if shape[0] != n:
        fail(f"the index along axis {axis} must have length {n}, found length {shape[0]}")
    dtype = getattr(index, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.integer) or shape[0] == 0):
        fail(f"the index must hold integers, found dtype {dtype}")
    if not isinstance(index, jax.core.Tracer):
        host = np.asarray(index)
        if host.size and (host.min() < -n or host.max() >= n):
            fail(f"index values must lie in [-{n}, {n}) for axis {axis} of length {n}, found [{host.min()}, {host.max()}]")
    idx = jnp.asarray(index).astype(jnp.int32)
    return jnp.clip(jnp.where(idx < 0, idx + n, idx), 0, max(n - 1, 0))
