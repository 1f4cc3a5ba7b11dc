"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022) for any model with an ``apply_fn(params, batch) -> logits``.

The diagonal Fisher of each model is estimated on its own data, ``F = E_x E_{y~p(y|x)}[(∇θ log
p(y|x))²]`` (``mode="expected"``, exact over the classes, as the paper) or with the given labels
(``mode="empirical"``). The merge is, per parameter entry, ``θ* = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i``,
with ``eps`` added to every Fisher so entries no model is sensitive to fall back to the weighted mean.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .registry import merge_method, per_model

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["diagonal_fisher", "fisher_merge"]


def diagonal_fisher(apply_fn: Callable, params, batches: Iterable[Any], *, labels: Iterable[Any] | None = None,
                    mode: str = "expected"):
    """Diagonal Fisher (same pytree as ``params``), averaged over all examples of ``batches``."""
    if mode not in ("expected", "empirical"):
        raise MergeError(f"mode must be 'expected' or 'empirical', got {mode!r}")
    batches = list(batches)
    labels = list(labels) if labels is not None else None
    if mode == "empirical" and (labels is None or len(labels) != len(batches)):
        raise MergeError("mode='empirical' needs one label array per batch")

    def logp(p, x, y):
        return jax.nn.log_softmax(apply_fn(p, x[None])[0])[y]

    per_ex = jax.vmap(jax.grad(logp), in_axes=(None, 0, 0))

    @jax.jit
    def batch_fisher(p, x, y):
        if mode == "empirical":
            g = per_ex(p, x, y)
            return jax.tree.map(lambda v: jnp.sum(v ** 2, axis=0), g)
        probs = jax.nn.softmax(apply_fn(p, x), axis=-1)  # (B, C)

        def for_class(c):
            g = per_ex(p, x, jnp.full((x.shape[0],), c))
            w = probs[:, c]
            return jax.tree.map(lambda v: jnp.einsum("b,b...->...", w, v ** 2), g)

        per_c = jax.lax.map(for_class, jnp.arange(probs.shape[-1]))
        return jax.tree.map(lambda v: jnp.sum(v, axis=0), per_c)

    total, n = None, 0
    for i, x in enumerate(batches):
        x = jnp.asarray(x)
        y = jnp.asarray(labels[i]) if labels is not None else jnp.zeros((x.shape[0],), jnp.int32)
        f = batch_fisher(params, x, y)
        total = f if total is None else jax.tree.map(jnp.add, total, f)
        n += x.shape[0]
    if total is None:
        raise MergeError("diagonal_fisher needs at least one batch")
    return jax.tree.map(lambda v: v / n, total)


@merge_method("fisher_merge", base="unused", per_model_params=("weight",), stream=False, extras=("fishers",),
              paper="Matena & Raffel 2022 (Fisher merging)")
def fisher_merge(base, models, *, fishers: Sequence[Any], weight=1.0, eps: float = 1e-8):
    """Fisher-weighted averaging ``Σ λ_i F_i θ_i / Σ λ_i F_i`` per entry (``fishers``: one diagonal
    Fisher per model, from :func:`diagonal_fisher`)."""
    n = wtree.num_models(models)
    if isinstance(fishers, (list, tuple)):
        if len(fishers) != n:
            raise MergeError(f"fisher: {len(fishers)} Fishers for {n} models (one per model)")
        ref = jax.tree.map(lambda s: s[0] if wtree.is_array(s) else s, models)
        for i, f in enumerate(fishers):
            wtree.check_compatible(ref, f, dtypes=False, names=("model[0]", f"fisher[{i}]"))
        fishers = wtree.stack([jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), f) for f in fishers])
    lam = jnp.asarray(per_model(weight, n, "weight"), jnp.float32)

    def one(t, f):
        if not wtree.is_array(t):
            return t
        w = lam.reshape((-1,) + (1,) * (t.ndim - 1)) * (f.astype(jnp.float32) + eps)
        return (jnp.sum(w * t.astype(jnp.float32), 0) / jnp.sum(w, 0)).astype(t.dtype)

    return jax.tree.map(one, models, fishers)
