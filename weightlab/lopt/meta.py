"""Meta-training learned optimizers, and evaluating any optimizer on tasks.

>>> lo = meta.learned("small_fc")                       # what is trained: init_meta + make(theta)
>>> res = meta.train(lo, tasks.family("digits_mlp"), meta.pes(num_particles=8), meta_steps=500,
...                  key=jax.random.key(0), checkpoint="ckpt/")   # resumes from ckpt/ if it holds steps
>>> opt = lo.make(res.meta_params)                      # an optax transform

:func:`train` keeps one estimator state (a population of inner runs) per task config, draws a config
per meta-step from the step's key, and applies the meta-optimizer (Adam with gradient clipping by
default) to the estimated meta-gradient. A meta-gradient that is not finite is skipped (the
meta-parameters and the meta-optimizer's state do not move) and counted. With a checkpoint every
``checkpoint_every`` steps holding the meta-parameters, the meta-optimizer state, every population
and the history, an interrupted run resumes bit-identically: all randomness is ``fold_in(role(key, "meta_step"), step)``, each use
(config draw, noise, inner runs) taking its own :func:`~weightlab.lopt.tasks.role` of it.

:func:`run` trains one task with any optax optimizer and returns loss curves; :func:`tune_lr` sweeps
a learning rate (the tuned-Adam baseline); :func:`compare` builds the evaluation table.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import tree as wtree
from ..errors import LoptError, UsageError
from .estimators import Estimator, es, pes, tbptt  # noqa: F401  (re-exported: lopt.meta.es / pes / tbptt)
from .tasks import Family, Task, role

__all__ = ["LearnedOptimizer", "learned", "MetaResult", "train", "run", "RunResult", "tune_lr", "compare",
           "es", "pes", "tbptt", "population_shardings"]


class LearnedOptimizer(NamedTuple):
    """What meta-training trains: ``init_meta(key) -> theta`` and ``make(theta) -> optax transform``."""

    name: str
    init_meta: Callable
    make: Callable
    hp: dict


def learned(name: str = "small_fc", *, hidden_size: int = 32, **hp) -> LearnedOptimizer:
    """The learned optimizer ``name`` (``small_fc``, ``mulo``, ``hyper``) with hyper-parameters
    ``hp`` (those of the factory, e.g. ``learning_rate=``, ``network=``, ``mup_base=``)."""
    from . import hierarchical, perparam

    if name in ("small_fc", "mulo"):
        fac = perparam.small_fc if name == "small_fc" else perparam.mulo
        fac(None, hidden_size=hidden_size, **hp)  # validate the options now
        return LearnedOptimizer(name, lambda k: perparam.init_meta(k, hidden_size),
                                lambda th: fac(th, hidden_size=hidden_size, **hp), dict(hp, hidden_size=hidden_size))
    if name == "hyper":
        net = hp.get("network", "lstm")
        hierarchical.hyper(hierarchical.init_hyper_meta(None, hidden_size, network=net), **hp)
        return LearnedOptimizer(name, lambda k: hierarchical.init_hyper_meta(k, hidden_size, network=net),
                                lambda th: hierarchical.hyper(th, **hp), dict(hp, hidden_size=hidden_size))
    raise LoptError(f"meta.learned: {name!r} is not a learned optimizer; known: 'small_fc', 'mulo', 'hyper'")


class MetaResult(NamedTuple):
    """``meta_params``; ``history`` (per meta-step: ``meta_loss``, ``task`` index, ``skipped``);
    ``step`` reached; ``skipped`` count; ``seconds`` of this call; ``resumed_from`` (or None)."""

    meta_params: Any
    history: dict
    step: int
    skipped: int
    seconds: float
    resumed_from: int | None


def _typed_key(key):
    wtree.check_key(key)
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _task_list(tasks) -> list[Task]:
    if isinstance(tasks, Task):
        return [tasks]
    if isinstance(tasks, Family):
        return [tasks.task(i) for i in range(len(tasks.configs))]
    if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, Task) for t in tasks):
        return list(tasks)
    raise UsageError(f"meta.train: tasks must be a Task, a Family or a list of Tasks, got {type(tasks).__name__}")


def _manager(checkpoint, every):
    from ..io.manager import CheckpointManager

    if checkpoint is None or isinstance(checkpoint, CheckpointManager):
        return checkpoint, False
    return CheckpointManager(checkpoint, max_to_keep=2, save_interval_steps=every), True


_DEFAULT_META_OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
_STEP_CACHE: dict = {}


def population_shardings(est_state: Any, mesh, axis="data") -> Any:
    """NamedShardings for an estimator state (arrays or shapes) with its population split over mesh
    ``axis``: every entry but the restart ``key`` is a stack over particles (leading axis); the rest,
    like the meta-parameters, is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def stacked(x):
        return NamedSharding(mesh, P(axis, *([None] * (x.ndim - 1))))

    return {k: (jax.tree.map(lambda x: NamedSharding(mesh, P()), v) if k == "key" else jax.tree.map(stacked, v))
            for k, v in est_state.items()}


