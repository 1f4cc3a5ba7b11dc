"""The second batch of merge methods (nuslerp, multislerp, arcee_fusion, RAM, MagMax, TALL/consensus,
EMR, PCB, TSV-M, Iso-C/CTS, WUDI, OPCM) against float64 numpy implementations of the published
semantics, plus properties (copies of theta give theta where that holds)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError


def make(n=3, seed=0, shapes=((8, 6), (5,)), scale=0.3, sparse=0.0):
    rng = np.random.default_rng(seed)
    base = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    ms = []
    for _ in range(n):
        m = {}
        for k, v in base.items():
            d = rng.standard_normal(v.shape) * scale
            if sparse:
                d = d * (rng.random(v.shape) > sparse)
            m[k] = (v + d).astype(np.float32)
        ms.append(m)
    return base, ms


def f64(x):
    return np.asarray(x, np.float64)


def close(a, b, tol=1e-4):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=tol, atol=tol, err_msg=k)


# ------------------------------------------------------------------ spherical

def ref_slerp_rows(t, a, b):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        ux, uy = x / max(np.linalg.norm(x), 1e-7), y / max(np.linalg.norm(y), 1e-7)
        th = np.arccos(np.clip(ux @ uy, -1, 1))
        out[i] = (1 - t) * x + t * y if abs(np.sin(th)) < 1e-8 else \
            (np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)
    return out


@pytest.mark.parametrize("flatten,row_wise,with_base", [(True, False, False), (False, False, True), (False, True, False)])
def test_nuslerp_matches_reference(flatten, row_wise, with_base):
    base, ms = make(2)
    w = [0.3, 0.9]
    t = 0.9 / 1.2
    out = merge.nuslerp(ms, weight=w, base=base if with_base else None, nuslerp_flatten=flatten,
                        nuslerp_row_wise=row_wise)
    ref = {}
    for k in base:
        b = f64(base[k])
        a0, a1 = f64(ms[0][k]) - (b if with_base else 0), f64(ms[1][k]) - (b if with_base else 0)
        if flatten or a0.ndim == 1:
            r = ref_slerp_rows(t, a0.reshape(1, -1), a1.reshape(1, -1)).reshape(a0.shape)
        elif row_wise:
            r = ref_slerp_rows(t, a0.T, a1.T).T
        else:
            r = ref_slerp_rows(t, a0, a1)
        ref[k] = r + (b if with_base else 0)
    close(out, ref)
    with pytest.raises(MergeError, match="exactly two"):
        merge.nuslerp(make(3)[1], weight=[1, 1, 1])


def test_multislerp_matches_reference_and_two_model_slerp():
    base, ms = make(3)
    w = np.array([1.0, 2.0, 0.5])
    out = merge.multislerp(ms, weight=w, base=base)
    ref = {}
    for k in base:
        b = f64(base[k])
        x = np.stack([f64(m[k]) - b for m in ms]).reshape(3, -1)
        wn = w / w.sum()
        norms = np.linalg.norm(x, axis=1)
        u = x / norms[:, None]
        mean = (wn[:, None] * u).sum(0)
        mean /= np.linalg.norm(mean)
        ref[k] = (mean * (wn * norms).sum()).reshape(b.shape) + b  # tangent mean vanishes
    close(out, ref)
    # equal norms, two models: the geodesic midpoint direction = slerp(0.5)'s
    a = {"x": np.array([1.0, 0.0], np.float32)}
    c = {"x": np.array([0.0, 1.0], np.float32)}
    np.testing.assert_allclose(merge.multislerp([a, c])["x"], [np.sqrt(0.5)] * 2, atol=1e-5)


# ------------------------------------------------------------------ element-wise selection

def ref_arcee(b, m):
    b, m = f64(b), f64(m)
    sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    p, q = sm(m) + 1e-8, sm(b) + 1e-8
    imp = np.abs(m - b) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    qv = lambda q_: s[int(q_ * (s.size - 1))]
    thr = qv(0.5) + 1.5 * (qv(0.75) - qv(0.25))
    return b + (m - b) * (imp >= thr)


def test_arcee_fusion_ram_magmax_match_references():
    base, ms = make(3, sparse=0.5)
    out = merge.arcee_fusion(base, ms[0])
    close(out, {k: ref_arcee(base[k], ms[0][k]) for k in base})
    assert not np.allclose(out["t0"], ms[0]["t0"]) and not np.allclose(out["t0"], base["t0"])

    r, rp, mm = merge.ram(base, ms), merge.ramplus_tl(base, ms, r=0.5, alpha=0.4), merge.magmax(base, ms, lambda_=0.7)
    for k in base:
        b = f64(base[k]).reshape(-1)
        tv = np.stack([f64(m[k]).reshape(-1) - b for m in ms])
        nz = np.abs(tv) > 1e-5
        cnt = nz.sum(0)
        want = np.zeros_like(b)
        want_p = np.zeros_like(b)
        for i in range(3):
            uniq = nz[i] & (cnt == 1)
            shared = nz[i] & (cnt > 1)
            lam = 1 + 0.5 * np.clip(shared.sum() / max(uniq.sum(), 1e-5), 0, 0.4)
            want += np.where(uniq, tv[i], 0) + np.where(shared, tv[i] / np.maximum(cnt, 1), 0)
            want_p += np.where(uniq, tv[i] * lam, 0) + np.where(shared, tv[i] / np.maximum(cnt, 1), 0)
        close({k: r[k].reshape(-1)}, {k: b + want})
        close({k: rp[k].reshape(-1)}, {k: b + want_p})
        pick = np.zeros_like(b)
        for i in range(3):  # running >=: later wins ties
            pick = np.where(np.abs(tv[i]) >= np.abs(pick), tv[i], pick)
        close({k: mm[k].reshape(-1)}, {k: b + 0.7 * pick})


def test_tall_masks_and_consensus_match_reference():
    base, ms = make(4, seed=3)
    masks = merge.tall_masks(base, ms, tall_mask_lambda=0.5)
    out = merge.consensus(base, ms, k=2, tall_mask_lambda=0.5, lambda_=0.8)
    for k in base:
        b = f64(base[k])
        tv = np.stack([f64(m[k]) - b for m in ms])
        mtl = tv.sum(0)
        ref_m = np.abs(tv) > 0.5 * np.abs(mtl[None] - tv)
        np.testing.assert_array_equal(np.asarray(masks[k]), ref_m)
        close({k: out[k]}, {k: b + 0.8 * mtl * (ref_m.sum(0) >= 2)})
    # k = 0 keeps everything: plain task arithmetic
    close(merge.consensus(base, ms, k=0), {k: f64(base[k]) + sum(f64(m[k]) - f64(base[k]) for m in ms) for k in base})


def test_emr_matches_reference_and_reconstructs_signs():
    base, ms = make(3, seed=5)
    res = merge.emr(base, ms)
    before, after = np.zeros(3), np.zeros(3)
    uni, msk = {}, {}
    for k in base:
        b = f64(base[k])
        tv = np.stack([f64(m[k]) - b for m in ms])
        flag = np.where(tv.sum(0) > 0, 1.0, -1.0)
        mask = tv * flag > 0
        uni[k] = np.max(np.abs(tv) * mask, axis=0) * flag
        msk[k] = mask
        before += np.abs(tv).reshape(3, -1).mean(1)
        after += np.abs(uni[k][None] * mask).reshape(3, -1).mean(1)
    close(res.unified, uni)
    np.testing.assert_allclose(res.rescalers, before / after, rtol=1e-5)
    t1 = res.task_model(1)
    close(t1, {k: f64(base[k]) + before[1] / after[1] * uni[k] * msk[k][1] for k in base})
    # the task model agrees in sign with its fine-tune wherever the mask is on
    for k in base:
        d = np.asarray(t1[k]) - base[k]
        tv1 = ms[1][k] - base[k]
        assert np.all(np.sign(d[msk[k][1]]) == np.sign(tv1[msk[k][1]]))


def ref_pcb(tv, ratio):
    n, d = tv.shape

    def clamp(x, lo_r, hi_r):
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, int(d * lo_r)][:, None], s[:, int(d * (1 - hi_r) - 1)][:, None])

    def mm(x):
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return (x - lo) / (hi - lo)

    mag = clamp(np.abs(tv), 1e-4, 1e-4)
    score = np.exp(n * mm(mag) ** 2) * np.tanh(tv * tv.sum(0, keepdims=True))
    scale = mm(clamp(score, 1 - ratio, 0))
    return (np.sign(tv) * mag * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


def test_pcb_matches_reference_global_and_tensor_scope():
    base, ms = make(3, seed=7, shapes=((8, 6), (30,)))
    keys = sorted(base)
    tv = np.concatenate([np.stack([f64(m[k]) - f64(base[k]) for m in ms]).reshape(3, -1) for k in keys], axis=1)
    merged = 1.2 * ref_pcb(tv, 0.2)
    out = merge.pcb(base, ms, pcb_ratio=0.2, lambda_=1.2)
    off = 0
    for k in keys:
        sz = base[k].size
        close({k: out[k]}, {k: f64(base[k]) + merged[off:off + sz].reshape(base[k].shape)}, tol=2e-4)
        off += sz
    out_t = merge.pcb(base, ms, pcb_ratio=0.2, scope="tensor")
    for k in keys:
        tvk = np.stack([f64(m[k]) - f64(base[k]) for m in ms]).reshape(3, -1)
        close({k: out_t[k]}, {k: f64(base[k]) + ref_pcb(tvk, 0.2).reshape(base[k].shape)}, tol=2e-4)


# ------------------------------------------------------------------ subspace methods

def polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def ref_tsv(tvs):
    n = len(tvs)
    r = min(tvs[0].shape)
    k = r // n
    us, ss, vs = np.zeros((tvs[0].shape[0], r)), np.zeros(r), np.zeros((r, tvs[0].shape[1]))
    for i, t in enumerate(tvs):
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        us[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], vs[i * k:(i + 1) * k] = u[:, :k], s[:k], vt[:k]
    return polar(us) @ np.diag(ss) @ polar(vs)


def ref_iso_cts(tvs, frac):
    n, r = len(tvs), min(tvs[0].shape)
    c = int(r * frac)
    per = round((r - c) / n)
    c = r - per * n
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    U, S, V = [], [], []
    for t in tvs:
        res = t - u[:, :c] @ u[:, :c].T @ t
        a, b, ct = np.linalg.svd(res, full_matrices=False)
        U.append(a[:, :per]), S.append(b[:per]), V.append(ct[:per])
    U, S, V = np.concatenate(U + [u[:, :c]], 1), np.concatenate(S + [s[:c]]), np.concatenate(V + [vt[:c]], 0)
    return polar(U) * S.mean() @ polar(V)


def test_tsv_iso_match_references():
    base, ms = make(3, seed=2, shapes=((12, 9), (9,)))
    tv = lambda k: [f64(m[k]) - f64(base[k]) for m in ms]
    mean_bias = np.mean(tv("t1"), axis=0)
    out = merge.tsv_m(base, ms, lambda_=0.9)
    close(out, {"t0": f64(base["t0"]) + 0.9 * ref_tsv(tv("t0")), "t1": f64(base["t1"]) + 0.9 * mean_bias})
    u, s, vt = np.linalg.svd(sum(tv("t0")), full_matrices=False)
    close(merge.iso_c(base, ms), {"t0": f64(base["t0"]) + u * s.mean() @ vt, "t1": f64(base["t1"]) + mean_bias})
    close(merge.iso_cts(base, ms, common_space_fraction=0.5),
          {"t0": f64(base["t0"]) + ref_iso_cts(tv("t0"), 0.5), "t1": f64(base["t1"]) + mean_bias})
    # Iso-C has a flat spectrum; exclude= leaves a matrix to the mean
    d = np.asarray(merge.iso_c(base, ms)["t0"]) - base["t0"]
    sv = np.linalg.svd(d, compute_uv=False)
    np.testing.assert_allclose(sv, sv.mean(), rtol=1e-4)
    close(merge.iso_c(base, ms, exclude="t0"), {"t0": f64(base["t0"]) + np.mean(tv("t0"), axis=0)})


def test_tsv_of_orthogonal_low_rank_tasks_is_their_sum():
    """Tasks living in orthogonal rank-1 subspaces do not interfere: TSV-M returns the plain sum."""
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    q2, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    base = {"w": np.zeros((8, 6), np.float32)}
    ms = [{"w": (3.0 * np.outer(q1[:, i], q2[:, i])).astype(np.float32)} for i in range(6)]
    np.testing.assert_allclose(merge.tsv_m(base, ms)["w"], sum(m["w"] for m in ms), atol=1e-5)


def test_wudi_reduces_its_loss_and_matches_numpy_adam():
    base, ms = make(2, seed=4, shapes=((6, 4),))
    tvs = np.stack([f64(m["t0"]) - f64(base["t0"]) for m in ms])  # flax (in, out)
    steps, lr = 50, 1e-2
    out = merge.wudi(base, ms, steps=steps, lr=lr)
    t = np.swapaxes(tvs, 1, 2)  # (n, out, in)
    norms = (t.reshape(2, -1) ** 2).sum(1)
    loss = lambda m: sum(((m - t[i]) @ t[i].T) ** 2 / norms[i] for i in range(2)).sum()
    grad = lambda m: sum(2 * ((m - t[i]) @ t[i].T) @ t[i] / norms[i] for i in range(2))
    m, mu, nu = t.sum(0), 0, 0
    for i in range(1, steps + 1):  # Adam (b1 .9, b2 .999, eps 1e-8), written out
        g = grad(m)
        mu, nu = 0.9 * mu + 0.1 * g, 0.999 * nu + 0.001 * g * g
        m = m - lr * (mu / (1 - 0.9 ** i)) / (np.sqrt(nu / (1 - 0.999 ** i)) + 1e-8)
    np.testing.assert_allclose(np.asarray(out["t0"]) - base["t0"], m.T, atol=2e-4)
    assert loss(m) < loss(t.sum(0))
    # HF layout: the same merge on transposed weights, input_axis=1
    tb = {"t0": base["t0"].T.copy()}
    tm = [{"t0": x["t0"].T.copy()} for x in ms]
    np.testing.assert_allclose(merge.wudi(tb, tm, steps=steps, lr=lr, input_axis=1)["t0"], np.asarray(out["t0"]).T,
                               atol=1e-5)


def ref_opcm(base, models, alpha):
    """Independent float64 OPCM (reference loop written out)."""
    tv = lambda m: {k: f64(m[k]) - f64(base[k]) for k in base}
    gnorm = lambda d: np.sqrt(sum((v ** 2).sum() for v in d.values()))
    merged = tv(models[0])
    norms, lam = [gnorm(merged)], 1.0
    for m in models[1:]:
        t = tv(m)
        norms.append(gnorm(t))
        acc = {}
        for k in base:
            if merged[k].ndim == 2:
                u, s, vt = np.linalg.svd(merged[k], full_matrices=True)
                split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
                p = u.T @ t[k] @ vt.T
                np.fill_diagonal(p, 0)
                p[:split, :split] = 0
                acc[k] = lam * merged[k] + u @ p @ vt
            else:
                acc[k] = lam * merged[k] + t[k]
        an = gnorm(acc)
        merged = {k: v * np.mean(norms) / an for k, v in acc.items()}
        lam = an / np.mean(norms)
    return {k: f64(base[k]) + merged[k] for k in base}


def test_opcm_matches_reference_and_keeps_mean_norm():
    base, ms = make(4, seed=9, shapes=((7, 5), (5,)))
    out = merge.opcm(base, ms, alpha=0.5)
    close(out, ref_opcm(base, ms, 0.5))
    gn = lambda m: np.sqrt(sum(((np.asarray(m[k], np.float64) - base[k]) ** 2).sum() for k in base))
    np.testing.assert_allclose(gn(out), np.mean([gn(m) for m in ms]), rtol=1e-4)


# ------------------------------------------------------------------ properties + errors

@pytest.mark.parametrize("name", ["ram", "ramplus_tl", "magmax_copies", "tsv_m", "iso_c", "iso_cts", "pcb", "emr",
                                  "multislerp", "nuslerp"])
def test_copies_of_theta(name):
    """Merging N copies of theta gives theta for every method where that holds (TSV/Iso/consensus
    change the spectrum or scale of a single task vector by design, so copies of a fine-tune are
    not fixed points; with base = theta every method returns theta. OPCM adds non-matrix leaves
    whole before renormalising, so it has no such property either.)"""
    base, ms = make(1, seed=11)
    th = ms[0]
    copies = [th, th, th]
    fns = {"ram": lambda: merge.ram(th, copies), "ramplus_tl": lambda: merge.ramplus_tl(th, copies),
           "magmax_copies": lambda: merge.magmax(base, copies), "tsv_m": lambda: merge.tsv_m(th, copies),
           "iso_c": lambda: merge.iso_c(th, copies), "iso_cts": lambda: merge.iso_cts(th, copies),
           "pcb": lambda: merge.pcb(th, copies), "emr": lambda: merge.emr(base, copies).task_model(2),
           "multislerp": lambda: merge.multislerp(copies, weight=[1, 2, 3]),
           "nuslerp": lambda: merge.nuslerp([th, th], weight=[1, 3])}
    out = fns[name]()
    for k in th:
        np.testing.assert_allclose(np.asarray(out[k]), th[k], atol=1e-4, err_msg=name)


def test_bad_inputs():
    base, ms = make(2)
    with pytest.raises(MergeError):
        merge.pcb(base, ms, pcb_ratio=0)
    with pytest.raises(MergeError):
        merge.consensus(base, ms, k=5)
    with pytest.raises(MergeError):
        merge.wudi(base, ms, input_axis=2)
    with pytest.raises(MergeError):
        merge.opcm(base, [])
    bad = dict(ms[0], t0=np.full_like(ms[0]["t0"], np.nan))
    with pytest.raises(MergeError, match="t0"):
        merge.tsv_m(base, [bad, ms[1]])
    with pytest.raises(MergeError, match="zero"):
        merge.multislerp([{"x": np.array([1.0, 0])}, {"x": np.array([-1.0, 0])}, {"x": np.array([0.0, 0])}],
                         weight=[1, 1, 0])


@pytest.mark.parametrize("name", ["ties", "dare_ties", "magmax", "iso_c", "tsv_m", "pcb_tensor"])
def test_results_do_not_depend_on_device_count(name):
    """The same merge, jitted over inputs sharded across an 8-device mesh, equals the 1-device result
    (random masks come from path-derived keys, not from device-local RNG)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    base, ms = make(3, seed=12, shapes=((16, 8), (8,)))
    stacked = jax.tree.map(lambda *x: np.stack(x), *ms)
    fns = {"ties": lambda b, s: merge.ties(b, s, density=0.4),
           "dare_ties": lambda b, s: merge.dare_ties(b, s, density=0.5, key=jax.random.key(3)),
           "magmax": lambda b, s: merge.magmax(b, s), "iso_c": lambda b, s: merge.iso_c(b, s),
           "tsv_m": lambda b, s: merge.tsv_m(b, s),
           "pcb_tensor": lambda b, s: merge.pcb(b, s, pcb_ratio=0.3, scope="tensor")}
    fn = fns[name]
    want = fn(base, stacked)
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    b_sh = {k: put(v, P(None, "x") if v.ndim == 2 else P("x")) for k, v in base.items()}
    s_sh = {k: put(v, P(None, None, "x") if v.ndim == 3 else P(None, "x")) for k, v in stacked.items()}
    got = jax.jit(fn)(b_sh, s_sh)
    for k in base:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-5, err_msg=k)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None)
@given(st.integers(2, 4), st.integers(2, 7), st.integers(2, 7), st.integers(0, 10_000))
def test_lambda_zero_gives_base_for_every_scaled_method(n, rows, cols, seed):
    """Property: every method with a final scale returns the base at lambda = 0, for any shapes."""
    base, ms = make(n, seed=seed, shapes=((rows, cols), (cols,)))
    for fn in (merge.magmax, merge.consensus, merge.pcb, merge.tsv_m, merge.iso_c, merge.iso_cts,
               lambda b, m, lambda_: merge.wudi(b, m, steps=3, lr=1e-3, lambda_=lambda_)):
        out = fn(base, ms, lambda_=0.0)
        for k in base:
            np.testing.assert_allclose(np.asarray(out[k]), base[k], atol=1e-6)
