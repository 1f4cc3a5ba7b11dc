"""Meta-gradient estimators over truncated unrolls: truncated backprop, antithetic ES and PES.

All three train a population of ``num_particles`` inner runs of one :class:`~weightlab.lopt.tasks.Task`
with an optimizer ``make_opt(theta)`` (any optax transform built from meta-parameters ``theta``).
An inner run is cut into truncations of ``trunc_length`` steps; at the end of its ``horizon`` a run
restarts from a new initialisation. Initial step counters are staggered by whole truncations
(``stagger=True``; the first run of particle ``i`` is ``i mod (horizon / trunc_length)`` truncations
longer) so the population does not restart all at once. The meta-loss of a truncation is the mean training loss
over its steps (each step's loss capped at ``loss_cap``; a non-finite loss counts as the cap).

* :func:`tbptt` — truncated backpropagation through time: ``d(meta-loss)/d(theta)`` through each
  truncation (second-order terms included), inner states carried across truncations without
  gradient. Biased towards short horizons, low variance.
* :func:`es` — antithetic evolution strategies (Salimans et al. 2017, arXiv 1703.03864): pairs
  ``theta +- eps``, ``eps ~ N(0, sigma^2 I)``, ``g = mean (L+ - L-) eps / (2 sigma^2)``; in
  truncated form each sign keeps its own inner state (as learned_optimization's TruncatedES).
  Unbiased for the Gaussian-smoothed loss of one truncation, biased across truncations.
* :func:`pes` — Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein 2021, arXiv
  2112.13835): as ES, but each pair accumulates its perturbations since its run began
  (``xi += eps``) and the estimate is ``mean (L+ - L-) xi / (2 sigma^2)``: unbiased for the gradient
  of the smoothed *whole-run* loss, whatever the truncation length.

Each estimator is a :class:`Estimator` of pure functions; ``weightlab.lopt.meta.train`` jits them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import UsageError
from .tasks import role

__all__ = ["Estimator", "Unroll", "tbptt", "es", "pes", "truncation", "reset_unrolls"]


class Unroll(NamedTuple):
    """One inner run: its params, optimizer state, step counter (negative while staggered), key
    (raw ``key_data``, so states can be checkpointed) and restart count."""

    params: Any
    opt_state: Any
    step: jax.Array
    run_key: jax.Array
    generation: jax.Array


class Estimator(NamedTuple):
    """``init(theta, task, make_opt, key) -> state``; ``grad(theta, state, task, make_opt, key) ->
    (meta_grad, meta_loss, state)``; the settings it was built with in ``config``."""

    name: str
    init: Callable
    grad: Callable
    config: dict


def _check_objective(objective, task=None):
    if objective not in ("train", "valid"):
        raise UsageError(f"objective must be 'train' or 'valid', got {objective!r}")
    if task is not None and objective == "valid" and getattr(task, "valid_batch", None) is None:
        raise UsageError(f"objective='valid' needs a task with valid_batch; {getattr(task, 'name', task)!r} has none")


def _check(num_particles, trunc_length, horizon, sigma=None):
    for n, v in (("num_particles", num_particles), ("trunc_length", trunc_length), ("horizon", horizon)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{n} must be a positive int, got {v!r}")
    if horizon % trunc_length:
        raise UsageError(f"horizon ({horizon}) must be a multiple of trunc_length ({trunc_length}), so runs restart "
                         "at truncation boundaries")
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise UsageError(f"sigma must be > 0, got {sigma!r}")


def _update(opt, g, state, params, loss):
    if isinstance(opt, optax.GradientTransformationExtraArgs):
        return opt.update(g, state, params, loss=loss)
    return opt.update(g, state, params)


def _fresh(theta, task, make_opt, run_key, step, generation):
    params = task.init(run_key)
    return Unroll(params, make_opt(theta).init(params), jnp.asarray(step, jnp.int32), jax.random.key_data(run_key),
                  jnp.asarray(generation, jnp.int32))


def reset_unrolls(theta, task, make_opt, u: Unroll, horizon: int, base_key) -> tuple[Unroll, jax.Array]:
    """Restart the runs (batched) whose step reached ``horizon``; returns (runs, restarted flags)."""
    done = u.step >= horizon

    def one(u1, d, i):
        gen = u1.generation + 1
        key = jax.random.fold_in(jax.random.fold_in(base_key, i), gen)
        fresh = _fresh(theta, task, make_opt, key, 0, gen)
        return jax.tree.map(lambda a, b: jnp.where(d, a, b), fresh, u1)

    idx = jnp.arange(done.shape[0])
    return jax.vmap(one)(u, done, idx), done


def truncation(theta, task, make_opt, u: Unroll, length: int, loss_cap: float = 10.0, objective: str = "train"):
    """Run ``length`` steps of ``make_opt(theta)`` from ``u``; returns (meta-loss, new run). The
    meta-loss is differentiable in ``theta`` (truncated backprop takes its gradient). ``objective``:
    ``"train"`` (the mean training loss of the steps) or ``"valid"`` (the mean loss, after each step,
    on a batch of the task's meta-validation split: rewards what generalises, not memorisation)."""
    opt = make_opt(theta)
    run_key = jax.random.wrap_key_data(u.run_key)

    def body(carry, _):
        params, state, step = carry
        b = task.batch(run_key, step)  # negative while staggered: distinct batches all the same
        loss, g = jax.value_and_grad(task.loss)(params, b)
        upd, state = _update(opt, g, state, params, loss)
        params = optax.apply_updates(params, upd)
        if objective == "valid":
            loss = task.loss(params, task.valid_batch(run_key, step))
        capped = jnp.where(jnp.isfinite(loss), jnp.minimum(loss, loss_cap), loss_cap)
        return (params, state, step + 1), capped

    (params, state, step), losses = jax.lax.scan(body, (u.params, u.opt_state, u.step), None, length=length)
    return jnp.mean(losses), u._replace(params=params, opt_state=state, step=step)


def _init_population(theta, task, make_opt, key, n, trunc_length, horizon, stagger=True):
    keys = jax.random.split(role(key, "runs"), n)
    n_trunc = horizon // trunc_length
    offsets = -(jnp.arange(n) % n_trunc) * trunc_length * int(stagger)  # staggered restarts
    return jax.vmap(lambda k, s: _fresh(theta, task, make_opt, k, s, 0))(keys, offsets)


def _noise(theta, key, sigma):
    leaves, tdef = jax.tree.flatten(theta)
    ks = jax.random.split(key, len(leaves))
    return tdef.unflatten([sigma * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(ks, leaves)])


def _add(a, b, s=1.0):
    return jax.tree.map(lambda x, y: x + s * y, a, b)


def tbptt(num_particles: int = 8, trunc_length: int = 50, horizon: int = 400, loss_cap: float = 10.0,
          stagger: bool = True, objective: str = "train") -> Estimator:
    """Truncated backprop through time (see the module docstring)."""
    _check(num_particles, trunc_length, horizon)
    _check_objective(objective)

    def init(theta, task, make_opt, key):
        _check_objective(objective, task)
        return {"runs": _init_population(theta, task, make_opt, key, num_particles, trunc_length, horizon, stagger),
                "key": jax.random.key_data(role(key, "restarts"))}

    def grad(theta, state, task, make_opt, key):
        runs, _ = reset_unrolls(theta, task, make_opt, state["runs"], horizon, jax.random.wrap_key_data(state["key"]))
        f = lambda th, u: truncation(th, task, make_opt, u, trunc_length, loss_cap, objective)
        (losses, new), grads = jax.vmap(jax.value_and_grad(f, has_aux=True), in_axes=(None, 0))(theta, runs)
        # a diverged run (NaN params until its restart) must not void every meta-step: average the
        # finite particles only (all non-finite -> a non-finite estimate, which meta.train skips)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
                                for g in jax.tree.leaves(grads)]), axis=0)
        n_ok = jnp.sum(ok)
        mean_ok = lambda g: jnp.where(n_ok > 0, jnp.sum(jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), 0)
                                      / jnp.maximum(n_ok, 1), jnp.nan)
        return jax.tree.map(mean_ok, grads), jnp.mean(losses), dict(state, runs=new)

    return Estimator("tbptt", init, grad, dict(num_particles=num_particles, trunc_length=trunc_length,
                                               horizon=horizon, loss_cap=loss_cap, stagger=stagger,
                                               objective=objective))