def _check_population_mesh(estimator: Estimator, mesh, axis) -> None:
    """Before any work: the axis exists and divides the population."""
    from ..errors import ShardingError
    from ..shard.rules import axis_size

    names = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        raise ShardingError("population", f"unknown mesh axis '{unknown[0]}'; the mesh has axes "
                                          f"{tuple(mesh.axis_names)}", axis=unknown[0])
    n, m = estimator.config["num_particles"], axis_size(mesh, axis)
    if n % m:
        raise ShardingError("population", f"{n} particles do not split over mesh axis {axis!r} (size {m}); use a "
                                          f"multiple of {m}", axis=axis)


def _meta_step_fn(estimator: Estimator, task: Task, make: Callable, mopt, mesh=None, axis="data"):
    """The jitted meta-step, cached per (estimator, task, optimizer, meta-optimizer, mesh) objects,
    so a resumed or repeated ``train`` call does not compile again. With ``mesh`` the population is
    constrained to be split over ``axis`` on the way in and out (the inner runs then execute on
    their own devices; the meta-gradient is one all-reduce)."""
    ck = (id(estimator), id(task), id(make), id(mopt), id(mesh), axis)
    if ck in _STEP_CACHE:
        return _STEP_CACHE[ck][0]
    if len(_STEP_CACHE) > 64:
        _STEP_CACHE.clear()

    def on_mesh(est_state):
        if mesh is None:
            return est_state
        return jax.lax.with_sharding_constraint(est_state, population_shardings(est_state, mesh, axis))

    def step(theta, mstate, est_state, key):
        g, loss, est_state = estimator.grad(theta, on_mesh(est_state), task, make, key)
        est_state = on_mesh(est_state)
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        g = jax.tree.map(lambda x: jnp.where(ok, x, 0.0), g)
        upd, new_mstate = mopt.update(g, mstate, theta)
        new_theta = optax.apply_updates(theta, upd)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
        return pick(new_theta, theta), pick(new_mstate, mstate), est_state, loss, ~ok

    fn = jax.jit(step)
    _STEP_CACHE[ck] = (fn, estimator, task, make, mopt, mesh)  # the objects stay alive, so their ids stay theirs
    return fn


