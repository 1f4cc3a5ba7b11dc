"""Reorder a sharded axis without gathering it: a ring of neighbour exchanges.

``jnp.take(w, idx, axis)`` on an axis that is split over mesh devices makes XLA bring the whole
weight to every device first (an all-gather, or on CPU a full-size all-reduce; see
tests/test_shard_permute.py), so each device briefly holds the full tensor: for the largest weights of a 70B model that is the memory the sharding was meant
to save. :func:`take` instead passes the blocks of that axis around the ring of devices that split
it (``D - 1`` ``collective-permute`` steps inside one loop); at each step every device copies the
rows it needs out of the block it is holding. Besides its input and output block, each device holds two
blocks of scratch (the visiting one and the next; measured with ``memory_analysis``), and the bytes moved per device are those of
an all-gather, ``(D - 1) / D`` of the weight. It is exact (a copy, no arithmetic), for any index,
and other sharded axes of the weight stay sharded.

This is what :func:`weightlab.align.permute` uses when given ``mesh=`` and ``rules=``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..errors import ShardingError
from .rules import _axes, axis_size, normalize_spec

__all__ = ["take"]


def take(x: jax.Array, idx: jax.Array, axis: int, mesh: Mesh, spec=None, *, path: str = "") -> jax.Array:
    """``jnp.take(x, idx, axis=axis)`` for ``x`` laid out on ``mesh`` by ``spec`` (a
    ``PartitionSpec``; ``None``: replicated), returned with the same layout. ``idx`` must be a
    permutation-sized index (``len(idx) == x.shape[axis]``, values in range; it is not checked
    under ``jit``). When ``spec`` does not split ``axis`` this is the plain local ``jnp.take``;
    when it does, the ring exchange above (no all-gather). Works inside and outside ``jit``."""
    spec = normalize_spec(spec if spec is not None else P(), x.ndim, path, mesh, tuple(x.shape))
    axis = axis % x.ndim
    if idx.shape != (x.shape[axis],):
        raise ShardingError(path, f"index of shape {tuple(idx.shape)} for axis {axis} of length "
                                  f"{x.shape[axis]}; expected ({x.shape[axis]},)", shape=tuple(x.shape))
    names = _axes(spec[axis])
    if not names:
        return jnp.take(x, idx, axis=axis)
    d = axis_size(mesh, spec[axis])
    b = x.shape[axis] // d
    name = names if len(names) > 1 else names[0]
    ring = [(i, (i + 1) % d) for i in range(d)]

    def local(xb, ix):
        me = jax.lax.axis_index(name)
        want = jax.lax.dynamic_slice_in_dim(ix.astype(jnp.int32), me * b, b)
        src, off = want // b, want % b
        shape = [1] * xb.ndim
        shape[axis] = b

        def pick(held, owner, out):  # rows of this device's output that live in `held`
            return jnp.where((src == owner).reshape(shape), jnp.take(held, off, axis=axis), out)

        def step(r, carry):
            held, out = carry
            held = jax.lax.ppermute(held, name, ring)  # now the block of device (me - r) mod d
            return held, pick(held, (me - r) % d, out)

        out = pick(xb, me, jnp.zeros_like(xb))
        return jax.lax.fori_loop(1, d, step, (xb, out))[1]

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)(x, idx)
