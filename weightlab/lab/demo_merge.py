"""Demo section: fine-tune the demo MLP on four input-transform tasks of MNIST-1D (signal as is,
reversed, shifted, time-warped; see :mod:`.merge_science`) and merge the fine-tunes with a cross-section
of methods. lambda for the scaled methods is picked on 500 training examples (the demo model saw
them in training; ``scripts/merge_science.py`` holds them out)."""

from __future__ import annotations

import numpy as np

METHODS = ("task arithmetic", "TIES (density 0.2, global)", "TSV-M", "Iso-C", "Fisher merging", "RegMean",
           "EMR (per-task masks, needs the task id)")


def run(ctx) -> None:
    from .merge_science import TASKS, compare, fine_tune

    base = ctx.models[0]
    f = base.model.apply_fn
    d = ctx.data
    tasks = list(TASKS)
    fine = fine_tune(f, base.params, d["x"], d["y"], tasks, steps=300 if ctx.quick else 800)
    res = compare(f, base.params, fine, tasks, d["x"], (d["x"][:500], d["y"][:500]), (d["x_test"], d["y_test"]),
                  quick=True, methods=METHODS)
    ctx.rows.append(("fine-tunes on their own task", f"mean {res['individual_mean']:.3f} "
                     + ", ".join(f"{t} {a:.3f}" for t, a in res["individual"].items())))
    for r in res["rows"]:
        lam = "" if r["lambda"] is None else f" (lambda {r['lambda']:g})"
        ctx.rows.append((r["method"] + lam, f"mean over {len(tasks)} tasks {r['mean']:.3f}: "
                         + ", ".join(f"{t} {a:.3f}" for t, a in r["per_task"].items())))
    ctx.summary["merging"] = {"tasks": tasks, "individual_mean": res["individual_mean"],
                              "rows": [{k: r[k] for k in ("method", "lambda", "mean")} for r in res["rows"]],
                              "best": max(res["rows"][1:], key=lambda r: r["mean"])["method"]}
    assert np.isfinite(res["individual_mean"])
