"""Writes notebooks/learned_optimizers.ipynb (then execute it with nbclient to commit outputs)."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("""# weightlab.lopt: learned optimizers as optax transforms

A learned optimizer is a small neural network that maps what an optimizer sees about each parameter
(gradient, momenta, second moments, the parameter itself, the step) to its update. In weightlab it is
an ordinary `optax.GradientTransformationExtraArgs`: it goes into `optax.chain`, takes schedules,
`multi_transform`, `jit`, `vmap` and sharded params. This notebook:

1. trains an MNIST-1D MLP with the **shipped** optimizer `lopt.pretrained("small_fc_mnist1d")` next to Adam;
2. composes it the way optax users do;
3. runs the seed papers' hand-designed variants (cautious, Grams, AdamP, TAM, Switch EMA ...);
4. meta-trains a learned optimizer (truncated backprop, then PES) and resumes an interrupted run;
5. shows the hierarchical (VeLO-style) and μLO variants.

`WEIGHTLAB_SMALL=1` (the test suite) shrinks every run."""),
    code("""import os, time, numpy as np, jax, jax.numpy as jnp, optax
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from IPython.display import Image, display
import weightlab as wl
from weightlab import lopt
from weightlab.lopt import meta, tasks
SMALL = os.environ.get("WEIGHTLAB_SMALL") == "1"
STEPS = 50 if SMALL else 1000
SEEDS = 1 if SMALL else 3
print(jax.devices(), "small" if SMALL else "full")"""),
    md("""## 1. The shipped optimizer on a task

`lopt.shipped.available()` lists the shipped meta-weights with the recipe that reproduces them.
`meta.run` trains a task (params from its key, batches from its key and step) and records curves;
`seeds=` runs several seeds in one vmapped program."""),
    code("""print(lopt.shipped.available()["small_fc_mnist1d"]["recipe"])
