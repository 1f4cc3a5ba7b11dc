"""Writers of the Hugging Face sharded safetensors layout (``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), all atomic: the directory appears only when complete.

* :func:`save_sharded` — a whole pytree at once;
* :class:`ShardWriter` — tensors streamed in, one shard buffered at a time;
* :class:`PlannedShardWriter` — layout known in advance, each tensor written in place (memory: one
  tensor); used by the streaming merge engine.

All three go through :func:`weightlab.io.atomic.atomic_dir` (one temporary directory, published by
one rename) and :func:`_finish`: inside the temporary directory every shard is named ``*.part``
and has a zero header length until it is complete, so a killed run leaves nothing that any
``*.safetensors`` glob, index or reader accepts; the final names and the index appear last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import PathCollisionError, UsageError
from .atomic import atomic_dir
from .safetensors import INDEX_NAME, _encode_metadata, _host_tensors, _layout_header, _seal, _write_file, dtype_name

__all__ = ["save_sharded", "ShardWriter", "PlannedShardWriter"]

PART = ".part"


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _check_extra_files(extra_files: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(extra_files or {})
    for fname, text in out.items():
        if (not isinstance(fname, str) or fname in ("", ".", "..", INDEX_NAME) or Path(fname).name != fname
                or fname.endswith((".safetensors", PART))):
            raise UsageError(f"extra file name {fname!r} must be a plain file name (not a shard or the index)")
        if not isinstance(text, (str, bytes)):
            raise UsageError(f"extra file {fname!r}: contents must be text or bytes, got {type(text).__name__}")
    return out


def _finish(tmp: Path, shard_names: list[list[str]], total: int, meta: dict[str, str],
            extra_files: dict[str, str]) -> None:
    """Inside the temporary directory: extra files, then each complete ``<shard>.part`` renamed to its
    final name, then the index (written under a ``.part`` name and renamed)."""
    for fname, text in extra_files.items():
        (tmp / fname).write_bytes(text if isinstance(text, bytes) else text.encode())
    n = len(shard_names)
    weight_map = {}
    for i, names in enumerate(shard_names):
        final = _shard_name(i, n)
        os.replace(tmp / (final + PART), tmp / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
    part = tmp / (INDEX_NAME + PART)
    with open(part, "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / INDEX_NAME)


def _group(items, nbytes, max_shard_bytes: int) -> list[list]:
    groups: list[list] = [[]]
    size = 0
    for item in items:
        nb = nbytes(item)
        if groups[-1] and size + nb > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nb
    return groups


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
    extra = _check_extra_files(extra_files)
    shards = _group(tensors, lambda t: t[1].nbytes, max_shard_bytes)
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        for i, shard in enumerate(shards):
            _write_file(tmp / (_shard_name(i, len(shards)) + PART), shard, meta)
        _finish(tmp, [[name for name, _ in s] for s in shards], sum(a.nbytes for _, a in tensors), meta, extra)
    return Path(directory)


class _AtomicWriter:
    """Shared lifecycle of the sharded writers: ``close()`` publishes the temporary directory, an
    exception inside ``with`` (or :meth:`abort`) deletes it."""

    _closed = False

    def _publish(self, shard_names: list[list[str]], extra_files) -> Path:
        """Finish the temporary directory (final shard names, index, extra files), then publish it."""
        try:
            _finish(self.tmp, shard_names, self.total, self.meta, _check_extra_files(extra_files))
        except BaseException as e:
            self.abort(e)
            raise
        self._closed = True
        self._ctx.__exit__(None, None, None)  # publishes; on failure the temporary is already removed
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
        meta = _encode_metadata(metadata)
        self._ctx = atomic_dir(directory, overwrite=overwrite)
        self.tmp = self._ctx.__enter__()
        self.max_shard_bytes, self.meta = max_shard_bytes, meta
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
        if self._buf:  # the shard count is unknown until close: numbered provisionally, renamed there
            _write_file(self.tmp / f"shard-{len(self._shards):05d}{PART}", self._buf, self.meta)
            self._shards.append([n for n, _ in self._buf])
            self._buf, self._size = [], 0

    def close(self, extra_files=None) -> Path:
        self._flush()
        n = len(self._shards)
        for i in range(n):
            os.replace(self.tmp / f"shard-{i:05d}{PART}", self.tmp / (_shard_name(i, n) + PART))
        return self._publish(self._shards, extra_files)


class PlannedShardWriter(_AtomicWriter):
    """Sharded writer for a layout known in advance (names, shapes, dtypes): each shard file is sized
    up front and each tensor goes straight to its final offset when it arrives, so memory holds one
    tensor, not one shard. The header length of every shard is written at :meth:`close`, after its
    data is flushed. Same atomic-directory guarantees as :class:`ShardWriter`."""

    def __init__(self, directory, layout, *, max_shard_bytes: int = 2 * 1024**3, metadata=None,
                 overwrite: bool = False):
        self.meta = _encode_metadata(metadata)
        layout = [(name, tuple(int(d) for d in shape), np.dtype(dtype)) for name, shape, dtype in layout]
        seen: set[str] = set()
        for name, _, _ in layout:
            if name in seen:
                raise PathCollisionError(f"duplicate tensor name '{name}' in the planned layout")
            seen.add(name)
        groups = _group(layout, lambda t: int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize, max_shard_bytes)
        headers = [_layout_header(g, self.meta) for g in groups]  # validates names and dtypes before any IO
        self._ctx = atomic_dir(directory, overwrite=overwrite)
        self.tmp = self._ctx.__enter__()
        self.directory = Path(directory)
        self._where: dict[str, tuple[int, int, tuple, np.dtype]] = {}
        self._files, self._header_lens, self.total = [], [], 0
        self._names = [[name for name, _, _ in g] for g in groups]
        try:
            for i, (g, (raw, spans)) in enumerate(zip(groups, headers)):
                f = open(self.tmp / (_shard_name(i, len(groups)) + PART), "wb+")
                self._files.append(f)
                f.write(b"\0" * 8)  # header length: written last, by close()
                f.write(raw)
                f.truncate(8 + len(raw) + (spans[-1][1] if spans else 0))
                for (name, shape, dt), (b, e) in zip(g, spans):
                    self._where[name] = (i, 8 + len(raw) + b, shape, dt)
                    self.total += e - b
                self._header_lens.append(len(raw))
        except BaseException as e:
            self.abort(e)
            raise
        self.weight_map = {name: _shard_name(i, len(groups)) for i, g in enumerate(self._names) for name in g}
        self._written: set[str] = set()
        self._closed = False

    def add(self, name: str, arr) -> None:
        if name not in self._where:
            raise KeyError(f"'{name}' is not in the planned layout")
        i, off, shape, dt = self._where[name]
        a = np.ascontiguousarray(np.asarray(arr))
        if a.shape != shape or a.dtype != dt:
            raise ValueError(f"'{name}': planned {shape} {dt}, got {a.shape} {a.dtype}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        f = self._files[i]
        f.seek(off)
        f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
        self._written.add(name)

    def close(self, extra_files=None) -> Path:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written (e.g. '{missing[0]}')")
        for f, n in zip(self._files, self._header_lens):
            _seal(f, n)
            f.close()
        return self._publish(self._names, extra_files)

    def abort(self, exc=None) -> None:
        for f in getattr(self, "_files", []):
            try:
                f.close()
            except OSError:
                pass
        super().abort(exc)
