"""Writers of the Hugging Face sharded safetensors layout (``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), all atomic: the directory appears only when complete.

* :func:`save_sharded` — a whole pytree at once;
* :class:`ShardWriter` — tensors streamed in, one shard buffered at a time;
* :class:`PlannedShardWriter` — layout known in advance, each tensor written in place (memory: one
  tensor); used by the streaming merge engine.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import WeightlabError
from .atomic import atomic_dir
from .safetensors import INDEX_NAME, _encode_metadata, _host_tensors, _write_file, dtype_name

__all__ = ["save_sharded", "ShardWriter", "PlannedShardWriter"]


def save_sharded(directory: str | os.PathLike, tree: Any, *, max_shard_bytes: int = 2 * 1024**3,
                 metadata: Mapping[str, Any] | None = None, overwrite: bool = False,
                 extra_files: Mapping[str, str] | None = None) -> Path:
    """Write the Hugging Face sharded layout: ``model-0000i-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json`` (``weight_map`` and ``metadata.total_size``).

    The whole directory appears atomically. ``extra_files`` (name -> text) are written beside the
    shards (e.g. the config that produced the checkpoint).
    """
    tensors = _host_tensors(tree)
    meta = _encode_metadata(metadata)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        size += arr.nbytes
    n = len(shards)
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            _write_file(tmp / fname, shard, meta)
            weight_map.update({name: fname for name, _ in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for _, a in tensors), **meta}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        for fname, text in (extra_files or {}).items():
            if Path(fname).name != fname:
                raise WeightlabError(f"extra file name {fname!r} must be a plain file name")
            (tmp / fname).write_text(text)
    return Path(directory)


class _AtomicWriter:
    """Shared lifecycle of the sharded writers: ``close()`` publishes the temporary directory, an
    exception inside ``with`` (or :meth:`abort`) deletes it."""

    _closed = False

    def _publish(self, weight_map: dict, extra_files) -> Path:
        """Write the index and extra files, then rename the temporary directory into place."""
        index = {"metadata": {"total_size": self.total, **self.meta}, "weight_map": weight_map}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        for fname, text in (extra_files or {}).items():
            (self.tmp / fname).write_text(text)
        self._ctx.__exit__(None, None, None)
        self._closed = True
        return self.directory

    def abort(self, exc=None) -> None:
        self._closed = True
        try:
            self._ctx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
        except BaseException:
            pass

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.abort(ev)
        elif not self._closed:
            self.close()
        return False


class ShardWriter(_AtomicWriter):
    """Streaming writer of the HF sharded layout: tensors are added one at a time and written out
    whenever a shard is full, so memory holds at most one shard. Everything goes into a temporary
    directory that is renamed into place by :meth:`close`; if the process dies or :meth:`abort` is
    called, no output directory appears. Use as a context manager (an exception aborts)."""

    def __init__(self, directory, *, max_shard_bytes: int = 2 * 1024**3, metadata=None, overwrite: bool = False):
        self._ctx = atomic_dir(directory, overwrite=overwrite)
        self.tmp = self._ctx.__enter__()
        self.max_shard_bytes, self.meta = max_shard_bytes, _encode_metadata(metadata)
        self._buf: list[tuple[str, np.ndarray]] = []
        self._size = 0
        self._shards: list[list[str]] = []
        self.total = 0
        self.directory = Path(directory)
        self._closed = False

    def add(self, name: str, arr) -> None:
        a = np.asarray(arr)
        dtype_name(a.dtype, name)
        if self._buf and self._size + a.nbytes > self.max_shard_bytes:
            self._flush()
        self._buf.append((name, a))
        self._size += a.nbytes
        self.total += a.nbytes

    def _flush(self) -> None:
        if self._buf:
            _write_file(self.tmp / f"shard-{len(self._shards):05d}.part", self._buf, self.meta)
            self._shards.append([n for n, _ in self._buf])
            self._buf, self._size = [], 0

    def close(self, extra_files=None) -> Path:
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.part", self.tmp / final)
            weight_map.update({name: final for name in names})
        return self._publish(weight_map, extra_files)


class PlannedShardWriter(_AtomicWriter):
    """Sharded writer for a layout known in advance (names, shapes, dtypes): every shard's header is
    written first and each tensor goes straight to its final offset when it arrives, so memory holds
    one tensor, not one shard. Same atomic-directory guarantees as :class:`ShardWriter`."""

    def __init__(self, directory, layout, *, max_shard_bytes: int = 2 * 1024**3, metadata=None,
                 overwrite: bool = False):
        self._ctx = atomic_dir(directory, overwrite=overwrite)
        self.tmp = self._ctx.__enter__()
        self.directory = Path(directory)
        meta = _encode_metadata(metadata)
        self.meta = meta
        groups: list[list[tuple[str, tuple, np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        n = len(groups)
        self._where: dict[str, tuple[int, int, tuple, np.dtype]] = {}
        self._files, self.weight_map, self.total = [], {}, 0
        try:
            for i, g in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                h: dict[str, Any] = {"__metadata__": meta} if meta else {}
                off = 0
                for name, shape, dt in g:
                    nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                    h[name] = {"dtype": dtype_name(dt, name), "shape": list(shape), "data_offsets": [off, off + nb]}
                    self._where[name] = (i, 0, shape, dt)
                    self.weight_map[name] = fname
                    off += nb
                raw = json.dumps(h, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                f = open(self.tmp / fname, "wb+")
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + off)
                self._files.append(f)
                for name, _, _ in g:
                    i_, _, shape, dt = self._where[name]
                    self._where[name] = (i_, 8 + len(raw) + h[name]["data_offsets"][0], shape, dt)
                self.total += off
        except BaseException as e:
            self.abort(e)
            raise
        self._written: set[str] = set()
        self._closed = False

    def add(self, name: str, arr) -> None:
        if name not in self._where:
            raise KeyError(f"'{name}' is not in the planned layout")
        i, off, shape, dt = self._where[name]
        a = np.ascontiguousarray(np.asarray(arr))
        if a.shape != shape or a.dtype != dt:
            raise ValueError(f"'{name}': planned {shape} {dt}, got {a.shape} {a.dtype}")
        f = self._files[i]
        f.seek(off)
        f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
        self._written.add(name)

    def close(self, extra_files=None) -> Path:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written (e.g. '{missing[0]}')")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return self._publish(self.weight_map, extra_files)

    def abort(self, exc=None) -> None:
        for f in getattr(self, "_files", []):
            try:
                f.close()
            except OSError:
                pass
        super().abort(exc)
