"""The shape of learned_optimization's CPU tutorial, on sklearn's 8x8 digits, for each estimator.

    python scripts/lopt_tutorial.py [--meta-steps 300] [--particles 16] [--horizon 400] [--trunc 50]

learned_optimization's no-dependency tutorial meta-trains a per-parameter MLP optimizer on 8x8 image
MLPs from a start that barely moves the weights, and reports the meta-loss (mean training loss over
the inner run) falling 2.30 -> 1.60 with truncated backprop (16 tasks x 400 steps), 1.75 with ES and
1.88 with PES. Here: the same start (small_fc with its skip scaled by 0.01, so it begins near
ln 10 = 2.30), the digits MLP task family, ``--particles`` inner runs, horizon 400, truncations of
50, Adam on the meta-parameters; for each estimator the meta-loss before (mean of the first 10
meta-steps) and after (mean of the last 10), and the held-out result of 400 inner steps with the
meta-trained optimizer from scratch (whole-run mean training loss, the tutorial's meta-loss).
Prints one JSON line per estimator.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax


def main():
    from weightlab.lopt import meta, tasks

    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-steps", type=int, default=300)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--horizon", type=int, default=400)
    ap.add_argument("--trunc", type=int, default=50)
    ap.add_argument("--meta-lr", type=float, default=3e-3)
    ap.add_argument("--estimators", default="tbptt,es,pes")
    ap.add_argument("--lopt", default="small_fc", choices=["small_fc", "hyper"],
                    help="hyper: the VeLO-style per-tensor LSTM, horizon-conditioned on --horizon")
    a = ap.parse_args()
    task = tasks.mlp_task("digits", width=32, depth=1, batch_size=128)
    weak = lambda th: dict(th, skip=th["skip"] * 0.01)  # noqa: E731  (an optimizer that barely moves)
    if a.lopt == "hyper":
        lo = meta.learned("hyper", hidden_size=32, num_steps=a.horizon)
        theta0 = lo.init_meta(jax.random.key(0))
        theta0 = dict(theta0, perparam=weak(theta0["perparam"]))
    else:
        lo = meta.learned("small_fc", hidden_size=32)
        theta0 = weak(lo.init_meta(jax.random.key(0)))
    start = meta.run(lo.make(theta0), task, steps=a.horizon, key=jax.random.key(7), seeds=4).train_loss.mean()
    for name in a.estimators.split(","):
        kw = dict(num_particles=a.particles, trunc_length=a.trunc, horizon=a.horizon)
        est = meta.tbptt(**kw) if name == "tbptt" else getattr(meta, name)(sigma=0.01, **kw)
        t0 = time.process_time()
        res = meta.train(lo, task, est, meta_steps=a.meta_steps, key=jax.random.key(1), meta_params=theta0,
                         meta_optimizer=optax.adam(a.meta_lr))
        cpu = time.process_time() - t0
        after = meta.run(lo.make(res.meta_params), task, steps=a.horizon, key=jax.random.key(7), seeds=4)
        h = res.history["meta_loss"]
        print(json.dumps({"lopt": a.lopt, "estimator": name, "meta_steps": a.meta_steps, "particles": a.particles,
                          "horizon": a.horizon, "trunc": a.trunc, "whole_run_loss_before": round(float(start), 3),
                          "meta_loss_first10": round(float(np.mean(h[:10])), 3),
                          "meta_loss_last10": round(float(np.mean(h[-10:])), 3),
                          "whole_run_loss_after": round(float(after.train_loss.mean()), 3),
                          "test_accuracy_after": round(float(after.test_accuracy[:, -1].mean()), 3),
                          "skipped": res.skipped, "cpu_seconds": round(cpu, 1)}), flush=True)


if __name__ == "__main__":
    main()