task = tasks.mlp_task("mnist1d", width=64, depth=2)
opts = {"small_fc_mnist1d": lopt.pretrained("small_fc_mnist1d"), "adam 1e-3": optax.adam(1e-3), "adam 3e-3": optax.adam(3e-3)}
runs = {n: meta.run(o, task, steps=STEPS, key=jax.random.key(0), seeds=SEEDS, eval_every=STEPS // 5) for n, o in opts.items()}
for n, r in runs.items():
    print(f"{n:18s} train loss {r.train_loss[:, -STEPS // 10:].mean():.3f}  test loss {r.test_loss[:, -1].mean():.3f}  "
          f"test acc {r.test_accuracy[:, -1].mean():.3f} ± {r.test_accuracy[:, -1].std():.3f}")
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
for n, r in runs.items():
    ax[0].plot(np.convolve(r.train_loss.mean(0), np.ones(20) / 20, "valid"), label=n)
    ax[1].plot(r.eval_steps, r.test_loss.mean(0), "o-", label=n)
ax[0].set(yscale="log", xlabel="step", ylabel="train loss"); ax[1].set(xlabel="step", ylabel="test loss"); ax[0].legend()
fig.tight_layout(); fig.savefig("lopt_curves.png", dpi=90); plt.close(fig); display(Image("lopt_curves.png"))"""),
    md("""It was meta-trained with a *validation* objective (the loss on held-out training data after each
step), so it trades some training loss for test loss. docs/learned_optimizers.md has the held-out
evaluation against Adam with a tuned learning rate (5 seeds, 1000 and 5000 steps, wider nets)."""),
    md("## 2. An ordinary optax citizen"),
    code("""params = task.init(jax.random.key(1))
grads = jax.grad(task.loss)(params, task.batch(jax.random.key(1), 0))
sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 50, 1000)
chained = optax.chain(optax.clip_by_global_norm(1.0), lopt.pretrained("small_fc_mnist1d", learning_rate=sched))
u, s = jax.jit(chained.update)(grads, chained.init(params), params)
mixed = optax.multi_transform({"lo": lopt.small_fc(), "adam": optax.adam(1e-3)},
                              {k: ("lo" if k != "layer_2" else "adam") for k in params})
u, s = mixed.update(grads, mixed.init(params), params)
t = wl.select("layer_0/", lopt.transform("small_fc"))            # the weightlab protocol: one step, grads=
new = wl.apply_once(t, params, grads=grads)
print("unchanged outside the selection:", bool(jnp.all(new["layer_1"]["kernel"] == params["layer_1"]["kernel"])))
low = lopt.small_fc(factored=True, state_dtype=jnp.bfloat16)   # Adafactor-style factors, bf16 momenta
nbytes = lambda st: sum(x.nbytes for x in jax.tree.leaves(st))
print("state bytes: full", nbytes(lopt.small_fc().init(params)), " low-memory", nbytes(low.init(params)))"""),
    md("""## 3. The seed papers' variants

Each is registered next to the learned optimizers (`weightlab methods --pillar lopt`) and tested
against a literal NumPy reading of its paper over 60 steps."""),
    code("""variants = {"adamw": optax.adamw(3e-3, weight_decay=1e-4), "cautious_adamw": lopt.cautious_adamw(3e-3, weight_decay=1e-4),
            "adamw_cwd": lopt.adamw_cwd(3e-3, weight_decay=1e-4), "grams": lopt.grams(3e-3),
            "adamp": lopt.adamp(3e-3, channel_axis=-1), "sgd momentum": optax.sgd(3e-2, momentum=0.9), "tam": lopt.tam(3e-2),
            "switch_ema(adam)": lopt.switch_ema(optax.adam(3e-3), decay=0.99, switch_every=100)}
if SMALL:
    variants = {k: variants[k] for k in ("cautious_adamw", "grams")}
for n, o in variants.items():
    r = meta.run(o, task, steps=STEPS, key=jax.random.key(0), seeds=SEEDS)
    print(f"{n:18s} test acc {r.test_accuracy[:, -1].mean():.3f}   test loss {r.test_loss[:, -1].mean():.3f}")"""),
    md("""## 4. Meta-training

`meta.learned(name)` is what is trained (`init_meta`, `make(theta)`); an estimator turns truncated
inner runs into meta-gradients: `meta.tbptt` (backprop through each truncation), `meta.es`
(antithetic), `meta.pes` (unbiased across truncations). We start from an optimizer that barely
moves the weights, like learned_optimization's CPU tutorial, on the 8x8 digits."""),
    code("""digits = tasks.mlp_task("digits", width=32, depth=1)
lo = meta.learned("small_fc", hidden_size=16)
theta0 = lo.init_meta(jax.random.key(0)); theta0 = dict(theta0, skip=theta0["skip"] * 0.01)
MS = 3 if SMALL else 150
res = meta.train(lo, digits, meta.tbptt(num_particles=8, trunc_length=20, horizon=200), meta_steps=MS,
                 key=jax.random.key(0), meta_params=theta0, meta_optimizer=optax.adam(3e-3))
IN = 20 if SMALL else 200
before = meta.run(lo.make(theta0), digits, steps=IN, key=jax.random.key(5), seeds=2)
after = meta.run(lo.make(res.meta_params), digits, steps=IN, key=jax.random.key(5), seeds=2)
print(f"whole-run mean training loss: {before.train_loss.mean():.3f} -> {after.train_loss.mean():.3f};"
      f" test acc {before.test_accuracy[:, -1].mean():.3f} -> {after.test_accuracy[:, -1].mean():.3f}; skipped {res.skipped}")
plt.figure(figsize=(4, 2.5)); plt.plot(res.history["meta_loss"]); plt.xlabel("meta-step"); plt.ylabel("meta-loss")
plt.tight_layout(); plt.savefig("meta_loss.png", dpi=90); plt.close(); display(Image("meta_loss.png"))"""),
    md("""Checkpoints: `checkpoint=` a directory (orbax, every `checkpoint_every` meta-steps). A killed run
resumes where the last checkpoint left it, bit-identically (all randomness is derived from the key and the meta-step number).
From the shell: `weightlab lopt meta-train out.safetensors --tasks digits_mlp --estimator pes`."""),
    code("""import tempfile
ck = tempfile.mkdtemp() + "/ck"
est = meta.pes(num_particles=2, trunc_length=5, horizon=20)
def stop(step, loss):
    if step == 2: raise KeyboardInterrupt
try:
    meta.train(lo, digits, est, meta_steps=4, key=jax.random.key(1), checkpoint=ck, checkpoint_every=2, progress=stop)
except KeyboardInterrupt:
    print("interrupted at meta-step 2")
resumed = meta.train(lo, digits, est, meta_steps=4, key=jax.random.key(1), checkpoint=ck, checkpoint_every=2)
straight = meta.train(lo, digits, est, meta_steps=4, key=jax.random.key(1))
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(resumed.meta_params), jax.tree.leaves(straight.meta_params)))
print("resumed from", resumed.resumed_from, "- identical to an uninterrupted run:", same)"""),
    md("""## 5. Hierarchical (VeLO-style) and μLO

`lopt.hyper` adds a per-tensor LSTM (or MLP) that reads tensor statistics, the loss (`update(...,
loss=)`) and optionally the horizon, and modulates the per-parameter MLP. `lopt.mulo` scales each
matrix's step by `fan_in(base) / fan_in(leaf)` so an optimizer meta-trained on narrow nets keeps its
meaning on wide ones."""),
    code("""h = lopt.hyper(num_steps=STEPS)
params = task.init(jax.random.key(0))
u, st = jax.jit(h.update)(grads, h.init(params), params, loss=task.loss(params, task.batch(jax.random.key(0), 0)))
print("hyper: one step with the loss; per-tensor LSTM state for", len(jax.tree.leaves(st.extra["cells"])), "tensors")
wide = tasks.mlp_task("mnist1d", width=128 if SMALL else 512, depth=2)
base = jax.eval_shape(task.init, jax.random.key(0))
for n, o in {"small_fc_mnist1d": lopt.pretrained("small_fc_mnist1d"),
             "+ muP (mulo)": lopt.pretrained("small_fc_mnist1d", mup_base=base)}.items():
    r = meta.run(o, wide, steps=STEPS, key=jax.random.key(0), seeds=SEEDS)
    print(f"width {wide.config['width']}, {n:18s} test acc {r.test_accuracy[:, -1].mean():.3f}  test loss {r.test_loss[:, -1].mean():.3f}")"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                               "name": "python3"}})
nbf.write(nb, "notebooks/learned_optimizers.ipynb")
