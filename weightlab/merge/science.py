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

__all__ = ["TASKS", "LAMBDAS", "run"]

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
    """Train, fine-tune, merge, evaluate; returns ``{"rows": [...], "individual": ..., "seconds": ...}``."""
    from .. import merge
    from ..data import load_mnist1d
    from ..models import train_mnist1d
    from ..train import evaluate, fit

    t0 = time.time()
    d = load_mnist1d()
    n_val = 500
    x_tr, y_tr, x_val, y_val = d["x"][n_val:], d["y"][n_val:], d["x"][:n_val], d["y"][:n_val]
    TASKS = ALL_TASKS if tasks is None else {k: ALL_TASKS[k] for k in tasks}  # noqa: N806
    pre = train_mnist1d(seed=seed, steps=pretrain_steps or (1500 if quick else 4000), width=width,
                        data={**d, "x": x_tr, "y": y_tr})
    f, base = pre.model.apply_fn, pre.params
    ft_steps = ft_steps or (300 if quick else 1000)
    fine = [fit(f, base, tf(x_tr), y_tr, key=jax.random.key(100 + i), steps=ft_steps, batch_size=100,
                optimizer=optax.adam(1e-3)).params for i, tf in enumerate(TASKS.values())]

    def with_head(p, i):
        """``task_heads``: task i is evaluated with its own fine-tuned output layer (the vision
        protocol: merge the shared body, keep one classifier per task)."""
        if not task_heads:
            return p
        return {**p, "head": fine[i]["head"]}

    def accs(p, split="test"):
        x, y = (d["x_test"], d["y_test"]) if split == "test" else (x_val, y_val)
        return [float(evaluate(f, with_head(p, i), tf(x), y)[1]) for i, tf in enumerate(TASKS.values())]

    def tuned(make):
        """Pick lambda on the validation split; returns (params, lambda)."""
        best = max(LAMBDAS, key=lambda lam: np.mean(accs(make(lam), "val")))
        return make(best), best

    unl = [[jnp.asarray(tf(x_tr[:256])), jnp.asarray(tf(x_tr[256:512]))] for tf in TASKS.values()]
    fishers = [merge.diagonal_fisher(f, p, u) for p, u in zip(fine, unl)]
    key = jax.random.key(seed)
    rows = [("base (pretrained)", base, None), ("linear average", merge.linear(fine), None)]
    for name, make in [
        ("task arithmetic", lambda lam: merge.task_arithmetic(base, fine, lambda_=lam)),
        ("TIES (density 0.2, global)", lambda lam: merge.ties(base, fine, density=0.2, lambda_=lam, scope="global",
                                                              normalize=False)),
        ("DARE + TA (density 0.3)", lambda lam: merge.dare_linear(base, fine, density=0.3, key=key, lambda_=lam)),
        ("MagMax", lambda lam: merge.magmax(base, fine, lambda_=lam)),
        ("consensus TA (k=2)", lambda lam: merge.consensus(base, fine, k=2, lambda_=lam)),
        ("PCB (ratio 0.1)", lambda lam: merge.pcb(base, fine, pcb_ratio=0.1, lambda_=lam)),
        ("TSV-M", lambda lam: merge.tsv_m(base, fine, lambda_=lam)),
        ("Iso-C", lambda lam: merge.iso_c(base, fine, lambda_=lam)),
        ("Iso-CTS", lambda lam: merge.iso_cts(base, fine, lambda_=lam)),
        ("WUDI (lr 1e-3, 200 steps)", lambda lam: merge.wudi(base, fine, lr=1e-3, steps=200, lambda_=lam)),
    ]:
        p, lam = tuned(make)
        rows.append((name, p, lam))
    rows += [
        ("OPCM (alpha 0.5, continual)", merge.opcm(base, fine, alpha=0.5), None),
        ("Fisher merging", merge.fisher_merge(fine, fishers), None),
        ("RegMean", merge.regmean(f, fine, unl), None),
        ("AdaMerging layer-wise (unlabeled)", merge.adamerging(f, base, fine, unl, steps=60 if quick else 150,
                                                               init=min(0.3, 1.0 / len(fine)),
                                                               optimizer=optax.adam(1e-2)).params, None),
    ]
    out = []
    for name, p, lam in rows:
        a = accs(p)
        out.append({"method": name, "lambda": lam, "per_task": dict(zip(TASKS, a)), "mean": float(np.mean(a))})
    emr = merge.emr(base, fine)
    a = [accs(emr.task_model(i))[i] for i in range(len(TASKS))]
    out.append({"method": "EMR (per-task masks, needs the task id)", "lambda": None,
                "per_task": dict(zip(TASKS, a)), "mean": float(np.mean(a))})
    indiv = [accs(p)[i] for i, p in enumerate(fine)]
    return {"rows": out, "individual": dict(zip(TASKS, indiv)), "individual_mean": float(np.mean(indiv)),
            "seconds": time.time() - t0, "tasks": list(TASKS), "task_heads": task_heads}


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
