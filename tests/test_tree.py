import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from weightlab import tree as wt
from weightlab.errors import (DTypeMismatchError, PathCollisionError, ShapeMismatchError,
                              StructureMismatchError)

EXPECTED_PATHS = {
    "dict": ["dense_0/bias", "dense_0/kernel", "dense_1/bias", "dense_1/kernel"],
    "linen": ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"],
    "nnx": ["dense_0/bias", "dense_0/kernel", "dense_1/bias", "dense_1/kernel"],
    "equinox": ["layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias", "activation",
                "final_activation"],
    "list": ["0/0", "0/1", "1/0", "1/1"],
    "dataclass": ["layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"],
}


def test_paths_per_flavour(flavour):
    name, t = flavour
    assert wt.paths(t) == EXPECTED_PATHS[name]


def test_flat_dict_roundtrip_into_like(flavour):
    name, t = flavour
    flat = wt.to_flat_dict(t)
    back = wt.from_flat_dict(flat, like=t)
    assert jax.tree.structure(back) == jax.tree.structure(t)
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(back)):
        assert a is b


def test_flat_dict_without_like_nests_dicts():
    flat = {"enc/layer_0/kernel": 1, "enc/layer_0/bias": 2, "head": 3}
    assert wt.from_flat_dict(flat) == {"enc": {"layer_0": {"kernel": 1, "bias": 2}}, "head": 3}
    with pytest.raises(PathCollisionError):
        wt.from_flat_dict({"a": 1, "a/b": 2})


def test_from_flat_dict_errors_name_path():
    like = {"a": {"k": jnp.zeros((2, 3))}}
    with pytest.raises(StructureMismatchError, match="a/k"):
        wt.from_flat_dict({}, like)
    with pytest.raises(StructureMismatchError, match="zz"):
        wt.from_flat_dict({"a/k": jnp.zeros((2, 3)), "zz": 1}, like)
    with pytest.raises(ShapeMismatchError, match=r"a/k.*\(2, 3\).*\(3, 2\)"):
        wt.from_flat_dict({"a/k": jnp.zeros((3, 2))}, like)
    with pytest.raises(DTypeMismatchError, match="a/k"):
        wt.from_flat_dict({"a/k": jnp.zeros((2, 3), jnp.bfloat16)}, like)


def test_path_collision_detected():
    with pytest.raises(PathCollisionError):
        wt.paths({"a/b": jnp.ones(1), "a": {"b": jnp.ones(1)}})


def test_stack_unstack_roundtrip(flavour):
    name, t = flavour
    arrays = [x for x in jax.tree.leaves(t) if wt.is_array(x)]
    t2 = jax.tree.map(lambda x: x + 1 if wt.is_array(x) else x, t)
    s = wt.stack([t, t2, t])
    assert wt.num_models(s) == 3
    for x, y in zip(arrays, [x for x in jax.tree.leaves(s) if wt.is_array(x)]):
        assert y.shape == (3,) + x.shape
    back = wt.unstack(s)
    assert len(back) == 3
    for a, b in zip(jax.tree.leaves(t2), jax.tree.leaves(back[1])):
        if wt.is_array(a):
            np.testing.assert_array_equal(a, b)


def test_stack_checks_before_work():
    a = {"enc": {"k": jnp.zeros((2, 3))}}
    with pytest.raises(ShapeMismatchError, match=r"enc/k.*\(2, 3\).*\(2, 4\)"):
        wt.stack([a, {"enc": {"k": jnp.zeros((2, 4))}}])
    with pytest.raises(StructureMismatchError, match="enc/q"):
        wt.stack([a, {"enc": {"k": jnp.zeros((2, 3)), "q": jnp.zeros(1)}}])


def test_check_compatible_reports_first_mismatch():
    a = {"encoder": {"layer_3": {"attn": {"query": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}}}}
    b = jax.tree.map(lambda x: x, a)
    wt.check_compatible(a, b)
    b["encoder"]["layer_3"]["attn"]["query"]["kernel"] = jnp.zeros((4, 5))
    with pytest.raises(ShapeMismatchError) as e:
        wt.check_compatible(a, b)
    assert e.value.path == "encoder/layer_3/attn/query/kernel"
    assert "(4, 4)" in str(e.value) and "(4, 5)" in str(e.value)
    c = jax.tree.map(lambda x: x.astype(jnp.float16), a)
    with pytest.raises(DTypeMismatchError, match="float16"):
        wt.check_compatible(a, c)
    wt.check_compatible(a, c, dtypes=False)
    d = {"encoder": {"layer_3": {"attn": {"query": {"kernel": jnp.zeros((4, 4))}}}}}
    with pytest.raises(StructureMismatchError, match="encoder/layer_3/attn/query/bias.*missing"):
        wt.check_compatible(a, d)
    with pytest.raises(StructureMismatchError, match="containers"):
        wt.check_compatible([jnp.zeros(1)], (jnp.zeros(1),))


def test_leaf_keys_order_independent():
    key = jax.random.key(42)
    a = {"x": jnp.zeros(2), "y": {"z": jnp.zeros(3)}}
    b = {"y": {"z": jnp.zeros(3), "w": jnp.zeros(1)}, "x": jnp.zeros(2), "extra": jnp.zeros(5)}
    ka, kb = wt.leaf_keys(key, a), wt.leaf_keys(key, b)
    assert np.array_equal(jax.random.key_data(ka["y"]["z"]), jax.random.key_data(kb["y"]["z"]))
    assert np.array_equal(jax.random.key_data(ka["x"]), jax.random.key_data(kb["x"]))
    assert not np.array_equal(jax.random.key_data(ka["x"]), jax.random.key_data(ka["y"]["z"]))
    salted = wt.leaf_key(key, "x", salt="dare")
    assert not np.array_equal(jax.random.key_data(salted), jax.random.key_data(ka["x"]))


def test_true_nbytes_counts_bits():
    assert wt.true_nbytes(jnp.zeros((10, 8), jnp.int4)) == 40
    assert wt.true_nbytes(jnp.zeros((3,), jnp.bfloat16)) == 6
    assert wt.true_nbytes(np.zeros((7,), np.float32)) == 28
    assert wt.param_count({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}) == 10


def test_mask_selects_arrays_only(flavour):
    name, t = flavour
    m = wt.mask(t, None)
    got = [bool(v) for v in jax.tree.leaves(m)]
    want = [wt.is_array(x) for x in jax.tree.leaves(t)]
    assert got == want


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5),
                       st.dictionaries(st.text("kqv", min_size=1, max_size=3),
                                       st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=4))
def test_paths_roundtrip_property(spec):
    t = {a: {b: jnp.full((n,), float(n)) for b, n in sub.items()} for a, sub in spec.items()}
    flat = wt.to_flat_dict(t)
    assert set(flat) == {f"{a}/{b}" for a, sub in spec.items() for b in sub}
    assert wt.from_flat_dict(flat) == t or jax.tree.all(
        jax.tree.map(lambda x, y: bool(jnp.all(x == y)), wt.from_flat_dict(flat), t))
