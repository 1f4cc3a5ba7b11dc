"""Meta-training: the estimators against the true meta-gradient of a quadratic (PES unbiased over
truncations, ES and TBPTT exact on one truncation and biased across them), non-finite meta-gradients
skipped and counted, checkpoint/resume bit-identical, the task families, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from weightlab.cli import main
from weightlab.errors import LoptError, UsageError
from weightlab.lopt import estimators as E
from weightlab.lopt import meta, shipped, tasks

A = jnp.asarray([1.0, 0.5, 2.0, 0.25])
X0 = jnp.asarray([1.0, -2.0, 0.5, 3.0])


def _quadratic_task():
    """Deterministic quadratic 0.5 * sum(a x^2) from a fixed start (all noise is the estimator's)."""
    return tasks.Task("quadratic", init=lambda key: {"x": X0}, batch=lambda key, step: {},
                      loss=lambda p, b: 0.5 * jnp.sum(A * p["x"] ** 2), evaluate=None, apply_fn=None, config={})


def _make_opt(theta):
    """Meta-parameters: a learning rate and a weight-decay coefficient (a polynomial meta-loss)."""
    def update(g, state, params=None):
        return jax.tree.map(lambda gi, p: -theta["lr"] * gi - theta["wd"] * p, g, params), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


THETA = {"lr": jnp.asarray(0.3), "wd": jnp.asarray(0.05)}


def _full_unroll_grad(n_trunc, k):
    """d/dtheta of the mean loss over a whole run of n_trunc * k steps, by backprop through all of it."""
    task = _quadratic_task()

    def f(theta):
        u = E._fresh(theta, task, _make_opt, jax.random.key(0), 0, 0)
        total = 0.0
        for _ in range(n_trunc):
            loss, u = E.truncation(theta, task, _make_opt, u, k)
            total = total + loss
        return total / n_trunc

    return jax.grad(f)(THETA)


def _estimate(est, n_calls):
    task = _quadratic_task()
    st = est.init(THETA, task, _make_opt, jax.random.key(1))
    grad = jax.jit(lambda s, k: est.grad(THETA, s, task, _make_opt, k))
    gs = []
    for i in range(n_calls):
        g, _, st = grad(st, jax.random.key(100 + i))
        gs.append(g)
    return jax.tree.map(lambda *x: np.mean(np.asarray(x)), *gs)


def _close(a, b, rtol):
    for k in a:
        np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=rtol, err_msg=k)


def test_pes_is_unbiased_across_truncations_where_truncated_es_and_tbptt_are_not():
    n_trunc, k = 4, 3
    true = _full_unroll_grad(n_trunc, k)
    pes = E.pes(num_particles=20000, trunc_length=k, horizon=n_trunc * k, sigma=0.002, stagger=False)
    _close(_estimate(pes, n_trunc), true, rtol=0.05)
    tb = _estimate(E.tbptt(num_particles=2, trunc_length=k, horizon=n_trunc * k, stagger=False), n_trunc)
    es = _estimate(E.es(num_particles=20000, trunc_length=k, horizon=n_trunc * k, sigma=0.002, stagger=False), n_trunc)
    # truncation ignores how theta moved the earlier truncations: both miss the true gradient by > 20%
    assert abs(float(tb["lr"]) - float(true["lr"])) > 0.2 * abs(float(true["lr"]))
    _close(es, tb, rtol=0.05)  # and ES estimates exactly the truncated (TBPTT) gradient


def test_es_and_tbptt_are_exact_on_a_single_truncation():
    true = _full_unroll_grad(1, 6)
    _close(_estimate(E.tbptt(num_particles=1, trunc_length=6, horizon=6), 1), true, rtol=1e-5)
    _close(_estimate(E.es(num_particles=20000, trunc_length=6, horizon=6, sigma=0.002), 1), true, rtol=0.05)


def test_estimator_options_are_checked():
    with pytest.raises(UsageError, match="multiple"):
        E.pes(trunc_length=30, horizon=100)
    with pytest.raises(UsageError, match="sigma"):
        E.es(sigma=0)
    with pytest.raises(UsageError, match="num_particles"):
        E.tbptt(num_particles=0)
    with pytest.raises(UsageError, match="LearnedOptimizer"):
        meta.train("small_fc", _quadratic_task(), E.pes(), meta_steps=1, key=jax.random.key(0))
    with pytest.raises(UsageError, match="key"):
        meta.train(meta.learned(), _quadratic_task(), E.pes(), meta_steps=1, key=0)
    with pytest.raises(LoptError, match="did you mean"):
        tasks.family("mnist1d_mpl")


