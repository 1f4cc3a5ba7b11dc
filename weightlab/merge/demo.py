"""Demo section: fine-tune the demo MLP on two halves of the classes and merge the fine-tunes."""

from __future__ import annotations

import jax
import numpy as np
import optax


def run(ctx) -> None:
    from ..eval import evaluate
    from ..train import fit
    from . import adamerging, dare_ties, diagonal_fisher, fisher_merge, linear, regmean, task_arithmetic, ties

    base = ctx.models[0]
    f = base.model.apply_fn
    d = ctx.data
    steps = 300 if ctx.quick else 600
    tasks = {"digits 0-4": d["y"] < 5, "digits 5-9": d["y"] >= 5}
    fine = []
    for i, (name, sel) in enumerate(tasks.items()):
        r = fit(f, base.params, d["x"][sel], d["y"][sel], key=jax.random.key(100 + i), steps=steps, batch_size=100,
                optimizer=optax.adam(1e-3))
        fine.append(r.params)
    task_x = [d["x"][sel][:512] for sel in tasks.values()]
    fishers = [diagonal_fisher(f, p, [x[:256], x[256:512]]) for p, x in zip(fine, task_x)]
    te = {name: (d["y_test"] < 5) if "0-4" in name else (d["y_test"] >= 5) for name in tasks}

    def accs(p):
        return [evaluate(f, p, d["x_test"][m], d["y_test"][m])[1] for m in te.values()]

    rows = {"base (before fine-tuning)": base.params, "fine-tuned on 0-4": fine[0], "fine-tuned on 5-9": fine[1],
            "linear average": linear(fine),
            "task arithmetic (lambda 0.7)": task_arithmetic(base.params, fine, lambda_=0.7),
            "TIES (density 0.3)": ties(base.params, fine, density=0.3),
            "DARE-TIES (density 0.3)": dare_ties(base.params, fine, density=0.3, key=jax.random.key(0)),
            "Fisher merging": fisher_merge(fine, fishers),
            "RegMean": regmean(f, fine, [[x] for x in task_x]),
            "AdaMerging layer-wise (unlabeled)": adamerging(f, base.params, fine, [[x] for x in task_x],
                                                           steps=60, optimizer=optax.adam(1e-2)).params}
    results = []
    for name, p in rows.items():
        a = accs(p)
        results.append({"name": name, "acc_0_4": a[0], "acc_5_9": a[1], "mean": float(np.mean(a))})
        ctx.rows.append((name, f"acc on 0-4 {a[0]:.3f}, on 5-9 {a[1]:.3f}, mean {np.mean(a):.3f}"))
    ctx.summary["merging"] = results
