"""Mesh helpers: path rules -> ``PartitionSpec`` -> ``NamedSharding`` for parameter pytrees.

Rules are ``[(regex, PartitionSpec), ...]``; the first regex found in a leaf's path decides its
spec (leaves matching none are replicated). Divisibility is checked per leaf before anything moves,
with an error naming the path, the dimension and the mesh axis.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import tree as wtree
from .errors import ShapeMismatchError

__all__ = ["make_mesh", "partition_specs", "shard", "shardings", "P"]


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = ("data", "model"),
              devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all). ``shape=None`` puts every device on the last axis."""
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = (1,) * (len(axis_names) - 1) + (len(devices),)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def partition_specs(params: Any, rules: Sequence[tuple[str, P]], mesh: Mesh | None = None) -> Any:
    """Pytree of ``PartitionSpec`` chosen by the first matching rule (replicated if none matches).

    With ``mesh`` every sharded dimension is checked to be divisible by its mesh axes' size.
    """
    compiled = [(re.compile(rx), spec) for rx, spec in rules]

    def one(path, x):
        if not wtree.is_array(x):
            return None
        spec = next((s for rx, s in compiled if rx.search(path)), P())
        if len(spec) > np.ndim(x):
            raise ShapeMismatchError(path, f"rank >= {len(spec)} for spec {spec}", np.shape(x))
        if mesh is not None:
            for dim, axes in enumerate(spec):
                if axes is None:
                    continue
                size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
                if np.shape(x)[dim] % size:
                    raise ShapeMismatchError(
                        path, f"dim {dim} divisible by mesh axes {axes} (size {size})", np.shape(x))
        return spec

    return wtree.map_with_path(one, params)


def shard(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """``device_put`` every array leaf with ``NamedSharding(mesh, spec)`` from :func:`partition_specs`."""
    specs = partition_specs(params, rules, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)) if wtree.is_array(x) else x,
                        params, specs, is_leaf=lambda v: v is None)


def shardings(tree: Any) -> Any:
    """Pytree of each array leaf's ``.sharding``."""
    return jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