def train(lopt: LearnedOptimizer, tasks, estimator: Estimator, *, meta_steps: int, key, meta_params=None,
          meta_optimizer: optax.GradientTransformation | None = None, checkpoint=None, checkpoint_every: int = 50,
          progress: bool | Callable[[int, float], None] = False, mesh=None,
          population_axis: str | tuple = "data") -> MetaResult:
    """Meta-train ``lopt`` on ``tasks`` (a Task, a Family or a list) with ``estimator`` for
    ``meta_steps`` meta-steps. ``meta_params``: where to start (default ``lopt.init_meta``).
    ``meta_optimizer``: default ``chain(clip_by_global_norm(1), adam(3e-3))``. ``checkpoint``: a
    directory or :class:`~weightlab.io.CheckpointManager`; if it holds a step, training resumes there.
    ``progress``: True for a tqdm bar, or ``fn(step, meta_loss)``. ``mesh``: split every population
    (its inner runs: params, optimizer states, perturbations) over ``population_axis`` of this
    ``jax.sharding.Mesh`` (a mesh over several processes' devices works the same); the
    meta-parameters are replicated. Same results as one device up to the order of one reduction."""
    if not isinstance(lopt, LearnedOptimizer):
        raise UsageError(f"meta.train: lopt must be a LearnedOptimizer (meta.learned('small_fc')), got "
                         f"{type(lopt).__name__}")
    if not isinstance(estimator, Estimator):
        raise UsageError(f"meta.train: estimator must be meta.tbptt(...), meta.es(...) or meta.pes(...), got "
                         f"{type(estimator).__name__}")
    if not isinstance(meta_steps, int) or meta_steps < 1:
        raise UsageError(f"meta.train: meta_steps must be a positive int, got {meta_steps!r}")
    key = _typed_key(key)
    task_list = _task_list(tasks)
    if mesh is not None:
        _check_population_mesh(estimator, mesh, population_axis)
    mopt = meta_optimizer or _DEFAULT_META_OPT
    theta = lopt.init_meta(role(key, "meta_init")) if meta_params is None else meta_params
    jax.tree.map(lambda a, b: None, theta, lopt.init_meta(jax.random.key(0)))  # same structure as the architecture
    mstate = mopt.init(theta)
    inits = [jax.jit(lambda th, k, t=t: estimator.init(th, t, lopt.make, k)) for t in task_list]
    if mesh is not None:  # born split over the devices (a population never sits whole on one device)
        inits = [jax.jit(lambda th, k, t=t: estimator.init(th, t, lopt.make, k),
                         out_shardings=population_shardings(jax.eval_shape(
                             lambda th, k, t=t: estimator.init(th, t, lopt.make, k), theta, jax.random.key(0)),
                             mesh, population_axis)) for t in task_list]
    init_state = lambda i, th: inits[i](th, jax.random.fold_in(role(key, "population"), i))
    states: dict[str, Any] = {}  # a population per task config, created when the config is first drawn
    hist = {"meta_loss": np.full(meta_steps, np.nan, np.float32), "task": np.full(meta_steps, -1, np.int32),
            "skipped": np.zeros(meta_steps, np.int32)}
    mgr, own = _manager(checkpoint, checkpoint_every)
    start = resumed = None
    start = 0
    try:
        if mgr is not None and mgr.latest_step() is not None:
            resumed = mgr.latest_step()
            saved = {p.split("/")[1] for p in mgr.layout(resumed)["paths"] if p.startswith("states/")}
            like_states = {i: jax.eval_shape(lambda th, i=int(i): init_state(i, th), theta) for i in sorted(saved)}
            lay = mgr.layout(resumed)
            saved_len = dict(zip(lay["paths"], lay["shapes"]))["history/meta_loss"][0]
            like_hist = {k: np.zeros(saved_len, v.dtype) for k, v in hist.items()}
            like = {"theta": theta, "mstate": mstate, "states": like_states, "history": like_hist}
            if resumed > meta_steps:
                raise LoptError(f"meta.train: the checkpoint is at step {resumed}, past meta_steps={meta_steps}")
            got = mgr.restore(resumed, like=like)
            theta, mstate, states = got["theta"], got["mstate"], dict(got["states"])
            for k, v in got["history"].items():  # a run extended (or shortened) to a new meta_steps
                n = min(len(v), meta_steps)
                hist[k][:n] = np.asarray(v)[:n]
            start = resumed
        if mesh is not None:  # replicated on the mesh (meta_params committed to one device would not mix)
            from jax.sharding import NamedSharding, PartitionSpec as P

            theta, mstate = jax.device_put((theta, mstate), NamedSharding(mesh, P()))
        steps = [_meta_step_fn(estimator, t, lopt.make, mopt, mesh, population_axis) for t in task_list]
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=meta_steps, initial=start, desc=f"meta-train {lopt.name} ({estimator.name})")
        t0 = time.perf_counter()
        for s in range(start, meta_steps):
            k = jax.random.fold_in(role(key, "meta_step"), s)
            i = int(jax.random.randint(role(k, "config"), (), 0, len(task_list)))
            if str(i) not in states:
                states[str(i)] = init_state(i, theta)
            theta, mstate, states[str(i)], loss, skipped = steps[i](theta, mstate, states[str(i)], k)
            hist["meta_loss"][s], hist["task"][s], hist["skipped"][s] = float(loss), i, int(skipped)
            if mgr is not None and ((s + 1) % checkpoint_every == 0 or s + 1 == meta_steps):
                mgr.save(s + 1, {"theta": theta, "mstate": mstate, "states": states, "history": hist}, force=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(meta_loss=f"{float(loss):.3f}", skipped=int(hist["skipped"][: s + 1].sum()))
            elif callable(progress):
                progress(s + 1, float(loss))
        if bar is not None:
            bar.close()
        if mgr is not None:
            mgr.wait()
    finally:
        if own and mgr is not None:
            mgr.close()
    return MetaResult(theta, hist, meta_steps, int(hist["skipped"].sum()), time.perf_counter() - t0 if start < meta_steps
                      else 0.0, resumed)


# ----------------------------------------------------------------------------------------- evaluation

class RunResult(NamedTuple):
    """Training curves of one optimizer on one task: ``train_loss`` per step, and the held-out
    ``test_loss`` / ``test_accuracy`` at ``eval_steps``."""

    train_loss: np.ndarray
    eval_steps: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray


def _runs(opt, task: Task, steps: int, eval_every: int, keys) -> RunResult:
    """Training curves for every key of ``keys`` (one run each), as one compiled, vmapped program."""
    reparam = bool(task.config.get("reparam"))

    def one(kd):
        key = jax.random.wrap_key_data(kd)
        params = task.init(key)

        def body(carry, t):
            p, s = carry
            loss, g = jax.value_and_grad(task.loss)(p, task.batch(key, t))
            u, s = (opt.update(g, s, p, loss=loss) if isinstance(opt, optax.GradientTransformationExtraArgs)
                    else opt.update(g, s, p))
            return (optax.apply_updates(p, u), s), loss

        def chunk(carry, c):
            carry, losses = jax.lax.scan(body, carry, c * eval_every + jnp.arange(eval_every))
            ev = task.evaluate(carry[0], key) if reparam else task.evaluate(carry[0])
            return carry, (losses, ev["loss"], ev["accuracy"])

        _, (losses, el, ea) = jax.lax.scan(chunk, (params, opt.init(params)), jnp.arange(steps // eval_every))
        return losses.reshape(-1), el, ea

    tl, el, ea = jax.jit(jax.vmap(one))(keys)
    return RunResult(np.asarray(tl), np.arange(1, steps // eval_every + 1) * eval_every, np.asarray(el),
                     np.asarray(ea))


def _seed_keys(key, seeds: int):
    return jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(key, s)))(jnp.arange(seeds))


def run(opt: optax.GradientTransformation, task: Task, *, steps: int, key, eval_every: int | None = None,
        seeds: int | None = None) -> RunResult:
    """Train ``task`` from ``task.init(key)`` with ``opt`` for ``steps`` steps (batches from ``key``),
    evaluating every ``eval_every`` steps (default: only at the end). With ``seeds=n``: ``n`` runs
    (keys ``fold_in(key, i)``) in one vmapped program, every array gaining a leading seed axis."""
    key = _typed_key(key)
    eval_every = eval_every or steps
    if steps % eval_every:
        raise UsageError(f"meta.run: steps ({steps}) must be a multiple of eval_every ({eval_every})")
    if seeds is None:
        r = _runs(opt, task, steps, eval_every, jax.random.key_data(key)[None])
        return RunResult(r.train_loss[0], r.eval_steps, r.test_loss[0], r.test_accuracy[0])
    return _runs(opt, task, steps, eval_every, _seed_keys(key, seeds))


def tune_lr(make_opt: Callable[..., optax.GradientTransformation], task: Task, lrs: Sequence[float], *, steps: int,
            key, seeds: int = 1, on: str = "train") -> tuple[float, dict]:
    """The learning rate of ``lrs`` with the lowest mean score over ``seeds`` runs (a non-finite run
    loses): ``on="train"``, the training loss of the last 10% of steps; ``on="valid"``, the final
    loss on 8 batches of the task's meta-validation split (never the test split). Returns (best lr,
    {lr: mean score}). ``make_opt`` takes ``learning_rate=`` (``optax.adam``); every (lr, seed) run
    is one vmapped program (``optax.inject_hyperparams``), compiled once."""
    if on not in ("train", "valid") or (on == "valid" and task.valid_batch is None):
        raise UsageError(f"tune_lr: on must be 'train' or 'valid' (a task with valid_batch), got {on!r}")
    key = _typed_key(key)
    lrs = [float(x) for x in lrs]
    if not lrs or min(lrs) <= 0:
        raise UsageError(f"tune_lr: lrs must be positive numbers, got {lrs}")
    opt = optax.inject_hyperparams(make_opt)(learning_rate=lrs[0])
    tail = max(1, steps // 10)

    def one(lr, k):
        params = task.init(k)
        st = opt.init(params)
        st.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)

        def body(carry, t):
            p, s = carry
            loss, g = jax.value_and_grad(task.loss)(p, task.batch(k, t))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p_end, _), losses = jax.lax.scan(body, (params, st), jnp.arange(steps))
        last = losses[-tail:]
        if on == "valid":
            last = jnp.stack([task.loss(p_end, task.valid_batch(k, steps + i)) for i in range(8)])
        return jnp.where(jnp.all(jnp.isfinite(last)), jnp.mean(last), jnp.inf)

    keys = _seed_keys(key, seeds)
    grid = jax.jit(jax.vmap(jax.vmap(lambda lr, kd: one(lr, jax.random.wrap_key_data(kd)), (None, 0)), (0, None)))
    vals = np.asarray(grid(jnp.asarray(lrs, jnp.float32), keys))
    scores = {lr: float(np.mean(v)) for lr, v in zip(lrs, vals)}
    return min(scores, key=scores.get), scores


def compare(optimizers: dict[str, optax.GradientTransformation], tasks_: Sequence[Task], *, steps: int, seeds: int,
            key) -> list[dict]:
    """One row per (task, optimizer): final test loss and accuracy, mean and std over ``seeds``."""
    key = _typed_key(key)
    rows = []
    for task in tasks_:
        for name, opt in optimizers.items():
            r = run(opt, task, steps=steps, key=key, seeds=seeds)
            tl, ta = r.test_loss[:, -1], r.test_accuracy[:, -1]
            rows.append({"task": task.name, "optimizer": name, "steps": steps, "seeds": seeds,
                         "test_loss": float(tl.mean()), "test_loss_std": float(tl.std()),
                         "test_accuracy": float(ta.mean()), "test_accuracy_std": float(ta.std())})
    return rows
