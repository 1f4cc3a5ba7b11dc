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
         ((32, 16), P("model", "data"), 0), ((8, 32, 6), P(None, "model", None), 1), ((64,), P("data"), 0),
         ((32, 16), P(("model", "data"), None), 0), ((16, 32), P(None, ("model", "data")), 1)]


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


def test_ring_take_with_mesh_axes_in_any_order_on_a_three_axis_mesh():
    """A spec entry naming several mesh axes out of the mesh's order: the blocks' order (axis_index)
    and ppermute's ring (device order) differ; every ordering must still give jnp.take."""
    import itertools

    mesh3 = ws.make_mesh((2, 2, 2), ("x", "y", "z"))
    x = jax.random.normal(jax.random.key(0), (16, 3))
    idx = jax.random.permutation(jax.random.key(1), 16)
    for k in (2, 3):
        for names in itertools.permutations(("x", "y", "z"), k):
            spec = P(names, None)
            xs = jax.device_put(x, NamedSharding(mesh3, spec))
            y = jax.jit(lambda v, i, spec=spec: take(v, i, 0, mesh3, spec))(xs, idx)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.take(x, idx, axis=0)), err_msg=str(names))


def test_ring_take_indices_like_jnp_take_and_bad_ones_refused(mesh):
    x = jax.random.normal(jax.random.key(0), (16, 4))
    xs = jax.device_put(x, NamedSharding(mesh, P("model", None)))
    neg = -1 - jnp.arange(16)  # negative entries count from the end, on split and unsplit axes alike
    np.testing.assert_array_equal(np.asarray(take(xs, neg, 0, mesh, P("model", None))), np.asarray(jnp.take(x, neg, axis=0)))
    np.testing.assert_array_equal(np.asarray(take(xs, [3, 2, 1, 0], 1, mesh, P("model", None))), np.asarray(x[:, ::-1]))
    with pytest.raises(ShardingError, match="index values must lie in \\[-16, 16\\).*found \\[1, 16\\]"):
        take(xs, jnp.arange(1, 17), 0, mesh, P("model", None), path="w")
    with pytest.raises(ShardingError, match="must hold integers, found dtype float32"):
        take(xs, jnp.arange(16.0), 0, mesh, P("model", None))
    with pytest.raises(ShardingError, match="axis 2 out of range for an array of rank 2"):
        take(xs, jnp.arange(16), 2, mesh, P("model", None))
    # the unsplit path returns the spec's layout too
    y = take(jax.device_put(x, jax.devices()[0]), jnp.arange(4)[::-1], 1, mesh, P("model", None))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2), y.sharding


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
    with pytest.raises(ShardingError, match="dense/kernel.*index along axis 1 must have length 12, found length 5"):
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


@pytest.mark.parametrize("method,hp", [("rtn", dict(bits=4, group_size=8)), ("rtn", dict(bits=8, group_size=0)),
                                       ("any4", dict(group_size=8))], ids=["int4-g8", "int8-channel", "any4-g8"])
def test_align_permute_moves_sharded_qarrays_by_the_ring(mesh, method, hp):
    """QArray leaves on split axes: every child the weight's spec splits along the permuted axis
    (packed codes, scales, zeros, any4 tables; unpacked codes on the group axis) goes round the
    ring; the result dequantizes to the one-device result bit for bit, keeps the children's layout
    and the program's only collective is the neighbour exchange."""
    from weightlab import quant

    m = models.mlp(jax.random.key(0), hidden=(32, 16))
    spec = align.infer_spec(m.apply_fn, m.params, jax.random.normal(jax.random.key(1), (8, 40)))
    perms = dict(align.random_perms(spec, jax.random.key(5)))
    q = quant.quantize(m.params, method, select=r"dense_1/kernel|head/kernel", **hp)
    # dense_1/kernel (32, 16): its inputs (the group axis, hidden 0's units) and outputs (hidden 1's) split
    rules = [("dense_0/kernel", P(None, "model")), ("dense_0/bias", P("model")),
             ("dense_1/kernel", P("model", "data")), ("dense_1/bias", P("data")), ("head/kernel", P("data", None))]
    sh = ws.shard(q, mesh, rules)
    f = jax.jit(lambda p, pr: align.permute(spec, pr, p, mesh=mesh, rules=rules))
    out = f(sh, perms)
    want = align.permute(spec, perms, q)
    from weightlab import tree as wtree

    for a, b in zip(jax.tree.leaves(out, is_leaf=wtree.is_atomic), jax.tree.leaves(want, is_leaf=wtree.is_atomic)):
        np.testing.assert_array_equal(np.asarray(quant.dequantize(a)), np.asarray(quant.dequantize(b)))
    for path in ("dense_1", "head"):  # every child keeps its layout (a grouped K axis gains a g_idx)
        for name in ("codes", "scale", "zero", "lut"):
            x, y = getattr(out[path]["kernel"], name), getattr(sh[path]["kernel"], name)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (path, name, x.sharding, y.sharding)
    assert out["dense_1"]["kernel"].codes.sharding.spec == P("model", "data")
    assert set(hlo.collectives(hlo.compiled_text(f, sh, perms))) == {"collective-permute"}


