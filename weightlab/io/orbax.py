"""Orbax save/restore of parameter pytrees, sharded arrays included.

Thin layer over ``orbax.checkpoint.StandardCheckpointer`` that adds weightlab's rules: never
overwrite silently, typed errors for missing checkpoints, and restore into a target whose leaves may
be ``jax.ShapeDtypeStruct`` with a ``NamedSharding`` (each host reads only its shards).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from ..errors import CheckpointNotFoundError
from .atomic import refuse_existing

__all__ = ["save_orbax", "load_orbax", "abstract_like"]


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp


def save_orbax(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> Path:
    """Save ``tree`` (arrays may be sharded) to the directory ``path``.

    Orbax finalises checkpoints atomically (it writes to a temporary directory and renames). An
    existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = refuse_existing(Path(path).absolute(), overwrite)
    ckptr = _ocp().StandardCheckpointer()
    ckptr.save(path, tree, force=overwrite)
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` for every array leaf, keeping each leaf's sharding."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        if hasattr(x, "shape") else x, tree)


def load_orbax(path: str | os.PathLike, like: Any = None) -> Any:
    """Restore a checkpoint written by :func:`save_orbax`.

    ``like`` gives the target structure, dtypes and shardings (arrays or ``ShapeDtypeStruct``); each
    restored leaf takes ``like``'s sharding. Without ``like`` the saved structure is restored on the
    default device.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such orbax checkpoint")
    ckptr = _ocp().StandardCheckpointer()
    try:
        return ckptr.restore(path, abstract_like(like)) if like is not None else ckptr.restore(path)
    finally:
        ckptr.close()
