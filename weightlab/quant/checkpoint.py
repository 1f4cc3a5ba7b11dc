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

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from ..io.safetensors import Checkpoint, CheckpointView

__all__ = ["METADATA_KEY", "qarray_specs", "save", "load", "DequantizedCheckpoint"]

METADATA_KEY = "weightlab.qarrays"
"""Header-metadata key under which :func:`save` records each QArray's layout (JSON: path -> spec)."""


def _no_dups(pairs) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(x, lo: int = 0) -> bool:
    return type(x) is int and lo <= x < 2**63


def _check_spec(name: str, spec: Any, source: str) -> None:
    """A layout must hold what :meth:`QArray.from_spec` reads, with the right types; otherwise a
    :class:`CheckpointError` naming the tensor (never whatever the constructor would raise)."""
    from ..io.safetensors import DTYPES
    from .formats import FORMATS, Format

    where = f"{source}: layout of '{str(name)[:120]}' in {METADATA_KEY!r}"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} must be an object, found {type(spec).__name__}")
    missing = [k for k in ("shape", "dtype", "format", "group_size", "axis", "children") if k not in spec]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}")
    shape, children, fmt = spec["shape"], spec["children"], spec["format"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, found {str(shape)[:80]}")
    if not isinstance(spec["dtype"], str) or _float_dtype(spec["dtype"]) not in {
            v for k, v in DTYPES.items() if k.startswith(("F", "BF"))}:
        raise CheckpointError(f"{where}: dtype {str(spec['dtype'])[:40]!r} is not a float dtype safetensors can hold")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("name"), str) or fmt["name"] not in FORMATS:
        got = fmt.get("name") if isinstance(fmt, dict) else fmt
        raise CheckpointError(f"{where}: unknown format {str(got)[:40]!r} (known: {sorted(FORMATS)})")
    try:
        f = Format.from_json(fmt)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: format {fmt['name']!r} is malformed ({e})") from None
    known = FORMATS[fmt["name"]]
    if (f.kind, f.bits) != (known.kind, known.bits) or not isinstance(f.symmetric, bool):
        raise CheckpointError(f"{where}: format {fmt['name']!r} does not match its definition")
    if not _is_int(spec["group_size"]) or not _is_int(spec["axis"], -len(shape)) or (
            shape and spec["axis"] >= len(shape)):
        raise CheckpointError(f"{where}: group_size must be an integer >= 0 and axis an axis of shape "
                              f"{tuple(shape)}, found {str(spec['group_size'])[:20]}, {str(spec['axis'])[:20]}")
    if (not isinstance(children, list) or not children or not all(isinstance(c, str) for c in children)
            or len(set(children)) != len(children) or "codes" not in children):
        raise CheckpointError(f"{where}: children must be a list of distinct component names including "
                              f"'codes', found {str(children)[:80]}")


def _float_dtype(name: str):
    try:
        return np.dtype(name)
    except Exception:  # numpy has no such name: ml_dtypes' (bfloat16, float8_*) or none
        try:
            return np.dtype(getattr(ml_dtypes, name))
        except Exception:
            return None


def qarray_specs(metadata: Mapping[str, str], source: str = "checkpoint", names=None) -> dict:
    """The QArray layouts recorded in a checkpoint's metadata (``{}`` for a plain checkpoint);
    unreadable or ill-formed metadata is a :class:`CheckpointError` naming ``source`` and the tensor.
    With ``names`` (the tensors the file holds), every component a layout names must be present and
    no layout may share its name with a stored tensor."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    if not isinstance(raw, str):
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} must be a JSON string")
    try:
        specs = json.loads(raw, object_pairs_hook=_no_dups)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(specs, dict):
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} must map tensor names to layouts")
    for name, spec in specs.items():
        _check_spec(name, spec, source)
    if names is not None:
        names = set(names)
        for p, spec in specs.items():
            if p in names:
                raise CheckpointError(f"{source}: '{p}' is both a stored tensor and a quantized layout")
            missing = [n for n in spec["children"] if f"{p}/{n}" not in names]
            if missing:
                raise CheckpointError(f"{source}: the layout of '{p}' names tensor '{p}/{missing[0]}', "
                                      "which the file lacks")
    return specs


def _from_spec(name: str, spec: dict, children: dict, source: str):
    """``QArray.from_spec`` whose failures (a layout that does not fit its stored components) are a
    :class:`CheckpointError` naming the tensor."""
    from .qarray import QArray

    try:
        return QArray.from_spec(spec, children)
    except Exception as e:
        raise CheckpointError(f"{source}: cannot rebuild quantized tensor '{name}' from its layout ({e})") from e


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

    if like is not None:
        return wio.load(path, like=like)
    with wio.open_checkpoint(path) as c:
        specs = qarray_specs(c.metadata, str(path), names=c.keys())  # before any tensor is read
        flat = {k: jnp.asarray(c[k]) for k in c.keys()}
    for p, spec in specs.items():
        children = {n: flat.pop(f"{p}/{n}") for n in spec["children"]}
        flat[p] = _from_spec(p, spec, children, str(path))
    return wtree.from_flat_dict(flat)


class DequantizedCheckpoint(CheckpointView):
    """Logical tensors of a quantized checkpoint: QArray components (``name/codes``, ``name/scale``
    ...) are hidden behind ``name``, whose shape and dtype are the original ones."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self._source = str(getattr(ckpt, "path", "checkpoint"))
        self._specs = qarray_specs(self.metadata, self._source, names=ckpt.keys())
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
            return _float_dtype(self._specs[name]["dtype"])  # validated by qarray_specs
        return self._base.dtype(name)

    def _compute(self, name):
        if name not in self._specs:
            return None
        spec = self._specs[name]
        q = _from_spec(name, spec, {n: self._base.get(f"{name}/{n}") for n in spec["children"]}, self._source)
        try:
            out = np.asarray(q.dequantize())
        except Exception as e:  # components whose shapes do not fit the layout
            raise CheckpointError(f"{self._source}: cannot dequantize '{name}' ({e})") from e
        if out.shape != self.shape(name):
            raise CheckpointError(f"{self._source}: '{name}' dequantizes to shape {out.shape}, its layout says "
                                  f"{self.shape(name)}")
        return out
