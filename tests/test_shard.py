"""weightlab.shard: rules, QArray sharding, default rules per family, and every quantizer and merge
run on an 8-device CPU mesh against the single-device result (values and output shardings)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import weightlab as wl
from weightlab import merge, quant, shard as ws
from weightlab.errors import ShardingError
from weightlab.models import llama

P = ws.P


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py must give 8 CPU devices"
    return ws.make_mesh((2, 4), ("data", "model"))


def _w(shape=(64, 48), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _specs(q):
    return {n: getattr(q, n) for n in ("codes", "scale", "zero", "lut", "tensor_scale", "pre", "lr_a", "lr_b", "g_idx")}


def test_qarray_children_follow_the_weight_spec(mesh):
    q = quant.quantize_array(_w(), "rtn", bits=4, group_size=16)  # groups along axis 0: 4 groups
    s = _specs(ws.qarray_specs(q, P("model", None), mesh, "enc/kernel"))
    assert s["codes"] == P("model", None) and s["scale"] == P("model", None, None) == s["zero"]
    s = _specs(ws.qarray_specs(q, P(None, "model"), mesh, "enc/kernel"))  # output axis: scales follow it
    assert s["codes"] == P(None, "model") and s["scale"] == P(None, None, "model")
    s = _specs(ws.qarray_specs(q, P("data", "model"), mesh, "enc/kernel"))
    assert s["scale"] == P("data", None, "model")
    # per-channel scales (one group): the size-1 group axis is never sharded
    pc = quant.quantize_array(_w(), "rtn", bits=8, group_size=-1)
    assert _specs(ws.qarray_specs(pc, P("model", None), mesh))["scale"] == P(None, None, None)
    # NVFP4's tensor scale is replicated; any4's tables follow the non-grouped axis
    nv = quant.quantize_array(_w(), "rtn", fmt="nvfp4")
    assert _specs(ws.qarray_specs(nv, P(None, "model"), mesh))["tensor_scale"] == P()
    a4 = quant.quantize_array(_w((64, 48)), "any4", group_size=64)
    assert _specs(ws.qarray_specs(a4, P("model", "data"), mesh))["lut"] == P(None, "data")
    # low-rank factors: A (K, r) like the group axis, B (r, N) like the output axis
    lr = q.replace(lr_a=jnp.zeros((64, 4)), lr_b=jnp.zeros((4, 48)), pre=jnp.ones(64))
    s = _specs(ws.qarray_specs(lr, P("model", "data"), mesh))
    assert s["lr_a"] == P("model", None) and s["lr_b"] == P(None, "data") and s["pre"] == P("model")
    # act-order: any shard may need any group, so the scales stay whole along the groups
    ao = q.replace(g_idx=jnp.arange(64, dtype=jnp.int32) % 4)
    s = _specs(ws.qarray_specs(ao, P("model", None), mesh))
    assert s["scale"] == P(None, None, None) and s["g_idx"] == P("model") and s["codes"] == P("model", None)


def test_groups_or_packing_blocks_straddling_shards_are_named_errors(mesh):
    q = quant.quantize_array(_w(), "rtn", bits=4, group_size=32)  # 2 groups over 4 shards
    with pytest.raises(ShardingError, match=r"enc/kernel.*2 groups of 32.*'model'"):
        ws.qarray_specs(q, P("model", None), mesh, "enc/kernel")
    s = _specs(ws.qarray_specs(q, P("model", None), mesh, "enc/kernel", indivisible="replicate"))
    assert s["codes"] == P("model", None) and s["scale"] == P(None, None, None)  # asked for, not silent
    q3 = quant.quantize_array(_w(), "rtn", bits=3, group_size=16)  # 32 codes per packing block, 16 rows/shard
    with pytest.raises(ShardingError, match="straddles a block"):
        ws.qarray_specs(q3, P("model", None), mesh, "enc/kernel")
    with pytest.raises(ShardingError, match=r"'w'.*2 groups"):  # the same check through the rules
        ws.shard({"w": q}, mesh, [("w", P("model", None))])


def test_bad_rules_are_named_errors_before_anything_moves(mesh):
    p = {"enc": {"kernel": jnp.ones((8, 30)), "bias": jnp.ones(30)}}
    for rules, pattern in [([("kernel", P(None, "model"))], r"enc/kernel.*dim 1.*30.*'model'"),
                           ([("kernel", P(None, "tensor"))], r"enc/kernel.*unknown mesh axis 'tensor'"),
                           ([("kernel", P("model", "model"))], "used twice"),
                           ([("bias", P(None, "model"))], r"enc/bias.*rank 1"),
                           ([("kernel",)], "rule 0 must be"),
                           ([("kernel", "model")], "PartitionSpec")]:
        with pytest.raises(ShardingError, match=pattern):
            ws.shard(p, mesh, rules)
    with pytest.raises(ShardingError, match="needs 6 devices"):
        ws.make_mesh((2, 3))
    assert ws.make_mesh((2, -1)).shape == {"data": 2, "model": 4}
    with pytest.raises(ShardingError, match="batch axis 0"):
        ws.shard_batch({"x": jnp.ones((3, 4))}, mesh)
    b = ws.shard_batch({"x": jnp.ones((6, 4))}, mesh)
    assert b["x"].sharding.spec == P("data", None)


def test_default_rules_are_megatron_tensor_parallel_per_family(mesh):
    p = llama.random_llama(jax.random.key(0), llama.tiny_config())
    specs = ws.partition_specs(p, ws.default_rules(p), mesh)
    assert specs["model.layers.0.self_attn.q_proj.weight"] == P("model", None)  # column-parallel (out, in)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == P(None, "model")  # row-parallel
    assert specs["model.layers.1.mlp.down_proj.weight"] == P(None, "model")
    assert specs["model.norm.weight"] == P(None)
    fs = ws.partition_specs(p, ws.default_rules(p, fsdp=True), mesh)
    assert fs["model.layers.0.mlp.up_proj.weight"] == P("model", "data")
    t = wl.models.transformer(jax.random.key(0), dim=32)
    specs = ws.partition_specs(t.params, ws.default_rules(t.params), mesh, indivisible="replicate")
    assert specs["block_0"]["attn"]["query"]["kernel"] == P(None, "model")
    assert specs["block_0"]["attn"]["out"]["kernel"] == P("model", None)
    assert specs["head"]["kernel"] == P(None, None)
    from weightlab.models import bert

    cfg = bert.BertConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in bert.expected_shapes(cfg).items()}
    specs = ws.partition_specs(shapes, ws.default_rules(shapes), mesh)
    assert specs["encoder.layer.0.attention.self.query.weight"] == P("model", None)
    assert specs["encoder.layer.0.attention.output.dense.weight"] == P(None, "model")
    assert specs["encoder.layer.0.output.dense.weight"] == P(None, "model")
    assert specs["encoder.layer.0.intermediate.dense.weight"] == P("model", None)
    rows = ws.explain(shapes, mesh)
    assert {r["path"] for r in rows} == set(shapes) and all(r["bytes_per_device"] > 0 for r in rows)
    # The convolution rule takes whole path components of rank-3 kernels only (not q_proj/kernel).
    flax_like = {"q_proj": {"kernel": jnp.ones((16, 16))}, "conv_0": {"kernel": jnp.ones((3, 8, 16))},
                 "proj": {"kernel": jnp.ones((8, 16))}}
    specs = ws.partition_specs(flax_like, ws.default_rules(family="flax"), mesh, indivisible="replicate")
    assert specs["q_proj"]["kernel"] == P(None, None) and specs["proj"]["kernel"] == P(None, None)
    assert specs["conv_0"]["kernel"] == P(None, None, "model")
    # indivisible="replicate" trims a rule written for a higher rank, but a mistyped axis still raises.
    trimmed = ws.partition_specs(flax_like, [("q_proj", P(None, "model", "data"))], mesh, indivisible="replicate")
    assert trimmed["q_proj"]["kernel"] == P(None, "model")
    with pytest.raises(ShardingError, match=r"q_proj/kernel.*unknown mesh axis 'modle'"):
        ws.partition_specs(flax_like, [("q_proj", P("modle"))], mesh, indivisible="replicate")


def _check_placement(out, mesh, rules):
    want = ws.named_shardings(out, mesh, rules)
    for got, w in zip(jax.tree.leaves(ws.shardings(out)), jax.tree.leaves(want)):
        assert got.is_equivalent_to(w, len(w.spec) or 1), (got, w)


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


QUANTIZERS = {"rtn-int4-g16": ("rtn", dict(bits=4, group_size=16, axis=-1)),
              "rtn-nf4": ("rtn", dict(fmt="nf4", group_size=16, axis=-1)),
              "rtn-mxfp4": ("rtn", dict(fmt="mxfp4", axis=-1)),
              "rtn-nvfp4": ("rtn", dict(fmt="nvfp4", axis=-1)),
              "hqq": ("hqq", dict(bits=4, group_size=16, axis=-1)),
              "any4": ("any4", dict(group_size=16, axis=-1)),
              "gptq": ("gptq", dict(bits=4, group_size=16)),
              "awq": ("awq", dict(bits=4, group_size=16))}


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = llama.tiny_config(num_layers=1)
    p = llama.random_llama(jax.random.key(1), cfg)
    toks = jax.random.randint(jax.random.key(2), (4, 16), 0, cfg.vocab_size)
    stats = quant.capture(lambda q, t: llama.llama_apply(q, t, cfg), p, [toks])
    return p, stats


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_every_quantizer_on_the_mesh_equals_one_device(name, tiny_llama):
    p, stats = tiny_llama
    mesh = ws.make_mesh((4, 2))  # 2-way tensor parallel: 32 input rows per shard, whole MX/NV groups
    method, hp = QUANTIZERS[name]
    sel = r"(proj)\.weight$"
    t = wl.select(sel, quant.transform(method, **hp))
    extras = {"stats": {k: v for k, v in stats.items() if "proj" in k}} if QUANTIZERS[name][0] in ("gptq", "awq") else {}
    want = wl.apply_once(t, p, **extras)
    rules = ws.default_rules(p)
    got = wl.apply_once(ws.jit(t, mesh, rules), p, **extras)
    assert quant.is_qarray(got["model.layers.0.mlp.down_proj.weight"])
    _equal(got, want)
    _check_placement(got, mesh, rules)
    down = got["model.layers.0.mlp.down_proj.weight"]  # row-parallel: codes and scales split on the group axis
    assert down.codes.sharding.spec[1] == "model"


MERGES = {"linear": {}, "task_arithmetic": {}, "ties": dict(density=0.4), "dare_ties": dict(density=0.5),
          "magmax": {}, "model_stock": {}, "slerp": dict(t=0.3), "tsv_m": {}, "iso_c": {}}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_every_merge_family_on_the_mesh_equals_one_device(name, mesh):
    key = jax.random.key(0)
    shapes = {"layer_0": {"kernel": (16, 32), "bias": (32,)}, "layer_1": {"kernel": (32, 8), "bias": (8,)}}
    mk = lambda i: jax.tree.map(lambda s: jax.random.normal(jax.random.fold_in(key, i), s) * 0.1 + 1.0, shapes,  # noqa
                                is_leaf=lambda s: isinstance(s, tuple))
    base = mk(0)
    n = 1 if name == "slerp" else 3
    models = jax.tree.map(lambda *x: jnp.stack(x), *[mk(i + 1) for i in range(n)])
    t = merge.transform(name, **MERGES[name])
    extras = dict(models=models, key=jax.random.key(5))
    want = wl.apply_once(t, base, **extras)
    rules = [(r"layer_0/kernel", P(None, "model")), (r"layer_0/bias", P("model")), (r"layer_1/kernel", P("model", None))]
    got = wl.apply_once(ws.jit(t, mesh, rules), base, **extras)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
    _check_placement(got, mesh, rules)


def test_gptq_sharded_along_outputs_runs_its_column_sweep_without_communication(mesh):
    """GPTQ's sweep over input columns updates every output independently: sharded along the
    outputs, the partitioned program has no collective at all (so none in the loop); the loop
    detector itself is checked on a loop that must all-reduce every iteration."""
    from weightlab.quant.second_order import gptq_quantize
    from weightlab.shard import hlo

    k, n = 64, 32
    w = jax.random.normal(jax.random.key(0), (k, n))
    x = jax.random.normal(jax.random.key(1), (256, k))
    h = x.T @ x
    f = jax.jit(lambda w, h: gptq_quantize(w, h, bits=4, group_size=32))
    w_out = jax.device_put(w, jax.sharding.NamedSharding(mesh, P(None, "model")))
    text = hlo.compiled_text(f, w_out, h)
    assert text.count("while(") >= 1  # the sweep is a loop in the compiled program
    assert hlo.collectives_in_loops(text) == [] and hlo.collectives(text) == {}
    _equal(f(w_out, h), f(w, h))
    w_in = jax.device_put(w, jax.sharding.NamedSharding(mesh, P("model", None)))  # inputs sharded: gathered once
    assert hlo.collectives_in_loops(hlo.compiled_text(f, w_in, h)) == []
    xs = jax.device_put(jnp.arange(64.0).reshape(8, 8), jax.sharding.NamedSharding(mesh, P("data", "model")))
    loop = lambda xs: jax.lax.fori_loop(0, 4, lambda i, c: c + jnp.sum(jnp.sin(xs * c[0]), 0), jnp.ones(8))  # noqa
    assert any("all-reduce" in op for _, op in hlo.collectives_in_loops(hlo.compiled_text(loop, xs)))
    # A loop carrying 7 values: XLA prints its tuple types with /*index=5*/ comments in the headers.
    def loop7(xs):
        body = lambda c: (c[0] + 1, *(v * 2 for v in c[1:6]), c[6] + jnp.sum(c[1]))  # noqa: E731
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, xs, xs, xs, xs, xs, 0.0))
    text7 = hlo.compiled_text(loop7, xs)
    assert "/*index=5*/" in text7
    assert [op for _, op in hlo.collectives_in_loops(text7) if "all-reduce" in op]


def test_learned_optimizer_steps_on_the_mesh_keep_state_sharded_and_equal_one_device(mesh):
    """Three small_fc steps through shard.jit (a WeightTransform with grads=): the same params as on
    one device, and every accumulator (momenta (4, *shape), v, row/col factors) sharded like its
    parameter."""
    from weightlab import lopt

    p = {"enc": {"kernel": jax.random.normal(jax.random.key(0), (16, 32)), "bias": jnp.zeros(32)},
         "head": {"kernel": jax.random.normal(jax.random.key(1), (32, 8))}}
    rules = [("enc/kernel", P("data", "model")), ("enc/bias", P("model")), ("head/kernel", P("model", None))]
    t = lopt.transform("small_fc")
    st = ws.init(t, p, mesh, rules)
    assert st.mom["enc"]["kernel"].sharding.spec == P(None, "data", "model")
    assert st.row["enc"]["kernel"].sharding.spec == P("data")
    assert st.col["head"]["kernel"].sharding.spec == P(None)
    run, ref, ref_st = ws.jit(t, mesh, rules), p, t.init(p)
    q = p
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.cos(x + i), q)
        q, st = run.apply(q, st, grads=g)
        gr = jax.tree.map(lambda x: jnp.cos(x + i), ref)
        ref, ref_st = t.apply(ref, ref_st, grads=gr)
    for x, y in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert st.mom["enc"]["kernel"].sharding.spec == P(None, "data", "model")
    _check_placement(q, mesh, rules)


def test_meta_training_population_split_over_the_mesh_equals_one_device(mesh):
    """meta.train(mesh=...): each population (PES pairs and their inner runs) is born split over the
    mesh's devices and stays split through the meta-steps, which communicate only to reduce the
    meta-gradient; the meta-parameters equal the single-device run's; a population the axis does not
    divide is a ShardingError before any work."""
    from weightlab.lopt import estimators as E, meta, tasks

    task = tasks.mlp_task("digits", width=16, depth=1, batch_size=32)
    lo = meta.learned("small_fc", hidden_size=8)
    est = E.pes(num_particles=8, trunc_length=3, horizon=6, sigma=0.05)
    pop = ("data", "model")  # 8 particles over all 8 devices
    ref = meta.train(lo, task, est, meta_steps=3, key=jax.random.key(0))
    res = meta.train(lo, task, est, meta_steps=3, key=jax.random.key(0), mesh=mesh, population_axis=pop)
    for a, b in zip(jax.tree.leaves(res.meta_params), jax.tree.leaves(ref.meta_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.history["meta_loss"], ref.history["meta_loss"], rtol=1e-5)
    # the population itself: each device holds 1 of the 8 particles' params
    state = jax.jit(lambda th, k: est.init(th, task, lo.make, k),
                    out_shardings=meta.population_shardings(
                        jax.eval_shape(lambda th, k: est.init(th, task, lo.make, k), res.meta_params,
                                       jax.random.key(0)), mesh, pop))(res.meta_params, jax.random.key(1))
    leaf = jax.tree.leaves(state["pos"].params)[0]
    assert leaf.shape[0] == 8 and leaf.addressable_shards[0].data.shape[0] == 1
    assert state["key"].sharding.is_fully_replicated
    step = meta._meta_step_fn(est, task, lo.make, meta._DEFAULT_META_OPT, mesh, pop)
    mstate = meta._DEFAULT_META_OPT.init(res.meta_params)
    from weightlab.shard import hlo

    # The particles run where they live: the only communication is the meta-gradient's reduction.
    assert set(hlo.collectives(hlo.compiled_text(step, res.meta_params, mstate, state, jax.random.key(2)))) == {
        "all-reduce"}
    _, _, new, loss, _ = step(res.meta_params, mstate, state, jax.random.key(2))
    assert np.isfinite(float(loss))
    for x in jax.tree.leaves((new["pos"], new["neg"], new["xi"])):
        assert x.sharding.spec[0] == pop, x.sharding
    with pytest.raises(ShardingError, match="6 particles do not split over mesh axis 'model' \\(size 4\\)"):
        meta.train(lo, task, E.es(num_particles=6), meta_steps=1, key=jax.random.key(0), mesh=mesh,
                   population_axis="model")
    with pytest.raises(ShardingError, match="unknown mesh axis 'pop'"):
        meta.train(lo, task, est, meta_steps=1, key=jax.random.key(0), mesh=mesh, population_axis="pop")


def test_alignment_on_the_mesh_equals_one_device(mesh):
    """Weight matching reads sharded params (its cost matrices are contracted on the devices, partial
    sums reduced), finds the same permutations as on one device, and the permuted model comes back
    sharded by the rules (permuting a sharded axis costs XLA one gather of that weight: HLO checked)."""
    from weightlab import align, models
    from weightlab.shard import hlo

    m = models.mlp(jax.random.key(0), hidden=(32, 16))
    spec = align.infer_spec(m.apply_fn, m.params, jax.random.normal(jax.random.key(1), (8, 40)))
    b = align.permute(spec, align.random_perms(spec, jax.random.key(5)), m.params)
    b = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), b)
    rules = [("dense_0/kernel", P("model", None)), ("dense_1/kernel", P(None, "model")), ("dense_1/bias", P("model"))]
    a_sh, b_sh = ws.shard(m.params, mesh, rules), ws.shard(b, mesh, rules)
    found = align.weight_matching(spec, a_sh, b_sh)
    want = align.weight_matching(spec, m.params, b)
    assert all(np.array_equal(found[g], want[g]) for g in spec.groups)
    apply_perms = wl.stateless(lambda p, perms: align.permute(spec, perms, p))
    out = wl.apply_once(ws.jit(apply_perms, mesh, rules), b_sh, perms=dict(found))
    _equal(out, align.permute(spec, want, b))
    _check_placement(out, mesh, rules)
    # dense_0's permuted axis (its outputs) is unsharded under these rules: permuting it is local
    f = jax.jit(lambda w, p: jnp.take(w, p, axis=1))
    assert hlo.collectives(hlo.compiled_text(f, a_sh["dense_0"]["kernel"], jnp.arange(32))) == {}


def test_factored_state_of_a_square_matrix_follows_rows_and_columns_by_name(mesh):
    """A (n, n) weight split (rows over "data", columns over "model"): its row factors (optax
    adafactor's v_row, small_fc's row) take the rows' spec, its column factors the columns'."""
    import optax

    from weightlab import lopt

    p = {"w": jax.random.normal(jax.random.key(0), (16, 16)), "v": jax.random.normal(jax.random.key(1), (16, 8))}
    rules = [("w", P("data", "model")), ("v", P("data", "model"))]
    st = ws.init(lopt.transform("small_fc"), p, mesh, rules)
    assert st.row["w"].sharding.spec == P("data") and st.col["w"].sharding.spec == P("model")
    assert st.row["v"].sharding.spec == P("data") and st.col["v"].sharding.spec == P("model")
    ada = ws.init(optax.adafactor(1e-3, min_dim_size_to_factor=4), p, mesh, rules)
    fac = next(s for s in jax.tree.leaves(ada, is_leaf=lambda s: hasattr(s, "v_row")) if hasattr(s, "v_row"))
    assert fac.v_row["w"].shape == (16,) and fac.v_row["w"].sharding.spec == P("data")
    assert fac.v_col["w"].sharding.spec == P("model")
    # a label that merely contains "row" ("narrow") does not make a column factor a row factor
    mt = optax.multi_transform({"narrow": optax.adafactor(1e-3, min_dim_size_to_factor=4)}, {"w": "narrow", "v": "narrow"})
    st = ws.init(mt, p, mesh, rules)
    fac = next(s for s in jax.tree.leaves(st, is_leaf=lambda s: hasattr(s, "v_row")) if hasattr(s, "v_row"))
    assert fac.v_col["w"].sharding.spec == P("model") and fac.v_row["w"].sharding.spec == P("data")
