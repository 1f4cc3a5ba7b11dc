"""weightlab.merge against float64 numpy implementations of mergekit's documented semantics, plus
invariants that can fail (N copies of theta merge to theta, the order of the model list does not
matter, reproducible DARE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from weightlab import merge, tree
from weightlab.errors import MergeError, ShapeMismatchError


def models(n=3, seed=0, shapes=((6, 5), (7,))):
    rng = np.random.default_rng(seed)
    base = {f"t{i}": {"kernel": rng.standard_normal(s).astype(np.float32)} for i, s in enumerate(shapes)}
    ms = [jax.tree.map(lambda x: (x + rng.standard_normal(x.shape) * 0.5).astype(np.float32), base) for _ in range(n)]
    return base, ms


# ------------------------------------------------------------------ float64 references (per tensor)

def ref_topk_mask(d, density):
    k = int(density * d.size)
    order = np.argsort(-np.abs(d).reshape(-1), kind="stable")
    m = np.zeros(d.size, bool)
    m[order[:k]] = True
    return m.reshape(d.shape)


def ref_outlier_mask(d, density, gamma):
    n = d.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(d).reshape(-1), kind="stable")
    m = np.zeros(n, bool)
    m[order[n_bot:n - n_top]] = True
    return m.reshape(d.shape)


def ref_gta(base, ms, weights, density=1.0, sparsify=None, consensus=None, normalize=False, lam=1.0, gamma=0.01,
            rescale_l1=False):
    b = base.astype(np.float64)
    deltas = []
    for m in ms:
        d = m.astype(np.float64) - b
        if sparsify == "magnitude" and density < 1:
            mask = ref_topk_mask(d, density)
        elif sparsify == "magnitude_outliers" and density < 1:
            mask = ref_outlier_mask(d, density, gamma)
        else:
            mask = np.ones(d.shape, bool)
        md = d * mask
        if rescale_l1 and np.abs(md).sum() > 1e-7:
            md = md * np.abs(d).sum() / np.abs(md).sum()
        deltas.append(md)
    d = np.stack(deltas)
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (d.ndim - 1))
    wd = d * w
    if consensus:
        total = wd.sum(0) if consensus == "sum" else np.sign(wd).sum(0)
        elected = np.where(total >= 0, 1.0, -1.0)
        mask = np.sign(wd) == elected
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = np.broadcast_to(w.sum(0), mixed.shape).copy()
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def each(base, ms, fn):
    return {k: {"kernel": fn(base[k]["kernel"], [m[k]["kernel"] for m in ms])} for k in base}


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=tol, atol=tol)


W = [0.5, 1.0, 0.7]


def test_task_arithmetic_and_linear():
    base, ms = models()
    close(merge.task_arithmetic(base, ms, weight=W, lambda_=0.8), each(base, ms, lambda b, m: ref_gta(b, m, W, lam=0.8)))
    close(merge.task_arithmetic(base, ms, weight=W, **{"lambda": 0.8}), each(base, ms, lambda b, m: ref_gta(b, m, W, lam=0.8)))
    lin = merge.linear(None, ms, weight=W)
    close(lin, each(base, ms, lambda b, m: sum(w * x.astype(np.float64) for w, x in zip(W, m)) / sum(W)))


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_matches_reference(density, consensus):
    base, ms = models(seed=1)
    got = merge.ties(base, ms, weight=W, density=density, consensus=consensus, lambda_=0.9)
    close(got, each(base, ms, lambda b, m: ref_gta(b, m, W, density, "magnitude", consensus, True, 0.9)))


@pytest.mark.parametrize("method,cons", [("breadcrumbs", None), ("breadcrumbs_ties", "sum")])
def test_breadcrumbs_matches_reference(method, cons):
    base, ms = models(seed=2, shapes=((20, 10),))
    got = getattr(merge, method)(base, ms, weight=W, density=0.6, gamma=0.05)
    close(got, each(base, ms, lambda b, m: ref_gta(b, m, W, 0.6, "magnitude_outliers", cons, False, gamma=0.05)))


def test_ties_global_scope_trims_over_the_whole_model():
    base, ms = models(seed=3, shapes=((10, 10), (50,)))
    # make one tensor's task vectors much larger: global trimming keeps mostly that tensor
    ms = [{"t0": {"kernel": m["t0"]["kernel"] * 10 - base["t0"]["kernel"] * 9}, "t1": m["t1"]} for m in ms]
    g = merge.ties(base, ms, density=0.3, scope="global")
    t = merge.ties(base, ms, density=0.3)
    changed = lambda out, k: float(np.mean(np.asarray(out[k]["kernel"]) != base[k]["kernel"]))
    assert changed(g, "t1") < changed(t, "t1")  # small-delta tensor loses its entries under global scope
    assert changed(g, "t0") > changed(t, "t0")


def test_dare_reproducible_and_rescales():
    base, ms = models(seed=4, shapes=((40, 30),))
    k = jax.random.key(7)
    a = merge.dare_linear(base, ms, weight=W, density=0.4, key=k)
    b = merge.dare_linear(base, ms, weight=W, density=0.4, key=k)
    close(a, jax.tree.map(np.asarray, b), tol=0)
    c = merge.dare_linear(base, ms, weight=W, density=0.4, key=jax.random.key(8))
    assert not np.allclose(a["t0"]["kernel"], c["t0"]["kernel"])
    # one model, weight 1: the kept fraction ~ density and the L1 norm of the task vector is preserved
    one = merge.dare_linear(base, ms[:1], density=0.4, key=k)
    d_in = ms[0]["t0"]["kernel"] - base["t0"]["kernel"]
    d_out = np.asarray(one["t0"]["kernel"]) - base["t0"]["kernel"]
    assert abs(np.mean(d_out != 0) - 0.4) < 0.05
    np.testing.assert_allclose(np.abs(d_out).sum(), np.abs(d_in).sum(), rtol=1e-4)
    inv = merge.dare_linear(base, ms[:1], density=0.4, key=k, rescale="inverse")
    d_inv = np.asarray(inv["t0"]["kernel"]) - base["t0"]["kernel"]
    np.testing.assert_allclose(d_inv[d_inv != 0], d_in[d_inv != 0] / 0.4, rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeError, match="key"):
        merge.dare_ties(base, ms, density=0.5)


def test_della_keep_probabilities_follow_magnitude_rank():
    from weightlab.merge.steps import della_probs
    d = jnp.asarray(np.random.default_rng(0).standard_normal((4, 9)))
    p = np.asarray(della_probs(d, 0.5, 0.1))
    for r in range(4):
        order = np.argsort(np.abs(np.asarray(d[r])))
        np.testing.assert_allclose(p[r, order], np.linspace(0.4, 0.6, 9), atol=1e-6)
    base, ms = models(seed=5, shapes=((30, 20),))
    out = merge.della(base, ms, density=0.5, epsilon=0.1, key=jax.random.key(0))
    assert out["t0"]["kernel"].shape == (30, 20)
    with pytest.raises(MergeError, match="epsilon"):
        merge.della(base, ms, density=0.9, epsilon=0.2, key=jax.random.key(0))


def ref_slerp(t, a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ua, ub = a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)
    dot = np.sum(ua * ub)
    if abs(dot) > 0.9995:
        return (1 - t) * a64 + t * b64
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * a64 + np.sin(th * t) / np.sin(th) * b64


def test_slerp_nearswap_model_stock_sce_karcher_match_references():
    base, ms = models(seed=6)
    close(merge.slerp(ms[0], [ms[1]], t=0.3), each(ms[0], [ms[1]], lambda a, m: ref_slerp(0.3, a, m[0])), tol=1e-4)
    ns = merge.nearswap(base, [ms[0]], t=0.2)
    ref = each(base, [ms[0]], lambda a, m: (lambda w: w * m[0] + (1 - w) * a)(np.clip(0.2 / np.maximum(np.abs(a - m[0]), 1e-6), 0, 1)))
    close(ns, ref)

    def ref_stock(b, m):
        offs = [x.astype(np.float64).reshape(-1) - b.reshape(-1) for x in m]
        cos = np.mean([np.dot(offs[i], offs[j]) / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
                       for i in range(len(offs)) for j in range(i + 1, len(offs))])
        t = len(m) * cos / (1 + (len(m) - 1) * cos)
        return t * np.mean(m, axis=0) + (1 - t) * b

    close(merge.model_stock(base, ms), each(base, ms, ref_stock), tol=1e-4)

    def ref_sce(b, m, topk):
        tv = np.stack([x.astype(np.float64) - b for x in m])
        if topk < 1:
            var = tv.var(0)
            k = int(np.count_nonzero(var) * topk)
            keep = ref_topk_mask(var, k / var.size)
            tv = tv * keep
        elected = np.where(tv.sum(0) >= 0, 1, -1)
        erase = np.sign(tv) == elected
        w = (tv ** 2).reshape(len(m), -1).mean(1)
        w = w / w.sum()
        ew = w.reshape((-1,) + (1,) * (tv.ndim - 1)) * erase
        return b + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)

    close(merge.sce(base, ms, select_topk=0.5), each(base, ms, lambda b, m: ref_sce(b, m, 0.5)), tol=1e-4)

    def ref_karcher(m, iters=10, tol=1e-5):
        x = [v.astype(np.float64).reshape(-1) for v in m]
        norms = [np.linalg.norm(v) for v in x]
        units = [v / n for v, n in zip(x, norms)]
        a = np.ones(len(x)) / len(x)
        u = sum(ai * ui for ai, ui in zip(a, units))
        u /= np.linalg.norm(u)
        for _ in range(iters):
            T = np.zeros_like(u)
            for ai, ui in zip(a, units):
                dot = np.clip(u @ ui, -1, 1)
                th = np.arccos(dot)
                if th >= tol:
                    T += ai * th / np.sin(th) * (ui - dot * u)
            nt = np.linalg.norm(T)
            if nt < tol:
                break
            u = np.cos(nt) * u + np.sin(nt) * T / nt
            u /= np.linalg.norm(u)
        return (np.mean(norms) * u).reshape(m[0].shape)

    close(merge.karcher(None, ms), each(base, ms, lambda b, m: ref_karcher(m)), tol=1e-4)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 4), st.sampled_from(["linear", "ties", "dare_ties", "dare_linear", "slerp", "karcher",
                                           "model_stock", "nearswap", "sce", "della"]), st.integers(0, 1000))
def test_merging_copies_of_theta_gives_theta(n, method, seed):
    base, ms = models(n=1, seed=seed)
    theta = ms[0]
    copies = [theta] * n
    kw = {}
    if method == "linear":
        out = merge.linear(None, copies)
    elif method in ("slerp", "nearswap"):
        out = getattr(merge, method)(theta, [theta], t=0.4)
    elif method == "karcher":
        out = merge.karcher(None, copies)
    elif method == "model_stock":
        out = merge.model_stock(base, copies + [theta])
    elif method == "sce":
        out = merge.sce(base, copies)
    else:  # task-vector methods: density 1 (no trimming), weights summing to 1
        kw = dict(weight=1.0 / n, density=1.0, key=jax.random.key(seed))
        if method == "della":
            kw["epsilon"] = 0.0
        out = getattr(merge, method)(base, copies, normalize=True, **kw)
    close(out, jax.tree.map(np.asarray, theta), tol=2e-4)


ORDER_FREE = {  # methods that treat the models symmetrically (equal weights): the list order cannot matter
    "task_arithmetic": {}, "ties": dict(density=0.4), "breadcrumbs": dict(density=0.6), "linear": {}, "karcher": {},
    "model_stock": {}, "sce": dict(select_topk=0.5), "ram": {}, "ramplus_tl": {}, "consensus": {}, "pcb": {},
    "tsv_m": {}, "iso_c": {}, "iso_cts": {}, "wudi": dict(steps=20, lr=1e-2), "multislerp": {},
}


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(ORDER_FREE)), st.permutations([0, 1, 2]), st.integers(0, 1000))
def test_permuting_the_model_list_changes_nothing(method, perm, seed):
    base, ms = models(n=3, seed=seed, shapes=((8, 6), (5,)))
    fn = getattr(merge, method)
    b = None if merge.METHODS[method].base == "unused" else base
    a = fn(b, ms, **ORDER_FREE[method])
    c = fn(b, [ms[i] for i in perm], **ORDER_FREE[method])
    close(c, jax.tree.map(lambda x: np.asarray(x, np.float64), a), tol=1e-4)


def test_n_copies_of_theta_merge_to_theta_for_every_averaging_method():
    """Every method that averages (rather than adds) task vectors returns theta for N copies of theta."""
    base, ms = models(n=1, seed=11, shapes=((8, 6), (5,)))
    theta = ms[0]
    want = jax.tree.map(np.asarray, theta)
    cases = {"linear": {}, "karcher": {}, "ties": dict(density=1.0), "multislerp": {}, "nuslerp": dict(weight=[1, 1]),
             "ram": {}, "magmax": {}, "model_stock": {}, "sce": {}, "fisher_merge": None, "regmean": None}
    for method, kw in cases.items():
        copies = [theta] * (2 if method == "nuslerp" else 3)
        entry = merge.METHODS[method]
        b = None if entry.base == "unused" else base
        if method == "fisher_merge":
            kw = dict(fishers=[jax.tree.map(np.ones_like, theta)] * 3)
        if method == "regmean":
            kw = dict(grams=[{"t0/kernel": np.eye(8)}] * 3)
        close(getattr(merge, method)(b, copies, **kw), want, tol=2e-4)


def test_leaf_order_and_jit_independence():
    base, ms = models(seed=10)
    a = merge.dare_ties(base, ms, density=0.5, key=jax.random.key(3))
    rev = {k: base[k] for k in reversed(list(base))}
    b = merge.dare_ties(rev, [{k: m[k] for k in rev} for m in ms], density=0.5, key=jax.random.key(3))
    for k in base:
        np.testing.assert_array_equal(a[k]["kernel"], b[k]["kernel"])
    sub = merge.dare_ties({"t1": base["t1"]}, [{"t1": m["t1"]} for m in ms], density=0.5, key=jax.random.key(3))
    np.testing.assert_array_equal(a["t1"]["kernel"], sub["t1"]["kernel"])  # other leaves do not matter
    j = jax.jit(lambda b, s: merge.ties(b, s, density=0.5))(base, tree.stack(ms))
    close(j, jax.tree.map(np.asarray, merge.ties(base, ms, density=0.5)), tol=1e-6)


def test_bad_input_typed_errors():
    base, ms = models()
    with pytest.raises(MergeError, match="density"):
        merge.ties(base, ms, density=1.5)
    with pytest.raises(MergeError, match="density"):
        merge.ties(base, ms, density=0.0)
    with pytest.raises(MergeError, match="no models"):
        merge.ties(base, [])
    with pytest.raises(MergeError, match="ties has no parameter 'desnity'"):
        merge.ties(base, ms, desnity=0.5)
    bad = jax.tree.map(lambda x: x, ms[0])
    bad["t0"]["kernel"] = np.zeros((6, 4), np.float32)
    with pytest.raises(ShapeMismatchError, match="t0/kernel"):
        merge.ties(base, [ms[1], bad])
    nan = jax.tree.map(lambda x: x.copy(), ms[0])
    nan["t1"]["kernel"][2] = np.nan
    with pytest.raises(MergeError, match="t1/kernel.*NaN"):
        merge.task_arithmetic(base, [nan, ms[1]])
    with pytest.raises(MergeError, match="one value or 3"):
        merge.ties(base, ms, weight=[1.0, 2.0])
    with pytest.raises(MergeError, match="at least 2"):
        merge.model_stock(base, ms[:1])
    with pytest.raises(MergeError, match="single model"):
        merge.slerp(base, ms[0], t=0.5)  # a hurried user's (base, other): models must be a list or a stack
    with pytest.raises(MergeError, match="needs the parameter 't'"):
        merge.slerp(base, [ms[0]])
    with pytest.raises(MergeError, match="parameter 't' must be a finite number in"):
        merge.slerp(base, [ms[0]], t=1.5)
    with pytest.raises(MergeError, match="base=None"):
        merge.linear(base, ms)
    with pytest.raises(MergeError, match="sum to zero"):
        merge.linear(None, ms[:2], weight=[1.0, -1.0])


def test_review_cases_list_rooted_stacks_and_whole_model_methods():
    import weightlab as wl
    w = lambda v: [(jnp.full((2, 2), v), jnp.full(2, v)), (jnp.full((2, 2), v), jnp.full(2, v))]
    b, a, c = w(0.0), w(1.0), w(3.0)
    want = merge.task_arithmetic(b, [a, c])
    close(merge.task_arithmetic(b, tree.stack([a, c])), jax.tree.map(np.asarray, want), tol=0)  # list-rooted stack
    assert float(want[0][0][0, 0]) == 4.0
    t = wl.select("kernel", merge.transform("adamerging", apply_fn=lambda p, x: x, steps=1))
    p = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}
    with pytest.raises(MergeError, match="whole model"):
        wl.apply_once(t, p, models=[p, p], unlabeled=[[jnp.ones((1, 2))]] * 2)
