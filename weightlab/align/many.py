"""Aligning three or more models to a common reference (MergeMany), cycle-consistently.

Ainsworth, Hayase & Srinivasa (ICLR 2023), Appendix "Merging many models" (MergeMany): every
model is matched in turn, in a random order, against the average of all the *other* (already
aligned) models, until no model's permutation changes in a full pass. Each model's permutation is
found relative to its original weights (warm-started from the previous round), so the result is
one permutation per model onto a shared frame: for any two models, ``pi_i`` followed by
``invert(pi_j)`` maps model i onto model j, and these maps compose consistently around every cycle
(matching pairs independently does not give that).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import AlignError
from .registry import METHODS, run_method
from .spec import Spec, identity_perms, permute

__all__ = ["merge_many", "MergeManyResult"]


class MergeManyResult(NamedTuple):
    """``merged``: the average of the aligned models; ``aligned``: each model permuted into the
    common frame; ``perms``: each model's permutations (model 0's frame is not special);
    ``rounds``: passes made; ``converged``: whether the last pass changed nothing (else
    ``max_rounds`` ran out, with a warning)."""

    merged: Any
    aligned: list
    perms: list
    rounds: int
    converged: bool = True


def _mean(trees: Sequence[Any]) -> Any:
    """Leafwise average in float32, returned in each leaf's dtype; integer leaves must agree."""
    def avg(path, *xs):
        x0 = jnp.asarray(xs[0])
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            if any(not bool(jnp.array_equal(x0, jnp.asarray(x))) for x in xs[1:]):
                raise AlignError(f"'{path}': an integer leaf differs between the models; it cannot be averaged")
            return x0
        return (sum(jnp.asarray(x, jnp.float32) for x in xs) / len(xs)).astype(x0.dtype)

    return wtree.map_with_path(avg, trees[0], *trees[1:])


def _deq(t):
    return jax.tree.map(lambda x: x.dequantize() if wtree.is_atomic(x) else x, t, is_leaf=wtree.is_atomic)


def merge_many(spec: Spec, models: Sequence[Any], *, key: jax.Array | None = None, max_rounds: int = 20,
               method: str = "weight_matching", apply_fn: Callable | None = None, batches=None,
               loss_fn: Callable | None = None, **hp) -> MergeManyResult:
    """Align ``models`` (>= 2; QArrays dequantized) to a common frame with MergeMany and average them.

    ``method``: any registered matcher (``weight_matching`` by default; data-driven matchers get
    ``apply_fn``/``batches``/``loss_fn`` and match against the running average of the others),
    ``hp`` its parameters; ``key`` drives the visiting order and the matcher; ``max_rounds`` bounds
    the passes. Returns :class:`MergeManyResult`. Merge the aligned models with any merge method
    afterwards (``merge.ties(None, result.aligned)``), or repair the average (:func:`repair`).
    """
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise AlignError(f"merge_many needs a list of at least 2 models, got {type(models).__name__}"
                         f"{' of ' + str(len(models)) if isinstance(models, (list, tuple)) else ''}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise AlignError(f"merge_many: max_rounds must be an integer >= 1, got {max_rounds!r}")
    METHODS[method]
    from .registry import as_batches

    batches = as_batches(batches)
    models = [_deq(m) for m in models]
    wtree.check_compatible(*models)
    key = jax.random.key(0) if key is None else key
    wtree.check_key(key)
    n = len(models)
    perms = [dict(identity_perms(spec)) for _ in range(n)]
    aligned = list(models)
    rounds = 0
    for r in range(max_rounds):
        rounds = r + 1
        changed = False
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, r), n))
        for i in (int(j) for j in order):
            others = _mean([aligned[j] for j in range(n) if j != i])
            extra = {"init": perms[i]} if method == "weight_matching" else {}
            found = run_method(method, spec, others, models[i], key=jax.random.fold_in(key, 1000 * r + i),
                               apply_fn=apply_fn, loss_fn=loss_fn, batches=batches, **extra, **hp)
            new = {g: jnp.asarray(found[g], jnp.int32) for g in spec.groups}
            if any(not bool(jnp.array_equal(new[g], perms[i][g])) for g in spec.groups):
                changed = True
            perms[i] = new
            aligned[i] = permute(spec, new, models[i])
        if not changed:
            break
    if changed:
        import warnings

        warnings.warn(f"merge_many: permutations still changed after max_rounds={max_rounds} passes (common with "
                      "data-driven matchers, whose targets move with every pass); the result is the last pass's",
                      stacklevel=2)
    return MergeManyResult(_mean(aligned), aligned, perms, rounds, not changed)
