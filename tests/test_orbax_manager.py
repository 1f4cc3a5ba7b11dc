"""weightlab.io.CheckpointManager: step checkpoints of any pytree (QArrays, optimizer states,
nnx.State), atomic steps, typed errors before any work, and resumable training in ``train.fit``.

References: the saved tree itself (restores are bit-exact), and an uninterrupted training run
(a resumed one must land on the same params, bit for bit).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from weightlab import io as wio
from weightlab import quant, tree
from weightlab.errors import (CheckpointNotFoundError, LeafTypeError, ShapeMismatchError, StructureMismatchError,
                              UsageError)


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"dense_0": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
            "head": {"kernel": jax.random.normal(k2, (32, 8)), "bias": jnp.ones(8)}}


def _job():
    """Quantized params + an optax chain state: what a long QAT/PTQ job checkpoints."""
    p = _params()
    q = quant.quantize(p, "rtn", bits=4, group_size=8)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(p)
    return {"params": q, "opt_state": opt, "step": jnp.int32(3)}


def _assert_same(a, b):
    assert jax.tree.structure(a, is_leaf=quant.is_qarray) == jax.tree.structure(b, is_leaf=quant.is_qarray)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (p, x), (_, y) in zip(tree.flatten_with_paths(a)[0], tree.flatten_with_paths(b)[0]):
        assert np.asarray(x).dtype == np.asarray(y).dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


@pytest.fixture(scope="module")
def job():
    return _job()


def test_save_restore_roundtrips_qarrays_and_optimizer_state_exactly(job, tmp_path):
    with wio.CheckpointManager(tmp_path / "ck", async_=True) as mgr:
        assert mgr.latest_step() is None and mgr.all_steps() == []
        assert mgr.save(0, job) and mgr.save(5, job)
        mgr.wait()
        assert mgr.all_steps() == [0, 5] and mgr.latest_step() == 5
        back = mgr.restore(like=job)
        _assert_same(back, job)
        assert isinstance(back["params"]["head"]["kernel"], quant.QArray)
        assert back["params"]["head"]["kernel"].spec() == job["params"]["head"]["kernel"].spec()
        # an abstract target (no arrays at all) carries the QArrays' static metadata just as well
        abstract = jax.eval_shape(_job)
        _assert_same(mgr.restore(0, like=abstract), job)
        # without a target: nested dicts under weightlab's paths (a QArray as its components)
        raw = mgr.restore()
        assert tree.paths(raw) == tree.paths(job)
        assert mgr.layout()["atomic"]["params/head/kernel"] == job["params"]["head"]["kernel"].spec()


def test_nnx_state_with_qarrays_restores_into_the_module(tmp_path):
    from weightlab.quant import flax as qf

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.dense_0 = nnx.Linear(16, 32, rngs=rngs)
            self.head = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.dense_0(x)))

    m = qf.quantize_module(MLP(nnx.Rngs(0)), "rtn", bits=4, group_size=8)
    state = nnx.state(m)
    with wio.CheckpointManager(tmp_path, async_=False) as mgr:
        mgr.save(1, state)
        raw = mgr.restore()
        assert tree.paths(raw) == tree.paths(state) == ["dense_0/bias", "dense_0/kernel/codes", "dense_0/kernel/scale",
                                                        "dense_0/kernel/zero", "head/bias", "head/kernel/codes",
                                                        "head/kernel/scale", "head/kernel/zero"]
        back = mgr.restore(like=state)
    _assert_same(back, state)
    fresh = qf.quantize_module(MLP(nnx.Rngs(5)), "rtn", bits=4, group_size=8)
    nnx.update(fresh, back)
    x = jnp.ones((2, 16))
    np.testing.assert_array_equal(fresh(x), m(x))


def test_max_to_keep_and_save_interval(job, tmp_path):
    with wio.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=10, async_=True) as mgr:
        written = [s for s in range(0, 45, 5) if mgr.save(s, job["opt_state"])]
        mgr.wait()
        assert written == [0, 10, 20, 30, 40]
        assert mgr.all_steps() == [30, 40]
        assert mgr.save(41, job["opt_state"], force=True)
    assert wio.CheckpointManager(tmp_path).all_steps() == [40, 41]


def test_a_partial_step_is_ignored_and_the_latest_complete_one_restores(job, tmp_path):
    with wio.CheckpointManager(tmp_path, async_=False) as mgr:
        mgr.save(1, job)
        mgr.save(2, job)
    # what a job killed mid-save leaves: orbax's temporary directory (renamed only when complete),
    # and a step directory without orbax's step metadata (e.g. an interrupted copy)
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    (tmp / "tree").mkdir(parents=True)
    (tmp / "tree" / "partial").write_bytes(b"\0" * 10)
    (tmp_path / "4" / "tree").mkdir(parents=True)
    mgr = wio.CheckpointManager(tmp_path)
    try:
        assert mgr.all_steps() == [1, 2] and mgr.latest_step() == 2
        _assert_same(mgr.restore(like=job), job)
        with pytest.raises(CheckpointNotFoundError, match="complete steps: \\[1, 2\\]"):
            mgr.restore(4, like=job)
    finally:
        mgr.close()


def test_bad_input_is_refused_before_any_work(job, tmp_path):
    for bad in (dict(max_to_keep=0), dict(save_interval_steps=0), dict(save_interval_steps=1.5),
                dict(max_to_keep=True)):
        with pytest.raises(UsageError):
            wio.CheckpointManager(tmp_path / "x", **bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        wio.CheckpointManager(tmp_path / "file")
    with wio.CheckpointManager(tmp_path / "ck", async_=False) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
            mgr.restore(like=job)
        with pytest.raises(LeafTypeError, match="'meta/name'"):
            mgr.save(0, {"w": jnp.ones(3), "meta": {"name": "a string"}})
        with pytest.raises(UsageError, match="step"):
            mgr.save(-1, job)
        assert mgr.all_steps() == []  # nothing written
        mgr.save(0, job)
        with pytest.raises(UsageError, match="already saved"):
            mgr.save(0, job)
        other = dict(job, params=quant.quantize(_params(), "rtn", bits=4, group_size=16))
        with pytest.raises(ShapeMismatchError, match="params/dense_0/kernel/scale"):
            mgr.restore(like=other)
        # same paths, shapes and dtypes, another format: int4 codes must not be read as NF4 codes
        int4 = quant.quantize(_params(), "rtn", fmt="int", bits=4, group_size=8)
        nf4 = quant.quantize(_params(), "rtn", fmt="nf4", bits=4, group_size=8)
        assert tree.describe(int4) == tree.describe(nf4)
        mgr.save(1, int4)
        with pytest.raises(StructureMismatchError, match="'dense_0/kernel': expected the saved format int4, found "
                                                         "format nf4"):
            mgr.restore(1, like=nf4)
        _assert_same(mgr.restore(1, like=int4), int4)
        no_bias = {**job["params"], "head": {"kernel": job["params"]["head"]["kernel"]}}
        with pytest.raises(StructureMismatchError, match="params/head/bias"):
            mgr.restore(0, like={**job, "params": no_bias})
        assert json.loads(json.dumps(mgr.layout(0)))["paths"] == tree.paths(job)
        with pytest.raises(StructureMismatchError, match="'extra'.*a leaf in like="):
            mgr.restore(0, like={**job, "extra": jnp.ones(2)})


# ------------------------------------------------------------------------- resumable training

def _qat_run(steps, checkpoint=None, progress=None):
    from weightlab import models
    from weightlab.data import load_mnist1d
    from weightlab.train import fit

    data = load_mnist1d()
    model = models.mlp(jax.random.key(0), hidden=(32, 32))
    apply_fn = quant.qat_apply_fn(model.apply_fn, bits=4, group_size="channel")
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=1e-4))
    return fit(apply_fn, model.params, data["x"], data["y"], key=jax.random.key(1), steps=steps, batch_size=64,
               optimizer=opt, chunk=50, checkpoint=checkpoint, progress=progress)


class _Killed(Exception):
    pass


def test_qat_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path):
    ref = _qat_run(200)

    def kill_at_100(step, loss):
        if step == 100:
            raise _Killed

    mgr = wio.CheckpointManager(tmp_path, save_interval_steps=50)
    with pytest.raises(_Killed):
        _qat_run(200, checkpoint=mgr, progress=kill_at_100)
    mgr.close()
    assert wio.CheckpointManager(tmp_path).all_steps() == [50, 100]
    resumed = _qat_run(200, checkpoint=str(tmp_path))  # a directory: fit opens and closes its own manager
    assert resumed.start_step == 100 and len(resumed.losses) == 100
    np.testing.assert_array_equal(resumed.losses, ref.losses[100:])
    _assert_same(resumed.params, ref.params)
    _assert_same(resumed.opt_state, ref.opt_state)
    again = _qat_run(200, checkpoint=str(tmp_path))  # already finished: nothing to run
    assert again.start_step == 200 and len(again.losses) == 0
    _assert_same(again.params, ref.params)
    with pytest.raises(UsageError, match="checkpoint="):
        _qat_run(10, checkpoint=3)


def test_closed_manager_and_restore_right_after_an_async_save(tmp_path):
    from weightlab.errors import UsageError
    from weightlab.io import CheckpointManager

    tree = {"w": jnp.arange(6.0).reshape(2, 3)}
    mgr = CheckpointManager(tmp_path / "ck", async_=True)
    mgr.save(1, tree)
    np.testing.assert_array_equal(np.asarray(mgr.restore(1, like=tree)["w"]), np.asarray(tree["w"]))  # waits
    mgr.close()
    mgr.close()  # a second close does nothing
    with pytest.raises(UsageError, match="closed"):
        mgr.save(2, tree)
    with pytest.raises(UsageError, match="closed"):
        mgr.restore()


def test_fit_batches_depend_on_the_step_only(tmp_path):
    """A run's result does not depend on ``chunk``, and a run extended from a checkpoint ends where
    an uninterrupted run ends."""
    import optax

    from weightlab.models import mlp
    from weightlab.train import fit

    m = mlp(jax.random.key(0), in_dim=8, hidden=(16,), out_dim=4)
    x = jax.random.normal(jax.random.key(1), (128, 8))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 4)
    kw = dict(key=jax.random.key(3), batch_size=16, optimizer=optax.adam(1e-2))
    a = fit(m.apply_fn, m.params, x, y, steps=30, chunk=10, **kw)
    b = fit(m.apply_fn, m.params, x, y, steps=30, chunk=7, **kw)
    fit(m.apply_fn, m.params, x, y, steps=20, chunk=10, checkpoint=tmp_path / "ck", **kw)
    c = fit(m.apply_fn, m.params, x, y, steps=30, chunk=4, checkpoint=tmp_path / "ck", **kw)
    assert c.start_step == 20
    for other in (b, c):
        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(other.params)):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-6)
