"""Weight matching speed: weightlab.align.weight_matching against a straightforward host loop.

The reference is the way the original Git Re-Basin code does it, written here in numpy: coordinate
descent over the permutation groups in a random order; for each group the cost matrix is the sum,
over the (leaf, axis) pairs the group moves, of ``A_axis @ B_axis^T`` with B's other axes already
permuted (``np.take``); ``scipy.optimize.linear_sum_assignment(maximize=True)`` solves it; stop
after a full pass that improves nothing. The problem: an MLP 64 -> n -> n -> n -> 10 with random
weights A, and B = a random permutation of A's hidden units plus Gaussian noise (``--noise`` times
each leaf's std), so the matching has to undo a planted permutation through noise.

    python scripts/bench_align.py                        # n = 256, 1024, 2048, 4096
    python scripts/bench_align.py --max-width 8192       # adds n = 8192 (minutes on 2 CPU cores)
    python scripts/bench_align.py --widths 1024 --profile  # cProfile of weightlab's second call

Reports per width: the reference time, weightlab's first call (compiles) and second call (the
compiled scorers are cached per spec), the ratio reference / second call, both objectives (asserted
equal within 1e-4 relative) and the fraction of the planted permutation recovered. Prints a
markdown table and one JSON line.
"""

import argparse
import cProfile
import io
import json
import pstats
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from weightlab import align

IN, OUT, DEPTH = 64, 10, 3

# The reference's own permutation spec (as in the original code): leaf -> permutation name per axis.
PERM_SPEC = {f"dense_{i}/kernel": (None if i == 0 else f"P{i - 1}", f"P{i}") for i in range(DEPTH)}
PERM_SPEC.update({f"dense_{i}/bias": (f"P{i}",) for i in range(DEPTH)})
PERM_SPEC.update({"head/kernel": (f"P{DEPTH - 1}", None), "head/bias": (None,)})


