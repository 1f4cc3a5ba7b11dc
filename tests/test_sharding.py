import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import weightlab as wl
from weightlab import shard as ws
from weightlab.errors import ShapeMismatchError

RULES = [("kernel$", ws.P(None, "model")), ("embed", ws.P("data", None))]


def sharded_params():
    assert len(jax.devices()) == 8, "tests/conftest.py must give 8 CPU devices"
    mesh = ws.make_mesh((2, 4), ("data", "model"))
    k = jax.random.key(0)
    p = {"embed": jax.random.normal(k, (16, 8)),
         "layer_0": {"kernel": jax.random.normal(k, (8, 32)), "bias": jnp.ones(32)},
         "head": {"kernel": jax.random.normal(k, (32, 8))}}
    return mesh, ws.shard(p, mesh, RULES)


def test_shard_places_leaves_by_rule():
    mesh, p = sharded_params()
    assert p["layer_0"]["kernel"].sharding.spec == ws.P(None, "model")
    assert p["embed"].sharding.spec == ws.P("data", None)
    assert p["layer_0"]["bias"].sharding.spec == ws.P(None)  # specs are padded to the rank
    assert len(p["layer_0"]["kernel"].addressable_shards) == 8


def test_divisibility_error_names_path():
    mesh = ws.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ShapeMismatchError, match="layer_0/kernel"):
        ws.shard({"layer_0": {"kernel": jnp.ones((8, 30))}}, mesh, RULES)


@pytest.mark.parametrize("jit", [False, True])
def test_transforms_preserve_named_sharding(jit):
    mesh, p = sharded_params()
    t = wl.chain(wl.select("kernel$", wl.per_leaf(lambda x, path, key: jnp.clip(x, -1, 1))),
                 wl.per_leaf(lambda x, path, key: x + jax.random.normal(key, x.shape) * 1e-3, needs_key=True),
                 wl.partition({"kernel": wl.identity()}, default=wl.per_leaf(lambda x, path, key: 0.5 * x)))
    f = (lambda q: wl.apply_once(t, q, key=jax.random.key(1)))
    out = jax.jit(f)(p) if jit else f(p)
    before, after = ws.shardings(p), ws.shardings(out)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert a.is_equivalent_to(b, 2), (a, b)


def test_results_do_not_depend_on_device_count():
    mesh, p = sharded_params()
    single = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), p)
    t = wl.per_leaf(lambda x, path, key: x + jax.random.uniform(key, x.shape), needs_key=True)
    a = jax.jit(lambda q: wl.apply_once(t, q, key=jax.random.key(5)))(p)
    b = jax.jit(lambda q: wl.apply_once(t, q, key=jax.random.key(5)))(single)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_optax_step_with_projection_keeps_sharding():
    mesh, p = sharded_params()
    opt = optax.chain(optax.adam(1e-2), wl.as_optax(wl.per_leaf(lambda x, path, key: jnp.clip(x, -2, 2))))
    state = opt.init(p)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(q)))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    q, state = step(p, state)
    for a, b in zip(jax.tree.leaves(ws.shardings(p)), jax.tree.leaves(ws.shardings(q))):
        assert a.is_equivalent_to(b, 2)
