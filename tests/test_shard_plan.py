"""weightlab.shard.plan: per-device memory planned from shapes equals what a real 8-device CPU mesh
holds, at a scaled-down LLaMA (the docs/scale.md table is the same code at 1B)."""

import jax
import jax.numpy as jnp
import pytest

import weightlab as wl
from weightlab import lopt, quant, shard as ws
from weightlab.models import llama
from weightlab.shard import plan


@pytest.fixture(scope="module")
def setup():
    mesh = ws.make_mesh((2, 4))
    cfg = llama.tiny_config(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                            head_dim=32, vocab_size=512)
    p = llama.random_llama(jax.random.key(0), cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: p)
    rules = ws.default_rules(p, fsdp=True)
    rows = {(r["job"], r["component"]): r["bytes_per_device"]
            for r in plan.plan_memory(shapes, mesh, rules, quant_hp=dict(bits=4, group_size=32, axis=-1))}
    return mesh, p, rules, rows


def test_planned_bytes_are_what_the_mesh_holds(setup):
    mesh, p, rules, rows = setup
    sp = ws.shard(p, mesh, rules)
    assert plan.measure(sp) == rows[("params", "params")]
    t = wl.select(r"proj\.weight$", quant.transform("rtn", bits=4, group_size=32, axis=-1))
    q = wl.apply_once(ws.jit(t, mesh, rules), p)
    assert quant.is_qarray(q["model.layers.0.mlp.down_proj.weight"])
    assert plan.measure(q) == rows[("quantize-rtn", "quantized output")]
    stacked = ws.jit(wl.identity(), mesh, rules).apply(sp, None, models=jax.tree.map(lambda x: jnp.stack([x] * 3), p))
    assert plan.measure(stacked) == rows[("params", "params")]
    for name, opt in {"lopt-small_fc": lopt.small_fc(), "optax-adam": __import__("optax").adam(1e-3)}.items():
        assert plan.measure(jax.jit(opt.init)(sp)) >= 7 * rows[(name, "optimizer state")]  # jit replicates zeros
        state = ws.init(opt, p, mesh, rules)  # born sharded like the params
        assert plan.measure(state) == pytest.approx(rows[(name, "optimizer state")], rel=0.02), name


def test_bytes_per_device_of_a_lut_qarray_is_what_the_mesh_holds(setup):
    """any4 QArrays have no zeros but a per-row table: absent children must not shift the specs."""
    mesh = setup[0]
    q = quant.quantize_any4(jax.random.normal(jax.random.key(0), (256, 128)), group_size=64)
    assert q.zero is None and q.lut is not None
    rules = [("w", ws.P(None, "model"))]
    placed = ws.shard({"w": q}, mesh, rules)
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed))
    spec = ws.partition_specs({"w": q}, rules, mesh)["w"]
    assert ws.bytes_per_device(q, spec, mesh) == held == plan.measure(placed)


def test_plan_for_a_1b_llama_on_8_64_256_devices_runs_from_shapes_alone():
    cfg = llama.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                            num_kv_heads=8, head_dim=64, tie_word_embeddings=True)  # Llama-3.2-1B's shapes
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.bfloat16) for k, v in llama.expected_shapes(cfg).items()}
    assert sum(x.size for x in shapes.values()) > 1.2e9
    totals = []
    for axes in ({"data": 1, "model": 8}, {"data": 8, "model": 8}, {"data": 32, "model": 8}):
        rows = plan.plan_memory(shapes, axes, ws.default_rules(shapes, fsdp=axes["data"] > 1),
                                jobs=("params", "merge-3"))
        totals.append(rows[0]["bytes_per_device"])
    assert totals[0] > 7.9 * totals[1] and totals[1] > 3.9 * totals[2]  # FSDP x TP divides the model


def test_hessians_are_grouped_per_layer_for_llama_bert_flax_and_experts():
    """GPTQ's Hessians: one per distinct matmul input and layer, whatever the naming: Q/K/V share
    one, gate/up another (per expert: experts see different tokens); K from the (out, in)
    ``weight`` or the (in, out) flax ``kernel``; a numbered segment without siblings (flax's
    ``Encoder_0``) is not the layer list."""
    from weightlab.shard.plan import _hessian_groups

    S = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    shapes = {}
    for i in range(2):
        shapes.update({f"model.layers.{i}.self_attn.q_proj.weight": S(64, 32), f"model.layers.{i}.self_attn.k_proj.weight": S(16, 32),
                       f"model.layers.{i}.self_attn.o_proj.weight": S(32, 64), f"model.layers.{i}.mlp.up_proj.weight": S(128, 32),
                       f"model.layers.{i}.mlp.gate_proj.weight": S(128, 32), f"model.layers.{i}.mlp.down_proj.weight": S(32, 128),
                       f"encoder/layer_{i}/attn/query/kernel": S(24, 24), f"encoder/layer_{i}/attn/value/kernel": S(24, 24),
                       f"encoder/layer_{i}/attn/out/kernel": S(24, 24), f"encoder/layer_{i}/mlp/up/kernel": S(24, 96),
                       f"encoder/layer_{i}/mlp/down/kernel": S(96, 24), f"Encoder_0/EncoderBlock_{i}/Dense_0/kernel": S(8, 16),
                       f"Encoder_0/EncoderBlock_{i}/Dense_1/kernel": S(16, 8)})
        for e in range(3):
            shapes.update({f"moe.layers.{i}.experts.{e}.w1.weight": S(56, 16), f"moe.layers.{i}.experts.{e}.w3.weight": S(56, 16),
                           f"moe.layers.{i}.experts.{e}.w2.weight": S(16, 56)})
    shapes["lm_head.weight"] = S(100, 32)
    g = _hessian_groups(shapes, lambda p, x: True)
    for i in range(2):
        assert g[f"model.layers.{i}"] == [32, 64, 32, 128]
        assert g[f"encoder.layer_{i}"] == [24, 24, 24, 96]
        assert g[f"Encoder_0.EncoderBlock_{i}"] == [8, 16]
        assert g[f"moe.layers.{i}"] == [16, 56] * 3  # each expert: w1/w3 share an input, w2 its own
    assert g[""] == [32] and len(g) == 9
