"""safetensors reading and writing, our own implementation: validated, lazy, atomic.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes; offsets are relative to the end of the header.

Why not the ``safetensors`` package directly: we need (1) every header field validated before any
allocation, with typed errors (a hostile header length cannot make us allocate), (2) per-tensor
lazy reads from memory-mapped single files and HF sharded directories, opening only the shards
asked for, (3) streaming atomic writes, and (4) bf16/fp8 through numpy. Files we write are read by
the ``safetensors`` package and vice versa, and what we accept it accepts byte for byte (fuzzed in
tests/test_fuzz_io.py); strict JSON and the index reader live in ``header.py``.

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

from ..errors import (CheckpointError, CheckpointNotFoundError, LeafTypeError, PathCollisionError, UnknownDTypeError,
                      UsageError)
from .atomic import atomic_file, is_partial
from .header import (FIELDS, INDEX_NAME, INT64_MAX, check_metadata, check_tiling, is_text, is_uint, kind, read_index,
                     show, strict_json)

__all__ = ["DTYPES", "SafetensorsFile", "Checkpoint", "open_checkpoint", "save", "load", "read_metadata",
           "INDEX_NAME", "dtype_name"]

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit (MAX_HEADER_SIZE)

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

def _refuse_partial(path: Path) -> None:
    for p in (path, path.parent):
        if is_partial(p):
            raise CheckpointError(f"{path}: {p.name} is an unfinished temporary of an interrupted weightlab "
                                  "writer, not a checkpoint (the next write of the same output removes it)")


class SafetensorsFile:
    """One ``.safetensors`` file, header validated on open, tensors read lazily from a memory map.

    ``f[name]`` returns a numpy array holding only that tensor's bytes; nothing else is read.
    ``bytes_read`` counts the tensor bytes materialised so far.

    Validation (every failure a :class:`CheckpointError` naming the file and the tensor) accepts only
    what the reference implementation accepts: strict JSON with no repeated key, exactly the fields
    ``dtype`` / ``shape`` / ``data_offsets`` per tensor with the right types and int64-sized values,
    string-to-string ``__metadata__``, and tensors that, sorted by offset, tile the data section
    exactly (no overlap, no hole, no trailing byte). A file whose 8-byte header length is still zero
    is one a writer did not finish (we write the length last).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"{self.path}: no such safetensors file")
        _refuse_partial(self.path)
        self._size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated ({self._size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n == 0:
                raise CheckpointError(f"{self.path}: header length 0: the file is incomplete (a writer was "
                                      "interrupted before finishing it) or not safetensors")
            if n > MAX_HEADER_BYTES or n > self._size - 8:
                raise CheckpointError(
                    f"{self.path}: header length {n} is impossible (file has {self._size} bytes, limit "
                    f"{MAX_HEADER_BYTES}); the file is truncated, corrupted or not safetensors")
            header_bytes = f.read(n)
        try:
            text = header_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: header is not valid UTF-8 ({e})") from None
        header = strict_json(text, f"{self.path}: header")
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header must be a JSON object, found {kind(header)}")
        if header.dups:
            d = header.dups[0]
            what = "'__metadata__'" if d == "__metadata__" else f"tensor '{show(d)}'"
            raise CheckpointError(f"{self.path}: {what} appears twice in the header")
        self.metadata: dict[str, str] = check_metadata(header.pop("__metadata__", None), self.path)
        self._data_start = 8 + n
        data_len = self._size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._validate(name, e, data_len)
        check_tiling(self.path, self._entries, data_len)
        self._mm: mmap.mmap | None = None
        self.bytes_read = 0

    def _validate(self, name: str, e: Any, data_len: int):
        where = f"{self.path}: tensor '{show(name)}'"
        if not is_text(name):
            raise CheckpointError(f"{where}: the name is not valid Unicode (lone surrogate)")
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: entry must be an object with dtype, shape and data_offsets, "
                                  f"found {kind(e)}")
        if e.dups:
            raise CheckpointError(f"{where}: field '{show(e.dups[0])}' appears twice")
        if set(e) != FIELDS:
            missing, extra = FIELDS - set(e), set(e) - FIELDS
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets"
                                  + (f"; missing {sorted(missing)}" if missing else "")
                                  + (f"; unknown {show(sorted(extra))}" if extra else ""))
        dname, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dname, str) or dname not in DTYPES:
            raise UnknownDTypeError(f"{where}: unknown dtype '{show(dname)}' (known: {sorted(DTYPES)})")
        dt = DTYPES[dname]
        if not isinstance(shape, list) or not all(is_uint(s) for s in shape):
            raise CheckpointError(f"{where}: shape must be a list of integers in [0, 2**63), found {show(shape)}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(is_uint(o) for o in offs) or offs[0] > offs[1]:
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end < 2**63, "
                                  f"found {show(offs)}")
        numel, addressable = 1, dt.itemsize
        for s in shape:
            numel *= s
            addressable *= max(s, 1)
            if addressable > INT64_MAX:  # numpy's limit (zero-size dims included); also the reference's
                raise CheckpointError(f"{where}: shape {show(shape)} x {dt} is too large to address")
        if offs[1] - offs[0] != numel * dt.itemsize:
            raise CheckpointError(f"{where}: shape {tuple(shape)} x {dt} needs {numel * dt.itemsize} bytes, "
                                  f"data_offsets span {offs[1] - offs[0]}")
        if offs[1] > data_len:
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
        if is_partial(self.path):
            _refuse_partial(self.path / INDEX_NAME)
        self._root = self.path
        index = self.path / INDEX_NAME
        if index.is_file():
            self._map, self.metadata = read_index(index)
            for fname in sorted(set(self._map.values())):
                if not (self.path / fname).is_file():
                    raise CheckpointNotFoundError(f"{index} names shard {fname}, which does not exist")
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
            f = SafetensorsFile(self._root / fname)
            lacking = [n for n, s in self._map.items() if s == fname and n not in f]
            if lacking:  # checked for every tensor of the shard, before any of them is read
                f.close()
                raise CheckpointError(f"{self.path / INDEX_NAME}: the index puts tensor '{show(lacking[0])}' in "
                                      f"{fname}, which lacks it ({len(lacking)} such tensors)")
            self._files[fname] = f
            self.opened_files.append(fname)
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
            raise UsageError(f"metadata keys must be strings; key {show(k)} is a {type(k).__name__}")
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
            raise LeafTypeError(f"'{p}': cannot store a {type(x).__name__} in safetensors; keep only array leaves "
                                "(e.g. eqx.filter(model, eqx.is_array))")
        if str(getattr(x, "dtype", "")).startswith("key<"):
            raise LeafTypeError(f"'{p}': a PRNG key array cannot be stored in safetensors; save its "
                                "jax.random.key_data(...) or leave RNG state out (e.g. nnx.state(model, nnx.Param))")
        arr = np.asarray(x)
        dtype_name(arr.dtype, p)
        out.append((p, arr))
    return out


