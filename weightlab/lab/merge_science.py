"""A small, reproducible merging benchmark on MNIST-1D: one pretrained MLP, fine-tuned on a family of
*input-transform* tasks, then merged by every method.

Tasks (same 10 classes, the input signal transformed): ``identity``, ``reversed`` (time reversal),
``shifted`` (circular shift by 10 of 40 samples) and ``warped`` (a monotone time warp, t -> 40 (t/40)^1.6). The base is trained on
the untransformed data only, so on the other tasks it starts weak, and each fine-tune moves the
weights in its own direction: the setting in which task-vector interference (what TIES, TSV and
Iso address) and data-driven merging (Fisher, RegMean, AdaMerging) are compared in the literature
(Ilharco et al. 2023; Yadav et al. 2023; Yang et al. 2024). Scaling coefficients of the data-free
methods are chosen on a validation split carved from the training data (never the test set), from
``LAMBDAS``; the table reports mean test accuracy over the tasks.

``TASKS`` are the first four; ``ALL_TASKS`` adds shifts by 20/30, reversed+warped and reversed+shifted.
``python scripts/merge_science.py`` runs all eight over three seeds (~70 s on 2 CPU cores).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["TASKS", "ALL_TASKS", "LAMBDAS", "run", "fine_tune", "compare", "markdown"]

_WARP = np.minimum((40 * (np.arange(40) / 40) ** 1.6).round().astype(int), 39)
ALL_TASKS = {
    "identity": lambda x: x,
    "reversed": lambda x: x[:, ::-1],
    "shifted": lambda x: np.roll(x, 10, axis=1),
    "warped": lambda x: x[:, _WARP],
    "shifted20": lambda x: np.roll(x, 20, axis=1),
    "shifted30": lambda x: np.roll(x, 30, axis=1),
    "rev-warped": lambda x: x[:, _WARP][:, ::-1],
    "rev-shifted": lambda x: np.roll(x[:, ::-1], 20, axis=1),
}
TASKS = {k: ALL_TASKS[k] for k in ("identity", "reversed", "shifted", "warped")}
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3)


def run(*, quick: bool = False, seed: int = 0, tasks=None, width: float = 1.0, pretrain_steps=None,
        ft_steps=None, task_heads: bool = False) -> dict:
    """Pretrain, fine-tune on each task, then :func:`compare`; returns its dict plus ``seconds``."""
    from ..data import load_mnist1d
    from ..models import train_mnist1d

    t0 = time.time()
    d = load_mnist1d()
    n_val = 500
    train = {"x": d["x"][n_val:], "y": d["y"][n_val:]}
    val = (d["x"][:n_val], d["y"][:n_val])
    names = list(ALL_TASKS) if tasks is None else list(tasks)
    pre = train_mnist1d(seed=seed, steps=pretrain_steps or (1500 if quick else 4000), width=width,
                        data={**d, **train})
    f, base = pre.model.apply_fn, pre.params
    fine = fine_tune(f, base, train["x"], train["y"], names, steps=ft_steps or (300 if quick else 1000))
    res = compare(f, base, fine, names, train["x"], val, (d["x_test"], d["y_test"]), quick=quick, seed=seed,
                  task_heads=task_heads)
    return {**res, "seconds": time.time() - t0}


def fine_tune(f, base, x, y, tasks, *, steps: int, lr: float = 1e-3) -> list:
    """One fine-tune of ``base`` per task (Adam, batch 100, keys 100 + i)."""
    from ..train import fit

    return [fit(f, base, ALL_TASKS[t](x), y, key=jax.random.key(100 + i), steps=steps, batch_size=100,
                optimizer=optax.adam(lr)).params for i, t in enumerate(tasks)]


FULL = ("task arithmetic", "TIES (density 0.2, global)", "DARE + TA (density 0.3)", "MagMax", "consensus TA (k=2)",
        "PCB (ratio 0.1)", "TSV-M", "Iso-C", "Iso-CTS", "WUDI (lr 1e-3, 200 steps)", "OPCM (alpha 0.5, continual)",
        "Fisher merging", "RegMean", "AdaMerging layer-wise (unlabeled)", "EMR (per-task masks, needs the task id)")


def compare(f, base, fine, tasks, x_unlabeled, val, test, *, quick: bool = False, seed: int = 0,
            task_heads: bool = False, methods=FULL) -> dict:
    """Merge ``fine`` (one fine-tune of ``base`` per task name) with every method in ``methods`` and
    report per-task test accuracy. Data-free scaled methods pick lambda from ``LAMBDAS`` on ``val``;
    data-driven ones see 512 unlabeled inputs per task from ``x_unlabeled``. ``task_heads``: each task
    is evaluated with its own fine-tuned ``head`` (merge the body only)."""
    from .. import merge
    from ..train import evaluate

    tfs = [ALL_TASKS[t] for t in tasks]

    def with_head(p, i):
        return {**p, "head": fine[i]["head"]} if task_heads else p

    def accs(p, split="test"):
        x, y = test if split == "test" else val
        return [float(evaluate(f, with_head(p, i), tf(x), y)[1]) for i, tf in enumerate(tfs)]

    def tuned(make):
        best = max(LAMBDAS, key=lambda lam: np.mean(accs(make(lam), "val")))
        return make(best), best

    unl = [[jnp.asarray(tf(x_unlabeled[:256])), jnp.asarray(tf(x_unlabeled[256:512]))] for tf in tfs]
    key = jax.random.key(seed)
    scaled = {
        "task arithmetic": lambda lam: merge.task_arithmetic(base, fine, lambda_=lam),
        "TIES (density 0.2, global)": lambda lam: merge.ties(base, fine, density=0.2, lambda_=lam, scope="global",
                                                             normalize=False),
        "DARE + TA (density 0.3)": lambda lam: merge.dare_linear(base, fine, density=0.3, key=key, lambda_=lam),
        "MagMax": lambda lam: merge.magmax(base, fine, lambda_=lam),
        "consensus TA (k=2)": lambda lam: merge.consensus(base, fine, k=2, lambda_=lam),
        "PCB (ratio 0.1)": lambda lam: merge.pcb(base, fine, pcb_ratio=0.1, lambda_=lam),
        "TSV-M": lambda lam: merge.tsv_m(base, fine, lambda_=lam),
        "Iso-C": lambda lam: merge.iso_c(base, fine, lambda_=lam),
        "Iso-CTS": lambda lam: merge.iso_cts(base, fine, lambda_=lam),
        "WUDI (lr 1e-3, 200 steps)": lambda lam: merge.wudi(base, fine, lr=1e-3, steps=200, lambda_=lam),
    }
    fixed = {
        "OPCM (alpha 0.5, continual)": lambda: merge.opcm(base, fine, alpha=0.5),
        "Fisher merging": lambda: merge.fisher_merge(
            None, fine, fishers=[merge.diagonal_fisher(f, p, u) for p, u in zip(fine, unl)]),
        "RegMean": lambda: merge.regmean(None, fine, grams=merge.regmean_grams(f, fine, unl)),
        "AdaMerging layer-wise (unlabeled)": lambda: merge.adamerging(
            base, fine, apply_fn=f, unlabeled=unl, steps=60 if quick else 150, init=min(0.3, 1.0 / len(fine)),
            optimizer=optax.adam(1e-2)),
    }
    rows = [("base (pretrained)", base, None), ("linear average", merge.linear(None, fine), None)]
    for name in methods:
        if name in scaled:
            rows.append((name, *tuned(scaled[name])))
        elif name in fixed:
            rows.append((name, fixed[name](), None))
    out = []
    for name, p, lam in rows:
        a = accs(p)
        out.append({"method": name, "lambda": lam, "per_task": dict(zip(tasks, a)), "mean": float(np.mean(a))})
    if "EMR (per-task masks, needs the task id)" in methods:
        emr = merge.emr(base, fine)
        a = [accs(emr.task_model(i))[i] for i in range(len(tasks))]
        out.append({"method": "EMR (per-task masks, needs the task id)", "lambda": None,
                    "per_task": dict(zip(tasks, a)), "mean": float(np.mean(a))})
    indiv = [accs(p)[i] for i, p in enumerate(fine)]
    return {"rows": out, "individual": dict(zip(tasks, indiv)), "individual_mean": float(np.mean(indiv)),
            "tasks": list(tasks), "task_heads": task_heads}


def markdown(result: dict) -> str:
    names = result["tasks"]
    lines = ["| method | lambda | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 3) + "|"]
    lines.append("| individual fine-tunes (own task) | | " + " | ".join(f"{result['individual'][n]:.3f}" for n in names)
                 + f" | {result['individual_mean']:.3f} |")
    for r in result["rows"]:
        lam = "" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['method']} | {lam} | " + " | ".join(f"{r['per_task'][n]:.3f}" for n in names)
                     + f" | {r['mean']:.3f} |")
    return "\n".join(lines)
