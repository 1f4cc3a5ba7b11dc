import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import weightlab as wl
from weightlab import tree as wt
from weightlab.errors import MissingExtraError, NoMatchError, PartitionError


def scale(c):
    return wl.per_leaf(lambda x, path, key: x * c)


def add(c):
    return wl.per_leaf(lambda x, path, key: x + c)


def noise(salt=""):
    return wl.per_leaf(lambda x, path, key: x + jax.random.normal(key, x.shape, x.dtype), salt=salt, needs_key=True)


def params():
    k = jax.random.key(0)
    return {"encoder": {"layer_0": {"attn": {"query": {"kernel": jax.random.normal(k, (8, 8)), "bias": jnp.ones(8)}},
                                    "mlp": {"kernel": jax.random.normal(jax.random.key(1), (8, 16))}}},
            "head": {"kernel": jax.random.normal(jax.random.key(2), (16, 4)), "bias": jnp.zeros(4)}}


def run(t, p, **kw):
    return wl.apply_once(t, p, **kw)


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)


def test_identity_and_empty_chain():
    p = params()
    assert_trees_equal(run(wl.identity(), p), p)
    assert_trees_equal(run(wl.chain(), p), p)
    assert_trees_equal(run(wl.chain(wl.identity(), scale(2.0)), p), run(scale(2.0), p))
    assert_trees_equal(run(wl.chain(scale(2.0), wl.identity()), p), run(scale(2.0), p))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["s2", "s.5", "a1", "a-3", "n"]), min_size=3, max_size=3))
def test_chain_associative(ops):
    mk = {"s2": lambda: scale(2.0), "s.5": lambda: scale(0.5), "a1": lambda: add(1.0),
          "a-3": lambda: add(-3.0), "n": lambda: noise("n")}
    a, b, c = (mk[o]() for o in ops)
    p, key = params(), jax.random.key(3)
    left = run(wl.chain(wl.chain(a, b), c), p, key=key)
    right = run(wl.chain(a, wl.chain(b, c)), p, key=key)
    flat = run(wl.chain(a, b, c), p, key=key)
    assert_trees_equal(left, right)
    assert_trees_equal(left, flat)


def test_select_leaves_unmatched_leaves_identical(flavour):
    name, t = flavour
    arrays = [p for p, x in wt.flatten_with_paths(t)[0] if wt.is_array(x)]
    target = arrays[0]
    out = run(wl.select(f"^{target}$", scale(3.0)), t)
    for (p, x), (_, y) in zip(wt.flatten_with_paths(t)[0], wt.flatten_with_paths(out)[0]):
        if p == target:
            np.testing.assert_allclose(y, 3.0 * np.asarray(x))
        else:
            assert y is x  # same object: not converted, not copied


def test_select_predicate_and_list():
    p = params()
    out = run(wl.select(lambda path, x: x.ndim == 1, scale(0.0)), p)
    assert float(jnp.abs(out["encoder"]["layer_0"]["attn"]["query"]["bias"]).sum()) == 0
    assert out["head"]["kernel"] is p["head"]["kernel"]
    out = run(wl.select(["query/kernel$", "^head/kernel$"], scale(0.0)), p)
    assert float(jnp.abs(out["head"]["kernel"]).sum()) == 0
    assert out["encoder"]["layer_0"]["mlp"]["kernel"] is p["encoder"]["layer_0"]["mlp"]["kernel"]


def test_select_typo_raises_before_work():
    calls = []
    t = wl.select("qeury", wl.per_leaf(lambda x, path, key: calls.append(path) or x))
    with pytest.raises(NoMatchError, match="qeury"):
        run(t, params())
    assert calls == []
    assert_trees_equal(run(wl.select("qeury", scale(2.0), strict=False), params()), params())


def test_inner_transform_sees_original_paths():
    seen = []
    t = wl.select("kernel$", wl.per_leaf(lambda x, path, key: seen.append(path) or x))
    run(t, params())
    assert seen == ["encoder/layer_0/attn/query/kernel", "encoder/layer_0/mlp/kernel", "head/kernel"]


def test_partition_covers_every_leaf_once():
    p = params()
    t = wl.partition({"kernel$": scale(2.0), "bias$": add(1.0)})
    out = run(t, p)
    np.testing.assert_allclose(out["head"]["kernel"], 2 * p["head"]["kernel"])
    np.testing.assert_allclose(out["head"]["bias"], p["head"]["bias"] + 1)
    with pytest.raises(PartitionError, match="query/bias.*no group"):
        run(wl.partition({"kernel$": scale(2.0)}), p)
    with pytest.raises(PartitionError, match="several groups"):
        run(wl.partition({"kernel$": scale(2.0), "head": add(1.0), "bias": add(1.0)}), p)
    out = run(wl.partition({"kernel$": scale(2.0)}, default=wl.identity()), p)
    assert out["head"]["bias"] is p["head"]["bias"]


