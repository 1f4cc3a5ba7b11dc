"""weightlab.merge.masking (arcee_fusion, RAM/RAM+, MagMax, TALL/consensus, EMR, PCB) against float64
numpy references; copies-of-theta properties, bad inputs and device-count independence of the
second batch of methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError

from merge_helpers import close, f64, make




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
    out = merge.arcee_fusion(base, [ms[0]])
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
           "multislerp": lambda: merge.multislerp(None, copies, weight=[1, 2, 3]),
           "nuslerp": lambda: merge.nuslerp(None, [th, th], weight=[1, 3])}
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
        merge.multislerp(None, [{"x": np.array([1.0, 0])}, {"x": np.array([-1.0, 0])}, {"x": np.array([0.0, 0])}],
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
