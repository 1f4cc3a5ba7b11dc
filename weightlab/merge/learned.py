"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024). The merged
model is ``θ(λ) = θ_base + Σ_k λ_k ⊙ τ_k`` with task vectors ``τ_k = θ_k - θ_base`` and
coefficients that are one scalar per task (``granularity="task"``) or one per task and parameter
leaf (``"layer"``, the paper's better variant). λ is trained with any optax optimizer to minimise the
mean prediction entropy of ``apply_fn(θ(λ), x)`` on each task's *unlabeled* batches; gradients come
from ``jax.grad`` through the merge, so it works for any model with an ``apply_fn``, not per
architecture. Coefficients are clipped to [0, 1] after each step, as the reference does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .registry import inputs, merge_method

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")
optax = _lazy.module("optax")

__all__ = ["AdaMergingResult", "merge_with", "adamerging", "adamerging_fit"]


class AdaMergingResult(NamedTuple):
    params: Any          # the merged model
    coefficients: Any    # (K,) array or a pytree of (K,) arrays (layer-wise)
    losses: Any          # entropy per step


def merge_with(base, task_vectors, coefficients):
    """``base + Σ_k λ_k τ_k``; ``coefficients`` is (K,) or a pytree like ``base`` of (K,) arrays."""
    if wtree.is_array(coefficients):
        return jax.tree.map(lambda b, t: b + jnp.tensordot(coefficients.astype(t.dtype), t, axes=1)
                            if wtree.is_array(b) else b, base, task_vectors)
    return jax.tree.map(lambda b, t, c: b + jnp.tensordot(c.astype(t.dtype), t, axes=1) if wtree.is_array(b) else b,
                        base, task_vectors, coefficients)


def _entropy(logits):
    p = jax.nn.softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def adamerging_fit(base, models, *, apply_fn: Callable, unlabeled: Sequence[Sequence[Any]],
                   granularity: str = "layer", init: float = 0.3, steps: int = 100,
                   optimizer: Any = None, checkpoint=None) -> AdaMergingResult:
    """Learn merging coefficients for ``models`` (fine-tunes of ``base``) from unlabeled batches,
    one list of batches per task (cycled through); returns the merge, the coefficients and the
    entropy curve. ``checkpoint``: a :class:`weightlab.io.CheckpointManager` receiving the
    coefficients and optimizer state at the steps its ``save_interval_steps`` accepts and at the
    end; a run restarted with it resumes from its latest step and ends where an uninterrupted run
    ends (the batches depend on the step only); ``losses`` then cover the steps this call ran."""
    if granularity not in ("task", "layer"):
        raise MergeError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    x = inputs(base, models, name="adamerging")
    base, stacked, k = x.base, x.models, x.n
    if len(unlabeled) != k or any(len(u) == 0 for u in unlabeled):
        raise MergeError("adamerging needs one non-empty list of unlabeled batches per model")
    tvs = jax.tree.map(lambda s, b: (s - b[None]).astype(jnp.float32) if wtree.is_array(b) else b, stacked, base)
    lam = jnp.full((k,), init, jnp.float32)
    coeffs = lam if granularity == "task" else jax.tree.map(lambda b: lam if wtree.is_array(b) else b, base)
    opt = optimizer or optax.adam(1e-3)
    state = opt.init(coeffs)

    def loss(c, batches):
        merged = merge_with(base, tvs, c)
        return sum(_entropy(apply_fn(merged, x)) for x in batches) / len(batches)

    @jax.jit
    def step(c, s, batches):
        l, g = jax.value_and_grad(loss)(c, batches)
        u, s = opt.update(g, s, c)
        c = jax.tree.map(lambda v: jnp.clip(v, 0.0, 1.0), optax.apply_updates(c, u))
        return c, s, l

    losses, start = [], 0
    if checkpoint is not None:
        from ..io.manager import CheckpointManager

        if not isinstance(checkpoint, CheckpointManager):
            raise MergeError(f"checkpoint= takes a weightlab.io.CheckpointManager, got {type(checkpoint).__name__}")
        if checkpoint.latest_step() is not None:
            start = min(checkpoint.latest_step(), steps)
            st = checkpoint.restore(start, like={"coefficients": coeffs, "opt_state": state})
            coeffs, state = st["coefficients"], st["opt_state"]
    for i in range(start, steps):
        batches = [jnp.asarray(u[i % len(u)]) for u in unlabeled]
        coeffs, state, l = step(coeffs, state, batches)
        losses.append(l)
        if checkpoint is not None and (checkpoint.should_save(i + 1) or i + 1 == steps):
            checkpoint.save(i + 1, {"coefficients": coeffs, "opt_state": state}, force=True)
    if checkpoint is not None:
        checkpoint.wait()  # the last step is complete on disk when this returns (writes are asynchronous)
    return AdaMergingResult(merge_with(base, tvs, coeffs), coeffs, jnp.stack(losses) if losses else jnp.zeros(0))


@merge_method("adamerging", stream=False, extras=("unlabeled",), whole_model=True, paper="Yang et al. 2024 (AdaMerging)")
def adamerging(base, models, *, apply_fn: Callable, unlabeled: Sequence[Sequence[Any]], granularity: str = "layer",
               init: float = 0.3, steps: int = 100, optimizer: Any = None):
    """AdaMerging: task- or layer-wise coefficients learned by entropy minimisation on unlabeled data."""
    return adamerging_fit(base, models, apply_fn=apply_fn, unlabeled=unlabeled, granularity=granularity, init=init,
                          steps=steps, optimizer=optimizer).params
