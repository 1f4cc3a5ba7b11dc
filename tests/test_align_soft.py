"""align.soft: Sinkhorn (against a float64 numpy reference, finite differences), soft_permute
(one-hot == permute), Sinkhorn re-basin and the STE (planted permutation; data-loss midpoints of two
independently trained MLPs against weight matching and no alignment)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weightlab.align import infer_spec, permute, random_perms, weight_matching
from weightlab.align.soft import sinkhorn, sinkhorn_matching, soft_permute, ste_matching
from weightlab.errors import AlignError, SpecError, UsageError
from weightlab.models import mlp, transformer

# ------------------------------------------------------------------------------------ sinkhorn


def _np_sinkhorn(s, n_iters, tau):
    x = np.asarray(s, np.float64) / tau
    for _ in range(n_iters):
        x = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        x = x - np.log(np.exp(x - x.max(-2, keepdims=True)).sum(-2, keepdims=True)) - x.max(-2, keepdims=True)
    return np.exp(x)


def test_sinkhorn_doubly_stochastic_matches_float64_reference():
    s = np.random.default_rng(0).normal(size=(3, 7, 7)) * 3
    for n_iters, tau in [(5, 1.0), (100, 1.0), (200, 0.5)]:
        p = np.asarray(sinkhorn(jnp.asarray(s, jnp.float32), n_iters, tau))
        np.testing.assert_allclose(p, _np_sinkhorn(s, n_iters, tau), atol=2e-5)
    p = np.asarray(sinkhorn(jnp.asarray(s, jnp.float32), 100))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)
    assert (p >= 0).all()
    # tau -> 0: the maximising permutation (here the identity plus a large margin)
    hard = np.asarray(sinkhorn(jnp.eye(5) * 2 + 0.01 * jnp.asarray(s[0, :5, :5], jnp.float32), 50, 0.05))
    np.testing.assert_allclose(hard, np.eye(5), atol=1e-3)


def test_sinkhorn_gradient_finite_and_matches_finite_differences():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 5))
    with jax.enable_x64(True):
        s = jnp.asarray(rng.normal(size=(5, 5)))
        f = jax.jit(lambda x: jnp.sum(sinkhorn(x, 30, 0.7) * w))
        g = np.asarray(jax.grad(f)(s))
        e = jnp.eye(25).reshape(25, 5, 5) * 1e-6
        fd = np.asarray((jax.vmap(f)(s + e) - jax.vmap(f)(s - e)) / 2e-6).reshape(5, 5)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)
    # float32: finite for small tau and for ties (all-equal scores; duplicated rows)
    ties = [jnp.zeros((6, 6)), jnp.tile(jnp.arange(6.0), (6, 1)),
            jnp.asarray(rng.normal(size=(6, 6)), jnp.float32) * 10]
    c = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, tau: jnp.sum(sinkhorn(x, 50, tau) * c)))
    for s in ties:
        for tau in (1.0, 0.2, 0.05):
            assert np.isfinite(np.asarray(grad(s, tau))).all(), tau


# -------------------------------------------------------------------------------- soft_permute


def _onehot(perms, spec):
    return {g: jax.nn.one_hot(p, spec.groups[g].size) for g, p in perms.items() if spec.groups[g].parent is None}


@functools.lru_cache(maxsize=None)
def _small_mlp(seed=0, hidden=(16, 16)):
    m = mlp(jax.random.key(seed), 8, hidden, 4)
    return m, infer_spec(m.apply_fn, m.params, jnp.ones((2, 8)))


def test_soft_permute_onehot_equals_permute_mlp_and_transformer():
    m, spec = _small_mlp()
    q = random_perms(spec, jax.random.key(3))
    got, want = soft_permute(spec, _onehot(q, spec), m.params), permute(spec, q, m.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)

    t, tspec = _small_transformer()
    assert any(g.parent for g in tspec.groups.values())
    q = random_perms(tspec, jax.random.key(4))
    nested = {g: p for g, p in q.items() if tspec.groups[g].parent is not None}
    got = soft_permute(tspec, _onehot(q, tspec), t.params, hard=nested)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, permute(tspec, q, t.params))
    # a soft (uniform) matrix averages the units
    g0 = next(iter(spec.groups))
    u = soft_permute(spec, {g0: jnp.full((16, 16), 1 / 16)}, m.params)
    np.testing.assert_allclose(u["dense_0"]["bias"], np.full(16, np.mean(m.params["dense_0"]["bias"])), atol=1e-6)


@functools.lru_cache(maxsize=None)
def _small_transformer():
    t = transformer(jax.random.key(0), dim=32, depth=1, num_heads=4)
    return t, infer_spec(t.apply_fn, t.params, jnp.ones((2, 40)))


# --------------------------------------------------------------------------- sinkhorn_matching


def test_sinkhorn_matching_recovers_planted_permutation_from_identity():
    m, spec = _small_mlp()
    a = m.params
    for seed in (1, 2):
        b = permute(spec, random_perms(spec, jax.random.key(seed)), a)
        r = sinkhorn_matching(spec, a, b, init="identity", steps=150)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), permute(spec, r, b), a)
        assert len(r.history) == 150 and r.history[-1] < 1e-3 < r.history[0]
        assert r.objective == pytest.approx(weight_matching(spec, a, b).objective, rel=1e-5)


def _teacher_data(n, key):
    teacher = mlp(jax.random.key(100), 8, (32,), 4)
    x = jax.random.normal(key, (n, 8))
    return x, jnp.argmax(teacher.apply_fn(teacher.params, x), -1)


def _ce(apply_fn, params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


@functools.lru_cache(maxsize=None)
def _trained_pair():
    """Two small MLPs (different inits, different data order) trained 200 Adam steps each."""
    x, y = _teacher_data(4096, jax.random.key(7))
    out = []
    for seed in (11, 12):
        m = mlp(jax.random.key(seed), 8, (32, 32), 4)
        opt = optax.adam(1e-2)

        @jax.jit
        def step(p, s, xb, yb):
            loss, g = jax.value_and_grad(lambda q: _ce(m.apply_fn, q, (xb, yb)))(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        p, s = m.params, opt.init(m.params)
        order = jax.random.permutation(jax.random.key(seed), 4096)
        for i in range(200):
            idx = order[(i * 256) % 4096:(i * 256) % 4096 + 256]
            p, s, _ = step(p, s, x[idx], y[idx])
        out.append(p)
    spec = infer_spec(m.apply_fn, out[0], x[:2])
    return m.apply_fn, spec, out[0], out[1]


def test_data_loss_matchers_beat_no_alignment():
    apply_fn, spec, a, b = _trained_pair()
    xt, yt = _teacher_data(2048, jax.random.key(8))
    loss_fn = lambda p, batch: _ce(apply_fn, p, batch)  # noqa: E731
    mid = lambda q: float(loss_fn(jax.tree.map(lambda u, v: (u + v) / 2, a, permute(spec, q, b)), (xt, yt)))  # noqa
    ends = [float(loss_fn(a, (xt, yt))), float(loss_fn(b, (xt, yt)))]
    xs, ys = _teacher_data(1024, jax.random.key(9))
    batches = [(xs[i:i + 256], ys[i:i + 256]) for i in range(0, 1024, 256)]
    none = mid({})
    wm = mid(weight_matching(spec, a, b))
    sk = sinkhorn_matching(spec, a, b, loss_fn=loss_fn, batches=batches, steps=100, lr=0.1)
    ste = ste_matching(spec, a, b, loss_fn, batches, steps=40, lr=1e-2, key=jax.random.key(1))
    l2 = sinkhorn_matching(spec, a, b, steps=100)
    got = {"ends": ends, "none": none, "wm": wm, "sinkhorn": mid(sk), "ste": mid(ste), "sinkhorn_l2": mid(l2)}
    print(got)
    assert np.isfinite(sk.history).all() and len(ste.history) == 40
    # seen (seeds 11/12): ends 0.254/0.230, none 0.622, wm 0.292, sinkhorn 0.283, ste 0.291, sinkhorn_l2 0.319.
    # Other seed pairs gave sinkhorn up to ~4% above wm (the relaxed loss mixes units, the projection
    # loses some of it) and ste at or below wm: assert half the barrier closed and within 10% of wm.
    assert got["wm"] < got["none"]
    for k in ("sinkhorn", "ste", "sinkhorn_l2"):
        assert got[k] < got["none"] - 0.5 * (got["none"] - max(ends)), (k, got)
    for k in ("sinkhorn", "ste"):
        assert got[k] <= got["wm"] * 1.10, (k, got)


# ------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_typed_errors():
    m, spec = _small_mlp()
    a = m.params
    loss = lambda p, b: jnp.sum(p["head"]["bias"])  # noqa: E731
    with pytest.raises(AlignError, match="steps"):
        sinkhorn_matching(spec, a, a, steps=0)
    with pytest.raises(AlignError, match="tau"):
        sinkhorn_matching(spec, a, a, tau=0.0)
    with pytest.raises(AlignError, match="tau"):
        sinkhorn(jnp.zeros((3, 3)), tau=-1.0)
    with pytest.raises(AlignError, match=r"\(\.\.\., n, n\)"):
        sinkhorn(jnp.zeros((3, 4)))
    with pytest.raises(AlignError, match="n_iters"):
        sinkhorn(jnp.zeros((3, 3)), n_iters=0)
    with pytest.raises(AlignError, match="init"):
        sinkhorn_matching(spec, a, a, init="random")
    with pytest.raises(AlignError, match="solver"):
        sinkhorn_matching(spec, a, a, solver="nope")
    with pytest.raises(AlignError, match="batches given without loss_fn"):
        sinkhorn_matching(spec, a, a, batches=[1])
    with pytest.raises(AlignError, match="loss_fn must be callable"):
        sinkhorn_matching(spec, a, a, loss_fn="ce", batches=[1])
    with pytest.raises(AlignError, match="loss_fn must be callable"):
        ste_matching(spec, a, a, None, [1])
    with pytest.raises(AlignError, match="empty"):
        ste_matching(spec, a, a, loss, [])
    with pytest.raises(AlignError, match="scalar"):
        ste_matching(spec, a, a, lambda p, b: p["head"]["bias"], [1])
    with pytest.raises(AlignError, match="steps"):
        ste_matching(spec, a, a, loss, [1], steps=0)
    with pytest.raises(UsageError, match="int"):
        ste_matching(spec, a, a, loss, [1], key=0)
    other = mlp(jax.random.key(1), 8, (16, 8), 4).params
    with pytest.raises(SpecError, match="dense_1"):
        sinkhorn_matching(spec, a, other)
    bad = jax.tree.map(lambda x: x, a)
    bad["head"]["kernel"] = bad["head"]["kernel"].astype(jnp.int32)
    with pytest.raises(AlignError, match="head/kernel"):
        sinkhorn_matching(spec, a, bad)
    g0, g1 = list(spec.groups)
    with pytest.raises(AlignError, match="unknown group"):
        soft_permute(spec, {"nope": jnp.eye(16)}, a)
    with pytest.raises(AlignError, match=r"\(16, 16\)"):
        soft_permute(spec, {g0: jnp.eye(8)}, a)
    with pytest.raises(AlignError, match="both"):
        soft_permute(spec, {g0: jnp.eye(16)}, a, hard={g0: jnp.arange(16)})
    t, tspec = _small_transformer()
    inner = next(g for g in tspec.groups.values() if g.parent)
    with pytest.raises(AlignError, match="nested"):
        soft_permute(tspec, {inner.name: jnp.eye(inner.size)}, t.params)