def test_partition_label_fn_and_tree():
    p = params()
    fn = lambda path, x: "big" if x.size >= 64 else "small"
    out = run(wl.partition({"big": scale(0.0), "small": wl.identity()}, labels=fn), p)
    assert float(jnp.abs(out["head"]["kernel"]).sum()) == 0
    assert out["head"]["bias"] is p["head"]["bias"]
    labels = jax.tree.map(lambda x: "big" if x.size >= 64 else "small", p)
    out2 = run(wl.partition({"big": scale(0.0), "small": wl.identity()}, labels=labels), p)
    assert_trees_equal(out, out2)
    with pytest.raises(PartitionError, match="label 'huge'"):
        run(wl.partition({"big": scale(0.0)}, labels=lambda path, x: "huge"), p)


def test_every_flavour_under_jit(flavour):
    name, t = flavour
    tr = wl.chain(wl.select(lambda p, x: x.ndim == 2, scale(2.0)), add(1.0))
    arrays_only = name == "equinox"
    if arrays_only:
        import equinox as eqx
        f = eqx.filter_jit(lambda m: run(tr, m))
    else:
        f = jax.jit(lambda m: run(tr, m))
    out = f(t)
    for (p, x), (_, y) in zip(wt.flatten_with_paths(t)[0], wt.flatten_with_paths(out)[0]):
        if wt.is_array(x):
            want = (2.0 * x if x.ndim == 2 else x) + 1.0
            np.testing.assert_allclose(y, want, rtol=1e-6)


def test_random_steps_need_key_and_are_order_independent():
    p = params()
    with pytest.raises(MissingExtraError):
        run(noise(), p)
    key = jax.random.key(7)
    a = run(noise(), p, key=key)
    sub = {"head": p["head"]}
    b = run(noise(), sub, key=key)
    assert_trees_equal(a["head"], b["head"])
    c = run(noise("other"), p, key=key)
    assert not np.allclose(a["head"]["kernel"], c["head"]["kernel"])


def test_as_optax_projects_after_each_step():
    p = params()
    grid = wl.per_leaf(lambda x, path, key: jnp.round(x * 4) / 4)  # project onto a 0.25 grid
    opt = optax.chain(optax.sgd(0.1), wl.as_optax(grid))
    state = opt.init(p)
    g = jax.tree.map(jnp.ones_like, p)
    for _ in range(3):
        upd, state = opt.update(g, state, p)
        p = optax.apply_updates(p, upd)
    for x in jax.tree.leaves(p):
        np.testing.assert_allclose(x * 4, jnp.round(x * 4), atol=1e-5)
    with pytest.raises(MissingExtraError):
        wl.as_optax(grid).update(g, wl.as_optax(grid).init(p))


def test_from_optax_step_matches_optax():
    p = params()
    g = jax.tree.map(lambda x: jnp.sin(x) + 0.1, p)
    adam = optax.adam(1e-2)
    t = wl.from_optax(adam)
    s = t.init(p)
    q, s = t.apply(p, s, grads=g)
    q, s = t.apply(q, s, grads=g)
    ref_s = adam.init(p)
    ref = p
    for _ in range(2):
        u, ref_s = adam.update(g, ref_s, ref)
        ref = optax.apply_updates(ref, u)
    assert_trees_equal(q, ref)
    with pytest.raises(MissingExtraError):
        t.apply(p, s)
    clipped = wl.apply_once(wl.from_optax(optax.clip(0.5), mode="map"), p)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(clipped)) <= 0.5


def test_projected_step_as_chain_under_jit():
    p = params()
    t = wl.chain(wl.from_optax(optax.sgd(0.1)), wl.select("kernel$", wl.per_leaf(lambda x, path, key: jnp.clip(x, -1, 1))))
    step = jax.jit(lambda p, s, g: t.apply(p, s, grads=g))
    s = t.init(p)
    g = jax.tree.map(lambda x: -jnp.ones_like(x), p)
    for _ in range(20):
        p, s = step(p, s, g)
    assert float(p["head"]["kernel"].max()) <= 1.0
    assert float(p["head"]["bias"].min()) == pytest.approx(2.0, rel=1e-5)


# ------------------------------------------------------------------ extras masked like the params

