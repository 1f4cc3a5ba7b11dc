import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_np
from safetensors import safe_open

from weightlab import io as wio
from weightlab.errors import (CheckpointError, CheckpointNotFoundError, DTypeMismatchError, OutputExistsError,
                              ShapeMismatchError, StructureMismatchError, UnknownDTypeError)

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
          np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.bool_]


def rand(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) > 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dt)
    return (rng.standard_normal(shape) * 3).astype(dt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_roundtrip_every_dtype(tmp_path, dtype):
    tree = {"enc": {"layer_0": {"kernel": rand((5, 7), dtype), "scalar": rand((), dtype)}}, "empty": rand((0, 3), dtype)}
    f = wio.save(tmp_path / "m.safetensors", tree, metadata={"recipe": {"method": "ties", "k": 0.2}})
    back = wio.load(f, like=tree, as_jax=False)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    assert json.loads(wio.read_metadata(f)["recipe"]) == {"method": "ties", "k": 0.2}


def test_roundtrip_jax_pytree_flavours(tmp_path, flavour):
    name, t = flavour
    if name == "equinox":
        import equinox as eqx
        t = eqx.filter(t, eqx.is_array)
    f = wio.save(tmp_path / f"{name}.safetensors", t)
    back = wio.load(f, like=t)
    assert jax.tree.structure(back) == jax.tree.structure(t)
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_non_array_leaf_refused_before_write(tmp_path):
    import equinox as eqx
    m = eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0))
    with pytest.raises(TypeError, match="activation"):
        wio.save(tmp_path / "x.safetensors", m)
    assert not any(tmp_path.iterdir())
    with pytest.raises(UnknownDTypeError, match="w"):
        wio.save(tmp_path / "x.safetensors", {"w": jnp.zeros(4, jnp.int4)})


