"""align.barrier (interpolation, loss barrier) and align.repair (REPAIR, Jordan et al. 2023)
against closed forms and an independent float64 numpy implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weightlab.align.barrier import Barrier, interpolate, loss_barrier
from weightlab.align.renorm import repair, repair_stats
from weightlab.errors import AlignError, NoMatchError, ShapeMismatchError, StructureMismatchError
from weightlab.models import cnn, mlp

# --------------------------------------------------------------------------------- interpolate


def test_interpolate_closed_form_and_integer_leaves():
    a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.0], jnp.bfloat16), "step": jnp.array(3, jnp.int32)}
    b = {"w": jnp.array([3.0, -2.0]), "b": jnp.array([4.0], jnp.bfloat16), "step": jnp.array(3, jnp.int32)}
    m = interpolate(a, b, 0.25)
    np.testing.assert_allclose(m["w"], [1.5, 1.0])
    assert m["b"].dtype == jnp.bfloat16 and float(m["b"][0]) == 1.0
    assert m["step"].dtype == jnp.int32 and int(m["step"]) == 3
    np.testing.assert_allclose(interpolate(a, b, 0.0)["w"], a["w"])
    np.testing.assert_allclose(interpolate(a, b, 1.0)["w"], b["w"])
    with pytest.raises(AlignError, match="step"):
        interpolate(a, dict(b, step=jnp.array(4, jnp.int32)), 0.5)
    with pytest.raises(AlignError, match="alpha"):
        interpolate(a, b, float("nan"))


def test_interpolate_structure_errors_name_the_path():
    a = {"l0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(StructureMismatchError, match="l0/bias"):
        interpolate(a, {"l0": {"kernel": jnp.ones((2, 3))}}, 0.5)
    with pytest.raises(ShapeMismatchError, match="l0/kernel"):
        interpolate(a, {"l0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}, 0.5)


def test_interpolate_dequantizes_qarrays():
    from weightlab.quant import quantize
    a = {"w": jax.random.normal(jax.random.key(0), (256, 32))}
    qa = quantize(a, "rtn", select=None)
    m = interpolate(qa, a, 0.0)
    np.testing.assert_allclose(m["w"], qa["w"].dequantize(), atol=1e-6)

# -------------------------------------------------------------------------------- loss barrier


def _double_well(p):
    # θ(α) = (1 - 2α, 0) between a = (1, 0) and b = (-1, 0): L(α) = 16 α² (1-α)²; endpoints 0.
    loss = (jnp.sum(p["t"] ** 2) - 1.0) ** 2
    return {"loss": loss, "acc": 1.0 - loss / 2}


A_, B_ = {"t": jnp.array([1.0, 0.0])}, {"t": jnp.array([-1.0, 0.0])}


def test_barrier_closed_form_and_accuracy_sign():
    r = loss_barrier(_double_well, A_, B_, n=11)
    assert isinstance(r, Barrier) and r.values["loss"].shape == (11,)
    al = np.linspace(0, 1, 11)
    np.testing.assert_allclose(r.values["loss"], 16 * al**2 * (1 - al) ** 2, atol=1e-5)
    assert r.barrier["loss"] == pytest.approx(1.0, abs=1e-5)
    assert r.barrier["acc"] == pytest.approx(0.5, abs=1e-5)      # higher-is-better: a drop is a barrier
    assert r.midpoint == pytest.approx({"loss": 1.0, "acc": 0.5}, abs=1e-5)
    assert r.higher == ("acc",)
    flipped = loss_barrier(_double_well, A_, B_, n=11, higher_is_better=())
    assert flipped.barrier["acc"] == pytest.approx(0.0, abs=1e-6)  # read as a loss: never above the line
    # even n: the grid misses 0.5 -> barrier on the grid, midpoint evaluated separately
    r4 = loss_barrier(_double_well, A_, B_, n=4)
    assert r4.barrier["loss"] == pytest.approx(64 / 81, abs=1e-5)
    assert r4.midpoint["loss"] == pytest.approx(1.0, abs=1e-5)


def test_barrier_scalar_loss_affine_path_and_untraceable_fn():
    c = jnp.array([2.0, -1.0])
    r = loss_barrier(lambda p: jnp.sum(p["t"] * c), A_, B_, n=5)
    assert list(r.values) == ["loss"] and abs(r.barrier["loss"]) < 1e-6   # affine along the path
    calls = []

    def host_loss(p):                      # not traceable: float() of a traced value
        calls.append(1)
        return float(jnp.sum(p["t"] ** 2))

    r = loss_barrier(host_loss, A_, B_, n=3)
    np.testing.assert_allclose(r.values["loss"], [1.0, 0.0, 1.0], atol=1e-6)
    assert r.barrier["loss"] == pytest.approx(0.0, abs=1e-6)


def test_barrier_plot_and_table(tmp_path):
    r = loss_barrier(lambda p: {"train_loss": _double_well(p)["loss"], "test_loss": _double_well(p)["loss"] * 2,
                                "test_acc": _double_well(p)["acc"]}, A_, B_, n=5)
    path = tmp_path / "barrier.png"
    fig = r.plot(path, title="double well")
    assert len(fig.axes) == 2                              # loss panel, acc panel
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    t = r.table()
    assert t.splitlines()[0].startswith("| metric") and "test_acc ↑" in t and len(t.splitlines()) == 5


def test_barrier_bad_inputs():
    with pytest.raises(AlignError, match="n must be"):
        loss_barrier(_double_well, A_, B_, n=1)
    with pytest.raises(AlignError, match="n must be"):
        loss_barrier(_double_well, A_, B_, n=2.5)
    with pytest.raises(StructureMismatchError, match="u"):
        loss_barrier(_double_well, A_, {"u": jnp.zeros(2)}, n=3)
    with pytest.raises(AlignError, match="'v'"):
        loss_barrier(lambda p: {"v": p["t"]}, A_, B_, n=3)

# -------------------------------------------------------------------------------------- REPAIR


def _np_forward(p, x, upto):
    """float64 pre-activations of dense_0 .. dense_{upto} of the bundled MLP (ReLU between)."""
    h, pre = x, []
    for i in range(upto + 1):
        z = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
        pre.append(z)
        h = np.maximum(z, 0.0)
    return pre


def _np_repair(pa, pb, pm, x, alpha, eps):
    """REPAIR written directly: correct dense_0, re-measure, correct dense_1 (float64 numpy)."""
    f64 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64), t)  # noqa: E731
    pa, pb, pm = f64(pa), f64(pb), f64(pm)
    for i in range(2):
        za, zb, zi = (_np_forward(p, x, i)[i] for p in (pa, pb, pm))
        mu_t = (1 - alpha) * za.mean(0) + alpha * zb.mean(0)
        sd_t = (1 - alpha) * za.std(0) + alpha * zb.std(0)
        s = sd_t / np.sqrt(zi.var(0) + eps)
        layer = pm[f"dense_{i}"]
        layer["bias"] = mu_t - s * (zi.mean(0) - layer["bias"])
        layer["kernel"] = layer["kernel"] * s[None, :]
    return pm, (mu_t, sd_t)


@pytest.fixture(scope="module")
def mlp_pair():
    a, b = mlp(jax.random.key(0), in_dim=12, hidden=(24, 16), out_dim=5), mlp(jax.random.key(1), in_dim=12,
                                                                          hidden=(24, 16), out_dim=5)
    xs = [jax.random.normal(jax.random.key(10 + i), (n, 12)) for i, n in enumerate((50, 37, 64))]
    return a.apply_fn, a.params, b.params, xs


def test_repair_matches_float64_numpy_reference(mlp_pair):
    f, pa, pb, xs = mlp_pair
    alpha = 0.3
    pm = interpolate(pa, pb, alpha)
    out, info = repair(f, pm, (pa, pb), iter(xs), alpha=alpha, return_info=True)
    ref, _ = _np_repair(pa, pb, pm, np.concatenate([np.asarray(x, np.float64) for x in xs]), alpha, 1e-5)
    for layer in ("dense_0", "dense_1"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(out[layer][leaf], ref[layer][leaf], rtol=1e-4, atol=1e-5 * np.abs(
                ref[layer][leaf]).max(), err_msg=f"{layer}/{leaf}")
    for leaf in ("kernel", "bias"):                           # the head is left alone by default
        np.testing.assert_array_equal(out["head"][leaf], pm["head"][leaf])
    assert jax.tree.map(lambda v: v.dtype, out) == jax.tree.map(lambda v: v.dtype, pm)
    assert list(info.layers) == ["dense_0/kernel", "dense_1/kernel"] and "head/kernel" in info.skipped
    assert info.layers["dense_0/kernel"].bias == "dense_0/bias" and info.no_bias == () and info.passes == 2


def test_repaired_statistics_hit_the_targets(mlp_pair):
    f, pa, pb, xs = mlp_pair
    pm = interpolate(pa, pb, 0.5)
    before = repair_stats(f, pm, xs)
    sa, sb = repair_stats(f, pa, xs), repair_stats(f, pb, xs)
    out = repair(f, pm, (pa, pb), xs)
    after = repair_stats(f, out, xs)
    for k in ("dense_0/kernel", "dense_1/kernel"):
        np.testing.assert_allclose(after[k].mean, (sa[k].mean + sb[k].mean) / 2, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(after[k].std, (sa[k].std + sb[k].std) / 2, rtol=1e-4)
    assert after["dense_0/kernel"].count == sum(x.shape[0] for x in xs)
    assert np.mean(before["dense_1/kernel"].std) < np.mean(after["dense_1/kernel"].std)  # variance collapse undone
    # select= overrides the default: the head alone
    only_head = repair(f, pm, (pa, pb), xs, select="head/")
    np.testing.assert_array_equal(only_head["dense_0"]["kernel"], pm["dense_0"]["kernel"])
    assert not np.allclose(only_head["head"]["kernel"], pm["head"]["kernel"])


def test_repair_bad_inputs(mlp_pair):
    f, pa, pb, xs = mlp_pair
    pm = interpolate(pa, pb, 0.5)
    with pytest.raises(StructureMismatchError, match="head/bias"):
        repair(f, pm, (pa, dict(pb, head={"kernel": pb["head"]["kernel"]})), xs)
    with pytest.raises(AlignError, match="alpha"):
        repair(f, pm, (pa, pb), xs, alpha=1.5)
    with pytest.raises(AlignError, match="batch"):
        repair(f, pm, (pa, pb), [])
    with pytest.raises(NoMatchError):
        repair(f, pm, (pa, pb), xs, select="no_such_layer")
    bad = jax.tree.map(lambda v: v, pm)
    bad["dense_1"]["bias"] = bad["dense_1"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(AlignError, match="dense_1/bias"):
        repair(f, bad, (pa, pb), xs)


def test_repair_lowers_the_midpoint_loss_of_trained_mlps():
    d, c = 20, 8
    t1, t2 = jax.random.normal(jax.random.key(42), (d, 32)), jax.random.normal(jax.random.key(43), (32, c))

    def data(k, n):
        x = jax.random.normal(k, (n, d))
        return x, jnp.argmax(jnp.tanh(x @ t1) @ t2, -1)

    (xtr, ytr), (xte, yte) = data(jax.random.key(1), 2048), data(jax.random.key(2), 1024)
    loss = lambda f, p, x, y: optax.softmax_cross_entropy_with_integer_labels(f(p, x), y).mean()  # noqa: E731

    def train(seed):
        m = mlp(jax.random.key(seed), in_dim=d, hidden=(64, 64), out_dim=c)
        opt = optax.adam(3e-3)

        @jax.jit
        def step(p, st, i):
            idx = jax.random.randint(jax.random.fold_in(jax.random.key(seed + 100), i), (128,), 0, 2048)
            g = jax.grad(lambda q: loss(m.apply_fn, q, xtr[idx], ytr[idx]))(p)
            u, st = opt.update(g, st, p)
            return optax.apply_updates(p, u), st

        p, st = m.params, opt.init(m.params)
        for i in range(120):
            p, st = step(p, st, i)
        return m.apply_fn, p

    (f, pa), (_, pb) = train(0), train(1)
    mid = interpolate(pa, pb, 0.5)
    rep = repair(f, mid, (pa, pb), [xtr[:1024], xtr[1024:]])
    assert float(loss(f, rep, xte, yte)) < float(loss(f, mid, xte, yte)) - 0.02


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_repair_resnet1d(norm):
    a = cnn(jax.random.key(0), blocks=1, width=0.5, norm=norm)    # B: A moved far (building a 2nd net is slow)
    rng = np.random.default_rng(1)
    b = a._replace(params=jax.tree.map(lambda p: jnp.asarray(p + 0.5 * np.std(p) * rng.standard_normal(p.shape),
                                                             p.dtype), a.params))
    xs = [jax.random.normal(jax.random.key(5 + i), (16, 40)) for i in range(2)]
    pm = interpolate(a.params, b.params, 0.5)
    out, info = repair(a.apply_fn, pm, (a.params, b.params), xs, return_info=True)
    assert list(info.layers)[0] == "stem/kernel" and len(info.layers) == 9 and "head/kernel" in info.skipped
    after, sa, sb = (repair_stats(a.apply_fn, p, xs)["stem/kernel"] for p in (out, a.params, b.params))
    np.testing.assert_allclose(after.std, (sa.std + sb.std) / 2, rtol=2e-3)   # eps=1e-5 vs small stem variance
    if norm == "none":                  # conv + bias: mean reset too; projections have no bias
        np.testing.assert_allclose(after.mean, (sa.mean + sb.mean) / 2, rtol=1e-4, atol=1e-5)
        assert info.no_bias == ("stage_1_block_0/proj/kernel", "stage_2_block_0/proj/kernel")
    else:                               # conv -> LayerNorm, no bias anywhere: rescale only
        assert set(info.no_bias) == set(info.layers)
    assert np.isfinite(np.asarray(out["head"]["kernel"])).all()


def test_loss_barrier_fix_hook_is_applied_at_every_alpha():
    from weightlab.align import loss_barrier

    a, b = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    seen = []

    def fix(p, t):
        seen.append(round(t, 3))
        return {"w": p["w"] * 0.0}

    r = loss_barrier(lambda p: jnp.sum(p["w"]), a, b, n=3, fix=fix)
    assert seen == [0.0, 0.5, 1.0] and r.values["loss"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(AlignError, match="fix must be callable"):
        loss_barrier(lambda p: jnp.sum(p["w"]), a, b, n=3, fix=3)
