"""Checkpoint IO: safetensors (lazy, sharded HF layout, validated headers), orbax, atomic writes."""

from .atomic import atomic_dir, atomic_file, check_output, refuse_existing
from .safetensors import DTYPES, INDEX_NAME, Checkpoint, SafetensorsFile, load, open_checkpoint, read_metadata, save
from .shards import PlannedShardWriter, ShardWriter, save_sharded

__all__ = ["CheckpointManager", "atomic_dir", "atomic_file", "check_output", "refuse_existing", "abstract_like",
           "load_orbax", "save_orbax", "DTYPES", "INDEX_NAME", "Checkpoint", "SafetensorsFile", "load", "open_checkpoint",
           "read_metadata", "save", "save_sharded", "ShardWriter", "PlannedShardWriter"]


def __getattr__(name):
    """The orbax helpers and the step-checkpoint manager import JAX; they load on first use."""
    if name in ("abstract_like", "load_orbax", "save_orbax"):
        from . import orbax

        return getattr(orbax, name)
    if name == "CheckpointManager":
        from .manager import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'weightlab.io' has no attribute {name!r}")
