"""Benchmark the hand-designed optimizer variants (weightlab.lopt.variants) against their bases.

Each variant runs with the *same* learning rate as its base optimizer, the base's best rate from a
small grid (tuned on a validation split carved from the training set, one seed), over several
seeds. Tasks: (a) an MLP on MNIST-1D (``weightlab.data.load_mnist1d``), (b) a one-layer transformer
that sorts random token sequences (synthetic, 16 tokens of a 16-symbol vocabulary). Prints one
JSON line per (task, optimizer): final test loss / accuracy mean and std over seeds and the ratio to
the base's means. Bases: AdamW (weight decay 0.01) for the Adam-family variants, SGD with momentum
0.9 for TAM, SGDP and the cautious wrapper around SGD-momentum; Switch EMA wraps AdamW, switches once
per epoch (``len(train) // batch`` steps) with EMA decay ``1 - 1 / steps_per_epoch``.

    python scripts/bench_optim.py            # full: 1500 steps (MLP), 1000 steps (transformer), 3 seeds
    python scripts/bench_optim.py --quick    # about a minute: 100 / 60 steps, no lr tuning, small
                                             # models, XLA backend optimisation off (compile-bound)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if "--quick" in sys.argv[1:]:  # compile time dominates a quick run: skip XLA's backend optimisation
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from weightlab.data import load_mnist1d  # noqa: E402
from weightlab.lopt import variants as V  # noqa: E402

WD = 0.01  # decoupled weight decay of the AdamW family (the SGD family runs without)


# --- optimizers: name -> (base name, factory(lr, steps_per_epoch)) -------------------------------

def _optimizers():
    adamw = lambda lr, ep: optax.adamw(lr, weight_decay=WD)  # noqa: E731
    sgdm = lambda lr, ep: optax.sgd(lr, momentum=0.9)  # noqa: E731
    return {
        "adamw": ("adamw", adamw),
        "sgdm": ("sgdm", sgdm),
        "cautious_adamw": ("adamw", lambda lr, ep: V.cautious_adamw(lr, weight_decay=WD)),
        "grams": ("adamw", lambda lr, ep: V.grams(lr, weight_decay=WD)),
        "adamp": ("adamw", lambda lr, ep: V.adamp(lr, weight_decay=WD, channel_axis=-1)),
        "adamw_cwd": ("adamw", lambda lr, ep: V.adamw_cwd(lr, weight_decay=WD)),
        "adatam": ("adamw", lambda lr, ep: V.adatam(lr, weight_decay=WD)),
        "switch_ema(adamw)": ("adamw", lambda lr, ep: V.switch_ema(adamw(lr, ep), decay=1 - 1 / ep, switch_every=ep)),
        "tam": ("sgdm", lambda lr, ep: V.tam(lr, momentum=0.9)),
        "sgdp": ("sgdm", lambda lr, ep: V.sgdp(lr, momentum=0.9, channel_axis=-1)),
        "cautious(sgdm)": ("sgdm", lambda lr, ep: V.cautious(sgdm(lr, ep))),
    }


GRIDS = {"adamw": (1e-3, 3e-3, 1e-2), "sgdm": (0.01, 0.03, 0.1)}
QUICK_LR = {"adamw": 3e-3, "sgdm": 0.03}


# --- models --------------------------------------------------------------------------------------

def _dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * math.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _ln(x, g, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * g + b


def tf_init(key, vocab, length, d, heads, ff):
    k = jax.random.split(key, 8)
    nrm = lambda kk, s, fan: jax.random.normal(kk, s) / math.sqrt(fan)  # noqa: E731
    return {"emb": nrm(k[0], (vocab, d), 1.0) * 0.5, "pos": nrm(k[1], (length, d), 1.0) * 0.5,
            "qkv": nrm(k[2], (d, 3 * d), d), "o": nrm(k[3], (d, d), d),
            "ln1": {"g": jnp.ones(d), "b": jnp.zeros(d)}, "ln2": {"g": jnp.ones(d), "b": jnp.zeros(d)},
            "ff1": _dense(k[4], d, ff), "ff2": _dense(k[5], ff, d), "out": _dense(k[6], d, vocab)}


def tf_apply(p, tokens, heads):
    x = p["emb"][tokens] + p["pos"]
    n, length, d = x.shape
    h = _ln(x, p["ln1"]["g"], p["ln1"]["b"]) @ p["qkv"]
    q, k, v = (a.reshape(n, length, heads, d // heads) for a in jnp.split(h, 3, -1))
    att = jax.nn.softmax(jnp.einsum("nqhc,nkhc->nhqk", q, k) / math.sqrt(d // heads), -1)
    x = x + jnp.einsum("nhqk,nkhc->nqhc", att, v).reshape(n, length, d) @ p["o"]
    h = _ln(x, p["ln2"]["g"], p["ln2"]["b"])
    x = x + jax.nn.relu(h @ p["ff1"]["w"] + p["ff1"]["b"]) @ p["ff2"]["w"] + p["ff2"]["b"]
    return x @ p["out"]["w"] + p["out"]["b"]


# --- tasks ---------------------------------------------------------------------------------------

def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def task_mnist1d(quick):
    d = load_mnist1d()
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (jnp.asarray(d["x_test"]) - mu) / sd
    sizes = (40, 128, 10) if quick else (40, 256, 256, 10)
    return dict(name="mnist1d_mlp", x=x, y=y, x_test=xt, y_test=jnp.asarray(d["y_test"]),
                init=lambda k: mlp_init(k, sizes), apply=mlp_apply, steps=100 if quick else 1500)


def task_sort(quick, steps=None):
    vocab, length, heads = (8, 8, 2) if quick else (16, 16, 2)
    d_model = 16 if quick else 64
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, (4096, length)).astype(np.int32)
    xt = rng.integers(0, vocab, (1024, length)).astype(np.int32)
    return dict(name="sort_transformer", x=jnp.asarray(x), y=jnp.asarray(np.sort(x, 1)), x_test=jnp.asarray(xt),
                y_test=jnp.asarray(np.sort(xt, 1)), init=lambda k: tf_init(k, vocab, length, d_model, heads,
                                                                                 2 * d_model),
                apply=lambda p, t: tf_apply(p, t, heads), steps=60 if quick else (steps or 1000))


# --- training ------------------------------------------------------------------------------------

def make_runner(task, make_opt, batch, validation):
    """jit(vmap over seeds) of a full training run; the learning rate is a traced scalar."""
    x, y, xt, yt = task["x"], task["y"], task["x_test"], task["y_test"]
    if validation:  # tune on the last 20% of the training set, never on the test set
        cut = int(0.8 * x.shape[0])
        x, y, xt, yt = x[:cut], y[:cut], x[cut:], y[cut:]
    n, apply, steps = x.shape[0], task["apply"], task["steps"]
    per_epoch = max(1, n // batch)

    def loss_fn(p, xb, yb):
        return _xent(apply(p, xb), yb)

    def run(lr, seed):
        key = jax.random.key(seed)
        params = task["init"](jax.random.fold_in(key, 0))
        opt = make_opt(lambda count: lr, per_epoch)
        state = opt.init(params)

        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, n)
            g = jax.grad(loss_fn)(p, x[idx], y[idx])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, state), jax.random.split(jax.random.fold_in(key, 1), steps))
        logits = apply(params, xt)
        acc = jnp.mean(jnp.argmax(logits, -1) == yt)
        return _xent(logits, yt), acc

    return jax.jit(jax.vmap(run, in_axes=(None, 0)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: few steps, no lr tuning")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (bases always run)")
    ap.add_argument("--tf-steps", type=int, default=1000,
                    help="transformer steps (reversal, tried first, was solved exactly by every optimizer: no signal)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    opts = _optimizers()
    if args.only:
        keep = set(args.only.split(","))
        opts = {k: v for k, v in opts.items() if k in keep or k in GRIDS}
    seeds = jnp.arange(args.seeds)
    for task in (task_mnist1d(args.quick), task_sort(args.quick, args.tf_steps)):
        lrs = {}
        for base in GRIDS:  # tune each base on the validation split with seed 0 (full mode only)
            if args.quick:
                lrs[base] = QUICK_LR[base]
                continue
            runner = make_runner(task, opts[base][1], args.batch, validation=True)
            scores = {lr: float(runner(jnp.float32(lr), jnp.arange(1))[0][0]) for lr in GRIDS[base]}
            lrs[base] = min(scores, key=lambda k: scores[k] if math.isfinite(scores[k]) else math.inf)
        results = {}
        for name, (base, make) in opts.items():
            t0 = time.time()
            loss, acc = make_runner(task, make, args.batch, validation=False)(jnp.float32(lrs[base]), seeds)
            loss, acc = np.asarray(loss, np.float64), np.asarray(acc, np.float64)
            results[name] = (loss.mean(), acc.mean())
            rec = {"task": task["name"], "optimizer": name, "base": base, "lr": lrs[base], "steps": task["steps"],
                   "seeds": int(args.seeds), "test_loss_mean": round(float(loss.mean()), 5),
                   "test_loss_std": round(float(loss.std()), 5), "test_acc_mean": round(float(acc.mean()), 5),
                   "test_acc_std": round(float(acc.std()), 5), "seconds": round(time.time() - t0, 1)}
            if base in results:
                rec["loss_ratio_to_base"] = round(float(loss.mean() / results[base][0]), 4)
                rec["acc_ratio_to_base"] = round(float(acc.mean() / max(results[base][1], 1e-12)), 4)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
