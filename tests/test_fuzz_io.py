"""Hostile inputs, racing writers and killed writers against weightlab's safetensors IO.

* Generated hostile headers: valid files written by ``io.save`` are mutated (value types, nesting,
  repeated keys, offsets, holes, trailing bytes, truncation, huge numbers, bad UTF-8, bit flips).
  Our reader must either raise a ``WeightlabError`` or accept the file, and then the independent
  reference implementation (the ``safetensors`` package) must accept it too with byte-identical
  tensors. The same for sharded indexes (against the tree that was written).
* Racing writers: several processes publish different content to one path at once.
* Killed writers: a writer process is SIGKILLed at a random moment.

Child processes come from a ``forkserver`` that imports weightlab once (a fresh interpreter per
child would import JAX each time); each child is a plain fork of it, so SIGKILL hits a real writer.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_np
from hypothesis import HealthCheck, given, settings, strategies as hst
from safetensors import safe_open

from weightlab import io as wio
from weightlab.errors import (CheckpointError, LeafTypeError, OutputExistsError,
                              OutputPathError, UnknownDTypeError, UsageError, WeightlabError)
from weightlab.io import atomic
from weightlab.io.safetensors import dtype_name

DT_NAMES = sorted(wio.DTYPES)
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------ helpers

def _random_tensor(rng, dt: np.dtype, shape) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        return (rng.integers(0, 2, n) > 0).reshape(shape)
    return rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)  # any bit pattern


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


class Obj(list):
    """A JSON object as (key, value) pairs, so keys may repeat."""


class Raw(str):
    """JSON text inserted as is (``-0``, ``NaN``, 10^5 nested brackets ...)."""


def enc(x, ascii_only: bool = True) -> str:
    if isinstance(x, Raw):
        return str(x)
    if isinstance(x, dict):
        x = Obj(x.items())
    if isinstance(x, Obj):
        return "{" + ",".join((k if isinstance(k, Raw) else json.dumps(k, ensure_ascii=ascii_only)) + ":"
                              + enc(v, ascii_only) for k, v in x) + "}"
    if isinstance(x, list):
        return "[" + ",".join(enc(v, ascii_only) for v in x) + "]"
    return json.dumps(x, ensure_ascii=ascii_only)


def ours(p):
    """(tensors, metadata) as our reader sees them, or None when it raises a WeightlabError. Any
    other exception propagates and fails the test."""
    try:
        with wio.SafetensorsFile(p) as f:
            out = {k: (dtype_name(f.dtype(k)), list(f.shape(k)), f.get(k).tobytes()) for k in f.keys()}
            for k in f.keys():  # the zero-copy path reads the same bytes
                assert f.get(k, copy=False).tobytes() == out[k][2]
            meta = dict(f.metadata)
        with wio.Checkpoint(p) as c:
            assert sorted(c.keys()) == sorted(out)
    except WeightlabError:
        return None
    return out, meta


def theirs(p):
    """(tensors, metadata) as the reference implementation sees them, or the exception it raised."""
    try:
        out = {k: (v["dtype"], list(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(Path(p).read_bytes())}
        with safe_open(str(p), framework="np") as f:
            meta = f.metadata() or {}
            assert set(f.keys()) == set(out)
            for k in f.keys():  # numpy has no float8: those are compared through deserialize only
                assert out[k][0].startswith("F8") or f.get_tensor(k).tobytes() == out[k][2]
    except Exception as e:  # the reference's own error types vary (SafetensorError, ValueError ...)
        return e
    return out, meta


def cross_check(p, counts: collections.Counter, kind: str = "") -> bool:
    """Our verdict must be a WeightlabError, or an acceptance the reference shares byte for byte."""
    mine, ref = ours(p), theirs(p)
    if mine is None:
        counts["rejected by both" if isinstance(ref, Exception) else "rejected by us only (stricter)"] += 1
        return False
    assert not isinstance(ref, Exception), f"{kind}: we accepted a file the reference refuses: {ref!r}"
    assert mine == ref, f"{kind}: accepted by both but read differently"
    counts["accepted by both"] += 1
    return True


# ------------------------------------------------------------------------------ mutations

NUMBERS = hst.one_of(
    hst.integers(-3, 40), hst.integers(-2**70, 2**70), hst.sampled_from([2**63 - 1, 2**63, 2**64, 2**64 - 1, 2**62]),
    hst.floats(allow_nan=True, allow_infinity=True), hst.booleans(), hst.none(), hst.text(max_size=3),
    hst.sampled_from([Raw("-0"), Raw("2.0"), Raw("1e2"), Raw("NaN"), Raw("-Infinity"), Raw("1" * 40),
                      Raw("18446744073709551616"), Raw("1e999")]))
VALUES = hst.recursive(NUMBERS, lambda c: hst.lists(c, max_size=3) | hst.dictionaries(hst.text(max_size=3), c, max_size=3),
                       max_leaves=6)
NAMES = hst.one_of(hst.text(max_size=6), hst.sampled_from(["\ud800", "__metadata__", "", "a\x00b", "é/ü", "t0"]))
DEPTHS = hst.sampled_from([1, 2, 3, 64, 127, 128, 129, 1000, 5000, 100_000])


def _well_formed(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and all(type(x) is int for x in v["shape"] + v["data_offsets"]))


def _pick(draw, hdr: Obj, well_formed: bool = False):
    """Index of a tensor entry (a dict; with ``well_formed``, one whose shape and offsets are ints)."""
    tensors = [i for i, (k, v) in enumerate(hdr)
               if k != "__metadata__" and isinstance(v, dict) and (not well_formed or _well_formed(v))]
    return draw(hst.sampled_from(tensors)) if tensors else None


def m_retype(draw, hdr, data, ctx):
    i = _pick(draw, hdr)
    where = draw(hst.sampled_from(["entry", "field", "element", "metadata", "top"]))
    value = draw(VALUES)
    if where == "top":
        ctx["top"] = value
    elif where == "metadata":
        hdr.append(("__metadata__", draw(hst.one_of(VALUES, hst.dictionaries(hst.text(max_size=3), VALUES, max_size=2)))))
    elif i is None:
        return
    elif where == "entry":
        hdr[i] = (hdr[i][0], value)
    else:
        name, entry = hdr[i]
        entry = dict(entry)
        field = draw(hst.sampled_from(["dtype", "shape", "data_offsets"]))
        if where == "element" and isinstance(entry.get(field), list) and entry[field]:
            lst = list(entry[field])
            lst[draw(hst.integers(0, len(lst) - 1))] = draw(NUMBERS)
            entry[field] = lst
        else:
            entry[field] = value
        hdr[i] = (name, entry)


def m_nest(draw, hdr, data, ctx):
    d, inner = draw(DEPTHS), draw(hst.sampled_from(["1", "[]", '"F32"', "{}"]))
    raw = Raw("[" * d + inner + "]" * d if draw(hst.booleans()) else '{"a":' * d + inner + "}" * d)
    i = _pick(draw, hdr)
    if i is None or draw(hst.booleans()):
        hdr.append((draw(hst.sampled_from(["__metadata__", "deep"])), raw))
    else:
        name, entry = hdr[i]
        hdr[i] = (name, {**entry, draw(hst.sampled_from(["dtype", "shape", "data_offsets", "extra"])): raw})


def m_dup(draw, hdr, data, ctx):
    i = _pick(draw, hdr)
    what = draw(hst.sampled_from(["tensor", "metadata", "field", "metadata_key"]))
    if what == "tensor" and i is not None:
        other = hdr[_pick(draw, hdr)][1]  # the same entry or another one
        hdr.insert(draw(hst.integers(0, len(hdr))), (hdr[i][0], other))
    elif what == "metadata":
        hdr.append(("__metadata__", {"a": "1"}))
        hdr.append(("__metadata__", {"a": "1"}))
    elif what == "field" and i is not None and hdr[i][1]:
        name, entry = hdr[i]
        f = draw(hst.sampled_from(sorted(entry)))
        hdr[i] = (name, Obj(list(entry.items()) + [(f, entry[f])]))
    else:
        hdr.append(("__metadata__", Obj([("k", "v"), ("k", draw(hst.sampled_from(["v", "w"])))])))


def m_offsets(draw, hdr, data, ctx):
    i = _pick(draw, hdr, well_formed=True)
    if i is None:
        return
    name, entry = hdr[i]
    b, e = entry["data_offsets"]
    delta = draw(hst.integers(-16, 16))
    op = draw(hst.sampled_from(["begin", "end", "both", "swap", "copy_other", "huge", "anywhere"]))
    new = {"begin": [b + delta, e], "end": [b, e + delta], "both": [b + delta, e + delta], "swap": [e, b],
           "huge": [b, e + 2**63]}.get(op)
    if op == "anywhere":  # e.g. a zero-size tensor inside another one
        at = draw(hst.integers(0, len(data)))
        new = [at, at + e - b]
    if op == "copy_other":
        new = list(hdr[_pick(draw, hdr, well_formed=True)][1]["data_offsets"])
    hdr[i] = (name, {**entry, "data_offsets": new})


def m_gap(draw, hdr, data, ctx):
    """Insert bytes into the data section and move the offsets of what follows (a hole) or not."""
    k = draw(hst.integers(1, 16))
    at = draw(hst.integers(0, len(data)))
    ctx["data"] = data[:at] + bytes(draw(hst.binary(min_size=k, max_size=k))) + data[at:]
    if draw(hst.booleans()):
        for j, (name, entry) in enumerate(hdr):
            if name != "__metadata__" and _well_formed(entry):
                b, e = entry["data_offsets"]
                hdr[j] = (name, {**entry, "data_offsets": [b + k if b >= at else b, e + k if e > at else e]})


def m_shape(draw, hdr, data, ctx):
    i = _pick(draw, hdr, well_formed=True)
    if i is None:
        return
    name, entry = hdr[i]
    shape = list(entry["shape"])
    numel = math.prod(shape)
    op = draw(hst.sampled_from(["flat", "unsqueeze", "dim", "huge", "zero_huge"]))
    if op == "flat":  # same size: both must accept
        shape = [numel]
    elif op == "unsqueeze":
        shape.insert(draw(hst.integers(0, len(shape))), 1)
    elif op == "dim" and shape:
        j = draw(hst.integers(0, len(shape) - 1))
        shape[j] = max(0, shape[j] + draw(hst.integers(-1, 1)))
    elif op == "huge":
        shape.append(draw(hst.sampled_from([2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 1])))
    else:  # zero-size tensors with enormous dims: numpy and the reference both have limits here
        shape = [0] + [draw(hst.sampled_from([2**31, 2**62, 2**63 - 1])) for _ in range(draw(hst.integers(1, 2)))]
        if draw(hst.booleans()):
            shape.reverse()
    hdr[i] = (name, {**entry, "shape": shape})


def m_dtype(draw, hdr, data, ctx):
    i = _pick(draw, hdr)
    if i is not None:
        name, entry = hdr[i]
        dt = draw(hst.sampled_from(DT_NAMES + ["F7", "f32", "I4", "C64", "F8_E8M0", "", "F32 ", "U1"]))
        hdr[i] = (name, {**entry, "dtype": dt})


def m_fields(draw, hdr, data, ctx):
    i = _pick(draw, hdr)
    if i is not None:
        name, entry = hdr[i]
        entry = dict(entry)
        if entry and draw(hst.booleans()):
            entry.pop(draw(hst.sampled_from(sorted(entry))))
        else:
            # values the reference parses even in a field it ignores: NaN, 1e999 and nesting past 128 it refuses
            entry[draw(hst.sampled_from(["extra", "offsets", "Dtype"]))] = draw(hst.one_of(VALUES, hst.sampled_from(
                [Raw("NaN"), Raw("1e999"), Raw("[" * 130 + "]" * 130), Raw("[" * 100 + "]" * 100), Raw("-0")])))
        hdr[i] = (name, entry)


def m_rename(draw, hdr, data, ctx):
    i = _pick(draw, hdr)
    if i is not None:
        hdr[i] = (draw(NAMES), hdr[i][1])


def m_reorder(draw, hdr, data, ctx):
    hdr[:] = draw(hst.permutations(list(hdr)))


def m_space(draw, hdr, data, ctx):
    ws = hst.sampled_from([" ", "\n", "\t", "\r", "\x0b", "\x00", "\ufeff", "  \n"])
    ctx["prefix"] = draw(ws) if draw(hst.booleans()) else ""
    ctx["suffix"] = draw(ws)


def m_data_flip(draw, hdr, data, ctx):
    if data:
        buf = bytearray(ctx.get("data", data))
        for _ in range(draw(hst.integers(1, 4))):
            buf[draw(hst.integers(0, len(buf) - 1))] ^= draw(hst.integers(1, 255))
        ctx["data"] = bytes(buf)


def m_number_form(draw, hdr, data, ctx):
    """The same number spelled differently: valid JSON that the reference reads as a float (``-0``,
    ``8.0``, ``8e0``) or not at all (``08``, ``+8``), or the same integer with spaces around it."""
    i = _pick(draw, hdr, well_formed=True)
    if i is None:
        return
    name, entry = hdr[i]
    field = draw(hst.sampled_from(["shape", "data_offsets"]))
    if not entry[field]:
        return
    lst = list(entry[field])
    zeros = [k for k, x in enumerate(lst) if x == 0]  # "-0" is the spelling most likely to slip through
    j = draw(hst.sampled_from(zeros)) if zeros and draw(hst.booleans()) else draw(hst.integers(0, len(lst) - 1))
    v = lst[j]
    lst[j] = Raw(draw(hst.sampled_from([f"-{v}", f"{v}.0", f"{v}e0", f"{v}E+0", f"0{v}", f"+{v}", f" {v}\n"])))
    hdr[i] = (name, {**entry, field: lst})


def m_unicode(draw, hdr, data, ctx):
    """Escapes in names and metadata: lone or paired surrogates, non-BMP characters, control escapes."""
    text = draw(hst.sampled_from([r"\ud800", r"\udfff", r"\ud83d\ude00", r"\ude00\ud83d", r"\u0000", r"\u00e9",
                                  r"\ud800x", r"\/", r"\\"]))
    where = draw(hst.sampled_from(["name", "meta_key", "meta_value"]))
    i = _pick(draw, hdr)
    quoted = '"t' + text + '"'  # a raw JSON string: the escapes reach the parsers as written
    if where == "name" and i is not None:
        hdr[i] = (Raw(quoted), hdr[i][1])
    else:
        hdr[:] = [kv for kv in hdr if kv[0] != "__metadata__"]
        hdr.append(("__metadata__", Raw("{" + (quoted + ':"v"' if where == "meta_key" else '"k":' + quoted) + "}")))


def m_zero_size(draw, hdr, data, ctx):
    """A new zero-size tensor at any offset: valid only on a tensor boundary, never inside one."""
    at = draw(hst.one_of(hst.integers(0, len(data)), hst.sampled_from(
        [b for _, v in hdr if _well_formed(v) for b in v["data_offsets"]] or [0])))
    shape = draw(hst.sampled_from([[0], [3, 0], [0, 2**40], [2**63 - 1, 0], [0, 2**62, 4], [2**62, 4, 0],
                                   [0, 2**31, 2**31, 4], [2**32, 0, 2**32]]))
    hdr.insert(draw(hst.integers(0, len(hdr))), ("zero", {"dtype": draw(hst.sampled_from(DT_NAMES)), "shape": shape,
                                                         "data_offsets": [at, at]}))


HEADER_MUTATIONS = [m_zero_size, m_retype, m_nest, m_dup, m_offsets, m_gap, m_shape, m_dtype, m_fields, m_rename, m_reorder,
                    m_space, m_data_flip, m_number_form, m_unicode]


def b_trail(draw, raw):
    return raw + draw(hst.binary(min_size=1, max_size=16))


def b_truncate(draw, raw):
    return raw[:draw(hst.integers(0, len(raw) - 1))]


def b_flip(draw, raw):
    (n,) = struct.unpack("<Q", raw[:8])
    buf = bytearray(raw)
    for _ in range(draw(hst.integers(1, 3))):
        buf[draw(hst.integers(0, min(len(buf), 8 + n) - 1))] ^= 1 << draw(hst.integers(0, 7))
    return bytes(buf)


def b_length(draw, raw):
    (n,) = struct.unpack("<Q", raw[:8])
    new = draw(hst.one_of(hst.integers(0, 2**64 - 1), hst.integers(max(0, n - 9), n + 9), hst.just(0)))
    return struct.pack("<Q", new) + raw[8:]


def b_bad_utf8(draw, raw):
    (n,) = struct.unpack("<Q", raw[:8])
    at = draw(hst.integers(8, 8 + n))
    bad = draw(hst.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc0\xaf"]))
    return struct.pack("<Q", n + len(bad)) + raw[8:at] + bad + raw[at:]


BYTE_MUTATIONS = [b_trail, b_truncate, b_flip, b_length, b_bad_utf8]


@hst.composite
def saved_tree(draw):
    rng = np.random.default_rng(draw(hst.integers(0, 2**32 - 1)))
    tree = {}
    for i in range(draw(hst.integers(1, 4))):
        name = draw(hst.sampled_from(["w", "enc/k", "a.weight", "é", "z" * 12])) + f"_{i}"
        dt = wio.DTYPES[draw(hst.sampled_from(DT_NAMES))]
        tree[name] = _random_tensor(rng, dt, tuple(draw(hst.lists(hst.integers(0, 4), max_size=3))))
    meta = draw(hst.dictionaries(hst.text(max_size=4), hst.text(max_size=6), max_size=2))
    return tree, meta


def test_unmutated_files_agree_both_ways(tmp_path):
    """Files from our writer and from the reference writer are accepted by both, byte for byte."""
    counts = collections.Counter()

    @settings(max_examples=40, **SETTINGS)
    @given(saved_tree(), hst.booleans())
    def run(tm, reference_writer):
        tree, meta = tm
        p = tmp_path / "m.safetensors"
        if reference_writer:
            p.write_bytes(st_np.save(tree, metadata=meta or None))
        else:
            wio.save(p, tree, metadata=meta, overwrite=True)
        assert cross_check(p, counts)
        got = ours(p)[0]
        assert got == {k: (dtype_name(v.dtype), list(v.shape), v.tobytes()) for k, v in tree.items()}

    run()
    assert counts["accepted by both"] >= 10


def test_hostile_headers_cross_checked_against_reference(tmp_path):
    counts = collections.Counter()

    @settings(max_examples=800, **SETTINGS)
    @given(saved_tree(), hst.data())
    def run(tm, data):
        tree, meta = tm
        p = tmp_path / "m.safetensors"
        wio.save(p, tree, metadata=meta, overwrite=True)
        hdr_json, payload = _split(p.read_bytes())
        hdr, ctx = Obj(hdr_json.items()), {}
        n_muts = data.draw(hst.sampled_from([1, 1, 1, 2]), label="number of header mutations")
        muts = [data.draw(hst.sampled_from(HEADER_MUTATIONS), label="header mutation") for _ in range(n_muts)]
        for m in muts:
            m(data.draw, hdr, payload, ctx)
        text = ctx.get("prefix", "") + enc(ctx["top"] if "top" in ctx else hdr,
                                           data.draw(hst.booleans(), label="ascii")) + ctx.get("suffix", "")
        if data.draw(hst.booleans(), label="pad"):
            text += " " * (-len(text.encode("utf-8", "surrogatepass")) % 8)
        hbytes = text.encode("utf-8", "surrogatepass")
        raw = struct.pack("<Q", len(hbytes)) + hbytes + ctx.get("data", payload)
        bm = data.draw(hst.sampled_from([None] * 10 + BYTE_MUTATIONS), label="byte mutation")  # 1 in 3
        if bm is not None and len(raw) > 8:
            raw = bm(data.draw, raw)
        p.write_bytes(raw)
        cross_check(p, counts, "+".join([m.__name__ for m in muts] + ([bm.__name__] if bm else [])) or "none")

    run()
    print(f"\nhostile headers: {dict(counts)}")
    assert counts["accepted by both"] > 20 and counts["rejected by both"] > 200  # both classes exercised


def test_hostile_indexes(tmp_path):
    """A sharded index that is mutated either fails with a WeightlabError (at open or on the first read
    of a tensor) or every tensor it lists reads back exactly as written."""
    counts = collections.Counter()
    rng = np.random.default_rng(0)
    tree = {f"l{i}/w": rng.standard_normal(64).astype(np.float32) for i in range(4)}
    src = wio.save_sharded(tmp_path / "src", tree, max_shard_bytes=300)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    index = json.loads((src / wio.INDEX_NAME).read_text())
    odd_names = ["../model-00001-of-00004.safetensors", "/etc/passwd", "sub/x.safetensors", "", ".", "..",
                 "model-00001-of-00004.safetensors.part", wio.INDEX_NAME, "missing.safetensors", "\ud800.safetensors"]

    @settings(max_examples=200, **SETTINGS)
    @given(hst.data())
    def run(data):
        wm = Obj(index["weight_map"].items())
        top = Obj([("metadata", index["metadata"]), ("weight_map", wm)])
        op = data.draw(hst.sampled_from(["retype", "value", "move", "dup", "nest", "drop", "metadata", "bytes"]))
        j = data.draw(hst.integers(0, len(wm) - 1))
        if op == "retype":
            top[data.draw(hst.integers(0, 1))] = (top[0][0], data.draw(VALUES))
        elif op == "value":
            wm[j] = (wm[j][0], data.draw(hst.one_of(hst.sampled_from(odd_names), VALUES)))
        elif op == "move":  # the tensor now said to live in a shard that lacks it
            wm[j] = (wm[j][0], data.draw(hst.sampled_from(shards)))
        elif op == "dup":
            which = data.draw(hst.sampled_from(["tensor", "weight_map", "metadata"]))
            (wm if which == "tensor" else top).append({"tensor": wm[j], "weight_map": top[1], "metadata": top[0]}[which])
        elif op == "nest":
            d = data.draw(DEPTHS)
            wm[j] = (wm[j][0], Raw("[" * d + "]" * d))
        elif op == "drop":
            del wm[j]
        elif op == "metadata":
            top[0] = ("metadata", data.draw(VALUES))
        text = enc(top, data.draw(hst.booleans())).encode("utf-8", "surrogatepass")
        if op == "bytes":
            text = b_bad_utf8(data.draw, struct.pack("<Q", len(text)) + text)[8:]
        d = tmp_path / "ckpt"
        d.mkdir(exist_ok=True)
        for s in shards:
            if not (d / s).exists():
                os.link(src / s, d / s)
        (d / wio.INDEX_NAME).write_bytes(text)
        try:
            with wio.Checkpoint(d) as c:
                got = {k: c[k] for k in c.keys()}
        except WeightlabError:
            counts["rejected"] += 1
            return
        counts["accepted"] += 1
        for k, v in got.items():
            assert k in tree and v.tobytes() == tree[k].tobytes()

    run()
    print(f"\nhostile indexes: {dict(counts)}")
    assert counts["accepted"] > 5 and counts["rejected"] > 50, counts


# ------------------------------------------------------------------------------ specific header cases

def _file(tmp_path, header, data=b"", name="h.safetensors"):
    raw = header if isinstance(header, bytes) else enc(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("case,header,data,match", [
    ("dup tensor", Obj([("t", T), ("t", T)]), b"\0" * 8, "'t' appears twice"),
    ("dup metadata", Obj([("__metadata__", {}), ("__metadata__", {}), ("t", T)]), b"\0" * 8, "__metadata__"),
    ("dup field", {"t": Obj([("dtype", "F32"), ("dtype", "F32"), ("shape", [2]), ("data_offsets", [0, 8])])},
     b"\0" * 8, "field 'dtype'"),
    ("hole", {"t": {**T, "data_offsets": [4, 12]}}, b"\0" * 12, "hole"),
    ("hole between", {"t": T, "u": {**T, "data_offsets": [12, 20]}}, b"\0" * 20, "'u'.*hole"),
    ("trailing", {"t": T}, b"\0" * 9, "trailing"),
    ("list dtype", {"t": {**T, "dtype": ["F32"]}}, b"\0" * 8, "'t'.*dtype"),
    ("dict dtype", {"t": {**T, "dtype": {"a": 1}}}, b"\0" * 8, "'t'.*dtype"),
    ("int dtype", {"t": {**T, "dtype": 3}}, b"\0" * 8, "'t'.*dtype"),
    ("deep", Raw('{"t":' + "[" * 100_000 + "]" * 100_000 + "}"), b"", "nested too deeply"),
    ("2^64 dim", {"t": {**T, "shape": [2**64, 0]}}, b"\0" * 8, "'t'.*shape"),
    ("2^63 dim", {"t": {**T, "shape": [2**63, 0], "data_offsets": [0, 0]}}, b"", "'t'.*shape"),
    ("too big to address", {"t": {**T, "shape": [2**62, 0], "data_offsets": [0, 0]}}, b"", "'t'.*too large"),
    ("entry not dict", {"t": [1, 2]}, b"", "'t'.*entry"),
    ("metadata not strings", {"__metadata__": {"a": 1}, "t": T}, b"\0" * 8, "__metadata__"),
    ("metadata list", {"__metadata__": [], "t": T}, b"\0" * 8, "__metadata__"),
    ("negative zero", {"t": {**T, "data_offsets": [Raw("-0"), 8]}}, b"\0" * 8, "'t'.*data_offsets"),
    ("float dim", {"t": {**T, "shape": [Raw("2.0")]}}, b"\0" * 8, "'t'.*shape"),
    ("extra field", {"t": {**T, "x": 1}}, b"\0" * 8, "'t'.*unknown"),
    ("header length 0", b"", b"{}", "header length 0"),
])
def test_header_cases_named_errors(tmp_path, case, header, data, match):
    p = _file(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=match) as ei:
        wio.SafetensorsFile(p)
    assert str(p) in str(ei.value)
    assert ours(p) is None


def test_unknown_dtype_subclass_and_zero_size_tensors(tmp_path):
    with pytest.raises(UnknownDTypeError, match="'t'"):
        wio.SafetensorsFile(_file(tmp_path, {"t": {**T, "dtype": "F7"}}, b"\0" * 8))
    ok = {"z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}, "t": T,
          "e": {"dtype": "U8", "shape": [2**63 - 1, 0], "data_offsets": [0, 0]}}
    p = _file(tmp_path, ok, b"\1" * 8, "ok.safetensors")
    assert cross_check(p, collections.Counter())


def test_write_errors_are_typed(tmp_path):
    with pytest.raises(LeafTypeError, match="'a'"):
        wio.save(tmp_path / "x.safetensors", {"a": object()})
    with pytest.raises(UsageError, match="metadata keys"):
        wio.save(tmp_path / "x.safetensors", {"a": np.ones(2)}, metadata={1: "x"})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ quantized layouts

def _quantized(tmp_path):
    import jax.numpy as jnp

    from weightlab import quant

    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32)), jnp.float32)
    q = {"dense/kernel": quant.quantize_array(w, "rtn", bits=4, group_size=16), "bias": jnp.ones(3)}
    p = quant.save(tmp_path / "q.safetensors", q, overwrite=True)
    with wio.SafetensorsFile(p) as f:
        return {k: f[k] for k in f.keys()}, dict(f.metadata)


@pytest.mark.parametrize("bad", ["missing component", "format", "dtype", "shape", "children", "not json",
                                 "clash"])
def test_quantized_layout_validation(tmp_path, bad):
    from weightlab.quant import METADATA_KEY
    from weightlab.quant import checkpoint as qc

    tensors, meta = _quantized(tmp_path)
    specs = json.loads(meta[METADATA_KEY])
    spec = specs["dense/kernel"]
    if bad == "missing component":
        tensors.pop("dense/kernel/scale")
    elif bad == "format":
        spec["format"]["name"] = "int17"
    elif bad == "dtype":
        spec["dtype"] = "float99"
    elif bad == "shape":
        spec["shape"] = [16, "32"]
    elif bad == "children":
        spec["children"] = "codes"
    elif bad == "clash":
        tensors["dense/kernel"] = np.ones(2, np.float32)
    meta[METADATA_KEY] = "{not json" if bad == "not json" else json.dumps(specs)
    p = wio.save(tmp_path / "bad.safetensors", tensors, metadata=meta)
    with pytest.raises(CheckpointError, match="dense/kernel" if bad != "not json" else METADATA_KEY):
        qc.load(p)
    c = wio.Checkpoint(p)
    with pytest.raises(CheckpointError, match="dense/kernel" if bad != "not json" else METADATA_KEY):
        qc.DequantizedCheckpoint(c)
    assert c.bytes_read == 0  # refused before any tensor was read


def test_quantized_layout_components_that_do_not_fit(tmp_path):
    from weightlab.quant import METADATA_KEY
    from weightlab.quant import checkpoint as qc

    tensors, meta = _quantized(tmp_path)
    good = qc.DequantizedCheckpoint(wio.Checkpoint(tmp_path / "q.safetensors"))
    assert good.get("dense/kernel").shape == (16, 32) and good.dtype("dense/kernel") == np.float32
    specs = json.loads(meta[METADATA_KEY])
    specs["dense/kernel"]["shape"] = [16, 33]  # valid types, but the stored codes do not fit
    meta[METADATA_KEY] = json.dumps(specs)
    p = wio.save(tmp_path / "bad.safetensors", tensors, metadata=meta)
    d = qc.DequantizedCheckpoint(wio.Checkpoint(p))
    with pytest.raises(CheckpointError, match="dense/kernel"):
        d.get("dense/kernel")


# ------------------------------------------------------------------------------ output checks

def test_check_output(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="parent directory .*missing.* does not exist"):
        wio.check_output(tmp_path / "missing" / "o.safetensors")
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        wio.check_output(tmp_path / "f" / "o.safetensors")
    with pytest.raises(OutputPathError, match="is a file, not a directory"):
        wio.check_output(tmp_path / "f" / "deeper" / "o.safetensors")
    with pytest.raises(OutputExistsError):
        wio.check_output(tmp_path / "f")
    assert wio.check_output(tmp_path / "f", overwrite=True) == tmp_path / "f"
    assert wio.check_output(tmp_path / "new") == tmp_path / "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe is gone
    # the API writers create missing parents, but a file in the way is an OutputPathError
    with pytest.raises(OutputPathError, match="is a file"):
        wio.save(tmp_path / "f" / "o.safetensors", {"a": np.ones(2)})
    with pytest.raises(OutputPathError, match="is a file"):
        wio.save_sharded(tmp_path / "f" / "d", {"a": np.ones(2)})


def test_check_output_unwritable_location(tmp_path, monkeypatch):
    # Root ignores permission bits, so chmod cannot make a directory unwritable here. sysfs refuses
    # file creation to everyone, root included: a truly unwritable place when it exists.
    sysfs_refuses = False
    if os.path.isdir("/sys"):
        try:
            os.close(os.open("/sys/.weightlab-test", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink("/sys/.weightlab-test")  # pragma: no cover - an unusual, writable /sys
        except OSError:
            sysfs_refuses = True
    if sysfs_refuses:
        with pytest.raises(OutputPathError, match="not writable"):
            wio.check_output("/sys/weightlab-probe.safetensors")
    # ... and everywhere: the probe's own failure (what a read-only filesystem returns) is simulated.
    real_open = os.open

    def refuse(path, flags, *a, **k):
        if atomic.PARTIAL_TAG in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(atomic.os, "open", refuse)
    with pytest.raises(OutputPathError, match="not writable.*Read-only file system"):
        wio.check_output(tmp_path / "o.safetensors")
    with pytest.raises(OutputPathError, match="not writable"):
        wio.save(tmp_path / "o.safetensors", {"a": np.ones(2)})
    monkeypatch.setattr(atomic.os, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(OutputPathError, match="not writable"):
        wio.save_sharded(tmp_path / "d", {"a": np.ones(2)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fallback", ["renameat2", "link", "exclusive-create"])
def test_publish_never_replaces(tmp_path, monkeypatch, fallback):
    if fallback == "renameat2" and sys.platform.startswith("linux"):
        assert atomic._libc_renameat2() is not None  # glibc >= 2.28: the primary path really runs here
    if fallback != "renameat2":
        monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    if fallback == "exclusive-create":
        monkeypatch.setattr(atomic.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    p, d = tmp_path / "o.safetensors", tmp_path / "d"
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic.atomic_file(p) as tmp:
            wio.save(p, {"a": np.full(2, 1.0)})  # another job publishes while we write ...
            tmp.write_bytes(b"late")
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic.atomic_dir(d) as tmp:
            wio.save_sharded(d, {"a": np.full(2, 1.0)})
            (tmp / "x").write_text("late")
    for target in (p, d):  # ... and keeps its output; our temporaries are gone
        assert wio.load(target, as_jax=False)["a"][0] == 1.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "o.safetensors"]
    monkeypatch.undo()
    wio.save(p, {"a": np.full(2, 2.0)}, overwrite=True)
    wio.save_sharded(d, {"a": np.full(2, 2.0)}, overwrite=True)
    assert wio.load(p, as_jax=False)["a"][0] == 2.0 and wio.load(d, as_jax=False)["a"][0] == 2.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "o.safetensors"]


def test_overwrite_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    d = wio.save_sharded(tmp_path / "d", {"a": np.ones(2)})
    wio.save_sharded(d, {"b": np.ones(2)}, overwrite=True)
    assert list(wio.Checkpoint(d).keys()) == ["b"] and [x.name for x in tmp_path.iterdir()] == ["d"]


def test_sweep_removes_only_dead_temporaries(tmp_path):
    out = tmp_path / "m.safetensors"
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = atomic._host()
    names = {"dead": f".m.safetensors{atomic.PARTIAL_TAG}{host}.{dead.pid}.ab12.tmp",
             "alive": f".m.safetensors{atomic.PARTIAL_TAG}{host}.{os.getpid()}.cd34.tmp",
             "parent": f".m.safetensors{atomic.PARTIAL_TAG}{host}.{os.getppid()}.ef56.tmp",
             "other host": f".m.safetensors{atomic.PARTIAL_TAG}elsewhere.{dead.pid}.0123.tmp",
             "other output": f".n.safetensors{atomic.PARTIAL_TAG}{host}.{dead.pid}.4567.tmp"}
    for n in names.values():
        (tmp_path / n).write_bytes(b"\0" * 16)
    (tmp_path / names["dead"]).unlink()
    (tmp_path / names["dead"]).mkdir()  # a dead directory temporary, with content
    (tmp_path / names["dead"] / "model-00001-of-00001.safetensors.part").write_bytes(b"\0" * 64)
    for n in names.values():  # partial names are refused by name, before their content is even read
        with pytest.raises(CheckpointError, match="unfinished temporary"):
            wio.Checkpoint(tmp_path / n)
    wio.save(out, {"a": np.ones(2)})
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"m.safetensors"} | {v for k, v in names.items() if k != "dead"}


# ------------------------------------------------------------------------------ processes

KINDS = ["save", "save_sharded", "shard_writer", "planned"]
_CTX = None


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["weightlab.io", "weightlab.tree", "jax", __name__])
    return _CTX


def _content(seed: int, mib: float = 3) -> dict:
    rng = np.random.default_rng(seed)
    n = 12
    return {f"layer_{i}/w": rng.standard_normal(int(mib * 2**20) // 4 // n).astype(np.float32) for i in range(n)}


def _write(kind: str, path, seed: int, overwrite: bool = False, mib: float = 3, tree=None):
    tree = _content(seed, mib) if tree is None else tree
    big = 2**19
    if kind == "save":
        wio.save(path, tree, overwrite=overwrite)
    elif kind == "save_sharded":
        wio.save_sharded(path, tree, max_shard_bytes=big, overwrite=overwrite)
    elif kind == "shard_writer":
        with wio.ShardWriter(path, max_shard_bytes=big, overwrite=overwrite) as w:
            for k, v in tree.items():
                w.add(k, v)
    else:
        with wio.PlannedShardWriter(path, [(k, v.shape, v.dtype) for k, v in tree.items()], max_shard_bytes=big,
                                    overwrite=overwrite) as w:
            for k, v in tree.items():
                w.add(k, v)


def _matches(path, seed: int, mib: float = 3) -> bool:
    got = wio.load(path, as_jax=False)
    flat = {f"{a}/{b}": v for a, sub in got.items() for b, v in sub.items()}
    want = _content(seed, mib)
    return flat.keys() == want.keys() and all(np.array_equal(flat[k], want[k]) for k in want)


def _race_worker(kind, path, seed, barrier, fallback, results):
    from weightlab.io import safetensors as st, shards

    if fallback:
        atomic._renameat2 = lambda *a: False
    real, waited = st._write_file, []

    def write_then_wait(*a, **k):  # every writer has its data written before any of them publishes
        real(*a, **k)
        if not waited:
            waited.append(True)
            barrier.wait(60)

    st._write_file = shards._write_file = write_then_wait
    try:
        _write(kind, path, seed, mib=1)
        results.put((seed, "ok"))
    except BaseException as e:  # reported, checked by the parent
        results.put((seed, type(e).__name__))


@pytest.mark.parametrize("kind,fallback", [("save", False), ("save_sharded", False), ("save", True),
                                           ("save_sharded", True)])
def test_concurrent_writers_exactly_one_wins(tmp_path, kind, fallback):
    ctx, n = _ctx(), 3
    out = tmp_path / ("o.safetensors" if kind == "save" else "o")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(kind, out, seed, barrier, fallback, results)) for seed in range(n)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert sorted(got.values()) == ["OutputExistsError"] * (n - 1) + ["ok"], got
    winner = next(s for s, r in got.items() if r == "ok")
    assert _matches(out, winner, mib=1)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporaries remain


def _kill_worker(kind, path, seed, ready):
    tree = _content(seed)
    ready.set()
    _write(kind, path, seed, tree=tree)


def _timed_worker(kind, path, seed, results):
    tree = _content(seed)
    t = time.perf_counter()
    _write(kind, path, seed, tree=tree)
    results.put(time.perf_counter() - t)


def _refused_or_exact(f: Path, seed: int):
    """None if our reader refuses the file ``f``, True if every tensor it holds is exactly the one
    the writer meant to write, False otherwise (e.g. a pre-sized shard whose data is still zeros)."""
    want = _content(seed)
    try:
        with wio.SafetensorsFile(f) as sf:
            return all(k in want and np.array_equal(sf[k], want[k]) for k in sf.keys())
    except WeightlabError:
        return None


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_mid_write_leaves_nothing_that_loads_wrong(tmp_path, kind):
    ctx = _ctx()
    rnd = random.Random(kind)
    results = ctx.Queue()
    durations = []
    for c in range(2):  # the warm (second) run is the typical one
        calib = ctx.Process(target=_timed_worker, args=(kind, tmp_path / f"calib{c}", 99, results))
        calib.start()
        durations.append(results.get(timeout=120))
        calib.join(30)
    duration = min(durations)
    outcomes = collections.Counter()
    for trial in range(5):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        out = d / ("o.safetensors" if kind == "save" else "o")
        ready = ctx.Event()
        p = ctx.Process(target=_kill_worker, args=(kind, out, trial, ready))
        p.start()
        assert ready.wait(60)
        time.sleep(rnd.uniform(0, duration))
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # finished first (children of the forkserver are reaped by it)
            pass
        p.join(30)
        if out.exists():  # published before the kill: complete and correct
            assert _matches(out, trial)
        leftovers = [x for x in d.iterdir() if x != out]
        outcomes["published" if out.exists() else "leftover" if leftovers else "nothing"] += 1
        for t in leftovers:
            assert atomic.is_partial(t), t
            with pytest.raises(WeightlabError):
                wio.Checkpoint(t)
            # the content alone must not pass for a checkpoint either: each file, under a neutral name,
            # is refused or complete and exact (killed after a shard was sealed, or just before publishing)
            for f in ([t] if t.is_file() else [x for x in t.iterdir() if not x.name.startswith(wio.INDEX_NAME)]):
                copy = d / "copy.safetensors"
                os.link(f, copy)
                ok = _refused_or_exact(copy, trial)
                copy.unlink()
                assert ok in (None, True), f"{f.name}: accepted with wrong content"
                outcomes["file refused" if ok is None else "file complete"] += 1
        _write(kind, out, 1000 + trial, overwrite=out.exists())  # the next write sweeps and succeeds
        assert _matches(out, 1000 + trial)
        assert [x.name for x in d.iterdir()] == [out.name]
    print(f"\n{kind}: write takes {duration * 1e3:.0f} ms; {dict(outcomes)}")
