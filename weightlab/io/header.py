"""Strict JSON for safetensors headers and sharded indexes, and the structural checks on them.

:func:`strict_json` parses what the reference implementation (the ``safetensors`` Rust crate)
parses, without losing what would make it refuse a file: repeated keys are recorded (``json`` keeps
the last silently), and every number that is not a plain non-negative integer below 2**63 (floats,
``-0``, ``NaN``, huge integers) is kept as a :class:`_Number` token the validators reject by type.
Nesting deeper than Python's recursion limit is a :class:`CheckpointError`, not a RecursionError.
The per-tensor validator itself is ``SafetensorsFile`` (``safetensors.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"

FIELDS = frozenset({"dtype", "shape", "data_offsets"})
INT64_MAX = 2**63 - 1


class _Obj(dict):
    """A parsed JSON object that remembers the keys it saw twice (json keeps only the last)."""

    dups: tuple = ()


class _Number:
    """A JSON number that can never be valid in a header (float, NaN/Infinity, negative or huge int):
    kept as its text, so the validator rejects it naming the tensor."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text if len(self.text) <= 40 else self.text[:37] + "..."


def _pairs(pairs) -> _Obj:
    obj, dups = _Obj(), []
    for k, v in pairs:
        if k in obj:
            dups.append(k)
        obj[k] = v
    if dups:
        obj.dups = tuple(dups)
    return obj


def _parse_int(text: str):
    return int(text) if len(text) <= 19 and not text.startswith("-") else _Number(text)


def strict_json(text: str, where: str) -> Any:
    """``json.loads`` that records repeated keys and keeps every non-integer number as a rejectable
    token; any parse failure (syntax, nesting too deep) is a :class:`CheckpointError` naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=_parse_int, parse_float=_Number,
                          parse_constant=_Number)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError included
        raise CheckpointError(f"{where}: not valid JSON ({str(e)[:200]})") from None


def show(x: Any, limit: int = 80) -> str:
    """A value for an error message: strings without quotes (control characters escaped), cut short."""
    r = repr(x)[1:-1] if isinstance(x, str) else repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def kind(x: Any) -> str:
    return {dict: "an object", _Obj: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", type(None): "null"}.get(type(x), "a number")


def is_text(s: Any) -> bool:
    """A str that is valid Unicode (no lone surrogate, which the reference parser refuses)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_uint(x: Any) -> bool:
    return type(x) is int and 0 <= x <= INT64_MAX


def check_metadata(meta: Any, path: Path) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ must be an object mapping strings to strings, found {kind(meta)}")
    if meta.dups:
        raise CheckpointError(f"{path}: __metadata__ key '{show(meta.dups[0])}' appears twice")
    for k, v in meta.items():
        if not is_text(k) or not is_text(v):
            raise CheckpointError(f"{path}: __metadata__ must map strings to strings; entry '{show(k)}' holds "
                                  f"{kind(v)} {show(v)}")
    return dict(meta)


def check_tiling(path: Path, entries: Mapping[str, tuple], data_len: int) -> None:
    """Sorted by offset, the tensors must cover the data section exactly (the safetensors rule)."""
    pos, prev = 0, None
    for b, e, name in sorted((b, e, name) for name, (_, _, b, e) in entries.items()):
        if b < pos:
            raise CheckpointError(f"{path}: tensors '{show(prev)}' and '{show(name)}' overlap in the data section")
        if b > pos:
            raise CheckpointError(f"{path}: tensor '{show(name)}' begins at data byte {b} but "
                                  + (f"'{show(prev)}' ends at {pos}" if prev is not None else "the data begins at 0")
                                  + f": a hole of {b - pos} bytes")
        pos, prev = e, name
    if pos != data_len:
        after = f"after tensor '{show(prev)}'" if prev is not None else "and no tensor"
        raise CheckpointError(f"{path}: {data_len - pos} trailing bytes {after}: the data section must end "
                              "where the last tensor ends (appended or corrupted data)")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a ``config.json`` ...); a :class:`CheckpointError`
    naming the file when it is unreadable, not JSON, or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, found {kind(obj)}")
    return obj


def read_index(index: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(weight_map, metadata) of a ``model.safetensors.index.json``, validated as strictly as a header."""
    try:
        text = index.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{index}: not valid UTF-8 ({e})") from None
    data = strict_json(text, str(index))
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: must be a JSON object, found {kind(data)}")
    if data.dups:
        raise CheckpointError(f"{index}: key '{show(data.dups[0])}' appears twice")
    wm = data.get("weight_map")
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard files, "
                              f"found {kind(wm) if 'weight_map' in data else 'nothing'}")
    if wm.dups:
        raise CheckpointError(f"{index}: tensor '{show(wm.dups[0])}' appears twice in weight_map")
    for name, fname in wm.items():
        where = f"{index}: tensor '{show(name)}'"
        if not is_text(name) or name == "__metadata__":
            raise CheckpointError(f"{where}: not a valid tensor name")
        if not is_text(fname):
            raise CheckpointError(f"{where}: shard must be a file name, found {kind(fname)} '{show(fname)}'")
        if (fname in ("", ".", "..") or Path(fname).name != fname or "/" in fname or "\\" in fname
                or "\0" in fname or not fname.endswith(".safetensors")):
            raise CheckpointError(f"{where}: shard '{show(fname)}' must be a plain *.safetensors file name "
                                  "in the same directory")
    meta = data.get("metadata")
    if meta is None:
        meta = _Obj()
    if not isinstance(meta, dict):
        raise CheckpointError(f"{index}: 'metadata' must be an object, found {kind(meta)}")
    if meta.dups:
        raise CheckpointError(f"{index}: metadata key '{show(meta.dups[0])}' appears twice")
    out = {}
    for k, v in meta.items():
        if isinstance(v, _Number) and v.text not in ("NaN", "Infinity", "-Infinity"):
            v = v.text  # a float or a huge integer: kept as written
        if not is_text(k) or not (is_text(v) or v is None or type(v) in (int, bool)):
            raise CheckpointError(f"{index}: metadata entry '{show(k)}' must be a string, number, boolean or "
                                  f"null, found {kind(v)} {show(v)}")
        out[k] = v if isinstance(v, str) else json.dumps(v)
    return dict(wm), out