def test_select_masks_grads_like_optax_multi_transform():
    """select(sel, from_optax(adam)) with grads= is optax.multi_transform(adam on sel, zero elsewhere)."""
    p = params()
    g = jax.tree.map(lambda x: jnp.cos(x) + 0.2, p)
    t = wl.select("kernel$", wl.from_optax(optax.adam(0.1)))
    s = t.init(p)
    for _ in range(3):
        q, s = t.apply(p if _ == 0 else q, s, grads=g)
    labels = wt.map_with_path(lambda path, x: "k" if path.endswith("kernel") else "o", p)
    ref_opt = optax.multi_transform({"k": optax.adam(0.1), "o": optax.set_to_zero()}, labels)
    rs, ref = ref_opt.init(p), p
    for _ in range(3):
        u, rs = ref_opt.update(g, rs, ref)
        ref = optax.apply_updates(ref, u)
    assert_trees_equal(q, ref)
    assert q["head"]["bias"] is p["head"]["bias"]


def test_partition_masks_every_extra_per_group():
    p = params()
    g = jax.tree.map(jnp.ones_like, p)
    seen = {}

    def spy(name):
        def record(ps, grads=None, **kw):
            seen[name] = wt.paths(grads)  # hidden leaves are MaskedNode: no paths
            return ps
        return wl.stateless(record)

    t = wl.partition({"kernel$": wl.chain(spy("k"), wl.from_optax(optax.sgd(1.0))), "bias$": spy("b")})
    out = wl.apply_once(t, p, grads=g)
    assert seen["k"] == [x for x in wt.paths(p) if x.endswith("kernel")]
    assert seen["b"] == [x for x in wt.paths(p) if x.endswith("bias")]
    np.testing.assert_allclose(out["head"]["kernel"], p["head"]["kernel"] - 1.0)
    assert out["head"]["bias"] is p["head"]["bias"]


def test_bad_extras_and_partitions_are_typed_errors_before_work():
    from weightlab.errors import SelectorError, StructureMismatchError
    p = params()
    calls = []
    spy = wl.per_leaf(lambda x, path, key: calls.append(path) or x)
    g = jax.tree.map(jnp.ones_like, p)
    del g["head"]["bias"]
    with pytest.raises(StructureMismatchError, match="head/bias.*missing from grads="):
        wl.apply_once(wl.select("kernel$", wl.chain(spy, wl.from_optax(optax.sgd(0.1)))), p, grads=g)
    assert calls == []
    with pytest.raises(NoMatchError, match="qeury"):
        wl.apply_once(wl.partition({"kernel$": spy, "qeury": spy}, default=wl.identity()), p)
    assert calls == []
    with pytest.raises(SelectorError, match="not a valid regular expression"):
        wl.select("attn/(query", spy)
    with pytest.raises(SelectorError, match="a selector is"):
        wl.select(42, spy)


def test_one_selector_type():
    p = params()
    sel = wt.selector("kernel$", exclude="^head", min_ndim=2)
    assert sel.paths(p) == ["encoder/layer_0/attn/query/kernel", "encoder/layer_0/mlp/kernel"]
    assert (wt.selector("bias$") | "head/kernel").paths(p) == ["encoder/layer_0/attn/query/bias", "head/bias",
                                                                 "head/kernel"]
    assert (~wt.selector("encoder")).paths(p) == ["head/bias", "head/kernel"]
    assert wt.selector(lambda path: "mlp" in path).paths(p) == ["encoder/layer_0/mlp/kernel"]  # fn(path)
    assert wt.selector(lambda path, x: x.ndim == 1).paths(p) == ["encoder/layer_0/attn/query/bias", "head/bias"]
    out = run(wl.select(sel, scale(0.0)), p)
    assert float(jnp.abs(out["head"]["kernel"]).sum()) > 0 and float(jnp.abs(out["encoder"]["layer_0"]["mlp"]["kernel"]).sum()) == 0


def test_review_cases_equinox_grads_list_layers_and_defaulted_predicates():
    import equinox as eqx
    m = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    gr = eqx.filter_grad(lambda m, x: jnp.sum(m(x)))(m, jnp.ones(3))  # None where the module has a function
    t = wl.select("layers/0/weight", wl.from_optax(optax.sgd(1.0)))
    out, _ = t.apply(m, t.init(m), grads=gr)
    np.testing.assert_allclose(out.layers[0].weight, m.layers[0].weight - gr.layers[0].weight)
    assert out.layers[1].weight is m.layers[1].weight
    layers = [(jnp.ones((4, 4)).at[0, 0].set(jnp.nan), jnp.zeros(4)), (jnp.ones((4, 4)), jnp.zeros(4))]
    assert wt.nonfinite(layers) == ["0/0"]  # a list of (W, b) is a tree, not (path, leaf) pairs
    sel = wt.selector(lambda path, leaf=None: leaf is not None and leaf.ndim == 2)
    assert sel.paths({"k": jnp.ones((2, 2)), "b": jnp.ones(2)}) == ["k"]
