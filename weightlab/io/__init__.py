"""Checkpoint IO: safetensors (lazy, sharded HF layout, validated headers), orbax, atomic writes."""

from .atomic import atomic_dir, atomic_file, refuse_existing
from .orbax import abstract_like, load_orbax, save_orbax
from .safetensors import DTYPES, INDEX_NAME, Checkpoint, SafetensorsFile, load, open_checkpoint, read_metadata, save
from .shards import PlannedShardWriter, ShardWriter, save_sharded

__all__ = ["atomic_dir", "atomic_file", "refuse_existing", "abstract_like", "load_orbax", "save_orbax", "DTYPES",
           "INDEX_NAME", "Checkpoint", "SafetensorsFile", "load", "open_checkpoint", "read_metadata", "save",
           "save_sharded", "ShardWriter", "PlannedShardWriter"]