def test_nonfinite_meta_gradients_are_skipped_and_counted():
    task = _quadratic_task()._replace(loss=lambda p, b: jnp.sum(jnp.sqrt(-1.0 - p["x"] ** 2)))  # NaN, NaN slope
    lo = meta.learned("small_fc", hidden_size=4, nonfinite="propagate")  # "skip" would hide it inside
    res = meta.train(lo, task, E.tbptt(num_particles=2, trunc_length=2, horizon=4), meta_steps=3,
                     key=jax.random.key(0), meta_params=lo.init_meta(jax.random.key(5)))
    assert res.skipped == 3 and res.history["skipped"].tolist() == [1, 1, 1]
    jax.tree.map(np.testing.assert_array_equal, res.meta_params, lo.init_meta(jax.random.key(5)))


def _small_setup():
    task = tasks.mlp_task("digits", width=16, depth=1, batch_size=32)
    return meta.learned("small_fc", hidden_size=8), task, E.pes(num_particles=2, trunc_length=4, horizon=8, sigma=0.05)


@pytest.mark.slow
def test_interrupted_meta_training_resumes_bit_identically(tmp_path):
    lo, task, est = _small_setup()
    full = meta.train(lo, task, est, meta_steps=6, key=jax.random.key(3))

    def stop_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta.train(lo, task, est, meta_steps=6, key=jax.random.key(3), checkpoint=tmp_path / "ck",
                   checkpoint_every=2, progress=stop_at_4)
    res = meta.train(lo, task, est, meta_steps=6, key=jax.random.key(3), checkpoint=tmp_path / "ck",
                     checkpoint_every=2)
    assert res.resumed_from == 4
    jax.tree.map(np.testing.assert_array_equal, res.meta_params, full.meta_params)
    np.testing.assert_array_equal(res.history["meta_loss"], full.history["meta_loss"])
    longer = meta.train(lo, task, est, meta_steps=7, key=jax.random.key(3), checkpoint=tmp_path / "ck",
                        checkpoint_every=2)  # extending a finished run resumes it too
    assert longer.resumed_from == 6 and np.isfinite(longer.history["meta_loss"]).all()


def test_tbptt_meta_training_makes_a_weak_optimizer_train():
    """learned_optimization's CPU tutorial shape, tiny: from an optimizer that barely moves (its
    skip scaled down), truncated backprop makes it train the digits MLP (whole-run mean loss)."""
    lo, task, _ = _small_setup()
    theta = lo.init_meta(jax.random.key(0))
    theta = dict(theta, skip=theta["skip"] * 0.05)
    est = E.tbptt(num_particles=4, trunc_length=10, horizon=40)
    res = meta.train(lo, task, est, meta_steps=40, key=jax.random.key(0), meta_params=theta,
                     meta_optimizer=optax.adam(3e-3))
    before = meta.run(lo.make(theta), task, steps=40, key=jax.random.key(9), seeds=4).train_loss.mean()
    after = meta.run(lo.make(res.meta_params), task, steps=40, key=jax.random.key(9), seeds=4).train_loss.mean()
    assert after < before - 0.3, (before, after)


def test_task_families_build_train_and_evaluate():
    for name in tasks.FAMILIES:
        fam = tasks.family(name)
        task = fam.sample(jax.random.key(0))
        r = meta.run(optax.adam(3e-3), task, steps=30, key=jax.random.key(0))
        assert np.isfinite(r.train_loss).all() and r.train_loss[-5:].mean() < r.train_loss[:5].mean(), name
        assert 0.0 <= r.test_accuracy[-1] <= 1.0
    # reparameterisation: same function, rescaled storage
    t0, t1 = tasks.mlp_task(width=16), tasks.mlp_task(width=16, reparam=True)
    k = jax.random.key(4)
    b0, b1 = t0.batch(k, 0), t1.batch(k, 0)
    np.testing.assert_allclose(t0.loss(t0.init(k), b0), t1.loss(t1.init(k), b1), rtol=1e-5)
    assert not np.allclose(t0.init(k)["layer_0"]["kernel"], t1.init(k)["layer_0"]["kernel"])
    # a config's Task is one object across Family instances: meta-steps keyed on it compile once
    assert tasks.family("digits_mlp").task(3) is tasks.family("digits_mlp").task(3)
    assert tasks.family("digits_mlp").task(3) is not tasks.family("digits_mlp").task(2)


@pytest.mark.slow
def test_cli_meta_train_writes_loadable_meta_weights_and_an_evaluation_table(tmp_path, capsys):
    out = tmp_path / "lo.safetensors"
    argv = ["lopt", "meta-train", str(out), "--tasks", "digits_mlp", "--meta-steps", "2", "--particles", "2",
            "--trunc-length", "4", "--horizon", "8", "--hidden", "8", "--eval-steps", "20", "--eval-seeds", "1",
            "--checkpoint-every", "2", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = json.loads(text.strip().splitlines()[-1])["evaluation"]
    assert {r["optimizer"].split(" ")[0] for r in rows} == {"learned", "adam"} and len(rows) == 6
    meta_params, info = shipped.load_meta(out)
    assert info["recipe"]["estimator"]["name"] == "pes" and info["hp"] == {"hidden_size": 8}
    assert main(argv) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["lopt", "meta-train", str(tmp_path / "x.bin")]) == 2
    assert main(["lopt", "list"]) == 0
