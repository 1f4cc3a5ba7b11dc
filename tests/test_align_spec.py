"""Permutation specs: inferred from the jaxpr (no hand-written lines), checked, applied, inverted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab import align, models, quant
from weightlab.errors import SpecError, SymmetryError


def _x(shape=(4, 40), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.fixture(scope="module")
def nets():
    return {
        "mlp": models.mlp(jax.random.key(0), hidden=(16, 8)),
        "cnn": models.cnn(jax.random.key(0), blocks=1),
        "gqa_rope": models.transformer(jax.random.key(0), dim=32, depth=1, num_heads=4, num_kv_heads=2, rope=True),
        "mha": models.transformer(jax.random.key(0), dim=32, depth=1, num_heads=4),
    }


def _relerr(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["mlp", "cnn", "gqa_rope", "mha"])
def test_inferred_spec_is_a_symmetry(nets, name):
    m = nets[name]
    spec = align.infer_spec(m.apply_fn, m.params, _x())
    assert spec.report == ()
    assert align.check_spec(spec, m.apply_fn, m.params, _x()) <= 1e-5
    # and it is not trivial: every hidden unit axis moves
    for k in range(2):
        p = align.permute(spec, align.random_perms(spec, jax.random.key(k)), m.params)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(m.params)))


def test_mlp_spec_is_the_hand_written_one(nets):
    m = nets["mlp"]
    spec = align.infer_spec(m.apply_fn, m.params, _x())
    h0, h1 = spec.group_of("dense_0/kernel", 1), spec.group_of("dense_1/kernel", 1)
    assert spec.axes == {"dense_0/bias": ((h0,),), "dense_0/kernel": ((), (h0,)), "dense_1/bias": ((h1,),),
                         "dense_1/kernel": ((h0,), (h1,)), "head/bias": ((),), "head/kernel": ((h1,), ())}
    hand = align.make_spec({"dense_0/kernel": (None, "a"), "dense_0/bias": ("a",), "dense_1/kernel": ("a", "b"),
                            "dense_1/bias": ("b",), "head/kernel": ("b", None), "head/bias": (None,)}, m.params)
    assert hand.groups["a"].size == 16 and hand.groups["b"].size == 8
    align.check_spec(hand, m.apply_fn, m.params, _x())


def test_attention_heads_gqa_and_rope(nets):
    """GQA + RoPE: key/value heads are one group, query heads nest under their key/value head, Q/K
    dims stay fixed (RoPE), V/O dims nest under the heads; without RoPE, Q/K dims nest too."""
    s = align.infer_spec(nets["gqa_rope"].apply_fn, nets["gqa_rope"].params, _x())
    q = s.axes["block_0/attn/query/kernel"][1]
    k = s.axes["block_0/attn/key/kernel"][1]
    v = s.axes["block_0/attn/value/kernel"][1]
    o = s.axes["block_0/attn/out/kernel"][0]
    kv, rep, vd = q[0], q[1], v[1]
    assert k == (kv, 8) and q == (kv, rep, 8) and v == (kv, vd) and o == (kv, rep, vd)
    assert s.groups[kv].size == 2 and s.groups[kv].parent is None
    assert s.groups[rep].parent == kv and s.groups[rep].size == 2
    assert s.groups[vd].parent == kv and s.groups[vd].size == 8
    res = s.group_of("embed/kernel", 1)
    assert s.axes["head/kernel"][0] == (res,) and s.axes["block_0/mlp/down/kernel"][1] == (res,)
    m2 = align.infer_spec(nets["mha"].apply_fn, nets["mha"].params, _x())
    qk = m2.axes["block_0/attn/key/kernel"][1]
    assert m2.groups[qk[1]].parent == qk[0] and m2.groups[qk[0]].size == 4
    assert m2.axes["pos"][1] == (m2.group_of("embed/kernel", 1),)


def test_llama_gated_mlp_and_tied_embeddings():
    from weightlab.models import llama

    for tie in (False, True):
        cfg = llama.tiny_config(tie_word_embeddings=tie)
        p = llama.random_llama(jax.random.key(0), cfg)
        f = lambda p, ids: llama.llama_apply(p, ids, cfg)  # noqa: E731
        ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
        s = align.infer_spec(f, p, ids)
        hid = s.group_of("model.layers.0.mlp.gate_proj.weight", 0)
        assert s.axes["model.layers.0.mlp.up_proj.weight"][0] == (hid,)
        assert s.axes["model.layers.0.mlp.down_proj.weight"][1] == (hid,)
        res = s.group_of("model.embed_tokens.weight", 1)
        assert res is not None and s.axes["model.norm.weight"] == ((res,),)
        align.check_spec(s, f, p, ids)


def test_grouped_and_depthwise_convolutions():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(1, 8, (3,), rngs=rngs)
            self.g = nnx.Conv(8, 12, (3,), feature_group_count=4, rngs=rngs)   # grouped
            self.d = nnx.Conv(12, 12, (3,), feature_group_count=12, rngs=rngs)  # depthwise
            self.o = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.a(x[..., None]))
            h = jax.nn.relu(self.d(jax.nn.relu(self.g(h))))
            return self.o(h.mean(1))

    m = models.from_nnx(Net(nnx.Rngs(0)))
    s = align.infer_spec(m.apply_fn, m.params, _x((3, 20)))
    align.check_spec(s, m.apply_fn, m.params, _x((3, 20)))
    # the grouped conv's output splits into (4 groups, 3 per group): groups permute as blocks
    g_out = s.axes["g/kernel"][2]
    assert len(g_out) == 2 and s.groups[g_out[0]].size == 4 and s.groups[g_out[1]].size == 3
    assert s.axes["a/kernel"][2][0] == g_out[0]  # the input channels' group factor is the same group


def test_unknown_primitive_pins_only_what_it_touches(nets):
    """A primitive without a handler (here a cumulative sum over the hidden units) pins the axes it
    touches and is reported; the rest of the spec stands (PLeaS would fail whole)."""
    m = nets["mlp"]

    def f(p, x):
        h = jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        h = jax.lax.cumsum(h, axis=1)  # order-sensitive over dense_0's units
        h = jax.nn.relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
        return jnp.tanh(h) @ p["head"]["kernel"] + p["head"]["bias"]

    s = align.infer_spec(f, m.params, _x())
    assert s.axes["dense_0/kernel"][1] == ()
    assert s.group_of("dense_1/kernel", 1) is not None
    align.check_spec(s, f, m.params, _x())

    def g(p, x):  # a primitive the inference does not know at all
        h = jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        h = jax.lax.reduce_precision(h, exponent_bits=8, mantissa_bits=7)
        h = jax.lax.top_k(h, 16)[0]
        h = jax.nn.relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    s = align.infer_spec(g, m.params, _x())
    prims = [r[0] for r in s.report]
    assert "top_k" in prims
    assert "dense_0/kernel" in dict((r[0], r[2]) for r in s.report)["top_k"]
    assert s.group_of("dense_1/kernel", 1) is not None
    align.check_spec(s, g, m.params, _x())


def test_check_spec_names_the_broken_group_and_the_missing_leaf(nets):
    m = nets["mlp"]
    params = jax.tree.map(lambda w: w + 0.1 * jax.random.normal(jax.random.key(7), w.shape), m.params)  # biases != 0
    bad = align.make_spec({"dense_0/kernel": (None, "a"), "dense_0/bias": (None,), "dense_1/kernel": ("a", "b"),
                           "dense_1/bias": ("b",), "head/kernel": ("b", None), "head/bias": (None,)}, params)
    with pytest.raises(SymmetryError, match="group 'a'.*missing from the group: 'dense_0/bias' axis 0") as e:
        align.check_spec(bad, m.apply_fn, params, _x())
    assert (e.value.path, e.value.axis) == ("dense_0/bias", 0)  # the culprit, not just a leaf of the group


def test_make_spec_errors(nets):
    p = nets["mlp"].params
    ok = {"dense_0/kernel": (None, "a"), "dense_0/bias": ("a",), "dense_1/kernel": ("a", None),
          "dense_1/bias": (None,), "head/kernel": (None, None), "head/bias": (None,)}
    with pytest.raises(SpecError, match="no entry for 'dense_0/bias'"):
        align.make_spec({k: v for k, v in ok.items() if k != "dense_0/bias"}, p)
    with pytest.raises(SpecError, match="leaves the params do not have.*dense_9"):
        align.make_spec({**ok, "dense_9/kernel": (None, None)}, p)
    with pytest.raises(SpecError, match="'dense_0/kernel': 2 axes"):
        align.make_spec({**ok, "dense_0/kernel": ("a",)}, p)
    with pytest.raises(SpecError, match="'dense_1/kernel' axis 1: the factors \\('a',\\) multiply to 16, the axis has 8"):
        align.make_spec({**ok, "dense_1/kernel": ("a", "a")}, p)
    with pytest.raises(SpecError, match="appear twice on one axis"):
        align.make_spec({**ok, "dense_0/bias": (("a", "a"),)}, p, groups={"a": 4})
    with pytest.raises(SpecError, match="nested under 'h'"):
        align.make_spec({**ok, "dense_0/bias": (("d", "h"),)}, p,
                        groups={"h": 4, "d": align.Group("d", 4, parent="h")}, partial=False)
    spec = align.make_spec(ok, p)
    with pytest.raises(Exception, match="shape \\(16,\\)"):
        align.permute(spec, {"a": jnp.arange(8)}, p)
    with pytest.raises(Exception, match="not a permutation"):
        align.permute(spec, {"a": jnp.zeros(16, jnp.int32)}, p)
    with pytest.raises(Exception, match="unknown group"):
        align.permute(spec, {"z": jnp.arange(16)}, p)


def test_permute_carries_quantized_leaves(nets):
    m = nets["mlp"]
    spec = align.infer_spec(m.apply_fn, m.params, _x())
    q = quant.quantize(m.params, "rtn", bits=4, group_size=8)
    perms = align.random_perms(spec, jax.random.key(3))
    pq = align.permute(spec, perms, q)
    assert isinstance(pq["dense_1"]["kernel"], quant.QArray)
    np.testing.assert_array_equal(quant.dequantize(pq)["dense_1"]["kernel"],
                                  align.permute(spec, perms, quant.dequantize(q))["dense_1"]["kernel"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**30))
def test_invert_and_compose_with_nested_groups(nets, seed):
    m = nets["gqa_rope"]
    spec = _gqa_spec(nets)
    k1, k2 = jax.random.split(jax.random.key(seed))
    p, q = align.random_perms(spec, k1), align.random_perms(spec, k2)
    x = m.params
    back = align.permute(spec, align.invert(spec, p), align.permute(spec, p, x))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(x)))
    two = align.permute(spec, q, align.permute(spec, p, x))
    one = align.permute(spec, align.compose(spec, p, q), x)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)))


_CACHE = {}


def _gqa_spec(nets):
    if "s" not in _CACHE:
        m = nets["gqa_rope"]
        _CACHE["s"] = align.infer_spec(m.apply_fn, m.params, _x())
    return _CACHE["s"]


def test_pin_fixes_the_residual_stream(nets):
    m = nets["mha"]
    s = align.infer_spec(m.apply_fn, m.params, _x())
    res = s.group_of("embed/kernel", 1)
    pinned = s.pin(res)
    assert res not in pinned.groups and pinned.axes["embed/kernel"] == ((), ())
    align.check_spec(pinned, m.apply_fn, m.params, _x())
    with pytest.raises(SpecError, match="unknown group"):
        s.pin("nope")


@pytest.mark.slow
def test_minilm_spec_from_the_real_checkpoint():
    from weightlab.models import bert

    m = bert.load_minilm()
    batch = m.tokenize(["a cat sat on the mat", "weights are pytrees"])
    s = align.infer_spec(m.apply_fn, m.params, batch)
    assert [r[0] for r in s.report] == ["unused"]  # only the pooler, which sentence embeddings do not use
    heads = s.group_of("encoder/layer_0/attn/query/kernel", 1)
    assert s.groups[heads].size == 12
    assert s.groups[s.group_of("encoder/layer_0/attn/query/kernel", 1, 1)].parent == heads
    assert align.check_spec(s, m.apply_fn, m.params, batch, trials=1) <= 1e-5


def _check_sound(f, params, batch):
    spec = align.infer_spec(f, params, batch)
    align.check_spec(spec, f, params, batch, trials=3)
    return spec


def test_adversarial_programs_never_get_a_false_symmetry():
    """Found in review: per-head dims may not nest under heads that a matmul leaves free, or that a
    broadcast copies onto a second axis; a gather's index-vector axis is not a symmetry; one group
    on two factors of an axis is pinned, not an error."""
    H, D = 3, 4
    k = jax.random.split(jax.random.key(0), 4)
    p = {"wq": jax.random.normal(k[0], (5, H * D))}
    x = jax.random.normal(k[1], (7, 5))

    def heads_free(p, x):
        q = (x @ p["wq"]).reshape(x.shape[0], H, D)
        return jnp.einsum("bhd,bgd->bhg", q, q).sum((1, 2))

    def outer_over_heads(p, x):
        q = (x @ p["wq"]).reshape(x.shape[0], H, D)
        return jnp.tanh((q[:, :, None, :] * q[:, None, :, :]).sum(2)).sum((1, 2))

    for f in (heads_free, outer_over_heads):
        s = _check_sound(f, p, x)
        assert all(g.parent is None for g in s.groups.values())
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0, 1), start_index_map=(0, 1))
    s = _check_sound(lambda p, x: jax.lax.gather(x, p["ij"], dn, slice_sizes=(1, 1)),
                     {"ij": jnp.array([[0, 1], [2, 3], [4, 3]])}, jax.random.normal(k[2], (5, 6)))
    assert s.axes["ij"][1] == ()

    def square(p, x):
        w = p["w"].reshape(6, 6)
        w = w + w.T
        return (x @ w @ w).sum(1)

    _check_sound(square, {"w": jax.random.normal(k[3], (36,))}, jax.random.normal(k[1], (7, 6)))


def test_check_spec_never_tests_the_identity():
    from weightlab.align.check import _moving

    spec = align.make_spec({"a": ("h",)}, {"a": jnp.zeros(2)})
    for s in range(8):
        m = _moving(align.random_perms(spec, jax.random.key(s)))
        assert np.asarray(m["h"]).tolist() == [1, 0]


def test_public_names_are_functions_even_after_their_modules_load():
    """A submodule named like a public function would shadow it once imported (align.repair was
    the renorm module for a while): every lazy name must stay the object it names."""
    import importlib

    for sub in align._SUBMODULES:
        importlib.import_module(f"weightlab.align.{sub}")
    for name in align.__all__:
        assert not isinstance(getattr(align, name), type(importlib)), name


def test_pooling_keeps_channel_symmetries():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(1, 6, (3,), rngs=rngs)
            self.b = nnx.Conv(6, 5, (3,), rngs=rngs)
            self.o = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.max_pool(jax.nn.relu(self.a(x[..., None])), (2,), strides=(2,))
            h = nnx.avg_pool(jax.nn.relu(self.b(h)), (2,), strides=(2,))
            return self.o(h.mean(1))

    m = models.from_nnx(Net(nnx.Rngs(0)))
    s = align.infer_spec(m.apply_fn, m.params, _x((3, 20)))
    assert s.report == () and len(s.groups) == 2
    align.check_spec(s, m.apply_fn, m.params, _x((3, 20)))