def _layout_header(layout, metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (JSON padded with spaces to 8-byte alignment) and each tensor's [begin, end) for a
    layout of (name, shape, dtype), tensors stored back to back in layout order."""
    h: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    spans, off = [], 0
    for name, shape, dtype in layout:
        if name in h:
            raise PathCollisionError(f"duplicate tensor name '{name}'")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        h[name] = {"dtype": dtype_name(dtype, name), "shape": [int(d) for d in shape],
                   "data_offsets": [off, off + nbytes]}
        spans.append((off, off + nbytes))
        off += nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), spans  # 8-byte aligned data section


def _header(tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    return _layout_header([(n, a.shape, a.dtype) for n, a in tensors], metadata)[0]


def _seal(f, header_len: int) -> None:
    """Make a file we wrote valid: flush and fsync its data, then write the 8-byte header length
    (zero until now, so a file cut short at any point fails validation) and fsync again."""
    f.flush()
    os.fsync(f.fileno())
    f.seek(0)
    f.write(struct.pack("<Q", header_len))
    f.flush()
    os.fsync(f.fileno())


def _write_file(fname: Path, tensors, metadata: dict[str, str]) -> None:
    """Write one safetensors file; its header length is written last (see :func:`_seal`)."""
    header = _header(tensors, metadata)
    with open(fname, "wb") as f:
        f.write(b"\0" * 8)
        f.write(header)
        for _, arr in tensors:
            a = np.ascontiguousarray(arr)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
        _seal(f, len(header))


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
