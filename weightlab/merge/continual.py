"""Continual merging: fold fine-tuned models into one, one at a time, without keeping the old ones.

OPCM (Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging"). For each new model, every 2-D leaf's task vector is rotated into
the singular basis (U, V, full) of the current merged task vector, its diagonal and the top-left
``split x split`` block are zeroed (``split`` = the first index where the cumulative singular-value
share exceeds ``alpha``), i.e. the part that would interfere with what is already merged is removed,
and the result is rotated back and added; other leaves are added as is. The accumulated sum is then
rescaled so the merged task vector's global norm equals the mean global norm of the task vectors
seen so far. The state keeps the running scale ``lambda_t`` so the next step undoes it, exactly as
the reference. The first model is taken as is (the merge of one model is that model).

As a transform (``merge.transform("opcm", alpha=0.5)``) the state is an :class:`OPCMState` and each
``apply(merged, state, models=[new, ...])`` folds the new models in (jit-able: fixed-shape state).
:func:`opcm` runs a whole sequence (order matters; shuffle the list yourself for the paper's
averaged-over-orders protocol). Memory: the transform fed one model per call holds the base and one
merged model; the plain function stacks the list it is given (all N models).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import _lazy, tree as wtree
from .registry import inputs, merge_method

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["OPCMState", "opcm"]


class OPCMState(NamedTuple):
    """Running state of OPCM: the base, the scale applied to the accumulated task vectors, and the
    sum and count of the global task-vector norms seen so far."""

    base: Any
    lambda_t: Any
    norm_sum: Any
    count: Any


def _global_norm(a, b):
    sq = [jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if wtree.is_array(x)]
    return jnp.sqrt(sum(sq))


@_lazy.jit
def _project(prev_tv, tv, alpha):
    u, s, vt = jnp.linalg.svd(prev_tv, full_matrices=True)
    share = jnp.cumsum(s) / jnp.where(jnp.sum(s) == 0, 1.0, jnp.sum(s))
    split = jnp.argmax(share > alpha)
    p = u.T @ tv @ vt.T
    i = jnp.arange(p.shape[0])[:, None]
    j = jnp.arange(p.shape[1])[None, :]
    p = jnp.where((i == j) | ((i < split) & (j < split)), 0.0, p)
    return u @ p @ vt


def _fold(base, merged, lambda_t, norm_sum, count, model, alpha):
    """One OPCM step (``count`` >= 1 models already merged): returns (merged, lambda_t, norm_sum)."""
    norm_sum = norm_sum + _global_norm(model, base)
    avg = norm_sum / (count + 1)

    def accumulate(b, m, x):
        if not wtree.is_array(b):
            return b
        b32 = b.astype(jnp.float32)
        prev, tv = m.astype(jnp.float32) - b32, x.astype(jnp.float32) - b32
        if b.ndim == 2:
            tv = _project(prev, tv, jnp.float32(alpha))
        return lambda_t * prev + tv

    acc = jax.tree.map(accumulate, base, merged, model)
    acc_norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(acc) if wtree.is_array(a)))
    factor = avg / jnp.where(acc_norm == 0, 1.0, acc_norm)
    new = jax.tree.map(lambda b, a: (b.astype(jnp.float32) + a * factor).astype(b.dtype)
                       if wtree.is_array(b) else b, base, acc)
    return new, acc_norm / avg, norm_sum


def _init(params) -> OPCMState:
    return OPCMState(params, jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0))


def _step(merged, state: OPCMState, models, *, alpha: float = 0.5):
    """Transform step: validate ``models`` (list or stacked) and fold them into ``merged``."""
    return _fold_all(merged, state, inputs(state.base, models, name="opcm").models, alpha)


def _fold_all(merged, state: OPCMState, stacked, alpha):
    """Fold validated, stacked models into ``merged`` one at a time."""
    base, lam, nsum, count = state
    for i in range(wtree.num_models(stacked)):
        model = jax.tree.map(lambda s, i=i: s[i] if wtree.is_array(s) else s, stacked)
        first = lambda: (jax.tree.map(lambda m, b: m.astype(b.dtype) if wtree.is_array(b) else b, model, merged),
                         jnp.float32(1.0), _global_norm(model, base))
        later = lambda: _fold(base, merged, lam, nsum, count, model, alpha)
        if isinstance(count, jax.core.Tracer):
            merged, lam, nsum = jax.lax.cond(count == 0, first, later)
        else:
            merged, lam, nsum = first() if int(count) == 0 else later()
        count = count + 1
    return merged, OPCMState(base, lam, nsum, count)


@merge_method("opcm", stream=False, continual=(_init, _step), paper="Tang et al. 2025 (OPCM)")
def opcm(base, models, *, alpha: float = 0.5):
    """OPCM over ``models`` in the given order: each projected away from what is already merged."""
    merged, _ = _fold_all(base, _init(base), models, alpha)  # models: already validated and stacked
    return merged
