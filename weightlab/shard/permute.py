"""Reorder a sharded axis without gathering it: a ring of neighbour exchanges.

``jnp.take(w, idx, axis)`` on an axis that is split over mesh devices makes XLA bring the whole
weight to every device first (an all-gather, or on CPU a full-size all-reduce; see
tests/test_shard_permute.py), so each device briefly holds the full tensor: for the largest weights of a 70B model that is the memory the sharding was meant
to save. :func:`take` instead passes the blocks of that axis around the ring of devices that split
it (``D - 1`` ``collective-permute`` steps inside one loop); at each step every device copies the
rows it needs out of the block it is holding. Besides its input and output block, each device holds two
blocks of scratch (the visiting one and the next; measured with ``memory_analysis``), and the bytes moved per device are those of
an all-gather, ``(D - 1) / D`` of the weight. It is exact (a copy, no arithmetic) for any in-range
index (repeats included; negative entries count from the end), and other sharded axes of the
weight stay sharded. A spec entry may name several mesh axes in any order (``("model", "data")``
on a ``("data", "model")`` mesh): each block carries its owner's number round the ring.

This is what :func:`weightlab.align.permute` uses when given ``mesh=`` (or run by ``shard.jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import tree as wtree
from ..errors import ShardingError
from .rules import _axes, axis_size, normalize_spec

__all__ = ["take"]


def take(x: jax.Array, idx: jax.Array, axis: int, mesh: Mesh, spec=None, *, path: str = "") -> jax.Array:
    """``jnp.take(x, idx, axis=axis)`` for ``x`` laid out on ``mesh`` by ``spec`` (a
    ``PartitionSpec``; ``None``: replicated), returned with that layout. ``idx``: integers of length
    ``x.shape[axis]``, negative ones counted from the end; a concrete index out of range is a
    :class:`ShardingError` (a traced one is clamped). When ``spec`` does not split ``axis`` this is
    the plain local ``jnp.take``; when it does, the ring exchange above (no all-gather). Works inside
    and outside ``jit``."""
    x = jnp.asarray(x)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ShardingError(path, f"axis {axis!r} out of range for an array of rank {x.ndim}", shape=tuple(x.shape))
    spec = normalize_spec(spec if spec is not None else P(), x.ndim, path, mesh, tuple(x.shape))
    axis = int(axis) % x.ndim
    n = x.shape[axis]
    def fail(msg):
        raise ShardingError(path, msg, shape=tuple(x.shape))

    idx = wtree.gather_index(idx, n, axis, fail)
    names = _axes(spec[axis])
    if not names:
        y, sh = jnp.take(x, idx, axis=axis), NamedSharding(mesh, spec)
        return jax.lax.with_sharding_constraint(y, sh) if isinstance(y, jax.core.Tracer) else jax.device_put(y, sh)
    d = axis_size(mesh, spec[axis])
    b = n // d
    name = names if len(names) > 1 else names[0]
    ring = [(i, (i + 1) % d) for i in range(d)]

    def local(xb, ix):
        # Block numbers follow axis_index (the spec's order of mesh axes); ppermute's ring follows the
        # mesh's device order, which differs for a tuple not in mesh order, so each block travels
        # with its owner's number instead of the owner being inferred from the step.
        me = jax.lax.axis_index(name)
        want = jax.lax.dynamic_slice_in_dim(ix, me * b, b)
        src, off = want // b, want % b
        shape = [1] * xb.ndim
        shape[axis] = b

        def pick(held, owner, out):  # rows of this device's output that live in `held`
            return jnp.where((src == owner).reshape(shape), jnp.take(held, off, axis=axis), out)

        def step(_, carry):
            held, owner, out = carry
            held, owner = jax.lax.ppermute((held, owner), name, ring)
            return held, owner, pick(held, owner, out)

        return jax.lax.fori_loop(1, d, step, (xb, me, pick(xb, me, jnp.zeros_like(xb))))[2]

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)(x, idx)
