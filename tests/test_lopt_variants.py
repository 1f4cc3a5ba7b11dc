"""Hand-designed optimizer variants (weightlab.lopt.variants) against literal float64 numpy
re-implementations of each paper's pseudo-code, plus composition, registry and error checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weightlab.errors import MissingExtraError, UsageError
from weightlab.lopt import variants as V

STEPS = 60
SHAPES = {"vec": (5,), "mat": (4, 3), "mat_l": (3, 4), "conv": (3, 2, 2, 2)}


def _x64():
    return jax.enable_x64() if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def _init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) + 0.1 for k, s in SHAPES.items()}


_NOISE = np.random.default_rng(1)
NOISE = [{k: _NOISE.normal(size=s) for k, s in SHAPES.items()} for _ in range(STEPS)]


def grads_at(params, t):
    """Gradient of a quadratic plus a fixed noise sequence; 'conv' rows and the whole of 'mat_l'
    get gradients orthogonal to the weights (scale-invariant, for AdamP/SGDP's two views)."""
    g = {k: 0.5 * params[k] + NOISE[t][k] for k in ("vec", "mat")}
    x, n = params["conv"].reshape(3, -1), NOISE[t]["conv"].reshape(3, -1)
    g["conv"] = (n - x * (np.sum(x * n, 1, keepdims=True) / np.sum(x * x, 1, keepdims=True))).reshape(3, 2, 2, 2)
    x, n = params["mat_l"].ravel(), NOISE[t]["mat_l"].ravel()
    g["mat_l"] = (n - x * (x @ n) / (x @ x)).reshape(3, 4)
    return g


def run_jax(opt, steps=STEPS):
    """Trajectory of params (list of numpy dicts) under ``opt`` in float64, jitted."""
    with _x64():
        params = {k: jnp.asarray(v, jnp.float64) for k, v in _init_params().items()}
        state = opt.init(params)
        upd = jax.jit(opt.update)
        traj = []
        for t in range(steps):
            g = {k: jnp.asarray(v) for k, v in grads_at({k: np.asarray(v) for k, v in params.items()}, t).items()}
            u, state = upd(g, state, params)
            params = optax.apply_updates(params, u)
            assert all(v.dtype == jnp.float64 for v in params.values())
            traj.append({k: np.asarray(v) for k, v in params.items()})
    return traj


def run_ref(step_fn, state, steps=STEPS):
    params = _init_params()
    traj = []
    for t in range(steps):
        g = grads_at(params, t)
        params = {k: v.copy() for k, v in params.items()}
        step_fn(params, g, state, t + 1)  # in place, t = 1, 2, ...
        traj.append({k: v.copy() for k, v in params.items()})
    return traj


def assert_same(a, b, tol=1e-6):
    assert len(a) == len(b)
    for t, (pa, pb) in enumerate(zip(a, b)):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], atol=tol, rtol=0, err_msg=f"step {t + 1}, leaf {k}")


def zeros():
    return {k: np.zeros(s) for k, s in SHAPES.items()}


# --- reference implementations (straight from the papers' pseudo-code) ---------------------------