def test_interop_with_reference_library(tmp_path):
    tree = {"a/b": rand((3, 4), np.float32), "c": rand((2,), np.int8), "bf": rand((2, 2), ml_dtypes.bfloat16)}
    wio.save(tmp_path / "ours.safetensors", tree)
    with safe_open(tmp_path / "ours.safetensors", framework="flax") as f:
        for k, v in tree.items():
            np.testing.assert_array_equal(np.asarray(f.get_tensor(k)), v)
    theirs = {"x.weight": rand((4, 4), np.float16), "y.bias": rand((3,), np.int32)}
    st_np.save_file(theirs, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    f = wio.SafetensorsFile(tmp_path / "theirs.safetensors")
    assert f.metadata == {"format": "pt"}
    for k, v in theirs.items():
        np.testing.assert_array_equal(f[k], v)


def test_lazy_single_file_reads_only_requested(tmp_path):
    tree = {"big": rand((256, 256), np.float32), "small": rand((4,), np.float32)}
    wio.save(tmp_path / "m.safetensors", tree)
    with wio.open_checkpoint(tmp_path / "m.safetensors") as c:
        assert c.shape("big") == (256, 256) and c.dtype("big") == np.float32
        assert c.bytes_read == 0
        np.testing.assert_array_equal(c["small"], tree["small"])
        assert c.bytes_read == 16


def test_sharded_layout_and_lazy_shards(tmp_path):
    tree = {f"layer_{i}": {"kernel": rand((64, 64), np.float32, i)} for i in range(6)}
    out = wio.save_sharded(tmp_path / "ckpt", tree, max_shard_bytes=20_000, metadata={"who": "test"},
                           extra_files={"recipe.yaml": "merge_method: linear\n"})
    index = json.loads((out / wio.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 6 and shards[0] == "model-00001-of-00006.safetensors"
    assert (out / "recipe.yaml").read_text().startswith("merge_method")
    os.remove(out / index["weight_map"]["layer_5/kernel"])  # a lost shard only hurts its own tensors...
    with pytest.raises(CheckpointNotFoundError, match="layer_5|model-00006"):
        wio.open_checkpoint(out)
    tree2 = {f"layer_{i}": {"kernel": rand((64, 64), np.float32, i)} for i in range(6)}
    out2 = wio.save_sharded(tmp_path / "ckpt2", tree2, max_shard_bytes=20_000)
    with wio.open_checkpoint(out2) as c:
        assert c.opened_files == []
        np.testing.assert_array_equal(c["layer_3/kernel"], tree2["layer_3"]["kernel"])
        assert c.opened_files == [c.shard_of("layer_3/kernel")]
        assert c.bytes_read == 64 * 64 * 4
    back = wio.load(out2, like=tree2, as_jax=False)
    np.testing.assert_array_equal(back["layer_5"]["kernel"], tree2["layer_5"]["kernel"])


def test_never_overwrites_silently(tmp_path):
    p = tmp_path / "m.safetensors"
    wio.save(p, {"a": np.ones(2, np.float32)})
    with pytest.raises(OutputExistsError):
        wio.save(p, {"a": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(wio.load(p, as_jax=False)["a"], np.ones(2))
    wio.save(p, {"a": np.zeros(2, np.float32)}, overwrite=True)
    np.testing.assert_array_equal(wio.load(p, as_jax=False)["a"], np.zeros(2))
    wio.save_sharded(tmp_path / "d", {"a": np.ones(2, np.float32)})
    with pytest.raises(OutputExistsError):
        wio.save_sharded(tmp_path / "d", {"a": np.ones(2, np.float32)})
    wio.save_sharded(tmp_path / "d", {"b": np.ones(2, np.float32)}, overwrite=True)
    assert list(wio.open_checkpoint(tmp_path / "d").keys()) == ["b"]


def test_interrupted_write_leaves_nothing_loadable(tmp_path):
    """Kill the writer process mid-way: the final name must not exist (no partial file)."""
    target = tmp_path / "big.safetensors"
    code = f"""
import os, numpy as np
import weightlab.io.safetensors as s
orig = s._write_file
def slow(fname, tensors, meta):
    orig(fname, tensors[:1], meta)   # part of the data is on disk under the temporary name...
    os._exit(9)                      # ...and the process dies before the rename
s._write_file = slow
s.save({str(target)!r}, {{"a": np.ones((1000, 100), np.float32), "b": np.ones(10, np.float32)}})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9, r.stderr.decode()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    for f in leftovers:
        assert f.name.startswith(".") and f.name.endswith(".tmp")
    with pytest.raises(CheckpointNotFoundError):
        wio.load(target)


def test_exception_during_write_cleans_up(tmp_path):
    class Boom(np.ndarray):
        pass
    with pytest.raises(UnknownDTypeError):
        wio.save(tmp_path / "x.safetensors", {"ok": np.ones(3, np.float32), "bad": np.array(["s"])})
    assert list(tmp_path.iterdir()) == []


def _write_raw(path, header_len_bytes, header=b"", data=b""):
    path.write_bytes(header_len_bytes + header + data)
    return path


@pytest.mark.parametrize("case", ["empty", "short", "huge_len", "len_past_eof", "bad_json", "not_object",
                                  "unknown_dtype", "bad_shape", "offsets_mismatch", "offsets_past_eof", "overlap",
                                  "bad_metadata", "negative_offsets"])
def test_corrupted_headers_raise_typed_errors(tmp_path, case):
    def hdr(obj):
        raw = json.dumps(obj).encode()
        return struct.pack("<Q", len(raw)), raw

    p = tmp_path / f"{case}.safetensors"
    good = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "empty":
        _write_raw(p, b"")
    elif case == "short":
        _write_raw(p, b"\x01\x02")
    elif case == "huge_len":  # a hostile length must not make us allocate 2**63 bytes
        _write_raw(p, struct.pack("<Q", 2**63 - 1), b"{}")
    elif case == "len_past_eof":
        _write_raw(p, struct.pack("<Q", 1000), b"{}")
    elif case == "bad_json":
        _write_raw(p, struct.pack("<Q", 5), b"{nope")
    elif case == "not_object":
        _write_raw(p, *hdr([1, 2]))
    elif case == "unknown_dtype":
        _write_raw(p, *hdr({"t": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8)
    elif case == "bad_shape":
        _write_raw(p, *hdr({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), b"\0" * 8)
    elif case == "offsets_mismatch":
        _write_raw(p, *hdr({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), b"\0" * 12)
    elif case == "offsets_past_eof":
        _write_raw(p, *hdr(good), b"\0" * 4)
    elif case == "overlap":
        _write_raw(p, *hdr({"t": good["t"], "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), b"\0" * 12)
    elif case == "bad_metadata":
        _write_raw(p, *hdr({**good, "__metadata__": {"a": 1}}), b"\0" * 8)
    elif case == "negative_offsets":
        _write_raw(p, *hdr({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}), b"\0" * 8)
    err = UnknownDTypeError if case == "unknown_dtype" else CheckpointError
    with pytest.raises(err):
        wio.load(p)


def test_load_like_checks_before_reading(tmp_path):
    tree = {"enc": {"kernel": rand((4, 4), np.float32)}}
    p = wio.save(tmp_path / "m.safetensors", tree)
    with pytest.raises(ShapeMismatchError, match="enc/kernel"):
        wio.load(p, like={"enc": {"kernel": np.zeros((4, 5), np.float32)}})
    with pytest.raises(DTypeMismatchError, match="enc/kernel"):
        wio.load(p, like={"enc": {"kernel": np.zeros((4, 4), np.float16)}})
    with pytest.raises(StructureMismatchError, match="enc/bias"):
        wio.load(p, like={"enc": {"kernel": np.zeros((4, 4), np.float32), "bias": np.zeros(4, np.float32)}})
    with pytest.raises(CheckpointNotFoundError):
        wio.load(tmp_path / "nope.safetensors")


def test_load_into_sharded_target(tmp_path):
    from weightlab import shard as ws
    mesh = ws.make_mesh((2, 4))
    tree = {"k": rand((8, 16), np.float32)}
    p = wio.save(tmp_path / "m.safetensors", tree)
    like = ws.shard(jax.tree.map(jnp.zeros_like, tree), mesh, [("k", ws.P("data", "model"))])
    back = wio.load(p, like=like)
    assert back["k"].sharding == like["k"].sharding
    np.testing.assert_array_equal(back["k"], tree["k"])


def test_orbax_roundtrip_sharded(tmp_path):
    from weightlab import shard as ws
    mesh = ws.make_mesh((2, 4))
    tree = ws.shard({"enc": {"kernel": jnp.asarray(rand((8, 16), np.float32)), "b": jnp.arange(4.0).astype(jnp.bfloat16)}},
                    mesh, [("kernel", ws.P(None, "model"))])
    wio.save_orbax(tmp_path / "ck", tree)
    with pytest.raises(OutputExistsError):
        wio.save_orbax(tmp_path / "ck", tree)
    back = wio.load_orbax(tmp_path / "ck", like=tree)
    assert back["enc"]["kernel"].sharding.is_equivalent_to(tree["enc"]["kernel"].sharding, 2)
    assert back["enc"]["b"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    wio.save_orbax(tmp_path / "ck", jax.tree.map(lambda x: x * 0, tree), overwrite=True)
    assert float(jnp.abs(wio.load_orbax(tmp_path / "ck")["enc"]["kernel"]).sum()) == 0
    with pytest.raises(CheckpointNotFoundError):
        wio.load_orbax(tmp_path / "missing")


from hypothesis import given, settings, strategies as hst


@settings(max_examples=30, deadline=None)
@given(hst.lists(hst.tuples(hst.sampled_from(DTYPES), hst.lists(hst.integers(0, 5), max_size=3)), min_size=1, max_size=5),
       hst.integers(0, 2**31 - 1))
def test_roundtrip_property(tmp_path_factory, spec, seed):
    tree = {f"t{i}": rand(tuple(shape), dt, seed + i) for i, (dt, shape) in enumerate(spec)}
    f = wio.save(tmp_path_factory.mktemp("rt") / "m.safetensors", tree)
    back = wio.load(f, as_jax=False)
    assert set(back) == set(tree)
    for k, v in tree.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8))


def test_planned_shard_writer_writes_in_place_and_is_atomic(tmp_path):
    layout = [("a", (64, 64), np.float32), ("b", (10,), np.int8), ("c", (64, 64), ml_dtypes.bfloat16)]
    vals = {n: rand(s, d, i) for i, (n, s, d) in enumerate(layout)}
    with wio.PlannedShardWriter(tmp_path / "out", layout, max_shard_bytes=20_000, metadata={"m": "x"}) as w:
        for n in ("c", "a", "b"):  # any order
            w.add(n, vals[n])
    c = wio.open_checkpoint(tmp_path / "out")
    assert len(set(c.shard_of(n) for n in c.keys())) == 2 and c.metadata["m"] == "x"
    for n, v in vals.items():
        np.testing.assert_array_equal(c[n].view(np.uint8), v.view(np.uint8))
    with pytest.raises(ValueError, match="never written"):
        with wio.PlannedShardWriter(tmp_path / "out2", layout) as w:
            w.add("a", vals["a"])
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ValueError, match="planned"):
        with wio.PlannedShardWriter(tmp_path / "out3", layout) as w:
            w.add("a", vals["a"].astype(np.float64))
    assert not (tmp_path / "out3").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
