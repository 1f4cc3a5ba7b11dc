"""safetensors reading and writing, our own implementation: validated, lazy, atomic.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes; offsets are relative to the end of the header.

Why not the ``safetensors`` package directly: we need (1) every header field validated before any
allocation, with typed errors (a hostile header length cannot make us allocate), (2) per-tensor
lazy reads from memory-mapped single files and HF sharded directories, opening only the shards
asked for, (3) streaming atomic writes, and (4) bf16/fp8 through numpy. Files we write are read by
the ``safetensors`` package and vice versa (tested).

Tensor names are pytree paths (``encoder/layer_0/attn/query/kernel``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError, PathCollisionError, UnknownDTypeError
from .atomic import atomic_file

__all__ = ["DTYPES", "SafetensorsFile", "Checkpoint", "open_checkpoint", "save", "load", "read_metadata",
           "INDEX_NAME", "dtype_name"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
INDEX_NAME = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dt, path: str = "") -> str:
    """safetensors name of a numpy/jax dtype; :class:`UnknownDTypeError` if it has none."""
    dt = np.dtype(dt)
    if dt not in _NAMES:
        hint = " (pack sub-byte codes into uint8, e.g. with weightlab.quant)" if dt.itemsize == 1 else ""
        raise UnknownDTypeError(f"'{path}': dtype {dt} cannot be stored in safetensors{hint}")
    return _NAMES[dt]


# ------------------------------------------------------------------------------------- reading

class SafetensorsFile:
    """One ``.safetensors`` file, header validated on open, tensors read lazily from a memory map.

    ``f[name]`` returns a numpy array holding only that tensor's bytes; nothing else is read.
    ``bytes_read`` counts the tensor bytes materialised so far.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"{self.path}: no such safetensors file")
        self._size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated ({self._size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n == 0 or n > MAX_HEADER_BYTES or n > self._size - 8:
                raise CheckpointError(
                    f"{self.path}: header length {n} is impossible (file has {self._size} bytes, limit "
                    f"{MAX_HEADER_BYTES}); the file is truncated, corrupted or not safetensors")
            header_bytes = f.read(n)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header must be a JSON object, found {type(header).__name__}")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            self._entries[name] = self._validate(name, e)
            spans.append((self._entries[name][2], self._entries[name][3], name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: tensors '{n0}' and '{n1}' overlap in the data section")
        self._mm: mmap.mmap | None = None
        self.bytes_read = 0

    def _validate(self, name: str, e: Any):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
        if e["dtype"] not in DTYPES:
            raise UnknownDTypeError(f"{where}: unknown dtype {e['dtype']!r} (known: {sorted(DTYPES)})")
        dt = DTYPES[e["dtype"]]
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, found {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or offs[0] > offs[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, found {offs!r}")
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * dt.itemsize:
            raise CheckpointError(f"{where}: shape {tuple(shape)} x {dt} needs {numel * dt.itemsize} bytes, "
                                  f"data_offsets span {offs[1] - offs[0]}")
        if self._data_start + offs[1] > self._size:
            raise CheckpointError(f"{where}: data ends at byte {self._data_start + offs[1]} but the file has "
                                  f"{self._size} bytes (truncated?)")
        return dt, tuple(shape), offs[0], offs[1]

    # Mapping-like interface
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name):
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        return self._entries[name]

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        """The tensor as a numpy array, read with ``pread`` into a fresh buffer (so reading a whole
        checkpoint tensor by tensor does not keep the file mapped in memory). ``copy=False`` returns
        a read-only zero-copy view of a memory map instead (valid until :meth:`close`)."""
        dt, shape, b, e = self._entry(name)
        if copy:
            return self.read_into(name, np.empty(shape, dt))
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._size else None
        count = (e - b) // dt.itemsize
        if count == 0:
            arr = np.zeros(shape, dt)
        else:
            arr = np.frombuffer(self._mm, dtype=dt.newbyteorder("<"), count=count,
                                offset=self._data_start + b).reshape(shape)
            arr = arr.astype(dt) if (copy or arr.dtype != dt) else arr
        self.bytes_read += e - b
        return arr

    def read_into(self, name: str, buf: np.ndarray) -> np.ndarray:
        """Read the tensor into the start of ``buf`` (any contiguous array with enough bytes, e.g. a
        buffer reused across tensors, which avoids fresh page faults per tensor); returns the tensor as
        a view of ``buf``."""
        dt, shape, b, e = self._entry(name)
        raw = buf.reshape(-1).view(np.uint8)
        if raw.nbytes < e - b:
            raise ValueError(f"'{name}': buffer of {raw.nbytes} bytes, tensor needs {e - b}")
        view = raw[:e - b]
        if e > b:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got, pos, mv = 0, self._data_start + b, memoryview(view)
                while got < e - b:
                    n = os.preadv(fd, [mv[got:]], pos + got)
                    if n <= 0:
                        raise CheckpointError(f"{self.path}: tensor '{name}' truncated while reading")
                    got += n
            finally:
                os.close(fd)
        out = view.view(dt).reshape(shape)
        if dt.byteorder == ">":  # pragma: no cover - big-endian hosts
            out = out.byteswap().view(dt.newbyteorder("<"))
        self.bytes_read += e - b
        return out

    __getitem__ = get

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views handed out with copy=False are still alive
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Checkpoint:
    """A checkpoint that may span several files: a single ``.safetensors`` file, a directory with
    ``model.safetensors.index.json`` (HF sharded layout), or a directory with one ``*.safetensors``.

    Shards are opened only when one of their tensors is first asked for (``opened_files``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files: dict[str, SafetensorsFile] = {}
        self.opened_files: list[str] = []
        if self.path.is_file():
            f = SafetensorsFile(self.path)
            self._files[self.path.name] = f
            self.opened_files.append(self.path.name)
            self._map = {k: self.path.name for k in f.keys()}
            self.metadata = dict(f.metadata)
            self._root = self.path.parent
            return
        if not self.path.is_dir():
            raise CheckpointNotFoundError(f"{self.path}: no such file or directory")
        self._root = self.path
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                wm = data["weight_map"]
                assert isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())
            except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            for fname in sorted(set(wm.values())):
                if Path(fname).name != fname:
                    raise CheckpointError(f"{index}: shard name {fname!r} must be a plain file name")
                if not (self.path / fname).is_file():
                    raise CheckpointNotFoundError(f"{index} names shard {fname}, which does not exist")
            self._map = dict(wm)
            self.metadata = {k: str(v) for k, v in (data.get("metadata") or {}).items()}
            return
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointNotFoundError(
                f"{self.path}: expected {INDEX_NAME} or exactly one *.safetensors file, found {len(files)}")
        f = SafetensorsFile(files[0])
        self._files[files[0].name] = f
        self.opened_files.append(files[0].name)
        self._map = {k: files[0].name for k in f.keys()}
        self.metadata = dict(f.metadata)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._map:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        fname = self._map[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self._root / fname)
            self.opened_files.append(fname)
            if name not in self._files[fname]:
                raise CheckpointError(f"{self.path}: index puts '{name}' in {fname}, which lacks it")
        return self._files[fname]

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name) -> bool:
        return name in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def shape(self, name: str):
        return self._file(name).shape(name)

    def dtype(self, name: str):
        return self._file(name).dtype(name)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        return self._file(name).get(name, copy=copy)

    def read_into(self, name: str, buf: np.ndarray) -> np.ndarray:
        return self._file(name).read_into(name, buf)

    __getitem__ = get

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())

    def shard_of(self, name: str) -> str:
        return self._map[name]

    def close(self):
        for f in self._files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a safetensors checkpoint (file, HF sharded directory, or directory with one file) lazily."""
    return Checkpoint(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a file (or the index's ``metadata`` of a sharded directory)."""
    with Checkpoint(path) as c:
        return dict(c.metadata)


def load(path: str | os.PathLike, like: Any = None, *, as_jax: bool = True, sep: str = "/") -> Any:
    """Load a whole checkpoint as a pytree.

    With ``like`` (a pytree of arrays or ``jax.ShapeDtypeStruct``) the tensors are placed in that
    exact structure and checked (missing, extra, shape and dtype mismatches raise typed errors
    naming the path); ``like``'s shardings are used when it has them. Without it, nested dicts split
    on ``sep`` (use ``sep="."`` for Hugging Face names).
    """
    import jax
    import jax.numpy as jnp

    from .. import tree as wtree

    with Checkpoint(path) as c:
        names = c.keys()
        if like is not None:
            want = dict(wtree.flatten_with_paths(like)[0])
            for n in names:  # fail before reading a single tensor
                if n not in want:
                    raise wtree.StructureMismatchError(n, "no such leaf in the target structure", "an extra tensor")
            for p, ref in want.items():
                if not wtree.is_array(ref):
                    continue
                if p not in c:
                    raise wtree.StructureMismatchError(p, "a tensor", f"missing from {path}")
                if tuple(c.shape(p)) != tuple(ref.shape):
                    raise wtree.ShapeMismatchError(p, ref.shape, c.shape(p))
                if np.dtype(c.dtype(p)) != np.dtype(ref.dtype):
                    raise wtree.DTypeMismatchError(p, np.dtype(ref.dtype), c.dtype(p))
        flat = {}
        for n in names:
            arr = c.get(n)
            if as_jax:
                sharding = getattr(want.get(n), "sharding", None) if like is not None else None
                arr = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
            flat[n] = arr
    if like is not None:
        return wtree.from_flat_dict(flat, like, check=False)
    if sep != "/":
        flat = {k.replace(sep, "/"): v for k, v in flat.items()}
    return wtree.from_flat_dict(flat)


# ------------------------------------------------------------------------------------- writing

def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be strings, got {k!r}")
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


class CheckpointView:
    """Read-only view over a :class:`Checkpoint` whose subclasses compute some tensors on read
    (override :meth:`_compute`, returning None for tensors served from the base as they are). Same
    interface as ``Checkpoint``: ``keys``, ``shape``, ``dtype``, ``get``, ``read_into``, ``close``."""

    def __init__(self, base):
        self._base = base
        self.metadata = dict(getattr(base, "metadata", {}))

    def _compute(self, name: str) -> np.ndarray | None:
        return None

    def keys(self):
        return self._base.keys()

    def __contains__(self, name):
        return name in self._base

    def shape(self, name):
        return self._base.shape(name)

    def dtype(self, name):
        return self._base.dtype(name)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        a = self._compute(name)
        return self._base.get(name, copy=copy) if a is None else a

    __getitem__ = get

    def read_into(self, name: str, buf: np.ndarray) -> np.ndarray:
        a = self._compute(name)
        if a is None:
            return self._base.read_into(name, buf)
        view = buf.reshape(-1).view(np.uint8)[:a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(view, a)
        return view

    def close(self) -> None:
        self._base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _host_tensors(tree: Any) -> list[tuple[str, np.ndarray]]:
    """(path, numpy array) for every leaf; non-array leaves are an error (nothing is dropped)."""
    from .. import tree as wtree

    pairs = wtree.flatten_with_paths(tree)[0]  # a flat {hf.name: array} dict keeps its names
    out = []
    for p, x in pairs:
        if x is None:
            continue
        if not wtree.is_array(x):
            raise TypeError(f"'{p}': cannot store a {type(x).__name__} in safetensors; keep only array leaves "
                            "(e.g. eqx.filter(model, eqx.is_array))")
        arr = np.asarray(x)
        dtype_name(arr.dtype, p)
        out.append((p, arr))
    return out


def _header(tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    h: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, arr in tensors:
        if name in h:
            raise PathCollisionError(f"duplicate tensor name '{name}'")
        h[name] = {"dtype": dtype_name(arr.dtype, name), "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data section


def _write_file(fname: Path, tensors, metadata: dict[str, str]) -> None:
    header = _header(tensors, metadata)
    with open(fname, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for _, arr in tensors:
            a = np.ascontiguousarray(arr)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")


def save(path: str | os.PathLike, tree: Any, *, metadata: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write every array leaf of ``tree`` to one safetensors file, named by its path.

    The file appears atomically (temporary sibling + rename); an existing file is replaced only with
    ``overwrite=True``. ``metadata`` values that are not strings are stored as JSON. Non-array leaves
    and dtypes safetensors cannot hold raise before anything is written.
    """
    tensors = _host_tensors(tree)
    meta = _encode_metadata(metadata)
    with atomic_file(path, overwrite=overwrite) as tmp:
        _write_file(tmp, tensors, meta)
    return Path(path)
