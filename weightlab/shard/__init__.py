"""Sharding for every pillar: path rules -> ``PartitionSpec`` -> ``NamedSharding`` on a device mesh.

* :mod:`.rules`: :func:`make_mesh`, :func:`partition_specs` (rules are ``(selector, spec)`` with the
  same selectors as ``select=``), :func:`named_shardings`, :func:`shard`, :func:`explain`.
* :mod:`.qarray`: how a quantized weight's codes, scales and zeros follow its weight's spec.
* :mod:`.defaults`: tensor-parallel rules for the bundled model families (LLaMA, BERT, weightlab's
  flax models) and data-parallel batches.
* :mod:`.hlo`: which collectives a compiled sharded program runs, and which run inside loops.
* :mod:`.state`: optimizer/transform state sharded like the parameter each accumulator belongs to
  (:func:`init`).
* :mod:`.permute`: :func:`~.permute.take` reorders an axis split over devices by a ring of
  neighbour exchanges instead of gathering the weight (alignment's ``permute(mesh=, rules=)``).
* :mod:`.env`: :func:`tier`/:func:`pick` size a notebook or script by where it runs (test suite,
  CPU, TPU/GPU).
* :mod:`.plan`: per-device memory of each pillar's job planned from shapes (docs/scale.md).
* :mod:`.run`: :func:`jit` runs any WeightTransform under ``jax.jit`` with in/out shardings from the
  rules, so results come back sharded as the rules say.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P  # noqa: F401

from .defaults import FAMILY_RULES, batch_sharding, default_rules, shard_batch  # noqa: F401
from .qarray import qarray_specs  # noqa: F401
from .rules import (axis_size, bytes_per_device, explain, make_mesh, named_shardings, normalize_spec,  # noqa: F401
                    partition_specs, shard, shardings)
from . import permute  # noqa: F401
from .env import Runtime, pick, runtime, tier  # noqa: F401
from .run import jit  # noqa: F401
from .state import init, state_shardings  # noqa: F401

__all__ = ["P", "make_mesh", "partition_specs", "named_shardings", "shard", "shardings", "explain", "axis_size",
           "bytes_per_device", "normalize_spec", "qarray_specs", "default_rules", "FAMILY_RULES", "batch_sharding",
           "shard_batch", "jit", "init", "state_shardings", "tier", "pick", "runtime", "Runtime"]
