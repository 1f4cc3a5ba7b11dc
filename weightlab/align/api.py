"""The plain-function face of alignment: align one model to another, or align-then-merge a set.

>>> spec = align.infer_spec(apply_fn, params_a, batch)
>>> params_b2, perms = align.align(params_b, params_a, spec=spec)              # weight matching
>>> merged = align.align_and_merge([a, b, c], spec=spec, merge="ties", base=None)

:func:`align_and_merge` is the recipe of existing steps: alignment (a pair: ``params`` onto the
first model; three or more: MergeMany to a common frame), the merge (any method of
:mod:`weightlab.merge`, by name, over the aligned models), and optionally REPAIR of the result
(Jordan et al. 2023) when ``apply_fn`` and ``repair_batches`` are given.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import AlignError
from .registry import run_method

__all__ = ["align", "align_and_merge"]


def align(params: Any, reference: Any, *, spec=None, method: str = "weight_matching", apply_fn: Callable | None = None,
          batches=None, loss_fn: Callable | None = None, key=None, **hp):
    """``(params permuted to match reference, perms)``; ``spec`` defaults to
    :func:`~weightlab.align.infer_spec` on ``apply_fn`` and the first of ``batches``."""
    from .infer import infer_spec
    from .spec import permute

    from .registry import as_batches

    batches = as_batches(batches)
    if spec is None:
        if apply_fn is None or not batches:
            raise AlignError("align: give spec=, or apply_fn= and batches= to infer it")
        spec = infer_spec(apply_fn, reference, batches[0])
    perms = run_method(method, spec, reference, params, key=key, apply_fn=apply_fn, loss_fn=loss_fn,
                       batches=batches, **hp)
    return permute(spec, perms, params), perms


def align_and_merge(models: Sequence[Any], *, spec=None, method: str = "weight_matching", merge: str = "linear",
                    base: Any = None, apply_fn: Callable | None = None, batches=None,
                    repair_batches=None, key=None, merge_kwargs: dict | None = None, **hp):
    """Align ``models`` to a common frame, merge them with ``merge`` (a :mod:`weightlab.merge`
    method name; ``base`` and ``merge_kwargs`` passed on; ``base="first"``: the aligned first model
    is the base and the others are merged onto it, for task-vector methods such as TIES), and REPAIR the result on
    ``repair_batches`` when given (needs ``apply_fn``). ``method``/``hp``: the matcher. Returns the
    merged params. Two models: the second is aligned to the first; more: :func:`merge_many`.
    """
    from .. import merge as wmerge
    from .infer import infer_spec
    from .many import merge_many
    from .renorm import repair

    from .registry import as_batches

    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise AlignError("align_and_merge needs a list of at least 2 models")
    batches, repair_batches = as_batches(batches), as_batches(repair_batches, "repair_batches")
    if merge not in wmerge.METHODS:
        wmerge.METHODS[merge]  # raises with suggestions
    if repair_batches is not None and apply_fn is None:
        raise AlignError("align_and_merge: repair_batches= needs apply_fn=")
    if spec is None:
        if apply_fn is None or not (batches or repair_batches):
            raise AlignError("align_and_merge: give spec=, or apply_fn= and batches= to infer it")
        spec = infer_spec(apply_fn, models[0], (batches or repair_batches)[0])
    if len(models) == 2:
        b, _ = align(models[1], models[0], spec=spec, method=method, apply_fn=apply_fn, batches=batches, key=key, **hp)
        aligned = [models[0], b]
    else:
        aligned = merge_many(spec, list(models), key=key, method=method, apply_fn=apply_fn, batches=batches,
                             **hp).aligned
    frame = aligned
    if isinstance(base, str) and base == "first":  # the first model is the base; the others its "fine-tunes"
        base, aligned = aligned[0], aligned[1:]
    merged = wmerge.METHODS[merge].fn(base, aligned, **(merge_kwargs or {}))
    if repair_batches is not None:
        merged = repair(apply_fn, merged, frame, repair_batches)
    return merged
