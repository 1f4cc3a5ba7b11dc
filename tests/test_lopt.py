"""Learned optimizers as optax transforms: small_fc against a literal float64 NumPy reading of its
definition, the Adam-like start, μLO multipliers, the hierarchical variant, compositions users write
(chain + schedule, multi_transform, select with grads=, jit, vmap over a population, an 8-device
mesh), non-finite gradients, bad meta-weights, the shipped weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import weightlab as wl
from weightlab import lopt
from weightlab.errors import LoptError, MissingExtraError, StructureMismatchError, UsageError
from weightlab.lopt import hierarchical, perparam

DECAYS = (0.5, 0.9, 0.99, 0.999)
TAUS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4)


def _params(key=0):
    k = jax.random.split(jax.random.key(key), 4)
    return {"dense": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jax.random.normal(k[1], (5,)) * 0.1},
            "conv": jax.random.normal(k[2], (3, 2, 4)), "scale": jax.random.normal(k[3], ()) + 1.0}


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + 0.7 * t) * (0.5 + 0.1 * t % 3) + 0.05 * p, params)


def _np_step(meta, st, g, p, t, lr):
    """One small_fc step in float64, written from the docstring of weightlab.kernels.lopt_update."""
    m = {k: np.asarray(v, np.float64) for k, v in meta.items()}
    shape = p.shape
    r = int(np.prod(shape[:-1])) if len(shape) >= 2 else 1
    c = shape[-1] if len(shape) >= 1 else 1
    g2, p2 = np.asarray(g, np.float64).reshape(r, c), np.asarray(p, np.float64).reshape(r, c)
    mom = [d * st["mom"][i] + (1 - d) * g2 for i, d in enumerate(DECAYS)]
    v = 0.999 * st["v"] + 0.001 * g2 ** 2
    row = 0.999 * st["row"] + 0.001 * (g2 ** 2).mean(1)
    col = 0.999 * st["col"] + 0.001 * (g2 ** 2).mean(0)
    eps = 1e-12
    vf = np.outer(row, col) / max(row.mean(), eps)
    feats = [g2, p2, *mom, *[mk / np.sqrt(v + eps) for mk in mom], g2 / np.sqrt(v + eps), g2 / np.sqrt(vf + eps),
             mom[1] / np.sqrt(vf + eps), np.sqrt(v + eps)]
    feats = [f / np.sqrt((f ** 2).mean() + eps) for f in feats]
    b1 = m["b1"] + np.tanh(t / np.asarray(TAUS)) @ m["wt"]
    out = np.zeros((r, c, 2))
    for i in range(r):
        for j in range(c):
            x = np.asarray([f[i, j] for f in feats])
            h = np.maximum(x @ m["w1"] + b1, 0)
            h = np.maximum(h @ m["w2"] + m["b2"], 0)
            out[i, j] = h @ m["w3"] + m["b3"] + x @ m["skip"]
    upd = -lr * out[..., 0] * np.exp(np.clip(out[..., 1], -4, 4))
    return upd.reshape(shape), {"mom": mom, "v": v, "row": row, "col": col}


def test_small_fc_matches_a_float64_numpy_reading_over_30_steps():
    meta = perparam.init_meta(jax.random.key(3), 8, scale=0.5)  # a non-trivial MLP path
    opt = lopt.small_fc(meta, learning_rate=1e-2)
    params = _params()
    state = opt.init(params)
    ref_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ref_s = {}
    for path, x in wl.tree.to_flat_dict(params).items():
        r = int(np.prod(x.shape[:-1])) if x.ndim >= 2 else 1
        c = x.shape[-1] if x.ndim else 1
        ref_s[path] = {"mom": [np.zeros((r, c))] * 4, "v": np.zeros((r, c)), "row": np.zeros(r), "col": np.zeros(c)}
    step = jax.jit(opt.update)
    for t in range(30):
        g = _grads(params, t)
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        gf, pf = wl.tree.to_flat_dict(g), wl.tree.to_flat_dict(ref_p)
        for path in pf:
            du, ref_s[path] = _np_step(meta, ref_s[path], np.asarray(gf[path], np.float64), pf[path], t, 1e-2)
            pf[path] = pf[path] + du
        ref_p = wl.tree.from_flat_dict(pf, like=ref_p)
        got = wl.tree.to_flat_dict(params)
        for path in pf:
            np.testing.assert_allclose(np.asarray(got[path], np.float64), pf[path], rtol=2e-5, atol=2e-6,
                                       err_msg=f"{path} at step {t}")
        # keep the two trajectories on the same gradients: the reference's params feed the next grads
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref_p)


def test_fresh_optimizer_is_per_tensor_normalised_adam():
    meta = perparam.init_meta(jax.random.key(0))
    meta = dict(meta, w3=jnp.zeros_like(meta["w3"]))  # MLP path off: only the skip remains
    opt = lopt.small_fc(meta, learning_rate=0.1)
    p = {"w": jax.random.normal(jax.random.key(1), (7, 9))}
    st = opt.init(p)
    m = v = 0.0
    for t in range(5):
        g = {"w": jax.random.normal(jax.random.key(10 + t), (7, 9))}
        u, st = opt.update(g, st, p)
        m = 0.9 * m + 0.1 * np.asarray(g["w"], np.float64)
        v = 0.999 * v + 0.001 * np.asarray(g["w"], np.float64) ** 2
        d = m / np.sqrt(v + 1e-12)
        np.testing.assert_allclose(np.asarray(u["w"]), -0.1 * d / np.sqrt((d ** 2).mean()), rtol=1e-4, atol=1e-6)


def test_mup_multipliers_follow_mup_for_adam():
    base = {"in": jnp.zeros((40, 32)), "hid": jnp.zeros((32, 32)), "out": jnp.zeros((32, 10)), "b": jnp.zeros(32)}
    wide = {"in": jnp.zeros((40, 128)), "hid": jnp.zeros((128, 128)), "out": jnp.zeros((128, 10)), "b": jnp.zeros(128)}
    mult = perparam.mup_multipliers(wide, base)
    assert mult == {"in": 1.0, "hid": 0.25, "out": 0.25, "b": 1.0}
    with pytest.raises(MissingExtraError, match="mup_base"):
        lopt.mulo()
    with pytest.raises(StructureMismatchError):
        lopt.mulo(mup_base={"in": base["in"]}).init(wide)
    # the step of the hidden matrix is 1/4 of small_fc's; the input layer's is unchanged
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), wide)
    u0, _ = lopt.small_fc().update(g, lopt.small_fc().init(wide), wide)
    u1, _ = lopt.mulo(mup_base=base).update(g, lopt.mulo(mup_base=base).init(wide), wide)
    np.testing.assert_allclose(u1["hid"], 0.25 * u0["hid"], rtol=1e-6)
    np.testing.assert_allclose(u1["in"], u0["in"], rtol=1e-6)
    # inside optax.multi_transform the other group's leaves are MaskedNodes: mup_base is masked alike
    mt = optax.multi_transform({"lo": lopt.mulo(mup_base=base), "sgd": optax.sgd(0.1)},
                               {"in": "lo", "hid": "lo", "out": "lo", "b": "sgd"})
    u2, _ = mt.update(g, mt.init(wide), wide)
    np.testing.assert_allclose(u2["hid"], u1["hid"], rtol=1e-6)


def test_hyper_starts_as_small_fc_and_carries_its_lstm_state():
    params = _params()
    meta = hierarchical.init_hyper_meta(jax.random.key(0))
    h, s = lopt.hyper(meta, num_steps=100), lopt.small_fc(meta["perparam"])
    hs, ss = h.init(params), s.init(params)
    for t in range(3):
        g = _grads(params, t)
        uh, hs = h.update(g, hs, params, loss=1.0 + t)
        us, ss = s.update(g, ss, params)
        chex.assert_trees_all_close(uh, us, rtol=1e-6)
    assert float(jnp.abs(hs.extra["cells"]["dense"]["kernel"]).sum()) > 0  # the LSTM ran
    # non-zero heads change the step, and the loss features matter
    meta2 = jax.tree.map(lambda x: x, meta)
    meta2["tensor"]["w_lr"] = jnp.ones_like(meta["tensor"]["w_lr"])
    h2 = lopt.hyper(meta2, network="lstm")
    st = h2.init(params)
    a, _ = h2.update(_grads(params, 0), st, params, loss=2.0)
    b, _ = h2.update(_grads(params, 0), st, params)
    assert not np.allclose(a["conv"], b["conv"])
    with pytest.raises(MissingExtraError, match="loss="):
        lopt.hyper(use_loss=True).update(_grads(params, 0), lopt.hyper(use_loss=True).init(params), params)
    assert lopt.METHODS["hyper"].needs_loss == "use_loss=True"  # the registry (and docs table) say when
    assert "with `use_loss=True`" in lopt.registry.markdown_table()
    mlp = lopt.hyper(network="mlp")
    mlp.update(_grads(params, 0), mlp.init(params), params, loss=1.0)
    with pytest.raises(LoptError, match="network"):
        lopt.hyper(meta, network="mlp")  # LSTM weights into the MLP variant


def test_compositions_users_write():
    params = _params()
    g = _grads(params, 0)
    sched = optax.linear_schedule(1e-2, 1e-3, 100)
    opt = optax.chain(optax.clip_by_global_norm(1.0), lopt.small_fc(learning_rate=sched))
    st = opt.init(params)
    u, st = jax.jit(opt.update)(g, st, params)
    assert jax.tree.structure(u) == jax.tree.structure(params)
    # multi_transform: the learned optimizer on the dense layer only
    mt = optax.multi_transform({"l": lopt.small_fc(), "a": optax.adam(1e-3)},
                               {"dense": {"kernel": "l", "bias": "l"}, "conv": "a", "scale": "a"})
    u2, _ = mt.update(g, mt.init(params), params)
    u_alone, _ = lopt.small_fc().update(g["dense"], lopt.small_fc().init(params["dense"]), params["dense"])
    chex.assert_trees_all_close(u2["dense"], u_alone, rtol=1e-6)
    # the weightlab protocol: select + grads=
    t = wl.select("dense/", lopt.transform("small_fc", learning_rate=1e-2))
    new, _ = t.apply(params, t.init(params), grads=g)
    np.testing.assert_array_equal(new["conv"], params["conv"])
    assert not np.allclose(new["dense"]["kernel"], params["dense"]["kernel"])
    # a population under vmap
    stack = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), params)
    gs = jax.tree.map(lambda x: jnp.stack([x, x, x]), g)
    o = lopt.small_fc()
    us, _ = jax.vmap(o.update)(gs, jax.vmap(o.init)(stack), stack)
    one, _ = o.update(g, o.init(params), params)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], us), one, rtol=1e-5)


def test_sharded_params_keep_their_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P

    devs = np.asarray(jax.devices()[:8])
    if devs.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devs.reshape(2, 4), ("data", "model"))
    params = {"w": jax.random.normal(jax.random.key(0), (16, 32)), "b": jnp.ones(32)}
    sh = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model"))}
    ps = jax.device_put(params, sh)
    g = jax.device_put(jax.tree.map(lambda x: jnp.cos(x), params), sh)
    opt = lopt.small_fc()
    u, st = jax.jit(opt.update)(g, jax.jit(opt.init)(ps), ps)
    ref, _ = opt.update(jax.tree.map(jnp.cos, params), opt.init(params), params)
    chex.assert_trees_all_close(u, ref, rtol=1e-5, atol=1e-7)
    assert u["w"].sharding.is_equivalent_to(sh["w"], 2)


def test_nonfinite_gradients_skip_or_error_naming_the_tensor():
    params = _params()
    g = _grads(params, 0)
    bad = dict(g, conv=g["conv"].at[0, 0, 0].set(jnp.nan))
    opt = lopt.small_fc()
    st = opt.init(params)
    u, st2 = jax.jit(opt.update)(bad, st, params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    assert int(st2.skipped) == 1 and int(st2.count) == 0
    u, st3 = opt.update(g, st2, params)
    assert int(st3.count) == 1 and np.isfinite(np.asarray(u["conv"])).all()
    err = lopt.small_fc(nonfinite="error")
    with pytest.raises(LoptError, match="conv"):
        err.update(bad, err.init(params), params)
    with pytest.raises(UsageError, match="jit"):
        jax.jit(err.update)(g, err.init(params), params)
    with pytest.raises(MissingExtraError, match="params"):
        opt.update(g, st)


def test_bad_meta_weights_and_options_are_named():
    meta = perparam.init_meta(None)
    with pytest.raises(LoptError, match="w2"):
        lopt.small_fc(dict(meta, w2=jnp.zeros((3, 3))))
    with pytest.raises(LoptError, match="missing"):
        lopt.small_fc({k: v for k, v in meta.items() if k != "skip"})
    with pytest.raises(LoptError, match="not a small_fc"):
        lopt.small_fc({"lstm": jnp.zeros(3)})
    with pytest.raises(UsageError):
        lopt.small_fc(learning_rate=-1.0)
    with pytest.raises(UsageError):
        lopt.small_fc(nonfinite="ignore")
    with pytest.raises(UsageError, match="unknown parameter"):
        lopt.optimizer("small_fc", learning_rat=1e-3)
    with pytest.raises(Exception, match="did you mean"):
        lopt.optimizer("smal_fc")


def test_low_memory_state():
    params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    opt = lopt.small_fc(factored=True, state_dtype=jnp.bfloat16)
    st = opt.init(params)
    assert st.v["w"].shape == (0,) and st.v["b"].shape == (32,)
    assert st.mom["w"].dtype == jnp.bfloat16
    u, st = jax.jit(opt.update)(jax.tree.map(jnp.sin, params), st, params)
    assert st.mom["w"].dtype == jnp.bfloat16 and np.isfinite(np.asarray(u["w"])).all()
    full = lopt.small_fc()
    nb = lambda s: sum(x.nbytes for x in jax.tree.leaves(s))
    assert nb(st) < 0.5 * nb(full.init(params))


def test_meta_weights_files_check_their_architecture(tmp_path, monkeypatch):
    from weightlab.lopt import shipped

    meta = perparam.init_meta(jax.random.key(2), 16)
    path = shipped.save_meta(tmp_path / "m.safetensors", meta, lopt="small_fc", hp={"hidden_size": 16},
                             recipe={"seed": 0})
    got, info = shipped.load_meta(path)
    chex.assert_trees_all_close(got, meta)
    assert info["recipe"] == {"seed": 0} and info["arch"] == perparam.ARCH
    with pytest.raises(FileExistsError):
        shipped.save_meta(path, meta, lopt="small_fc")
    monkeypatch.setattr(perparam, "ARCH", "small_fc/v999")
    with pytest.raises(LoptError, match="re-train"):
        shipped.load_meta(path)
    with pytest.raises(LoptError, match="shipped"):
        lopt.pretrained("no_such_optimizer")


def test_shipped_optimizer_trains_an_unseen_task():
    from weightlab.lopt import meta, tasks

    names = lopt.shipped.available()
    assert "small_fc_mnist1d" in names
    rec = names["small_fc_mnist1d"]["recipe"]
    assert {"seed", "cpu_hours", "estimator", "meta_steps", "tasks"} <= set(rec)
    assert rec["cpu_hours"] <= 2.0
    opt = lopt.pretrained("small_fc_mnist1d")
    r = meta.run(opt, tasks.mlp_task("digits", width=48, depth=1), steps=200, key=jax.random.key(0))
    assert r.test_accuracy[-1] > 0.85
