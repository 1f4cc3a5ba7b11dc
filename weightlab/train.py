"""A small jit-compiled optax training loop for the reference models (classification).

The inner loop is a ``lax.scan`` over ``chunk`` steps, so Python dispatch happens once per chunk;
minibatches are drawn with ``jax.random`` from an explicit key (reproducible). With
``checkpoint=`` (a :class:`weightlab.io.CheckpointManager` or a directory) the params and optimizer
state are saved at chunk ends and a restarted job resumes from the latest complete step.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["cross_entropy", "evaluate", "accuracy", "fit", "FitResult"]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(apply_fn, params, xb, yb):
    logits = apply_fn(params, xb)
    return cross_entropy(logits, yb) * xb.shape[0], jnp.sum(jnp.argmax(logits, -1) == yb)


def evaluate(apply_fn: Callable, params, x, y, batch_size: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``apply_fn(params, x)`` on integer labels ``y``, in jitted
    batches (compiled once per ``apply_fn`` and batch shape; one host sync at the end)."""
    loss = correct = 0.0
    for i in range(0, len(y), batch_size):
        l, c = _batch_stats(apply_fn, params, jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size]))
        loss, correct = loss + l, correct + c
    return float(loss) / len(y), float(correct) / len(y)


def accuracy(apply_fn: Callable, params, x, y, batch_size: int = 2000) -> float:
    """Top-1 accuracy of ``apply_fn(params, x)`` on (x, y)."""
    return evaluate(apply_fn, params, x, y, batch_size)[1]


class FitResult(NamedTuple):
    params: Any
    losses: np.ndarray          # training loss per step run by this call (from start_step on)
    opt_state: Any
    start_step: int = 0         # the step this call resumed from (0 without a checkpoint)


@functools.partial(jax.jit, static_argnums=2)
def _step_keys(key, start, m: int):
    """The minibatch keys of steps ``start .. start+m-1``: ``fold_in(key, step)``, so a step's batch
    depends on the key and the step only (not on ``chunk`` or where a resumed run starts)."""
    return jax.vmap(lambda s: jax.random.fold_in(key, s))(start + jnp.arange(m))


def _manager(checkpoint):
    """(manager, whether fit owns it) for ``checkpoint=``."""
    from .io.manager import CheckpointManager

    if checkpoint is None or isinstance(checkpoint, CheckpointManager):
        return checkpoint, False
    if isinstance(checkpoint, (str, os.PathLike)):
        return CheckpointManager(checkpoint), True
    from .errors import UsageError

    raise UsageError(f"fit: checkpoint= takes a weightlab.io.CheckpointManager or a directory, got "
                     f"{type(checkpoint).__name__}")


def fit(apply_fn: Callable, params, x, y, *, key: jax.Array, steps: int = 3000, batch_size: int = 128,
        optimizer: optax.GradientTransformation | None = None, chunk: int = 100,
        loss_fn: Callable = cross_entropy, progress: Callable[[int, float], None] | None = None,
        checkpoint=None) -> FitResult:
    """Train ``params`` on (x, y) for ``steps`` minibatch steps of ``optimizer`` (default Adam 1e-3).

    ``progress(step, loss)`` is called after every chunk (e.g. to advance a progress bar).
    ``checkpoint``: a :class:`weightlab.io.CheckpointManager` (or a directory for a default one,
    closed on return) that receives ``{"params", "opt_state"}`` after every chunk its
    ``save_interval_steps`` accepts and after the last step. If it already holds a step, training
    resumes there (restored into the structure of ``params`` and ``optimizer.init(params)``, so
    QArrays and optimizer states come back as such); the minibatch keys depend only on ``key`` and
    the step, so a run resumed from a chunk end gives the same result as one never interrupted
    (``losses`` then cover the steps this call ran, from ``start_step``). A checkpoint at or past
    ``steps`` is returned as restored.
    """
    from . import tree as wtree

    qs = [p for p, x in wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0] if wtree.is_atomic(x)]
    if qs:
        from .errors import UsageError

        raise UsageError(f"fit trains float params; '{qs[0]}' is quantized (its codes have no gradient). Train the "
                         "float params through weightlab.quant.qat_apply_fn (QAT) and quantize afterwards")
    mgr, own = _manager(checkpoint)
    optimizer = optimizer or optax.adam(1e-3)
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    opt_state = optimizer.init(params)

    def step(carry, k):
        p, s = carry
        idx = jax.random.randint(k, (batch_size,), 0, n)
        loss, g = jax.value_and_grad(lambda q: loss_fn(apply_fn(q, x[idx]), y[idx]))(p)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    @jax.jit
    def run_chunk(p, s, k, length_keys):
        (p, s), losses = jax.lax.scan(step, (p, s), length_keys)
        return p, s, losses

    losses = []
    done = saved = 0
    try:
        if mgr is not None and mgr.latest_step() is not None:
            done = saved = mgr.latest_step()
            state = mgr.restore(done, like={"params": params, "opt_state": opt_state})
            params, opt_state = state["params"], state["opt_state"]
        start = done
        while done < steps:
            m = min(chunk, steps - done)
            keys = _step_keys(key, done, m)
            params, opt_state, l = run_chunk(params, opt_state, key, keys)
            losses.append(np.asarray(l))
            done += m
            if mgr is not None and (mgr.should_save(done) or done == steps) and done != saved:
                mgr.save(done, {"params": params, "opt_state": opt_state}, force=True)
                saved = done
            if progress is not None:
                progress(done, float(l[-1]))
    finally:
        if own:
            mgr.close()
        elif mgr is not None:
            mgr.wait()  # the last step is complete on disk when fit returns (writes are asynchronous)
    return FitResult(params, np.concatenate(losses) if losses else np.zeros(0), opt_state, start)
