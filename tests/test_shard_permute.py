"""Reordering a sharded axis without gathering it (weightlab.shard.permute.take), and alignment's
permutation applied that way on the 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from weightlab import align, models
from weightlab import shard as ws
from weightlab.errors import ShardingError
from weightlab.shard import hlo
from weightlab.shard.permute import take


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py must give 8 CPU devices"
    return ws.make_mesh((2, 4), ("data", "model"))


CASES = [((32, 12), P("model", None), 0), ((12, 32), P(None, "model"), 1), ((32, 16), P(("data", "model"), None), 0),
         ((32, 16), P("model", "data"), 0), ((8, 32, 6), P(None, "model", None), 1), ((64,), P("data"), 0)]


@pytest.mark.parametrize("shape,spec,axis", CASES, ids=[f"{s}-{p}-{a}" for s, p, a in CASES])
def test_ring_take_equals_take_keeps_the_layout_and_never_gathers(mesh, shape, spec, axis):
    x = jax.random.normal(jax.random.key(len(shape)), shape)
    idx = jax.random.permutation(jax.random.key(axis + 7), shape[axis])
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    f = jax.jit(lambda x, i: take(x, i, axis, mesh, spec))
    y = f(xs, idx)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.take(x, idx, axis=axis)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape)), y.sharding
    # the only collective is the neighbour exchange, run inside the ring loop
    assert set(hlo.collectives(hlo.compiled_text(f, xs, idx))) == {"collective-permute"}
    # a non-permutation index (repeats) is a gather like any other
    rep = jnp.zeros(shape[axis], jnp.int32).at[1::2].set(shape[axis] - 1)
    np.testing.assert_array_equal(np.asarray(f(xs, rep)), np.asarray(jnp.take(x, rep, axis=axis)))


def test_ring_take_holds_blocks_where_xla_holds_the_whole_weight(mesh):
    """Per-device scratch memory of the compiled programs: the ring keeps two blocks of the weight
    (the visiting one and the next), XLA's gather materialises the whole weight on each device."""
    spec = P(("data", "model"), None)
    x = jax.device_put(jnp.ones((4096, 256)), NamedSharding(mesh, spec))
    block = x.nbytes // 8
    idx = jnp.arange(4096)
    out = NamedSharding(mesh, spec)
    ring = jax.jit(lambda x, i: take(x, i, 0, mesh, spec), out_shardings=out).lower(x, idx).compile()
    xla = jax.jit(lambda x, i: jnp.take(x, i, axis=0), out_shardings=out).lower(x, idx).compile()
    assert ring.memory_analysis().temp_size_in_bytes <= 2.5 * block
    assert xla.memory_analysis().temp_size_in_bytes >= x.nbytes


def test_ring_take_unsharded_axis_is_local_and_bad_index_refused(mesh):
    x = jax.device_put(jnp.arange(96.0).reshape(8, 12), NamedSharding(mesh, P("data", None)))
    f = jax.jit(lambda x, i: take(x, i, 1, mesh, P("data", None)))
    assert hlo.collectives(hlo.compiled_text(f, x, jnp.arange(12)[::-1])) == {}
    with pytest.raises(ShardingError, match="index of shape \\(5,\\) for axis 1 of length 12"):
        take(x, jnp.arange(5), 1, mesh, P("data", None), path="dense/kernel")
    with pytest.raises(ShardingError, match="not divisible"):
        take(jnp.ones((6, 4)), jnp.arange(6), 0, mesh, P("model", None))


def test_align_permute_with_mesh_and_rules_equals_one_device_without_gathering(mesh):
    m = models.mlp(jax.random.key(0), hidden=(32, 16))
    spec = align.infer_spec(m.apply_fn, m.params, jax.random.normal(jax.random.key(1), (8, 40)))
    perms = dict(align.random_perms(spec, jax.random.key(5)))
    # every permuted axis of dense_0 and dense_1 split over the mesh
    rules = [("dense_0/kernel", P(None, "model")), ("dense_0/bias", P("model")),
             ("dense_1/kernel", P("model", "data")), ("head/kernel", P("data", None))]
    sh = ws.shard(m.params, mesh, rules)
    f = jax.jit(lambda p, pr: align.permute(spec, pr, p, mesh=mesh, rules=rules))
    out = f(sh, perms)
    want = align.permute(spec, perms, m.params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, s in zip(jax.tree.leaves(out), jax.tree.leaves(ws.named_shardings(m.params, mesh, rules))):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert set(hlo.collectives(hlo.compiled_text(f, sh, perms))) == {"collective-permute"}
    # the same permutation without mesh= is XLA's gather: a collective over whole weights
    g = jax.jit(lambda p, pr: align.permute(spec, pr, p))
    assert set(hlo.collectives(hlo.compiled_text(g, sh, perms))) - {"collective-permute"}
