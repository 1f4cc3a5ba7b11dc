"""Permutation specs: which axes of which weights a hidden-unit permutation moves, and how.

A network computes the same function after its hidden units are reordered, as long as every
weight that produces or consumes those units is reordered the same way (Hecht-Nielsen 1990; the
basis of Git Re-Basin, Ainsworth et al. 2023). A :class:`Spec` records this: for every parameter
leaf, one entry per axis, each a tuple of *factors* read major to minor. A factor is a group name
(the axis, or that factor of it, is permuted by the group's permutation) or an int (a block of
that size that stays put). ``()`` (or ``None`` when written by hand) is an axis nothing permutes.

Examples (an MLP layer ``kernel (in, out)``; attention with 4 heads of 16 dims)::

    "dense_0/kernel": ((), ("h0",))              # outputs permuted by h0
    "dense_1/kernel": (("h0",), ("h1",))         # inputs by h0, outputs by h1
    "attn/query/kernel": (("res",), ("heads", 16))          # heads move as units (RoPE: dims fixed)
    "attn/value/kernel": (("res",), ("heads", "v_dims"))    # dims within each head permute too

A :class:`Group` may be *nested* under a parent group on the same axis (``v_dims`` under
``heads``): it then has one permutation per parent position, so each head's dimensions are
reordered independently — the symmetry of multi-head attention, where Q/K (and V/O) dims only
need to agree within a head. Under GQA, the query-head factor nests under the key/value-head group.

Permutations are ``{group: int array}``: ``(size,)`` for a top-level group, ``(parent_size, size)``
for a nested one, indexed by the parent's *new* position. Gather semantics, as in Git Re-Basin:
the permuted axis holds, at new position ``i``, the old entry ``perm[i]``; for a factored axis
``(a, b)`` with ``b`` nested under ``a``, new ``(i, j)`` holds old ``(pa[i], pb[i, j])``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .. import tree as wtree
from ..errors import AlignError, SpecError

__all__ = ["Group", "Spec", "make_spec", "permute", "random_perms", "identity_perms", "invert", "compose",
           "axis_index", "check_perms"]

Factor = Any  # str (group name) or int (fixed block)


@dataclasses.dataclass(frozen=True)
class Group:
    """A permutation group: ``size`` units; ``parent``: nested under that group (one permutation
    per parent position); ``kind``: a description for reports (``hidden``, ``heads``, ``head dims``)."""

    name: str
    size: int
    parent: str | None = None
    kind: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Per-leaf axis factors (``axes``: path -> tuple per axis) and the groups they name."""

    axes: Mapping[str, tuple]
    groups: Mapping[str, Group]
    report: tuple = ()  # infer_spec's notes: (primitive, message, paths left fixed by it)

    def leaves(self, group: str) -> list[tuple[str, int]]:
        """(path, axis) of every leaf axis the group touches."""
        return [(p, a) for p, ax in self.axes.items() for a, fs in enumerate(ax) if group in fs]

    def pin(self, *groups: str) -> "Spec":
        """This spec with ``groups`` (and groups nested under them) fixed to the identity: e.g. the
        residual stream of a transformer, to align only the inner (MLP/attention) units."""
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise SpecError(f"pin: unknown group(s) {unknown}; groups: {sorted(self.groups)}")
        gone = set(groups)
        gone |= {g.name for g in self.groups.values() if g.parent in gone}
        axes = {p: tuple(tuple(self.groups[f].size if f in gone else f for f in fs) for fs in ax)
                for p, ax in self.axes.items()}
        axes = {p: tuple(_merge_ints(fs) for fs in ax) for p, ax in axes.items()}
        axes = {p: tuple(fs if any(isinstance(f, str) for f in fs) else () for fs in ax) for p, ax in axes.items()}
        return Spec(axes,
                    {n: g for n, g in self.groups.items() if n not in gone}, self.report)

    def summary(self) -> str:
        """One line per group: name, size, nesting, and the leaves it moves."""
        lines = []
        for g in self.groups.values():
            where = ", ".join(f"{p}[{a}]" for p, a in self.leaves(g.name))
            nest = f" per {g.parent}" if g.parent else ""
            lines.append(f"{g.name}: {g.size}{nest}{' (' + g.kind + ')' if g.kind else ''} -> {where}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Spec({len(self.groups)} groups over {sum(bool(self.leaves_of(p)) for p in self.axes)} leaves)"

    def leaves_of(self, path: str) -> list[str]:
        """The groups that move leaf ``path``."""
        return [f for fs in self.axes.get(path, ()) for f in fs if isinstance(f, str)]

    def group_of(self, path: str, axis: int, factor: int = 0) -> str | None:
        """The group labelling factor ``factor`` (counting groups only) of ``path``'s ``axis``."""
        if path not in self.axes:
            raise SpecError(f"no leaf '{path}' in the spec")
        names = [f for f in self.axes[path][axis] if isinstance(f, str)]
        return names[factor] if factor < len(names) else None


def _merge_ints(fs: tuple) -> tuple:
    out: list = []
    for f in fs:
        if isinstance(f, (int, np.integer)) and out and isinstance(out[-1], int):
            out[-1] *= int(f)
        elif isinstance(f, (int, np.integer)):
            out.append(int(f))
        else:
            out.append(f)
    return tuple(f for f in out if f != 1)


def _norm_axis(entry, path: str, axis: int) -> tuple:
    if entry is None:
        return ()
    if isinstance(entry, (str, int, np.integer)) and not isinstance(entry, bool):
        entry = (entry,)
    if not isinstance(entry, (tuple, list)) or not all(
            isinstance(f, str) or (isinstance(f, (int, np.integer)) and not isinstance(f, bool) and f >= 1)
            for f in entry):
        raise SpecError(f"'{path}' axis {axis}: an axis is None, a group name, or a tuple of group names and "
                        f"positive ints (fixed blocks), got {entry!r}")
    return tuple(f if isinstance(f, str) else int(f) for f in entry)


def _flat_axes(axes: Any) -> dict[str, Any]:
    if isinstance(axes, Mapping) and all(isinstance(k, str) and "/" in k for k in axes) and axes:
        return dict(axes)
    is_leaf = lambda x: x is None or isinstance(x, (tuple, list))  # noqa: E731
    return {p: v for p, v in wtree.flatten_with_paths(axes, is_leaf=is_leaf)[0]}


def make_spec(axes: Any, params: Any, groups: Mapping[str, Any] | None = None, *, partial: bool = False) -> Spec:
    """Build and validate a :class:`Spec` for ``params`` from hand-written ``axes``.

    ``axes``: a flat ``{path: per-axis entries}`` dict, or a pytree mirroring ``params`` whose
    leaves are tuples with one entry per axis (None, a group name, or a tuple of names and ints).
    ``groups``: sizes (``{"heads": 4}``) or :class:`Group` objects for groups whose size cannot be
    read off an axis (two groups on one axis); ``{name: Group(name, size, parent=...)}`` declares
    nesting. Every leaf must be listed (``None`` for a leaf no permutation touches) unless
    ``partial=True``. Raises :class:`SpecError` naming the leaf and axis: unknown or missing leaves,
    a wrong number of axes, factor sizes that do not multiply to the axis, one group with two sizes,
    a nested group whose parent is not a more-major factor of the same axis.
    """
    shapes = {p: tuple(np.shape(x)) if not wtree.is_atomic(x) else tuple(x.shape)
              for p, x in wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0]}
    flat = _flat_axes(axes)
    unknown = sorted(set(flat) - set(shapes))
    if unknown:
        raise SpecError(f"spec names leaves the params do not have: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}")
    missing = [p for p in shapes if p not in flat]
    if missing and not partial:
        raise SpecError(f"spec has no entry for '{missing[0]}' ({len(missing)} leaves missing); list it with None "
                        "if no permutation touches it, or pass partial=True")
    norm: dict[str, tuple] = {}
    for p, shape in shapes.items():
        entry = flat.get(p)
        if entry is None:
            norm[p] = tuple(() for _ in shape)
            continue
        if not isinstance(entry, (tuple, list)) or len(entry) != len(shape):
            raise SpecError(f"'{p}': {len(shape)} axes {shape}, the spec gives {entry!r}")
        norm[p] = tuple(_norm_axis(e, p, a) for a, e in enumerate(entry))
    gs: dict[str, Group] = {}
    for name, g in (groups or {}).items():
        if isinstance(g, Group) and g.name != name:
            raise SpecError(f"groups: key '{name}' holds Group named '{g.name}'; they must agree")
        gs[name] = g if isinstance(g, Group) else Group(name, int(g))
    # sizes from axes with one unknown group
    for _ in range(3):
        for p, ax in norm.items():
            for a, fs in enumerate(ax):
                known = int(np.prod([f if isinstance(f, int) else gs[f].size for f in fs if isinstance(f, int) or f in gs]))
                todo = [f for f in fs if isinstance(f, str) and f not in gs]
                if len(set(todo)) == 1 and len(todo) == 1 and shapes[p][a] % known == 0:
                    gs[todo[0]] = Group(todo[0], shapes[p][a] // known)
    spec = Spec(norm, gs)
    validate(spec, shapes)
    return spec


def validate(spec: Spec, shapes: Mapping[str, tuple]) -> None:
    """Check ``spec`` against leaf shapes (see :func:`make_spec`)."""
    for p, ax in spec.axes.items():
        if p not in shapes:
            raise SpecError(f"spec names '{p}', which the params do not have")
        if len(ax) != len(shapes[p]):
            raise SpecError(f"'{p}': {len(shapes[p])} axes {shapes[p]}, the spec gives {len(ax)}")
        for a, fs in enumerate(ax):
            names = [f for f in fs if isinstance(f, str)]
            for f in names:
                if f not in spec.groups:
                    raise SpecError(f"'{p}' axis {a}: the size of group '{f}' cannot be read off the axes; give it "
                                    "in groups=")
            if len(set(names)) != len(names):
                raise SpecError(f"'{p}' axis {a}: group(s) appear twice on one axis: {fs}")
            size = int(np.prod([f if isinstance(f, int) else spec.groups[f].size for f in fs]))
            if fs and size != shapes[p][a]:
                raise SpecError(f"'{p}' axis {a}: the factors {fs} multiply to {size}, the axis has {shapes[p][a]}")
            for i, f in enumerate(names):
                par = spec.groups[f].parent
                if par is not None and par not in fs[:fs.index(f)]:
                    raise SpecError(f"'{p}' axis {a}: group '{f}' is nested under '{par}', which must be a more-major "
                                    f"factor of the same axis (factors {fs})")
    for g in spec.groups.values():
        if g.parent is not None and (g.parent not in spec.groups or spec.groups[g.parent].parent is not None):
            raise SpecError(f"group '{g.name}': parent '{g.parent}' must be a top-level group of the spec")


# --- permutations ------------------------------------------------------------------------------

def _shape_of(spec: Spec, name: str) -> tuple[int, ...]:
    g = spec.groups[name]
    return (spec.groups[g.parent].size, g.size) if g.parent else (g.size,)


def check_is_spec(spec) -> None:
    """A typed error for a non-spec first argument (arguments in the wrong order, a raw dict)."""
    if not isinstance(spec, Spec):
        raise AlignError(f"expected a Spec (from align.infer_spec or align.make_spec) as the spec argument, got "
                         f"{type(spec).__name__}; the order is (spec, params_a, params_b) / "
                         "check_spec(spec, apply_fn, params, batch)")


def check_perms(spec: Spec, perms: Mapping[str, Any], *, complete: bool = False) -> None:
    """Names and shapes of ``perms`` against ``spec`` (:class:`AlignError`); ``complete``: every group
    must have one. Values are checked to be permutations when concrete."""
    if not isinstance(perms, Mapping):
        raise AlignError(f"permutations are a dict {{group: int array}}, got {type(perms).__name__}")
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise AlignError(f"permutations for unknown group(s) {unknown}; the spec's groups: {sorted(spec.groups)}")
    if complete:
        missing = sorted(set(spec.groups) - set(perms))
        if missing:
            raise AlignError(f"no permutation for group(s) {missing}")
    for n, p in perms.items():
        want = _shape_of(spec, n)
        if tuple(np.shape(p)) != want:
            raise AlignError(f"permutation of group '{n}' must have shape {want}, got {tuple(np.shape(p))}")
        if not isinstance(p, jax.core.Tracer):
            a = np.asarray(p)
            if not np.issubdtype(a.dtype, np.integer) or not (np.sort(a, axis=-1) == np.arange(want[-1])).all():
                raise AlignError(f"group '{n}': not a permutation of 0..{want[-1] - 1} (in every row)")


def identity_perms(spec: Spec) -> dict[str, jax.Array]:
    """The identity permutation of every group."""
    return {n: jnp.broadcast_to(jnp.arange(g.size, dtype=jnp.int32), _shape_of(spec, n)) for n, g in spec.groups.items()}


def random_perms(spec: Spec, key: jax.Array) -> dict[str, jax.Array]:
    """A uniformly random permutation of every group (per parent position for nested groups), each
    from ``key`` folded with the group's name, so adding a group changes no other group's draw."""
    wtree.check_key(key)
    out = {}
    for n, g in spec.groups.items():
        k = wtree.leaf_key(key, n, salt="align.random_perms")
        shape = _shape_of(spec, n)
        keys = jax.random.split(k, shape[0]) if g.parent else k[None]
        ps = jax.vmap(lambda kk: jax.random.permutation(kk, g.size))(keys).astype(jnp.int32)
        out[n] = ps if g.parent else ps[0]
    return out


def invert(spec: Spec, perms: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``q`` with ``permute(spec, q, permute(spec, perms, x)) == x``."""
    out = {}
    for n, p in perms.items():
        g = spec.groups[n]
        if g.parent is None:
            out[n] = jnp.argsort(p).astype(jnp.int32)
    for n, p in perms.items():
        g = spec.groups[n]
        if g.parent is not None:
            # new (i, j) holds old (pa[i], pb[i, j]); the inverse maps old (k, l) back: i = inv_a[k]
            inner = jnp.argsort(p, axis=-1).astype(jnp.int32)
            pa = perms.get(g.parent, jnp.arange(spec.groups[g.parent].size))
            out[n] = inner[jnp.argsort(pa)]
    return out


def compose(spec: Spec, first: Mapping[str, Any], then: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``r`` with ``permute(spec, r, x) == permute(spec, then, permute(spec, first, x))``."""
    out = {}
    ids = identity_perms(spec)
    for n, g in spec.groups.items():
        f, t = first.get(n, ids[n]), then.get(n, ids[n])
        if g.parent is None:
            out[n] = f[t]
        else:
            ft, tt = first.get(g.parent, ids[g.parent]), then.get(g.parent, ids[g.parent])
            # after `first`: y[i, j] = x[fa[i], fb[i, j]]; after `then`: z[i, j] = y[ta[i], tb[i, j]]
            #   = x[fa[ta[i]], fb[ta[i], tb[i, j]]]
            out[n] = jnp.take_along_axis(f[tt], t, axis=-1)
            del ft
    return out


def axis_index(spec: Spec, factors: tuple, perms: Mapping[str, Any], size: int):
    """The gather index (length ``size``) that ``perms`` induce on an axis with ``factors``, or
    None when no factor is permuted."""
    if not any(isinstance(f, str) and f in perms for f in factors):
        return None
    sizes = [f if isinstance(f, int) else spec.groups[f].size for f in factors]
    grids = jnp.meshgrid(*[jnp.arange(s, dtype=jnp.int32) for s in sizes], indexing="ij")
    old = []
    for i, f in enumerate(factors):
        if isinstance(f, int) or f not in perms:
            old.append(grids[i])
            continue
        g = spec.groups[f]
        if g.parent is None:
            old.append(perms[f][grids[i]])
        else:
            old.append(perms[f][grids[factors.index(g.parent)], grids[i]])
    flat = old[0]
    for i in range(1, len(old)):
        flat = flat * sizes[i] + old[i]
    return flat.reshape(size)


def _take(x, axis: int, idx, path: str, mesh=None, spec=None):
    """Gather ``x`` (an array or a QArray) along ``axis``; with ``mesh`` and the leaf's ``spec`` (a
    ``PartitionSpec``, or for a QArray a QArray of its children's specs) by the ring exchange wherever
    the gathered axis is split over devices."""
    if mesh is None or spec is None or (wtree.is_atomic(x) and np.ndim(x.codes) > x.ndim):
        ring = None  # a stack of QArrays (leading model axis) takes permute_qarray's vmapped gather
    else:
        from ..shard.permute import take as ring_take

        def ring(v, ax, i, name=None):
            s = spec if name is None else getattr(spec, name)
            return ring_take(jnp.asarray(v), i, ax, mesh, s, path=path if name is None else f"{path}/{name}")
    if wtree.is_atomic(x):
        from ..quant.permute import permute_qarray

        return permute_qarray(x, axis, idx, take=ring)
    return jnp.take(x, idx, axis=axis) if ring is None else ring(x, axis, idx)


def permute(spec: Spec, perms: Mapping[str, Any], params: Any, *, mesh=None, rules=None) -> Any:
    """``params`` with every axis the spec labels reordered by ``perms`` (groups absent from
    ``perms`` stay put). QArray leaves are permuted in their packed form (codes, scales, zeros,
    tables; a grouped input axis becomes an act-order layout) without dequantizing. Works under
    ``jit``. Errors (:class:`SpecError`, :class:`AlignError`) name the leaf before any work.

    With ``mesh`` and ``rules`` (the sharding rules the params are laid out by, as for
    :func:`weightlab.shard.jit`; ``rules=None`` means its default rules; both are taken from the
    ``shard.jit`` being traced when neither is given), an array whose permuted axis the rules split over devices is
    reordered by :func:`weightlab.shard.permute.take`, a ring of neighbour exchanges, instead of
    XLA's gather of the whole weight on every device; for QArray leaves the same holds for each
    child (codes, scales, zeros, tables, ``pre``, ``lr_a``) that the weight's spec splits along the
    permuted axis, except a low-rank ``lr_b`` and stacks of QArrays, which take XLA's gather."""
    check_is_spec(spec)
    check_perms(spec, perms)
    pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
    shapes = {p: tuple(x.shape) if wtree.is_atomic(x) else tuple(np.shape(x)) for p, x in pairs}
    validate_leaves(spec, shapes)
    specs = {}
    ind = "replicate" if rules is None else "error"  # as shard.jit: defaults skip what does not divide
    if mesh is None and rules is None:
        from ..shard.run import current

        # Traced under shard.jit: its mesh and rules, for the tree given here, which need not be the
        # one shard.jit placed; a leaf the rules do not fit is then gathered as without a mesh.
        mesh, rules = current() or (None, None)
        ind = "replicate"
    if mesh is not None:
        from ..shard import default_rules, partition_specs

        rules = default_rules(params) if rules is None else rules
        specs = dict(wtree.flatten_with_paths(partition_specs(params, rules, mesh, indivisible=ind),
                                              is_leaf=lambda v: v is None or isinstance(v, P) or wtree.is_atomic(v))[0])
    out = []
    for p, x in pairs:
        for a, fs in enumerate(spec.axes.get(p, ())):
            idx = axis_index(spec, fs, perms, shapes[p][a])
            if idx is None:
                continue
            x = _take(x, a, idx, p, mesh, specs.get(p))
        out.append(x)
    return treedef.unflatten(out)


def validate_leaves(spec: Spec, shapes: Mapping[str, tuple]) -> None:
    """The params' leaves are the spec's (same paths, axis sizes)."""
    check_is_spec(spec)
    extra = [p for p in shapes if p not in spec.axes]
    missing = [p for p in spec.axes if p not in shapes]
    if extra or missing:
        p = (missing or extra)[0]
        raise SpecError(f"the params do not match the spec at '{p}' ("
                        + ("a leaf of the spec missing from the params" if missing else "a leaf the spec does not list")
                        + f"; {len(missing)} missing, {len(extra)} extra)")
    validate(spec, shapes)