def apply_fn(params, x):
    for i in range(DEPTH):
        x = jax.nn.relu(x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def flat(params):
    return {f"{k}/{leaf}": np.asarray(v) for k, d in params.items() for leaf, v in d.items()}


def nest(fl):
    out = {}
    for k, v in fl.items():
        a, b = k.split("/")
        out.setdefault(a, {})[b] = v
    return out


def problem(n: int, noise: float, seed: int = 0):
    """(A, B, planted): float32 MLP params; B's hidden units are A's permuted by ``planted`` plus noise."""
    rng = np.random.default_rng(seed)
    sizes = [IN] + [n] * DEPTH + [OUT]
    a = {}
    for i in range(DEPTH + 1):
        name = f"dense_{i}" if i < DEPTH else "head"
        a[f"{name}/kernel"] = (rng.standard_normal((sizes[i], sizes[i + 1]), np.float32) / np.sqrt(sizes[i]))
        a[f"{name}/bias"] = 0.1 * rng.standard_normal(sizes[i + 1], np.float32)
    planted = {f"P{i}": rng.permutation(n) for i in range(DEPTH)}
    b = {}
    for k, v in permute_np(planted, a).items():
        b[k] = (v + noise * v.std() * rng.standard_normal(v.shape, np.float32)).astype(np.float32)
    return a, b, planted


def permute_np(perm, params, except_axis=None, leaf=None):
    """``np.take`` every permuted axis (all leaves, or only ``leaf``, skipping ``except_axis``)."""
    out = {}
    for k, v in params.items():
        if leaf is not None and k != leaf:
            continue
        for ax, p in enumerate(PERM_SPEC[k]):
            if p is not None and ax != except_axis:
                v = np.take(v, perm[p], axis=ax)
        out[k] = v
    return out


def objective_np(perm, a, b) -> float:
    """sum <A, pi(B)> over every leaf some permutation moves (the leaves weightlab scores), float64."""
    pb = permute_np(perm, b)
    return float(sum(np.vdot(a[k].astype(np.float64), pb[k].astype(np.float64))
                     for k, axes in PERM_SPEC.items() if any(p is not None for p in axes)))


def reference_matching(a, b, n: int, seed: int = 0, max_iter: int = 100):
    """The host loop: numpy cost matrices + scipy LAP, coordinate descent in a random group order."""
    rng = np.random.default_rng(seed)
    names = sorted({p for axes in PERM_SPEC.values() for p in axes if p is not None})
    moves = {p: [(k, ax) for k, axes in PERM_SPEC.items() for ax, q in enumerate(axes) if q == p] for p in names}
    perm = {p: np.arange(n) for p in names}
    passes = 0
    for _ in range(max_iter):
        passes += 1
        progress = False
        for i in rng.permutation(len(names)):
            p = names[i]
            cost = np.zeros((n, n), np.float32)
            for k, ax in moves[p]:
                wb = permute_np(perm, b, except_axis=ax, leaf=k)[k]
                cost += np.moveaxis(a[k], ax, 0).reshape(n, -1) @ np.moveaxis(wb, ax, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(cost, maximize=True)
            old = float(cost[np.arange(n), perm[p]].sum(dtype=np.float64))
            new = float(cost[np.arange(n), cols].sum(dtype=np.float64))
            if new > old + 1e-12 * max(abs(old), 1.0):
                progress = True
                perm[p] = cols
        if not progress:
            break
    return perm, passes


def bench(n: int, noise: float, profile: bool = False) -> dict:
    a, b, planted = problem(n, noise)
    t = time.perf_counter()
    ref, ref_passes = reference_matching(a, b, n)
    t_ref = time.perf_counter() - t
    ja, jb = jax.tree.map(jnp.asarray, nest(a)), jax.tree.map(jnp.asarray, nest(b))
    spec = align.infer_spec(apply_fn, ja, jnp.zeros((2, IN), jnp.float32))
    groups = {g: (frozenset((k, ax) for k, ax in spec.leaves(g))) for g in spec.groups}
    t = time.perf_counter()
    wl = align.weight_matching(spec, ja, jb)
    jax.block_until_ready(list(wl.values()))
    t_first = time.perf_counter() - t
    prof = None
    t = time.perf_counter()
    if profile:
        pr = cProfile.Profile()
        pr.enable()
    wl = align.weight_matching(spec, ja, jb)
    jax.block_until_ready(list(wl.values()))
    if profile:
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
        prof = s.getvalue()
    t_second = time.perf_counter() - t
    # weightlab's groups -> the reference's names, by the (leaf, axis) pairs they move
    wl_perm = {}
    for g, moves in groups.items():
        kern = sorted((k, ax) for k, ax in moves if k.endswith("kernel") and ax == 1)
        wl_perm[f"P{int(kern[0][0].split('/')[0].split('_')[1])}"] = np.asarray(wl[g])
    o_ref, o_wl = objective_np(ref, a, b), objective_np(wl_perm, a, b)
    rel = abs(o_ref - o_wl) / max(abs(o_ref), 1e-12)
    planted_inv = {p: np.argsort(v) for p, v in planted.items()}  # B unit planted[i] holds A unit i
    rec = {p: float(np.mean(ref[p] == planted_inv[p])) for p in ref}
    return {"n": n, "reference_s": t_ref, "reference_passes": ref_passes, "weightlab_first_s": t_first,
            "weightlab_second_s": t_second, "weightlab_passes": len(wl.history) - 1,
            "ratio": t_ref / t_second, "ratio_first": t_ref / t_first, "objective_reference": o_ref,
            "objective_weightlab": o_wl, "objective_weightlab_reported": float(wl.objective), "rel_diff": rel,
            "planted_recovered": float(np.mean(list(rec.values()))), "profile": prof}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="256,1024,2048,4096,8192")
    ap.add_argument("--max-width", type=int, default=4096, help="skip widths above this (8192 takes minutes)")
    ap.add_argument("--noise", type=float, default=1.0, help="noise std on B, in units of each leaf's std")
    ap.add_argument("--profile", action="store_true", help="cProfile weightlab's second call and print the top")
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",") if int(w) <= a.max_width]
    rows = []
    print(f"# devices: {jax.devices()}", flush=True)
    for n in widths:
        r = bench(n, a.noise, a.profile)
        print(f"# n={n}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                        if k != "profile"}), flush=True)
        if r["profile"]:
            print(r["profile"])
        assert r["rel_diff"] <= 1e-4, f"objectives differ at n={n}: {r['objective_reference']} vs {r['objective_weightlab']}"
        rows.append(r)
    print("\n| n | reference (numpy + scipy) s | weightlab 1st call s | weightlab 2nd call s | ratio ref/2nd | "
          "ratio ref/1st | passes ref / wl | s per pass ref / wl | objective rel. diff | planted recovered |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['reference_s']:.2f} | {r['weightlab_first_s']:.2f} | {r['weightlab_second_s']:.2f} | "
              f"{r['ratio']:.2f}x | {r['ratio_first']:.2f}x | {r['reference_passes']} / {r['weightlab_passes']} | "
              f"{r['reference_s'] / r['reference_passes']:.3f} / {r['weightlab_second_s'] / r['weightlab_passes']:.3f} | "
              f"{r['rel_diff']:.1e} | {r['planted_recovered']:.3f} |")
    print(json.dumps({"bench": "align_weight_matching", "noise": a.noise, "devices": str(jax.devices()[0].platform),
                      **{f"ratio_n{r['n']}": round(r["ratio"], 3) for r in rows},
                      **{f"reference_s_n{r['n']}": round(r["reference_s"], 3) for r in rows},
                      **{f"weightlab_s_n{r['n']}": round(r["weightlab_second_s"], 3) for r in rows},
                      **{f"weightlab_first_s_n{r['n']}": round(r["weightlab_first_s"], 3) for r in rows}}))
