"""Continual merging: fold fine-tuned models into one, one at a time, without keeping the old ones.

:func:`opcm_init` / :func:`opcm_update` implement OPCM (Tang et al. 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging"). For each new model,
every 2-D leaf's task vector is rotated into the singular basis (U, V, full) of the current merged
task vector, its diagonal and the top-left ``split x split`` block are zeroed (``split`` = the first
index where the cumulative singular-value share exceeds ``alpha``), i.e. the part that would
interfere with what is already merged is removed, and the result is rotated back and added; other
leaves are added as is. The accumulated sum is then rescaled so the merged task vector's global norm
equals the mean global norm of the task vectors seen so far. The state keeps the running scale
``lambda_t`` so the next step undoes it, exactly as the reference. Memory: one merged model.

:func:`opcm` runs the whole sequence (order matters; shuffle the list yourself for the paper's
averaged-over-orders protocol).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import tree as wtree
from ..errors import MergeError

__all__ = ["OPCMState", "opcm_init", "opcm_update", "opcm"]


class OPCMState(NamedTuple):
    merged: Any          # current merged params
    lambda_t: jax.Array  # scale applied to the accumulated task vectors
    norms: jax.Array     # global task-vector norms seen so far, (t,)


def _global_norm(a, b):
    sq = [jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if wtree.is_array(x)]
    return jnp.sqrt(sum(sq))


def opcm_init(base, first) -> OPCMState:
    """Start from the first fine-tuned model (the merge of one model is that model)."""
    wtree.check_compatible(base, first, names=("base_model", "model"))
    return OPCMState(first, jnp.float32(1.0), _global_norm(first, base)[None])


@jax.jit
def _project(prev_tv, tv, alpha):
    u, s, vt = jnp.linalg.svd(prev_tv, full_matrices=True)
    share = jnp.cumsum(s) / jnp.where(jnp.sum(s) == 0, 1.0, jnp.sum(s))
    split = jnp.argmax(share > alpha)
    p = u.T @ tv @ vt.T
    i = jnp.arange(p.shape[0])[:, None]
    j = jnp.arange(p.shape[1])[None, :]
    p = jnp.where((i == j) | ((i < split) & (j < split)), 0.0, p)
    return u @ p @ vt


def opcm_update(state: OPCMState, base, model, *, alpha: float = 0.5) -> OPCMState:
    """Merge one more model into ``state`` (see module docstring); ``alpha`` in [0, 1]."""
    if not 0 <= alpha <= 1:
        raise MergeError(f"alpha must be in [0, 1], got {alpha}")
    wtree.check_compatible(base, model, names=("base_model", "model"))
    norms = jnp.concatenate([state.norms, _global_norm(model, base)[None]])
    prev_lambda = state.lambda_t

    def accumulate(b, m, x):
        if not wtree.is_array(b):
            return b
        b32 = b.astype(jnp.float32)
        prev, tv = m.astype(jnp.float32) - b32, x.astype(jnp.float32) - b32
        if b.ndim == 2:
            tv = _project(prev, tv, jnp.float32(alpha))
        return prev_lambda * prev + tv

    acc = jax.tree.map(accumulate, base, state.merged, model)
    acc_norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(acc) if wtree.is_array(a)))
    avg = jnp.mean(norms)
    factor = avg / jnp.where(acc_norm == 0, 1.0, acc_norm)
    merged = jax.tree.map(lambda b, a: (b.astype(jnp.float32) + a * factor).astype(b.dtype)
                          if wtree.is_array(b) else b, base, acc)
    return OPCMState(merged, acc_norm / avg, norms)


def opcm(base, models, *, alpha: float = 0.5):
    """OPCM over ``models`` in the given order; returns the merged params."""
    models = wtree.unstack(models) if not isinstance(models, (list, tuple)) else list(models)
    if not models:
        raise MergeError("no models to merge")
    state = opcm_init(base, models[0])
    for m in models[1:]:
        state = opcm_update(state, base, m, alpha=alpha)
    return state.merged
