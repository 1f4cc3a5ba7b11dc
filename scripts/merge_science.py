"""MNIST-1D merging table (input-transform task family): every merge method's mean test accuracy.

    python scripts/merge_science.py                 # 8 tasks, seeds 0,1,2 (~2 min on 2 cores)
    python scripts/merge_science.py --tasks 4 --seeds 0 --quick

Prints a markdown table (mean over seeds, with the spread across seeds) and one JSON line; the
protocol is in weightlab/lab/merge_science.py.
"""

import argparse
import json

import numpy as np

from weightlab.lab import merge_science as science

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", type=int, choices=(4, 8), default=8)
    ap.add_argument("--task-heads", action="store_true", help="merge the body only; each task keeps its head")
    a = ap.parse_args()
    tasks = list(science.ALL_TASKS)[:a.tasks]
    runs = [science.run(quick=a.quick, seed=int(s), tasks=tasks, task_heads=a.task_heads)
            for s in a.seeds.split(",")]
    methods = [r["method"] for r in runs[0]["rows"]]
    table = {m: [next(r for r in run["rows"] if r["method"] == m)["mean"] for run in runs] for m in methods}
    table = {"individual fine-tunes (own task)": [r["individual_mean"] for r in runs], **table}
    lams = {m: [next(r for r in run["rows"] if r["method"] == m)["lambda"] for run in runs] for m in methods}
    print(f"{len(tasks)} tasks ({', '.join(tasks)}), seeds {a.seeds}, "
          f"{'per-task heads' if a.task_heads else 'shared head'}: mean test accuracy over tasks\n")
    print("| method | mean | min-max over seeds | lambda chosen |\n|---|---|---|---|")
    for m, v in table.items():
        lam = "" if m not in lams or lams[m][0] is None else "/".join(f"{x:g}" for x in lams[m])
        print(f"| {m} | {np.mean(v):.3f} | {min(v):.3f}-{max(v):.3f} | {lam} |")
    print(json.dumps({"bench": "merge_science_mnist1d", "tasks": len(tasks), "task_heads": a.task_heads, "seeds": a.seeds, "quick": a.quick,
                      "seconds": round(sum(r["seconds"] for r in runs), 1),
                      **{m: round(float(np.mean(v)), 4) for m, v in table.items()}}))
