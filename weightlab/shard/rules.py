"""Path rules -> ``PartitionSpec`` -> ``NamedSharding`` for any params pytree.

A rule is ``(selector, spec)``: the selector is anything ``select=`` takes elsewhere in weightlab (a
regex searched in the leaf's path, a list of them, a predicate, a :class:`~weightlab.tree.Selector`)
and the spec a ``PartitionSpec`` (or a tuple of mesh-axis names / ``None`` per dimension). The
first rule whose selector matches a weight leaf decides its spec; leaves no rule matches are
replicated. Every spec is checked against the mesh before anything moves: unknown mesh axes, a mesh
axis used twice, a spec longer than the leaf's rank and a dimension its mesh axes do not divide are
:class:`~weightlab.errors.ShardingError` naming the leaf and the mesh axis.

QArray leaves (quantized weights) get one spec for the weight and :func:`~weightlab.shard.qarray.qarray_specs`
derives the specs of its codes, scales and zeros (the rule qwix, AQT and MaxText converge on).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import tree as wtree
from ..errors import ShardingError

__all__ = ["make_mesh", "normalize_spec", "partition_specs", "named_shardings", "shard", "shardings", "P",
           "axis_size", "explain"]


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = ("data", "model"),
              devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all, across processes). ``shape=None`` puts every device on
    the last axis (pure tensor parallelism); ``-1`` in ``shape`` takes what the others leave."""
    devices = list(devices if devices is not None else jax.devices())
    axis_names = tuple(axis_names)
    if shape is None:
        shape = (1,) * (len(axis_names) - 1) + (len(devices),)
    shape = [int(s) for s in shape]
    if shape.count(-1) == 1:
        rest = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // max(rest, 1)
    if len(shape) != len(axis_names):
        raise ShardingError("", f"mesh shape {tuple(shape)} has {len(shape)} axes but axis_names {axis_names} "
                                f"{len(axis_names)}")
    if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
        raise ShardingError("", f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), axis_names)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axis_size(mesh: Mesh, entry) -> int:
    """Number of shards a spec entry (``None``, ``"model"`` or ``("data", "model")``) makes."""
    return math.prod(mesh.shape[a] for a in _axes(entry))


def normalize_spec(spec, ndim: int, path: str = "", mesh: Mesh | None = None, shape=None) -> P:
    """``spec`` as a ``PartitionSpec`` of length ``ndim``, checked: rank, mesh axes known and used
    once, and (with ``shape``) every sharded dimension divisible by its mesh axes' size."""
    if spec is None:
        spec = P()
    if not isinstance(spec, (P, tuple, list)):
        raise ShardingError(path, f"a spec is a PartitionSpec or a tuple of mesh axes per dimension, got {spec!r}")
    entries = list(spec)
    if len(entries) > ndim:
        raise ShardingError(path, f"spec {P(*entries)} has {len(entries)} entries but the leaf has rank {ndim}",
                            shape=shape)
    entries += [None] * (ndim - len(entries))
    seen: list[str] = []
    for dim, e in enumerate(entries):
        for a in _axes(e):
            if not isinstance(a, str):
                raise ShardingError(path, f"spec entry {e!r} (dim {dim}) is not a mesh-axis name", shape=shape)
            if mesh is not None and a not in mesh.shape:
                raise ShardingError(path, f"unknown mesh axis '{a}' (dim {dim}); the mesh has axes "
                                          f"{tuple(mesh.axis_names)}", axis=a, shape=shape)
            if a in seen:
                raise ShardingError(path, f"mesh axis '{a}' is used twice in spec {P(*entries)}", axis=a, shape=shape)
            seen.append(a)
        if mesh is not None and shape is not None and e is not None:
            size = axis_size(mesh, e)
            if shape[dim] % size:
                raise ShardingError(path, f"dim {dim} (length {shape[dim]}) is not divisible by mesh axis "
                                          f"{e!r} (size {size}); shape {tuple(shape)}", axis=e, shape=tuple(shape))
    return P(*entries)


def _compile_rules(rules) -> list:
    if rules is None:
        return []
    if isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[1], (P, tuple)) and not isinstance(
            rules[0], tuple):
        rules = [rules]  # one rule given bare
    out = []
    for i, r in enumerate(rules):
        if not (isinstance(r, (tuple, list)) and len(r) == 2):
            raise ShardingError("", f"rule {i} must be (selector, spec), got {r!r}")
        out.append((wtree.selector(r[0]), r[1]))
    return out


def partition_specs(params: Any, rules=(), mesh: Mesh | None = None, *, indivisible: str = "error") -> Any:
    """Pytree of ``PartitionSpec`` (for a QArray leaf, a QArray of specs, one per child), chosen by
    the first matching rule (replicated if none matches). With ``mesh`` every spec is checked.
    ``indivisible="replicate"`` replicates the dimensions a mesh axis does not divide instead of
    raising (what :func:`~weightlab.shard.defaults.default_rules` uses; :func:`explain` lists them)."""
    from .qarray import qarray_specs
    from ..quant.qarray import is_qarray

    if indivisible not in ("error", "replicate"):
        raise ShardingError("", f"indivisible must be 'error' or 'replicate', got {indivisible!r}")
    compiled = _compile_rules(rules)

    def one(path, x):
        if not wtree.is_weight(x):
            return None
        spec = next((s for sel, s in compiled if sel(path, x)), P())
        shape = tuple(x.shape)
        if indivisible == "replicate" and mesh is not None:
            spec = _drop_indivisible(spec, shape, mesh, path)
        spec = normalize_spec(spec, len(shape), path, mesh, shape if mesh is not None else None)
        if is_qarray(x):
            return qarray_specs(x, spec, mesh, path, indivisible=indivisible)
        return spec

    return wtree.map_with_path(one, params, is_leaf=wtree.is_atomic)


