"""How a quantized weight (:class:`~weightlab.quant.QArray`) is sharded, given its weight's spec.

The rule qwix, AQT and MaxText converge on, for a weight of spec ``S`` quantized in groups along
axis ``a`` (the contracting axis):

* ``codes`` keep ``S``. Codes are packed along ``a`` (``8 / bits`` per byte, or 32 per ``bits``
  uint32 words), so a sharded ``a`` needs every shard to hold whole packing blocks.
* ``scale`` and ``zero`` (grouped layout ``shape[:a] + (n_groups, 1) + shape[a+1:]``) keep ``S`` on
  every other axis; the group axis is sharded like ``a`` only where group boundaries coincide
  with shard boundaries (``n_groups`` divisible by the shards). Size-1 axes (per-channel or
  per-tensor scales, the group's own unit axis) are never sharded. Act-order QArrays (``g_idx``)
  keep their scales whole along the groups: any shard of ``a`` may need any group.
* ``lut`` (any4's per-row tables) follows the non-grouped axes; ``pre`` and ``g_idx`` (vectors or
  matrices over ``a``) and the low-rank factor ``lr_a`` (``(K, r)``) are sharded like ``a``;
  ``lr_b`` (``(r, N)``) like the output axis; ``tensor_scale`` is replicated.

Groups or packing blocks that straddle a shard boundary are a :class:`~weightlab.errors.ShardingError`
naming the leaf, the mesh axis and the sizes (``indivisible="replicate"`` replicates that axis of
the scales instead, on purpose: they are small and every shard of the codes finds its groups); nothing is replicated silently. MaxText cannot shard 2-D quantized weights;
this can, on any axis.
"""

from __future__ import annotations

from jax.sharding import Mesh, PartitionSpec as P

from ..errors import ShardingError
from ..quant.packing import codes_per_block
from ..quant.qarray import QArray
from .rules import axis_size, normalize_spec

__all__ = ["qarray_specs"]


def _fail(path, msg, entry, shape, indivisible):
    if indivisible == "replicate":
        return None
    raise ShardingError(path, msg, axis=entry, shape=shape)


def _checked(child, entries, path, name, mesh, indivisible, extra):
    if child is None:
        return None
    shape = tuple(child.shape)[extra:]
    entries = list(entries) + [None] * (len(shape) - len(entries))
    entries = [None if (e is not None and shape[d] == 1) else e for d, e in enumerate(entries[: len(shape)])]
    if mesh is not None:
        for d, e in enumerate(entries):
            if e is not None and shape[d] % axis_size(mesh, e):
                entries[d] = _fail(f"{path}/{name}", f"dim {d} (length {shape[d]}) of the {name} is not divisible "
                                   f"by mesh axis {e!r} (size {axis_size(mesh, e)})", e, shape, indivisible)
    return normalize_spec(P(*([None] * extra + entries)), extra + len(shape), f"{path}/{name}", mesh)


def qarray_specs(q: QArray, spec: P, mesh: Mesh | None = None, path: str = "", *,
                 indivisible: str = "error") -> QArray:
    """A QArray whose children are the ``PartitionSpec`` of ``q``'s children when the weight it
    stands for has ``spec`` (see the module docstring). ``None`` children stay ``None``."""
    nd = q.ndim
    s = list(normalize_spec(spec, nd, path, mesh))
    a = q.axis % nd
    extra = q.codes.ndim - nd  # leading stack axes (a stack of quantized models) are never sharded
    k = q.shape[a]
    ea = s[a]
    m = axis_size(mesh, ea) if (mesh is not None and ea is not None) else 1
    codes_s = list(s)
    if ea is not None and mesh is not None:
        per = codes_per_block(q.fmt.bits)
        if k % m or (k // m) % per:
            codes_s[a] = _fail(path, f"{q.fmt.bits}-bit codes are packed {per} per block along axis {a}; {k} rows over "
                               f"mesh axis {ea!r} (size {m}) leave {k / m:g} per shard, which straddles a block",
                               ea, q.shape, indivisible)
    ea = codes_s[a]

    def grouped(child, name):
        if child is None:
            return None
        cshape = tuple(child.shape)[extra:]
        if len(cshape) != nd + 1:  # per-tensor (all size 1) or another layout: follow equal-length axes
            return _checked(child, [s[d] if d < nd and cshape[d] == q.shape[d] and d != a else None
                                    for d in range(len(cshape))], path, name, mesh, indivisible, extra)
        g_entry = None
        n_groups = cshape[a]
        if ea is not None and n_groups > 1 and q.g_idx is None:
            if n_groups % m:
                g_entry = _fail(path, f"{n_groups} groups of {q.group_size} along axis {a} do not align with the "
                                f"{m} shards of mesh axis {ea!r} ({k // m} rows per shard); re-group "
                                f"(a group size dividing {k // m}) or shard another axis", ea, q.shape, indivisible)
            else:
                g_entry = ea
        return _checked(child, s[:a] + [g_entry, None] + s[a + 1:], path, name, mesh, indivisible, extra)

    lut = None if q.lut is None else _checked(q.lut, [e if d != a else None for d, e in enumerate(codes_s)],
                                              path, "lut", mesh, indivisible, extra)
    along_a = lambda child, name: None if child is None else _checked(  # noqa: E731
        child, [ea] + [None] * (child.ndim - extra - 1), path, name, mesh, indivisible, extra)
    lr_b = None
    if q.lr_b is not None:
        lr_b = _checked(q.lr_b, [None] + [e for d, e in enumerate(s) if d != a], path, "lr_b", mesh, indivisible,
                        extra)
    children = [_checked(q.codes, codes_s, path, "codes", mesh, indivisible, extra), grouped(q.scale, "scale"),
                grouped(q.zero, "zero"), lut,
                None if q.tensor_scale is None else P(*([None] * q.tensor_scale.ndim)),
                along_a(q.pre, "pre"), along_a(q.lr_a, "lr_a"), lr_b, along_a(q.g_idx, "g_idx")]
    _, aux = q.tree_flatten_with_keys()
    return QArray.tree_unflatten(aux, children)