def _antithetic(name, num_particles, trunc_length, horizon, sigma, loss_cap, persistent, stagger, objective):
    _check(num_particles, trunc_length, horizon, sigma)
    _check_objective(objective)

    def init(theta, task, make_opt, key):
        _check_objective(objective, task)
        runs = _init_population(theta, task, make_opt, key, num_particles, trunc_length, horizon, stagger)
        st = {"pos": runs, "neg": runs, "key": jax.random.key_data(role(key, "restarts"))}
        if persistent:
            st["xi"] = jax.tree.map(lambda x: jnp.zeros((num_particles,) + x.shape, jnp.float32), theta)
        return st

    def grad(theta, state, task, make_opt, key):
        base = jax.random.wrap_key_data(state["key"])
        pos, done = reset_unrolls(theta, task, make_opt, state["pos"], horizon, base)
        neg, _ = reset_unrolls(theta, task, make_opt, state["neg"], horizon, base)  # same keys: a pair restarts alike
        eps = jax.vmap(lambda k: _noise(theta, k, sigma))(jax.random.split(role(key, "noise"), num_particles))
        run = lambda th, u: truncation(th, task, make_opt, u, trunc_length, loss_cap, objective)
        # Both signs in one program (half the compile), stacked on a new leading axis rather than
        # concatenated: the particle axis stays axis 1, so a population split over devices stays split.
        stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
        thetas = stack(jax.vmap(lambda e: _add(theta, e))(eps), jax.vmap(lambda e: _add(theta, e, -1.0))(eps))
        losses, both = jax.vmap(jax.vmap(run))(thetas, stack(pos, neg))
        lp, ln = losses[0], losses[1]
        pos, neg = jax.tree.map(lambda x: x[0], both), jax.tree.map(lambda x: x[1], both)
        new = dict(state, pos=pos, neg=neg)
        direction = eps
        if persistent:
            keep = lambda x: jnp.where(done.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x)
            direction = jax.tree.map(lambda x, e: keep(x) + e, state["xi"], eps)
            new["xi"] = direction
        w = (lp - ln) / (2.0 * sigma ** 2)
        g = jax.tree.map(lambda d: jnp.mean(w.reshape((-1,) + (1,) * (d.ndim - 1)) * d, 0), direction)
        return g, jnp.mean((lp + ln) / 2), new

    return Estimator(name, init, grad, dict(num_particles=num_particles, trunc_length=trunc_length, horizon=horizon,
                                            sigma=sigma, loss_cap=loss_cap, stagger=stagger, objective=objective))


def es(num_particles: int = 8, trunc_length: int = 50, horizon: int = 400, sigma: float = 0.01,
       loss_cap: float = 10.0, stagger: bool = True, objective: str = "train") -> Estimator:
    """Antithetic ES over truncations (``num_particles`` pairs; see the module docstring)."""
    return _antithetic("es", num_particles, trunc_length, horizon, sigma, loss_cap, persistent=False,
                       stagger=stagger, objective=objective)


def pes(num_particles: int = 8, trunc_length: int = 50, horizon: int = 400, sigma: float = 0.01,
        loss_cap: float = 10.0, stagger: bool = True, objective: str = "train") -> Estimator:
    """Persistent evolution strategies (``num_particles`` antithetic pairs; see the module docstring)."""
    return _antithetic("pes", num_particles, trunc_length, horizon, sigma, loss_cap, persistent=True,
                       stagger=stagger, objective=objective)
