"""Writes notebooks/scale.ipynb, the large-model walkthrough (Colab-TPU ready); execute it with nbclient
to commit outputs (``WEIGHTLAB_SMALL=1``, the test suite's setting, shrinks it).

    python scripts/make_scale_notebook.py [--repo OWNER/NAME]

``--repo`` is the GitHub path the open-in-Colab badge and the install cell point at.
"""

import argparse

import nbformat as nbf

ap = argparse.ArgumentParser()
ap.add_argument("--repo", default="weightlab/weightlab")
a = ap.parse_args()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         f"(https://colab.research.google.com/github/{a.repo}/blob/main/notebooks/scale.ipynb)")
cells = [
    md(f"""{badge}

# weightlab at scale: a 1B LLaMA planned on 8/64/256 devices, then run on the devices you have

1. plan the per-device memory of every pillar's job for Llama-3.2-1B's shapes on meshes of 8, 64 and
   256 devices, from `jax.ShapeDtypeStruct`s alone (nothing is allocated);
2. run the same code for real on this machine's mesh (a Colab TPU v2-8 / v5e-8 has 8 cores; on a
   CPU the first cell makes 8 virtual devices) at a size that fits it: sharded quantization (RTN
   and GPTQ), a 3-model merge, one learned-optimizer step, and check the plan against what the
   devices hold.

Runtime > Change runtime type > TPU on Colab. `WEIGHTLAB_SMALL=1` (the test suite) shrinks it."""),
    code(f"""# Install weightlab where it is missing (Colab); skipped where it is installed.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("weightlab") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/{a.repo}"])
# No accelerator: 8 virtual CPU devices, so the mesh below exists everywhere (set before JAX starts).
ACCEL = os.path.exists("/dev/accel0") or bool(os.environ.get("COLAB_TPU_ADDR")) or os.path.exists("/dev/nvidia0")
if not ACCEL:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
print("backend:", jax.default_backend(), "| devices:", jax.device_count(), "|", jax.devices()[0].device_kind)"""),
    code("""import weightlab as wl
from weightlab import lopt, merge, quant, shard as ws
from weightlab.models import llama
from weightlab.shard import plan
SMALL = os.environ.get("WEIGHTLAB_SMALL") == "1"
ON_ACCEL = jax.default_backend() in ("tpu", "gpu")
n = jax.device_count()
model_axis = 8 if ON_ACCEL and n % 8 == 0 else (4 if n % 4 == 0 else n)  # CPU: 2 x 4, data and tensor parallel
mesh = ws.make_mesh((n // model_axis, model_axis), ("data", "model"))   # data x tensor parallel
print(mesh)"""),
    md("""## 1. The plan: Llama-3.2-1B on 8, 64 and 256 devices

`shard.default_rules` are Megatron-style tensor parallel rules (column-parallel q/k/v/gate/up,
row-parallel o/down); `fsdp=True` also splits every matrix over `"data"`. `plan.plan_memory` takes the
quantizer's and optimizers' output shapes from `jax.eval_shape` of the real transforms."""),
    code("""cfg_1b = llama.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                          num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True)
shapes = {k: jax.ShapeDtypeStruct(v, jnp.bfloat16) for k, v in llama.expected_shapes(cfg_1b).items()}
print(f"{sum(x.size for x in shapes.values()) / 1e9:.3f}B parameters")
JOBS = ("params", "merge-3", "optax-adam") if SMALL else ("params", "quantize-rtn", "quantize-gptq", "merge-3",
                                                           "lopt-small_fc", "optax-adam")
plans = {name: plan.plan_memory(shapes, axes, ws.default_rules(shapes, fsdp=fsdp), jobs=JOBS)
         for name, (axes, fsdp) in {"8 (TP 8)": ({"data": 1, "model": 8}, False),
                                    "64 (FSDP 8 x TP 8)": ({"data": 8, "model": 8}, True),
                                    "256 (FSDP 32 x TP 8)": ({"data": 32, "model": 8}, True)}.items()}
from IPython.display import Markdown, display
display(Markdown(plan.markdown(plans)))"""),
    md("""## 2. The same code, for real, on this mesh

A LLaMA sized for the machine (a few layers on CPU or in the test suite; wider on a TPU/GPU), its
params sharded by the default rules. `ws.explain` shows each leaf's spec and bytes per device."""),
    code("""cfg = (llama.tiny_config(num_layers=1 if SMALL else 2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                         head_dim=32, vocab_size=512) if SMALL or not ON_ACCEL else
       llama.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16,
                         num_kv_heads=8, head_dim=64))
params = llama.random_llama(jax.random.key(0), cfg, dtype=jnp.bfloat16)
rules = ws.default_rules(params, fsdp=mesh.shape["data"] > 1)
sp = ws.shard(params, mesh, rules)
for r in ws.explain(params, mesh, rules)[:6]:
    print(f"{r['path']:44s} {str(r['shape']):14s} {r['spec']:24s} {r['bytes_per_device']:>9,d} B/device")
planned = {(r["job"], r["component"]): r["bytes_per_device"] for r in
           plan.plan_memory(jax.eval_shape(lambda: params), mesh, rules, quant_hp=dict(bits=4, group_size=32, axis=-1))}
print("params per device: planned", planned[("params", "params")], "held", plan.measure(sp))"""),
    md("""### Quantization: RTN and GPTQ with sharded QArrays

`shard.jit(t, mesh, rules)` runs any transform under `jax.jit` with the params placed by the rules
and the output constrained to them: codes keep the weight's spec, scales keep it where their groups
align with the shards. GPTQ's statistics come from a calibration batch."""),
    code("""import time
rtn = wl.select(r"proj\\.weight$", quant.transform("rtn", bits=4, group_size=32, axis=-1))
t0 = time.perf_counter(); q = wl.apply_once(ws.jit(rtn, mesh, rules), params); jax.block_until_ready(q)
down = q["model.layers.0.mlp.down_proj.weight"]
print(f"RTN: {time.perf_counter() - t0:.1f} s; down_proj codes {down.codes.shape} {down.codes.sharding.spec}, "
      f"scales {down.scale.shape} {down.scale.sharding.spec}")
print("quantized model per device: planned", planned[("quantize-rtn", "quantized output")], "held", plan.measure(q))
toks = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size)
stats = quant.capture(lambda p, t: llama.llama_apply(p, t, cfg), jax.tree.map(lambda x: x.astype(jnp.float32), params), [toks])
stats = {k: v for k, v in stats.items() if k.endswith("proj.weight")}
gptq = wl.select(r"proj\\.weight$", quant.transform("gptq", bits=4, group_size=32))
t0 = time.perf_counter(); qg = wl.apply_once(ws.jit(gptq, mesh, rules), params, stats=stats); jax.block_until_ready(qg)
print(f"GPTQ: {time.perf_counter() - t0:.1f} s; q_proj codes sharding {qg['model.layers.0.self_attn.q_proj.weight'].codes.sharding.spec}")"""),
    md("""### Merging three fine-tunes (TIES), sharded like the params"""),
    code("""models = jax.tree.map(lambda x: jnp.stack([x + (0.01 * (i + 1) * jnp.sin(x.astype(jnp.float32) * (i + 2))).astype(x.dtype)
                                         for i in range(3)]), params)
merged = wl.apply_once(ws.jit(merge.transform("ties", density=0.5), mesh, rules), params, models=models)
print("merged per device:", plan.measure(merged), "bytes; e.g.", merged["model.layers.0.mlp.up_proj.weight"].sharding.spec)"""),
    md("""### One learned-optimizer step, its state born sharded

`jax.jit(opt.init)` would replicate the optimizer state on every device (zeros carry no sharding);
`shard.init` creates it sharded like the params."""),
    code("""opt = lopt.transform("small_fc")
f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
state = ws.init(opt, f32, mesh, rules)
loss = lambda p: jnp.mean(llama.llama_apply(p, toks, cfg) ** 2)
g = jax.grad(loss)(f32)
new, state = ws.jit(opt, mesh, rules).apply(f32, state, grads=g)
print("small_fc state per device:", plan.measure(state), "bytes (jit(init) would hold", plan.measure(jax.jit(opt.init)(f32)), ")")
print("loss before/after one step:", float(loss(f32)), float(loss(new)))"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "accelerator": "TPU", "colab": {"provenance": [], "gpuType": "V28"}})
nbf.write(nb, "notebooks/scale.ipynb")
