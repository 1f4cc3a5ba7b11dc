"""Held-out evaluation of a learned optimizer against Adam with a tuned learning rate.

    python scripts/lopt_eval.py [--name small_fc_mnist1d] [--steps 1000,5000] [--seeds 5] [--quick]

Tasks the meta-training never saw (new seeds everywhere; new architectures where marked): the
MNIST-1D MLP at width 64 (in the family), at width 256 and 512 (2x and 4x the widest meta-training
net), the digits MLP, the digits CNN and the sequence transformer. For every task and step budget:
Adam with the learning rate picked from a sweep of 7 values (1e-4 .. 1e-1) on the meta-validation
split (never the test split), Adam at 1e-3, the learned optimizer, and the μLO ablation (the same
meta-weights with μP step scaling relative to the width-64 net, on the wider nets). Prints one JSON
line per row and, with ``--out``, writes the rows (JSON) and a loss-curve figure.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def main():
    from weightlab import lopt
    from weightlab.lopt import meta, tasks

    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="small_fc_mnist1d")
    ap.add_argument("--steps", default="1000,5000")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="200 steps, 2 seeds, two tasks (a smoke test)")
    ap.add_argument("--out", default=None, help="prefix for <out>.json and <out>.png")
    ap.add_argument("--tasks", default=None, help="comma-separated indices into the task list (default: all)")
    a = ap.parse_args()
    steps_list = [200] if a.quick else [int(s) for s in a.steps.split(",")]
    seeds = 2 if a.quick else a.seeds
    base = tasks.mlp_task("mnist1d", width=64, depth=2)
    todo = [("mnist1d MLP w64", base, None), ("mnist1d MLP w256 (2x widest seen)", tasks.mlp_task("mnist1d", width=256,
                                                                                                depth=2), base),
            ("mnist1d MLP w512 (4x)", tasks.mlp_task("mnist1d", width=512, depth=2), base),
            ("digits MLP w64", tasks.mlp_task("digits", width=64, depth=1), None),
            ("digits CNN w16", tasks.cnn_task(width=16, depth=2), None),
            ("sequence transformer", tasks.sequence_task(), None)]
    if a.quick:
        todo = todo[:2]
    elif a.tasks:
        todo = [todo[int(i)] for i in a.tasks.split(",")]
    rows, curves = [], {}
    for label, task, mup_of in todo:
        for steps in steps_list:
            t0 = time.perf_counter()
            best, scores = meta.tune_lr(optax.adam, task, LRS, steps=steps, key=jax.random.key(100), seeds=2, on="valid")
            opts = {"learned": lopt.pretrained(a.name), f"adam tuned ({best:g})": optax.adam(best),
                    "adam 1e-3": optax.adam(1e-3)}
            if mup_of is not None:
                shapes = jax.eval_shape(mup_of.init, jax.random.key(0))
                opts["learned + muP (mulo)"] = lopt.pretrained(a.name, mup_base=shapes)
            for name, opt in opts.items():
                r = meta.run(opt, task, steps=steps, key=jax.random.key(7), seeds=seeds, eval_every=steps // 10)
                row = {"task": label, "steps": steps, "optimizer": name, "seeds": seeds,
                       "test_loss": float(np.mean(r.test_loss[:, -1])), "test_loss_std": float(np.std(r.test_loss[:, -1])),
                       "test_accuracy": float(np.mean(r.test_accuracy[:, -1])),
                       "test_accuracy_std": float(np.std(r.test_accuracy[:, -1])),
                       "best_test_accuracy": float(np.mean(r.test_accuracy.max(1))),
                       "final_train_loss": float(np.mean(r.train_loss[:, -max(1, steps // 10):]))}
                rows.append(row)
                curves[(label, steps, name)] = np.mean(r.train_loss, 0)
                print(json.dumps(row), flush=True)
            print(json.dumps({"task": label, "steps": steps, "adam_sweep_valid_loss": scores,
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [t[0] for t in todo]
        fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2))
        for ax, label in zip(np.atleast_1d(axes), labels):
            steps = max(steps_list)
            for (lab, st, name), c in curves.items():
                if lab == label and st == steps:
                    k = max(1, steps // 100)
                    ax.plot(np.convolve(c, np.ones(k) / k, mode="valid"), label=name)
            ax.set_title(label, fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("step")
        np.atleast_1d(axes)[0].set_ylabel("training loss")
        np.atleast_1d(axes)[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(a.out + ".png", dpi=110)


if __name__ == "__main__":
    main()
