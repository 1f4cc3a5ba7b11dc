"""Data-driven merges: Fisher-weighted averaging and RegMean, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError


def test_regmean_is_the_least_squares_solution():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((200, 6)) * s for s in (1.0, 3.0)]
    ws = [rng.standard_normal((6, 4)).astype(np.float32) for _ in xs]
    models = [{"l": {"kernel": w, "bias": np.full(4, i, np.float32)}} for i, w in enumerate(ws)]
    grams = [{"l/kernel": x.T @ x} for x in xs]
    out = merge.regmean(None, models, grams=grams, alpha=1.0)
    # closed form: argmin_W sum_i ||X_i W - X_i W_i||^2  (stack the problems, solve with lstsq)
    X = np.concatenate(xs)
    Y = np.concatenate([x @ w for x, w in zip(xs, ws)])
    ref = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(out["l"]["kernel"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["l"]["bias"], 0.5)  # non-matmul leaves are averaged
    # alpha = 0 keeps only the diagonals: a per-input-row weighted average
    d = merge.regmean(None, models, grams=grams, alpha=0.0)["l"]["kernel"]
    g = [np.diag(x.T @ x) for x in xs]
    np.testing.assert_allclose(d, (g[0][:, None] * ws[0] + g[1][:, None] * ws[1]) / (g[0] + g[1])[:, None], rtol=1e-4)
    with pytest.raises(MergeError, match="alpha"):
        merge.regmean(None, models, grams=grams, alpha=1.5)


def test_regmean_model_level_uses_traced_grams():
    from weightlab.models import mlp
    m = [mlp(jax.random.key(i), hidden=(8,)) for i in range(2)]
    data = [[jax.random.normal(jax.random.key(10 + i), (64, 40))] for i in range(2)]
    params = [x.params for x in m]
    out = merge.regmean(None, params, grams=merge.regmean_grams(m[0].apply_fn, params, data), alpha=1.0)
    x0, x1 = (np.asarray(d[0], np.float64) for d in data)
    w0, w1 = (np.asarray(x.params["dense_0"]["kernel"], np.float64) for x in m)
    g0, g1 = x0.T @ x0, x1.T @ x1
    ref = np.linalg.solve(g0 + g1, g0 @ w0 + g1 @ w1)
    np.testing.assert_allclose(out["dense_0"]["kernel"], ref, rtol=2e-3, atol=2e-3)


def test_fisher_merge_closed_form_and_identity():
    a = {"w": jnp.array([1.0, 2.0, 3.0])}
    b = {"w": jnp.array([3.0, 2.0, 0.0])}
    fa, fb = {"w": jnp.array([1.0, 0.0, 3.0])}, {"w": jnp.array([1.0, 1.0, 1.0])}
    out = merge.fisher_merge(None, [a, b], fishers=[fa, fb], eps=0.0)
    np.testing.assert_allclose(out["w"], [2.0, 2.0, 9.0 / 4.0])
    same = merge.fisher_merge(None, [a, a], fishers=[fa, fb])
    np.testing.assert_allclose(same["w"], a["w"], rtol=1e-6)


def test_diagonal_fisher_matches_bruteforce():
    from weightlab.models import mlp
    m = mlp(jax.random.key(0), in_dim=5, hidden=(4,), out_dim=3)
    x = jax.random.normal(jax.random.key(1), (6, 5))
    f = merge.diagonal_fisher(m.apply_fn, m.params, [x[:4], x[4:]])
    ref = jax.tree.map(jnp.zeros_like, m.params)
    for i in range(6):
        p = jax.nn.softmax(m.apply_fn(m.params, x[i:i + 1])[0])
        for c in range(3):
            g = jax.grad(lambda q: jax.nn.log_softmax(m.apply_fn(q, x[i:i + 1])[0])[c])(m.params)
            ref = jax.tree.map(lambda r, v: r + p[c] * v ** 2 / 6, ref, g)
    for u, v in zip(jax.tree.leaves(f), jax.tree.leaves(ref)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7)
    emp = merge.diagonal_fisher(m.apply_fn, m.params, [x], labels=[jnp.zeros(6, jnp.int32)], mode="empirical")
    assert jax.tree.structure(emp) == jax.tree.structure(m.params)
    with pytest.raises(MergeError, match="label"):
        merge.diagonal_fisher(m.apply_fn, m.params, [x], mode="empirical")


def test_adamerging_learns_coefficients_and_lowers_entropy():
    import optax
    from weightlab.data import load_mnist1d
    from weightlab.models import train_mnist1d
    from weightlab.train import fit
    d = load_mnist1d()
    run = train_mnist1d(seed=0, steps=600)
    f = run.model.apply_fn
    halves = [d["y"] < 5, d["y"] >= 5]
    fine = [fit(f, run.params, d["x"][m], d["y"][m], key=jax.random.key(i), steps=150,
                optimizer=optax.adam(1e-3)).params for i, m in enumerate(halves)]
    unl = [[d["x_test"][(d["y_test"] < 5) if i == 0 else (d["y_test"] >= 5)][:200]] for i in range(2)]
    for gran in ("task", "layer"):
        r = merge.adamerging_fit(run.params, fine, apply_fn=f, unlabeled=unl, granularity=gran, steps=40,
                                 optimizer=optax.adam(1e-2))
        assert float(r.losses[-1]) < float(r.losses[0])  # entropy goes down
        leaves = [r.coefficients] if gran == "task" else jax.tree.leaves(r.coefficients)
        assert all(float(c.min()) >= 0 and float(c.max()) <= 1 for c in leaves)
        assert any(float(jnp.abs(c - 0.3).max()) > 1e-3 for c in leaves)  # coefficients moved
    # merge_with is task arithmetic for fixed coefficients
    tvs = jax.tree.map(lambda *xs: jnp.stack([x - b for x, b in zip(xs[:-1], [xs[-1]] * 2)]), *fine, run.params)
    np.testing.assert_allclose(merge.merge_with(run.params, tvs, jnp.array([0.5, 0.5]))["head"]["kernel"],
                               merge.task_arithmetic(run.params, fine, weight=0.5)["head"]["kernel"], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(MergeError, match="granularity"):
        merge.adamerging(run.params, fine, apply_fn=f, unlabeled=unl, granularity="block")


def test_adamerging_resumes_from_a_checkpoint_manager(tmp_path):
    """Stopped after 6 of 12 steps and restarted with the same manager, AdaMerging ends exactly where
    an uninterrupted run ends (orbax step checkpoints of the coefficients and Adam state)."""
    import optax
    from weightlab.io import CheckpointManager
    from weightlab.models import mlp

    m = mlp(jax.random.key(0), in_dim=8, hidden=(16,), out_dim=4)
    fine = [jax.tree.map(lambda w, i=i: w + 0.1 * jax.random.normal(jax.random.key(i), w.shape), m.params)
            for i in range(2)]
    unl = [[jax.random.normal(jax.random.key(10 + i), (32, 8))] for i in range(2)]
    kw = dict(apply_fn=m.apply_fn, unlabeled=unl, granularity="layer", optimizer=optax.adam(5e-2))
    whole = merge.adamerging_fit(m.params, fine, steps=12, **kw)
    with CheckpointManager(tmp_path / "ck", save_interval_steps=3) as mgr:
        merge.adamerging_fit(m.params, fine, steps=6, checkpoint=mgr, **kw)
        assert mgr.all_steps() == [1, 3, 6]  # orbax saves the first step, then every 3rd, and the last
    with CheckpointManager(tmp_path / "ck", save_interval_steps=3) as mgr:
        rest = merge.adamerging_fit(m.params, fine, steps=12, checkpoint=mgr, **kw)
        assert mgr.latest_step() == 12
    assert len(rest.losses) == 6
    for a, b in zip(jax.tree.leaves(whole.coefficients), jax.tree.leaves(rest.coefficients)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(whole.losses[6:]), np.asarray(rest.losses))


def test_data_driven_methods_as_transforms_under_select():
    """Fisher merging as a transform: ``models=`` and ``fishers=`` are extras; under select both are
    masked to the selected leaves, and the result equals the plain function on those leaves."""
    import weightlab as wl

    rng = np.random.default_rng(3)
    mk = lambda: {"a": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
                  "b": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}}
    ms, fs = [mk(), mk()], [jax.tree.map(jnp.abs, mk()), jax.tree.map(jnp.abs, mk())]
    base = mk()
    t = wl.select("^a/", merge.transform("fisher_merge"))
    out = wl.apply_once(t, base, models=ms, fishers=fs)
    want = merge.fisher_merge(None, ms, fishers=fs)
    np.testing.assert_allclose(out["a"]["kernel"], want["a"]["kernel"], rtol=1e-6)
    assert out["b"]["kernel"] is base["b"]["kernel"]
    with pytest.raises(MergeError, match="needs the parameter 'fishers'"):
        wl.apply_once(t, base, models=ms)