def _drop_indivisible(spec, shape, mesh, path):
    """``indivisible="replicate"``: dimensions a mesh axis does not divide, and spec entries past the
    leaf's rank (a rule written for a higher-rank leaf), become replicated. Unknown mesh axes are
    still a ShardingError: a typo is not an indivisibility."""
    if spec is None or not isinstance(spec, (P, tuple, list)):
        return spec
    entries = list(spec)[: len(shape)]
    keep = []
    for dim, e in enumerate(entries):
        for a in _axes(e):
            if isinstance(a, str) and a not in mesh.shape:
                raise ShardingError(path, f"unknown mesh axis '{a}' (dim {dim}); the mesh has axes "
                                          f"{tuple(mesh.axis_names)}", axis=a, shape=tuple(shape))
        ok = e is None or not all(isinstance(a, str) for a in _axes(e)) or shape[dim] % axis_size(mesh, e) == 0
        keep.append(e if ok else None)
    return P(*keep)


def _is_spec(x) -> bool:
    return isinstance(x, P) or x is None


def named_shardings(params: Any, mesh: Mesh, rules=(), *, indivisible: str = "error") -> Any:
    """Pytree of ``NamedSharding`` (QArray leaves: a QArray of them) for ``jax.jit``'s
    ``in_shardings``/``out_shardings`` or ``jax.device_put``; ``None`` for non-array leaves."""
    specs = partition_specs(params, rules, mesh, indivisible=indivisible)
    return jax.tree.map(lambda s: None if s is None else NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard(params: Any, mesh: Mesh, rules=None, *, indivisible: str | None = None) -> Any:
    """``device_put`` every array leaf (and every QArray child) with the sharding its rule gives.
    ``rules=None``: :func:`~weightlab.shard.defaults.default_rules` for ``params`` (tensor-parallel
    on attention/MLP, replicated where an axis does not divide)."""
    if rules is None:
        from .defaults import default_rules

        rules = default_rules(params)
        indivisible = indivisible or "replicate"
    from .run import place

    return place(params, named_shardings(params, mesh, rules, indivisible=indivisible or "error"))


def shardings(tree: Any) -> Any:
    """Pytree of each array leaf's ``.sharding`` (``None`` for non-arrays)."""
    return jax.tree.map(lambda x: getattr(x, "sharding", None), tree)


def explain(params: Any, mesh: Mesh, rules=None) -> list[dict]:
    """One row per weight leaf: path, shape, the rule's spec, the spec used (dimensions a mesh axis
    does not divide replicated), and bytes per device. For reviewing a plan before running it."""
    from .defaults import default_rules

    rules = default_rules(params) if rules is None else rules
    compiled = _compile_rules(rules)
    used = partition_specs(params, rules, mesh, indivisible="replicate")
    rows = []

    def one(path, x, s):
        if not wtree.is_weight(x):
            return None
        wanted = list(next((sp for sel, sp in compiled if sel(path, x)), P()))
        wanted += [None] * (len(x.shape) - len(wanted))
        spec = list(s.codes if hasattr(s, "codes") else s)
        rows.append({"path": path, "shape": tuple(x.shape), "rule": str(P(*wanted)), "spec": str(P(*spec)),
                     "replicated_by_indivisibility": any(w is not None and u is None for w, u in zip(wanted, spec)),
                     "bytes_per_device": bytes_per_device(x, s, mesh)})
        return None

    wtree.map_with_path(one, params, used, is_leaf=wtree.is_atomic)
    big = [r["path"] for r in rows if r["replicated_by_indivisibility"]]
    if big:
        warnings.warn(f"{len(big)} leaves are replicated where their rule shards them (a mesh axis does not divide "
                      f"the dimension), e.g. '{big[0]}'", stacklevel=2)
    return rows


def bytes_per_device(x, spec, mesh: Mesh) -> int:
    """Bytes one device holds of leaf ``x`` (an array, ShapeDtypeStruct or QArray) sharded by ``spec``."""
    from ..dtypes import true_bytes

    from ..quant.qarray import is_qarray

    if is_qarray(x) and (spec is None or isinstance(spec, P)):
        from .qarray import qarray_specs

        spec = qarray_specs(x, spec if spec is not None else P(), mesh, indivisible="replicate")
    pairs: list = []
    # Walk the leaf and its specs together: a QArray's absent children (None) are absent in both.
    jax.tree.map(lambda a, s: pairs.append((a, s)), x, spec, is_leaf=lambda v: v is None or isinstance(v, P))
    total = 0
    for a, s in pairs:
        if a is None:
            continue
        shape = list(np.shape(a))
        for dim, e in enumerate(list(s or ())):
            if e is not None and dim < len(shape):
                shape[dim] = -(-shape[dim] // axis_size(mesh, e))
        total += true_bytes(tuple(shape), a.dtype)
    return int(total)