def test_under_shard_jit_alignment_permutes_by_the_ring_without_being_told(mesh):
    """A transform traced by shard.jit sees its mesh and rules (shard.run.current), so align.permute
    inside it takes the ring on split axes with no mesh= of its own."""
    import weightlab as wl
    from weightlab.shard import run

    m = models.mlp(jax.random.key(0), hidden=(32, 16))
    spec = align.infer_spec(m.apply_fn, m.params, jax.random.normal(jax.random.key(1), (8, 40)))
    perms = dict(align.random_perms(spec, jax.random.key(5)))
    rules = [("dense_0/kernel", P(None, "model")), ("dense_0/bias", P("model")), ("dense_1/kernel", P("model", None))]
    sh = ws.shard(m.params, mesh, rules)
    assert run.current() is None
    seen = []

    def permute(p, perms):
        seen.append(run.current())
        return align.permute(spec, perms, p)

    out = wl.apply_once(ws.jit(wl.stateless(permute), mesh, rules), sh, perms=perms)
    assert seen and all(s is not None and s[0] is mesh and s[1] is rules for s in seen)
    assert run.current() is None  # reset after the trace
    want = align.permute(spec, perms, m.params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the program shard.jit compiles: the same as under the context it sets
    with run._active(mesh, rules):
        text = hlo.compiled_text(jax.jit(lambda p, pr: align.permute(spec, pr, p)), sh, perms)
    assert set(hlo.collectives(text)) == {"collective-permute"}
    # matching itself runs on the host (LAP solvers, convergence loops): under shard.jit it is refused
    # by name; it is called on the sharded params outside jit (test_shard.py) and only the permutation jitted
    from weightlab.errors import AlignError

    with pytest.raises(AlignError, match="is traced: matching runs on the host"):
        wl.apply_once(ws.jit(align.transform("weight_matching", spec), mesh, rules), sh, reference=sh)


def test_mesh_paths_keep_what_worked_without_them(mesh):
    """Regressions a review found: a stack of QArrays (leading model axis) with mesh= takes the
    vmapped gather; under shard.jit, align.permute of a tree the rules do not fit (widths 6 on a
    4-way axis) gathers those leaves as without a mesh instead of raising."""
    import weightlab as wl
    from weightlab import quant, tree as wtree

    m = models.mlp(jax.random.key(0), hidden=(32, 16))
    x = jax.random.normal(jax.random.key(1), (8, 40))
    spec = align.infer_spec(m.apply_fn, m.params, x)
    perms = dict(align.random_perms(spec, jax.random.key(5)))
    q = quant.quantize(m.params, "rtn", select=r"dense_1/kernel", bits=8, group_size=0)
    q2 = quant.quantize(jax.tree.map(lambda v: 2 * v, m.params), "rtn", select=r"dense_1/kernel", bits=8, group_size=0)
    mix = jax.tree.map(lambda v: v, q, is_leaf=wtree.is_atomic)
    mix["dense_1"]["kernel"] = jax.tree.map(lambda a, b: jnp.stack([a, b]), q["dense_1"]["kernel"], q2["dense_1"]["kernel"])
    want = align.permute(spec, perms, mix)
    for rules in ([("dense_1/kernel", P("model", None))], []):
        got = align.permute(spec, perms, mix, mesh=mesh, rules=rules)
        np.testing.assert_array_equal(np.asarray(got["dense_1"]["kernel"].dequantize()),
                                      np.asarray(want["dense_1"]["kernel"].dequantize()))

    t = models.mlp(jax.random.key(2), hidden=(6, 6))
    spec_t = align.infer_spec(t.apply_fn, t.params, x)
    perms_t = dict(align.random_perms(spec_t, jax.random.key(5)))
    rules = [("dense_[0-9]/kernel", P(None, "model"))]  # fits m (32, 16), not t (6)
    other = []

    def f(p):
        other.append(align.permute(spec_t, perms_t, t.params))
        return p

    wl.apply_once(ws.jit(wl.stateless(f), mesh, rules), ws.shard(m.params, mesh, rules))
    assert other
