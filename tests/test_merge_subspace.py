"""weightlab.merge.subspace (TSV-M, Iso-C/CTS, WUDI) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError

from merge_helpers import close, f64, make




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
    # Iso-C has a flat spectrum; a matrix select= does not pick gets the mean
    d = np.asarray(merge.iso_c(base, ms)["t0"]) - base["t0"]
    sv = np.linalg.svd(d, compute_uv=False)
    np.testing.assert_allclose(sv, sv.mean(), rtol=1e-4)
    close(merge.iso_c(base, ms, select="t1"), {"t0": f64(base["t0"]) + np.mean(tv("t0"), axis=0)})


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


