"""Quantized checkpoints: :func:`save` / :func:`load` of trees with QArrays, the header-metadata key
that records each QArray's layout, and a read-only dequantizing view.

:class:`DequantizedCheckpoint` serves every QArray of a quantized safetensors checkpoint (written by
:func:`save` or ``weightlab quantize``) as its dequantized float tensor, one tensor at a time, with
the :class:`weightlab.io.Checkpoint` interface the streaming merge engine reads through, so
``weightlab merge`` accepts quantized models without materialising them whole. This module imports
NumPy only (JAX on the first dequantization), so ``weightlab info`` can read the layouts cheaply.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from ..errors import CheckpointError
from ..io.safetensors import Checkpoint, CheckpointView

__all__ = ["METADATA_KEY", "qarray_specs", "save", "load", "DequantizedCheckpoint"]

METADATA_KEY = "weightlab.qarrays"
"""Header-metadata key under which :func:`save` records each QArray's layout (JSON: path -> spec)."""


def qarray_specs(metadata: Mapping[str, str], source: str = "checkpoint") -> dict:
    """The QArray layouts recorded in a checkpoint's metadata (``{}`` for a plain checkpoint);
    unreadable or ill-formed metadata is a :class:`CheckpointError` naming ``source``."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        specs = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(specs, dict):
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} must map tensor names to layouts")
    for name, spec in specs.items():
        ok = isinstance(spec, dict) and isinstance(spec.get("shape"), list) and isinstance(spec.get("children"), list) \
            and isinstance(spec.get("format"), dict) and all(isinstance(c, str) for c in spec["children"])
        if not ok:
            raise CheckpointError(f"{source}: layout of '{name}' in {METADATA_KEY!r} is malformed: {str(spec)[:120]}")
    return specs


def save(path, tree, *, metadata: dict | None = None, overwrite: bool = False):
    """Save a tree with QArrays to safetensors; the QArray layouts go in the header metadata, so
    :func:`load` rebuilds them without a template."""
    from .. import io as wio
    from .. import tree as wtree
    from .qarray import is_qarray

    specs = {p: x.spec() for p, x in wtree.flatten_with_paths(tree, is_leaf=is_qarray)[0] if is_qarray(x)}
    meta = dict(metadata or {})
    meta[METADATA_KEY] = json.dumps(specs, sort_keys=True)
    return wio.save(path, tree, metadata=meta, overwrite=overwrite)


def load(path, like: Any = None):
    """Load a checkpoint written by :func:`save` (or any safetensors file) with its QArrays."""
    import jax.numpy as jnp

    from .. import io as wio
    from .. import tree as wtree
    from .qarray import QArray

    if like is not None:
        return wio.load(path, like=like)
    with wio.open_checkpoint(path) as c:
        specs = qarray_specs(c.metadata, str(path))
        flat = {k: jnp.asarray(c[k]) for k in c.keys()}
    for p, spec in specs.items():
        missing = [n for n in spec["children"] if f"{p}/{n}" not in flat]
        if missing:
            raise CheckpointError(f"{path}: the layout of '{p}' names tensor '{p}/{missing[0]}', which the file lacks")
        children = {n: flat.pop(f"{p}/{n}") for n in spec["children"]}
        flat[p] = QArray.from_spec(spec, children)
    return wtree.from_flat_dict(flat)


class DequantizedCheckpoint(CheckpointView):
    """Logical tensors of a quantized checkpoint: QArray components (``name/codes``, ``name/scale``
    ...) are hidden behind ``name``, whose shape and dtype are the original ones."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self._specs = qarray_specs(self.metadata)
        hidden = {f"{p}/{n}" for p, s in self._specs.items() for n in s["children"]}
        self._names = [n for n in ckpt.keys() if n not in hidden] + list(self._specs)
        self._plain = set(self._names) - set(self._specs)

    def keys(self):
        return list(self._names)

    def __contains__(self, name):
        return name in self._specs or name in self._plain

    def shape(self, name):
        return tuple(self._specs[name]["shape"]) if name in self._specs else self._base.shape(name)

    def dtype(self, name):
        if name in self._specs:
            from .qarray import _dtype

            return np.dtype(_dtype(self._specs[name]["dtype"]))
        return self._base.dtype(name)

    def _compute(self, name):
        if name not in self._specs:
            return None
        from .qarray import QArray

        spec = self._specs[name]
        q = QArray.from_spec(spec, {n: self._base.get(f"{name}/{n}") for n in spec["children"]})
        return np.asarray(q.dequantize())
