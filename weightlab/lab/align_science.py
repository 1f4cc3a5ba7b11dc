"""The width effect in permutation alignment, measured on MNIST-1D: how close does the midpoint of two
independently trained models come to the endpoints, per width, per alignment method?

Protocol. For each width multiplier and each seed pair ``(2p, 2p+1)``, two models are trained from
different seeds (different init *and* data order) with a **regularised** recipe (:data:`RECIPE`:
AdamW with decoupled weight decay 0.1, cosine-decayed learning rate 3e-3, label smoothing 0.1,
batch 100, 1500 steps; 800 in quick mode). The default MNIST-1D recipe (Adam 1e-2, 6000 steps)
memorises the training set: its test loss is 3.5-5.4 nats, so any test-*loss* barrier reads ~0
even without alignment; this recipe keeps the test cross-entropy near 1 nat. The last 500 of the
4000 training examples are held out (never trained on) and used only to fit the softmax
temperature; REPAIR statistics and activation matching read 2000 training inputs.

At the midpoint ``alpha = 0.5`` of the linear path, six models are scored (test accuracy, train
loss, test loss; losses are the plain cross-entropy, not the smoothed training loss):

* ``naive``: ``(A + B) / 2``, no alignment;
* ``weight matching`` / ``activation matching``: B permuted onto A (:func:`weightlab.align.weight_matching`,
  :func:`weightlab.align.activation_matching`), then averaged;
* ``WM + REPAIR`` / ``AM + REPAIR``: the same midpoints after :func:`weightlab.align.repair`
  (Jordan et al. 2023);
* ``naive + temperature``: the "wide + softmax temperature, no permutation" baseline of
  arXiv 2510.08023 — the naive midpoint with its logits divided by the ``T`` that minimises the
  cross-entropy on the held-out split. Dividing logits by ``T > 0`` never changes the argmax, so
  its accuracy is the naive accuracy by construction; only its losses can differ.

Along the path (``n`` alphas) :func:`weightlab.align.loss_barrier` gives the test-accuracy barrier
and the train-loss barrier of naive / WM / AM. Per width the summary reports the endpoint mean
test accuracy, each method's midpoint accuracy (mean and min-max over pairs) and the fraction of
the naive gap it closes, ``(mid_method - mid_naive) / (endpoint_mean - mid_naive)`` (per pair,
then averaged).

``arch="mlp"``: :func:`weightlab.models.mlp`, hidden ``(128, 128) x width``. ``arch="cnn"``: the
ResNet-20-style 1-D CNN :func:`weightlab.models.cnn` without normalisation (``norm="none"``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["RECIPE", "METHODS", "run", "train", "compare_pair", "fit_temperature", "summarize", "markdown"]

RECIPE = dict(optimizer="adamw", lr=3e-3, schedule="cosine", weight_decay=0.1, label_smoothing=0.1, batch_size=100,
              steps=1500, quick_steps=800, n_val=500)
METHODS = ("naive", "weight matching", "activation matching", "WM + REPAIR", "AM + REPAIR", "naive + temperature")
PATH_METHODS = ("naive", "weight matching", "activation matching")


def _smoothed_ce(eps: float):
    def loss(logits, labels):
        target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), eps)
        return optax.softmax_cross_entropy(logits, target).mean()
    return loss


def make_model(key, arch: str, width: float):
    from ..models import cnn, mlp

    if arch == "mlp":
        return mlp(key, hidden=(128, 128), width=width)
    if arch == "cnn":
        return cnn(key, width=width, norm="none")
    raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")


def train(seed: int, arch: str, width: float, x, y, *, steps: int, recipe: dict = RECIPE):
    """``(model, params)`` trained from ``seed`` (init and minibatch order) with the regularised recipe."""
    from ..train import fit

    key = jax.random.key(seed)
    model = make_model(key, arch, width)
    opt = optax.adamw(optax.cosine_decay_schedule(recipe["lr"], steps), weight_decay=recipe["weight_decay"])
    r = fit(model.apply_fn, model.params, x, y, key=jax.random.fold_in(key, 1), steps=steps,
            batch_size=recipe["batch_size"], optimizer=opt, loss_fn=_smoothed_ce(recipe["label_smoothing"]))
    return model, r.params


def fit_temperature(logits, labels) -> float:
    """The ``T`` minimising ``CE(logits / T)``: a log-spaced grid over [0.05, 50], then a finer grid
    around the best point."""
    logits, labels = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)

    @jax.jit
    def losses(ts):
        return jax.vmap(lambda t: optax.softmax_cross_entropy_with_integer_labels(logits / t, labels).mean())(ts)

    grid = np.exp(np.linspace(np.log(0.05), np.log(50.0), 121))
    i = int(np.argmin(np.asarray(losses(jnp.asarray(grid, jnp.float32)))))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 101))
    return float(fine[int(np.argmin(np.asarray(losses(jnp.asarray(fine, jnp.float32)))))])


def compare_pair(apply_fn, pa, pb, data: dict, *, key, n_path: int = 5, batches=None) -> dict:
    """Every method of :data:`METHODS` on one pair; ``data`` holds ``x, y`` (train), ``x_val, y_val``
    and ``x_test, y_test``. Returns ``{"midpoint": {method: {test_acc, train_loss, test_loss}},
    "barrier": {method: {test_acc, train_loss}}, "temperature", "wm_objective", "seconds": {...}}``."""
    from .. import align
    from ..train import evaluate

    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    if batches is None:
        batches = [x[i:i + 500] for i in range(0, min(len(x), 2000), 500)]
    secs = {}

    def scores(p, temp: float = 1.0):
        f = (lambda q, b: apply_fn(q, b) / temp) if temp != 1.0 else apply_fn
        tr_loss, _ = evaluate(f, p, x, y)
        te_loss, te_acc = evaluate(f, p, xt, yt)
        return {"test_acc": te_acc, "train_loss": tr_loss, "test_loss": te_loss}

    t = time.time()
    spec = align.infer_spec(apply_fn, pa, x[:2])
    secs["infer_spec"] = time.time() - t
    t = time.time()
    wm = align.weight_matching(spec, pa, pb, key=key)
    secs["weight_matching"] = time.time() - t
    t = time.time()
    am = align.activation_matching(spec, apply_fn, pa, pb, batches)
    secs["activation_matching"] = time.time() - t
    b_wm, b_am = align.permute(spec, wm, pb), align.permute(spec, am, pb)

    mids = {"naive": align.interpolate(pa, pb, 0.5), "weight matching": align.interpolate(pa, b_wm, 0.5),
            "activation matching": align.interpolate(pa, b_am, 0.5)}
    t = time.time()
    mids["WM + REPAIR"] = align.repair(apply_fn, mids["weight matching"], (pa, b_wm), batches, alpha=0.5)
    mids["AM + REPAIR"] = align.repair(apply_fn, mids["activation matching"], (pa, b_am), batches, alpha=0.5)
    secs["repair"] = time.time() - t
    out = {m: scores(p) for m, p in mids.items()}
    temp = fit_temperature(apply_fn(mids["naive"], jnp.asarray(data["x_val"])), data["y_val"])
    out["naive + temperature"] = scores(mids["naive"], temp)

    def path_metrics(p):
        logits, logits_t = apply_fn(p, x), apply_fn(p, xt)
        return {"test_acc": jnp.mean(jnp.argmax(logits_t, -1) == yt),
                "train_loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()}

    t = time.time()
    barrier = {}
    for m, b in (("naive", pb), ("weight matching", b_wm), ("activation matching", b_am)):
        r = align.loss_barrier(path_metrics, pa, b, n=n_path)
        barrier[m] = {k: float(v) for k, v in r.barrier.items()}
    secs["barriers"] = time.time() - t
    return {"midpoint": {m: out[m] for m in METHODS}, "barrier": barrier, "temperature": temp,
            "wm_objective": float(wm.objective), "am_objective": float(am.objective),
            "wm_passes": len(wm.history) - 1, "seconds": secs}


def run(widths=(1, 2, 4, 8, 16), pairs: int = 3, quick: bool = False, arch: str = "mlp", *, steps: int | None = None,
        n_path: int | None = None, seed0: int = 0, progress=None) -> dict:
    """The width sweep. Returns ``{"arch", "widths", "pairs", "quick", "recipe", "results": [per width:
    {"width", "n_params", "endpoints": [per model {train_acc, test_acc, train_loss, test_loss, seed}],
    "pairs": [compare_pair dicts], "train_seconds"}], "summary": summarize(...), "seconds"}``."""
    from ..data import load_mnist1d
    from ..train import evaluate

    t0 = time.time()
    d = load_mnist1d()
    n_val = RECIPE["n_val"]
    data = {"x": np.asarray(d["x"][:-n_val]), "y": np.asarray(d["y"][:-n_val]),
            "x_val": np.asarray(d["x"][-n_val:]), "y_val": np.asarray(d["y"][-n_val:]),
            "x_test": np.asarray(d["x_test"]), "y_test": np.asarray(d["y_test"])}
    steps = steps or (RECIPE["quick_steps"] if quick else RECIPE["steps"])
    n_path = n_path or (5 if quick else 9)
    results = []
    for w in widths:
        tw = time.time()
        ends, prs = [], []
        train_s = 0.0
        for p in range(pairs):
            models = []
            for s in (seed0 + 2 * p, seed0 + 2 * p + 1):
                t = time.time()
                model, params = train(s, arch, w, data["x"], data["y"], steps=steps)
                jax.block_until_ready(params)
                train_s += time.time() - t
                tr_loss, tr_acc = evaluate(model.apply_fn, params, data["x"], data["y"])
                te_loss, te_acc = evaluate(model.apply_fn, params, data["x_test"], data["y_test"])
                ends.append({"seed": s, "train_acc": tr_acc, "test_acc": te_acc, "train_loss": tr_loss,
                             "test_loss": te_loss})
                models.append((model, params))
            (model, pa), (_, pb) = models
            r = compare_pair(model.apply_fn, pa, pb, data, key=jax.random.key(p), n_path=n_path)
            r["endpoint_test_acc"] = [ends[-2]["test_acc"], ends[-1]["test_acc"]]
            prs.append(r)
            if progress:
                progress(w, p, r)
        n_params = int(sum(np.size(v) for v in jax.tree.leaves(pa)))
        results.append({"width": w, "n_params": n_params, "endpoints": ends, "pairs": prs, "train_seconds": train_s,
                        "seconds": time.time() - tw})
    out = {"arch": arch, "widths": list(widths), "pairs": pairs, "quick": quick, "steps": steps, "n_path": n_path,
           "recipe": {k: v for k, v in RECIPE.items() if k not in ("steps", "quick_steps")}, "results": results}
    out["summary"] = summarize(out)
    out["seconds"] = time.time() - t0
    return out


def _gap_closed(mid, naive, ends):
    den = float(np.mean(ends)) - naive
    return (mid - naive) / den if abs(den) > 1e-9 else float("nan")


def summarize(result: dict) -> list[dict]:
    """Per width: endpoint means, per-method midpoint accuracy / losses (mean, min, max over pairs),
    gap closed, barriers, and the issue's targets for WM + REPAIR."""
    rows = []
    for r in result["results"]:
        ends = r["endpoints"]
        row = {"width": r["width"], "n_params": r["n_params"],
               "endpoint_test_acc": float(np.mean([e["test_acc"] for e in ends])),
               "endpoint_train_acc": float(np.mean([e["train_acc"] for e in ends])),
               "endpoint_test_loss": float(np.mean([e["test_loss"] for e in ends])),
               "endpoint_train_loss": float(np.mean([e["train_loss"] for e in ends])),
               "temperature": [p["temperature"] for p in r["pairs"]], "methods": {}, "barriers": {}}
        for m in METHODS:
            acc = [p["midpoint"][m]["test_acc"] for p in r["pairs"]]
            gaps = [_gap_closed(p["midpoint"][m]["test_acc"], p["midpoint"]["naive"]["test_acc"], p["endpoint_test_acc"])
                    for p in r["pairs"]]
            row["methods"][m] = {
                "test_acc": float(np.mean(acc)), "test_acc_min": float(np.min(acc)), "test_acc_max": float(np.max(acc)),
                "train_loss": float(np.mean([p["midpoint"][m]["train_loss"] for p in r["pairs"]])),
                "test_loss": float(np.mean([p["midpoint"][m]["test_loss"] for p in r["pairs"]])),
                "gap_closed": float(np.mean(gaps)),
                "below_endpoints": float(np.mean([np.mean(p["endpoint_test_acc"]) - a for p, a in zip(r["pairs"], acc)]))}
        for m in PATH_METHODS:
            row["barriers"][m] = {k: float(np.mean([p["barrier"][m][k] for p in r["pairs"]]))
                                  for k in ("test_acc", "train_loss")}
        wr = row["methods"]["WM + REPAIR"]
        tol = {4: 0.05, 16: 0.02}.get(r["width"])
        row["target"] = None if tol is None else {
            "within": tol, "met_distance": bool(wr["below_endpoints"] <= tol),
            "met_gap_closed": bool(wr["gap_closed"] >= 0.8)}
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    """Two tables: midpoint test accuracy (and gap closed) per method, and losses / barriers."""
    s = result["summary"]
    head = ("| width | params | endpoints acc (train) | " + " | ".join(METHODS) + " |\n|---|---:|---:|"
            + "---:|" * len(METHODS))
    lines = [f"Midpoint test accuracy, % (mean over {result['pairs']} pairs, [min-max]; gap closed in parentheses)\n",
             head]
    for row in s:
        cells = []
        for m in METHODS:
            v = row["methods"][m]
            cells.append(f"{100 * v['test_acc']:.1f} [{100 * v['test_acc_min']:.1f}-{100 * v['test_acc_max']:.1f}]"
                         + ("" if m == "naive" else f" ({100 * v['gap_closed']:.0f}%)"))
        lines.append(f"| {row['width']:g}x | {row['n_params']:,} | {100 * row['endpoint_test_acc']:.1f} "
                     f"({100 * row['endpoint_train_acc']:.1f}) | " + " | ".join(cells) + " |")
    lines += ["", "Midpoint losses (nats; train / test) and barriers along the path (test-acc barrier in points, "
              "train-loss barrier in nats)\n",
              "| width | endpoints loss | " + " | ".join(METHODS) + " | T fitted | acc barrier naive / WM / AM | "
              "train-loss barrier naive / WM / AM |", "|---|---:|" + "---:|" * (len(METHODS) + 3)]
    for row in s:
        cells = [f"{row['methods'][m]['train_loss']:.2f} / {row['methods'][m]['test_loss']:.2f}" for m in METHODS]
        b = row["barriers"]
        lines.append(f"| {row['width']:g}x | {row['endpoint_train_loss']:.2f} / {row['endpoint_test_loss']:.2f} | "
                     + " | ".join(cells) + f" | {'/'.join(f'{t:.2f}' for t in row['temperature'])} | "
                     + " / ".join(f"{100 * b[m]['test_acc']:.1f}" for m in PATH_METHODS) + " | "
                     + " / ".join(f"{b[m]['train_loss']:.2f}" for m in PATH_METHODS) + " |")
    tg = [row for row in s if row["target"]]
    if tg:
        lines += ["", "Issue targets for WM + REPAIR (distance below the endpoints' mean; gap closed >= 80%):\n",
                  "| width | below endpoints | allowed | met | gap closed | met (>= 80%) |", "|---|---:|---:|---|---:|---|"]
        for row in tg:
            v, t = row["methods"]["WM + REPAIR"], row["target"]
            lines.append(f"| {row['width']:g}x | {100 * v['below_endpoints']:.1f} | {100 * t['within']:.0f} | "
                         f"{'yes' if t['met_distance'] else 'no'} | {100 * v['gap_closed']:.0f}% | "
                         f"{'yes' if t['met_gap_closed'] else 'no'} |")
    return "\n".join(lines)