def ref_cautious_sgdm(lr, mom, rescale):
    st = {"m": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["m"][k] = g[k] + mom * s["m"][k]          # optax.sgd trace
            u = s["m"][k]                                 # descent direction
            phi = (u * g[k] > 0).astype(float)
            scale = phi.size / (phi.sum() + 1) if rescale == "paper" else 1 / max(phi.mean(), 1e-3)
            p[k] -= lr * scale * phi * u
    return step, st


def ref_cautious_adamw(lr, b1, b2, eps, wd):
    st = {"m": zeros(), "v": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["m"][k] = b1 * s["m"][k] + (1 - b1) * g[k]
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * g[k] ** 2
            u = (s["m"][k] / (1 - b1 ** t)) / (np.sqrt(s["v"][k] / (1 - b2 ** t)) + eps)
            phi = (u * g[k] > 0).astype(float)
            lr_bar = lr * phi.size / (phi.sum() + 1)
            p[k] = p[k] - lr_bar * phi * u - lr * wd * p[k]
    return step, st


def ref_adamw_cwd(lr, b1, b2, eps, wd):
    st = {"m": zeros(), "v": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["m"][k] = b1 * s["m"][k] + (1 - b1) * g[k]
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * g[k] ** 2
            u = (s["m"][k] / (1 - b1 ** t)) / (np.sqrt(s["v"][k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr * (u + wd * (u * p[k] >= 0) * p[k])
    return step, st


def ref_sgd_cwd_post(lr_fn, wd):
    def step(p, g, s, t):
        for k in p:
            u = g[k]
            p[k] = p[k] - lr_fn(t - 1) * (u + wd * (u * p[k] >= 0) * p[k])
    return step, {}


def ref_tam(lr, beta, gamma, eps):
    st = {"m": zeros(), "s": {k: 0.0 for k in SHAPES}}

    def step(p, g, s, t):
        for k in p:
            m = s["m"][k]
            nm = np.linalg.norm(m) * np.linalg.norm(g[k])
            cos = float(np.sum(m * g[k]) / nm) if nm > 0 else 0.0
            s["s"][k] = gamma * s["s"][k] + (1 - gamma) * cos
            d = (1 + s["s"][k]) / 2
            s["m"][k] = beta * m + (eps + d) * g[k]
            p[k] -= lr * s["m"][k]
    return step, st


def ref_adatam(lr, b1, b2, gamma, eps, wd):
    st = {"m": zeros(), "v": zeros(), "s": {k: 0.0 for k in SHAPES}}

    def step(p, g, s, t):
        for k in p:
            m = s["m"][k]
            nm = np.linalg.norm(m) * np.linalg.norm(g[k])
            cos = float(np.sum(m * g[k]) / nm) if nm > 0 else 0.0
            s["s"][k] = gamma * s["s"][k] + (1 - gamma) * cos
            d = (1 + s["s"][k]) / 2
            s["m"][k] = b1 * m + (1 - b1) * (eps + d) * g[k]
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * g[k] ** 2
            u = (s["m"][k] / (1 - b1 ** t)) / (np.sqrt(s["v"][k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr * (u + wd * p[k])
    return step, st


def ref_projection(x, g, pert, delta, wd_ratio, eps):
    """AdamP Algorithm: channel view, then layer view; first scale-invariant view projects."""
    if x.ndim <= 1:
        return pert, 1.0
    for view in (lambda a: a.reshape(a.shape[0], -1), lambda a: a.reshape(1, -1)):
        xv, gv = view(x), view(g)
        cos = [abs(np.dot(xv[i], gv[i])) / max(np.linalg.norm(xv[i]) * np.linalg.norm(gv[i]), eps)
               for i in range(xv.shape[0])]
        if max(cos) < delta / math.sqrt(xv.shape[1]):
            pv = view(pert).copy()
            for i in range(xv.shape[0]):
                xn = xv[i] / (np.linalg.norm(xv[i]) + eps)
                pv[i] = pv[i] - xn * np.dot(xn, pv[i])
            return pv.reshape(x.shape), wd_ratio
    return pert, 1.0


def ref_adamp(lr, b1, b2, eps, wd, delta, wd_ratio, nesterov, hits):
    st = {"m": zeros(), "v": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["m"][k] = b1 * s["m"][k] + (1 - b1) * g[k]
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(s["v"][k]) / math.sqrt(1 - b2 ** t) + eps
            pert = ((b1 * s["m"][k] + (1 - b1) * g[k]) if nesterov else s["m"][k]) / denom
            pert, r = ref_projection(p[k], g[k], pert, delta, wd_ratio, eps)
            hits.add((k, r))
            p[k] = p[k] * (1 - lr * wd * r)
            p[k] = p[k] - lr / (1 - b1 ** t) * pert
    return step, st


def ref_sgdp(lr, mom, damp, nesterov, eps, wd, delta, wd_ratio, hits):
    st = {"b": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["b"][k] = mom * s["b"][k] + (1 - damp) * g[k]
            d_p = g[k] + mom * s["b"][k] if nesterov else s["b"][k]
            d_p, r = ref_projection(p[k], g[k], d_p, delta, wd_ratio, eps)
            hits.add((k, r))
            p[k] = p[k] * (1 - lr * wd * r / (1 - mom))
            p[k] = p[k] - lr * d_p
    return step, st


def ref_grams(lr, b1, b2, eps, wd):
    st = {"m": zeros(), "v": zeros()}

    def step(p, g, s, t):
        for k in p:
            s["m"][k] = b1 * s["m"][k] + (1 - b1) * g[k]
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * g[k] ** 2
            u = (s["m"][k] / (1 - b1 ** t)) / (np.sqrt(s["v"][k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr * wd * p[k]
            p[k] = p[k] - lr * np.sign(g[k]) * np.abs(u)
    return step, st


def ref_switch_ema_adam(lr, decay, every, warm):
    st = {"m": zeros(), "v": zeros(), "ema": _init_params()}

    def step(p, g, s, t):
        a = 1 - decay
        rate = (1 - a) * math.exp(-t / warm) + a if warm else a
        for k in p:
            s["m"][k] = 0.9 * s["m"][k] + 0.1 * g[k]
            s["v"][k] = 0.999 * s["v"][k] + 0.001 * g[k] ** 2
            p[k] = p[k] - lr * (s["m"][k] / (1 - 0.9 ** t)) / (np.sqrt(s["v"][k] / (1 - 0.999 ** t)) + 1e-8)
            s["ema"][k] = (1 - rate) * s["ema"][k] + rate * p[k]
            if t % every == 0:
                p[k] = s["ema"][k].copy()
    return step, st


# --- trajectory tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("rescale", ["paper", "mean"])
def test_cautious_wrapper_matches_reference(rescale):
    got = run_jax(V.cautious(optax.sgd(0.05, momentum=0.9), rescale=rescale))
    assert_same(got, run_ref(*ref_cautious_sgdm(0.05, 0.9, rescale)))


def test_cautious_adamw_matches_reference():
    got = run_jax(V.cautious_adamw(0.02, b1=0.8, b2=0.99, eps=1e-8, weight_decay=0.1))
    assert_same(got, run_ref(*ref_cautious_adamw(0.02, 0.8, 0.99, 1e-8, 0.1)))


def test_adamw_cwd_matches_reference():
    got = run_jax(V.adamw_cwd(0.02, b1=0.8, b2=0.99, eps=1e-8, weight_decay=0.5))
    assert_same(got, run_ref(*ref_adamw_cwd(0.02, 0.8, 0.99, 1e-8, 0.5)))


def test_cwd_after_full_optimizer_with_schedule():
    sched = optax.linear_schedule(0.05, 0.01, STEPS)
    got = run_jax(optax.chain(optax.sgd(sched), V.cautious_weight_decay(0.5, learning_rate=sched)))
    assert_same(got, run_ref(*ref_sgd_cwd_post(lambda c: 0.05 + (0.01 - 0.05) * c / STEPS, 0.5)))


def test_tam_matches_reference():
    got = run_jax(V.tam(0.02, momentum=0.9, decay_rate=0.8, eps=1e-8))
    assert_same(got, run_ref(*ref_tam(0.02, 0.9, 0.8, 1e-8)))


def test_adatam_matches_reference():
    got = run_jax(V.adatam(0.02, b1=0.9, b2=0.99, decay_rate=0.8, eps=1e-8, weight_decay=0.05))
    assert_same(got, run_ref(*ref_adatam(0.02, 0.9, 0.99, 0.8, 1e-8, 0.05)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_matches_reference(nesterov):
    hits = set()
    got = run_jax(V.adamp(0.02, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, nesterov=nesterov))
    assert_same(got, run_ref(*ref_adamp(0.02, 0.9, 0.99, 1e-8, 0.1, 0.1, 0.1, nesterov, hits)))
    # the test data exercises both views and the plain branch
    assert ("conv", 0.1) in hits and ("mat_l", 0.1) in hits and ("mat", 1.0) in hits


def test_sgdp_matches_reference():
    hits = set()
    got = run_jax(V.sgdp(0.02, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.1))
    assert_same(got, run_ref(*ref_sgdp(0.02, 0.9, 0.1, True, 1e-8, 0.1, 0.1, 0.1, hits)))
    assert ("conv", 0.1) in hits and ("mat_l", 0.1) in hits and ("mat", 1.0) in hits


def test_grams_matches_reference():
    got = run_jax(V.grams(0.02, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1))
    assert_same(got, run_ref(*ref_grams(0.02, 0.9, 0.99, 1e-8, 0.1)))


@pytest.mark.parametrize("warm", [0, 10])
def test_switch_ema_matches_reference(warm):
    got = run_jax(V.switch_ema(optax.adam(0.05), decay=0.9, switch_every=7, warmup_steps=warm))
    assert_same(got, run_ref(*ref_switch_ema_adam(0.05, 0.9, 7, warm)))


# --- composition ---------------------------------------------------------------------------------

def _all(lr):
    return {"cautious": V.cautious(optax.adam(lr)), "cautious_adamw": V.cautious_adamw(lr, weight_decay=0.1),
            "cautious_weight_decay": optax.chain(optax.sgd(lr), V.cautious_weight_decay(0.1, learning_rate=lr)),
            "adamw_cwd": V.adamw_cwd(lr), "tam": V.tam(lr), "adatam": V.adatam(lr, weight_decay=0.1),
            "adamp": V.adamp(lr, weight_decay=0.1), "sgdp": V.sgdp(lr, weight_decay=0.1),
            "grams": V.grams(lr, weight_decay=0.1), "switch_ema": V.switch_ema(optax.sgd(lr), switch_every=3)}


def _run32(opt, params, steps=5):
    state = opt.init(params)
    upd = jax.jit(opt.update)
    for t in range(steps):
        g = jax.tree.map(lambda x: 0.5 * x + 0.1 * (t + 1), params)
        u, state = upd(g, state, params)
        params = optax.apply_updates(params, u)
    return params


def test_schedules_in_chain_under_jit():
    params = {k: jnp.asarray(v, jnp.float32) for k, v in _init_params().items()}
    const = optax.constant_schedule(0.01)
    fixed, sched = _all(0.01), _all(const)
    for name in fixed:
        a = _run32(optax.chain(optax.clip_by_global_norm(10.0), fixed[name]), params)
        b = _run32(optax.chain(optax.clip_by_global_norm(10.0), sched[name]), params)
        for k in a:
            assert np.all(np.isfinite(a[k])), name
            np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=name)
        assert not np.allclose(a["mat"], params["mat"]), name
    # a schedule that is 0 after step 0 freezes the params after the first step
    zero_after = optax.piecewise_constant_schedule(0.01, {1: 0.0})
    one = _run32(V.tam(zero_after), params, steps=1)
    five = _run32(V.tam(zero_after), params, steps=5)
    np.testing.assert_allclose(one["mat"], five["mat"])


def test_multi_transform():
    params = {k: jnp.asarray(v, jnp.float32) for k, v in _init_params().items()}
    labels = {"vec": "b", "mat": "a", "mat_l": "b", "conv": "a"}
    for name, opt in _all(0.01).items():
        mt = optax.multi_transform({"a": opt, "b": optax.sgd(0.01)}, labels)
        out = _run32(mt, params)
        alone = _run32(_all(0.01)[name], {k: params[k] for k in ("mat", "conv")})
        for k in ("mat", "conv"):
            np.testing.assert_allclose(out[k], alone[k], atol=1e-6, err_msg=name)


def test_vmap_over_state():
    opt = V.tam(0.01)
    params = jnp.ones((4, 3))
    states = jax.vmap(opt.init)(params)
    u, _ = jax.vmap(opt.update)(params * 0.3, states, params)
    assert u.shape == (4, 3) and states.s.shape == (4,)


# --- registry and errors -------------------------------------------------------------------------

NAMES = ["cautious", "cautious_adamw", "cautious_weight_decay", "adamw_cwd", "tam", "adatam", "adamp",
         "sgdp", "grams", "switch_ema"]


def test_registry_lists_every_variant():
    from weightlab.lopt.registry import METHODS

    listed = METHODS.names(kind="variant")
    assert set(NAMES) <= set(listed)
    for n in NAMES:
        e = METHODS[n]
        assert e.paper and "arXiv" in e.paper and e.summary, n
        assert "learning_rate" in e.parameters or n in ("cautious", "switch_ema", "cautious_weight_decay")


def test_registry_builds_by_name():
    from weightlab.lopt.registry import optimizer

    params = {k: jnp.asarray(v, jnp.float32) for k, v in _init_params().items()}
    for opt in (optimizer("cautious", optax.sgd(0.01), rescale="none"), optimizer("tam", learning_rate=0.01),
                optimizer("switch_ema", optax.adam(0.01), switch_every=2), optimizer("adamp", weight_decay=0.1)):
        out = _run32(opt, params)
        assert all(np.all(np.isfinite(v)) for v in out.values())
    with pytest.raises(UsageError):
        optimizer("tam", nesterov=True)  # tam has no such parameter


def test_missing_params_raise():
    p = {"w": jnp.ones((3, 2))}
    for opt in (V.cautious_weight_decay(0.1), V.adamw_cwd(), V.adamp(), V.sgdp(),
                V.switch_ema(optax.sgd(0.1)), V.adatam(weight_decay=0.1), V.grams(weight_decay=0.1),
                V.cautious_adamw(weight_decay=0.1)):
        s = opt.init(p)
        with pytest.raises(MissingExtraError, match="params"):
            opt.update(p, s)


@pytest.mark.parametrize("make", [
    lambda: V.tam(-0.1), lambda: V.tam(momentum=1.0), lambda: V.adatam(decay_rate=-0.1),
    lambda: V.adamp(b1=1.0), lambda: V.adamp(delta=0.0), lambda: V.sgdp(wd_ratio=-1.0),
    lambda: V.grams(eps=-1.0), lambda: V.grams(learning_rate="x"), lambda: V.cautious_adamw(weight_decay=-1),
    lambda: V.cautious(optax.sgd(0.1), rescale="bogus"), lambda: V.cautious(3.0),
    lambda: V.cautious_weight_decay(-0.1), lambda: V.adamw_cwd(b2=1.5),
    lambda: V.switch_ema(optax.sgd(0.1), decay=1.0), lambda: V.switch_ema(optax.sgd(0.1), switch_every=0),
    lambda: V.switch_ema(optax.sgd(0.1), warmup_steps=-1), lambda: V.switch_ema("adam"),
    lambda: V.sgdp(learning_rate=float("nan")),
])
def test_bad_hyperparameters_raise(make):
    with pytest.raises(UsageError):
        make()
