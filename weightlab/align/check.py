"""``check_spec``: does permuting by the spec really leave the function unchanged?

Hand-written permutation specs fail silently in the reference implementations (a forgotten bias
or a transposed kernel gives a model that is merely *worse* after alignment). This applies random
permutations of each group and compares outputs; a group that changes them is reported with the
leaves it moves and, when :func:`~weightlab.align.infer_spec` can trace the function, the leaf
axes the traced symmetry says are missing from (or wrongly in) the group.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import SymmetryError
from .spec import Spec, permute, random_perms, validate_leaves

__all__ = ["check_spec"]


def _relerr(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2)) for x, y in zip(la, lb))
    den = sum(float(jnp.sum(jnp.asarray(x, jnp.float32) ** 2)) for x in la)
    return float(np.sqrt(num / max(den, 1e-30)))


_CULPRIT = None


def _hint(spec: Spec, group: str, apply_fn, params, batch) -> str:
    """Leaf axes where ``group`` differs from the inferred symmetry containing its first axis."""
    global _CULPRIT
    from .infer import infer_spec

    _CULPRIT = None
    try:
        ref = infer_spec(apply_fn, params, batch)
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    mine = set(spec.leaves(group))
    p, a = next(iter(sorted(mine)))
    names = [f for f in ref.axes[p][a] if isinstance(f, str)]
    if not names:
        return f"; the traced function has no symmetry on '{p}' axis {a} at all"
    theirs = {pa for n in names for pa in ref.leaves(n)}
    missing = sorted(theirs - mine)
    extra = sorted(mine - theirs)
    _CULPRIT = (missing or extra or [None])[0]
    out = []
    if missing:
        out.append("missing from the group: " + ", ".join(f"'{q}' axis {b}" for q, b in missing[:6]))
    if extra:
        out.append("in the group but not in the traced symmetry: " + ", ".join(f"'{q}' axis {b}" for q, b in extra[:6]))
    return "; " + "; ".join(out) if out else ""


def _moving(perms: dict) -> dict:
    """Random permutations with no identity row (an identity draw would test nothing: a size-2
    group is the identity half the time); an identity row is rotated by one."""
    out = {}
    for n, p in perms.items():
        p = jnp.asarray(p)
        ident = jnp.all(p == jnp.arange(p.shape[-1]), axis=-1, keepdims=True)
        out[n] = jnp.where(ident, jnp.roll(p, 1, axis=-1), p)
    return out


def check_spec(spec: Spec, apply_fn: Callable, params: Any, batch: Any, *, key: jax.Array | None = None,
               rtol: float = 1e-5, trials: int = 2) -> float:
    """Verify that permuting ``params`` by random permutations of ``spec`` leaves
    ``apply_fn(params, batch)`` unchanged (relative error ``||f(pi theta) - f(theta)|| / ||f(theta)||
    <= rtol``). Returns the largest relative error seen.

    Each group is first tested on its own (``trials`` random permutations), so a failure names the
    group, its size and the leaves and axes it moves — plus, where the function can be traced, the
    leaf axes the traced symmetry would add or remove. Then all groups together. Raises
    :class:`~weightlab.errors.SymmetryError` (with ``.path`` and ``.axis`` of a leaf axis in the
    failing group) or :class:`~weightlab.errors.SpecError` when the spec does not fit the params.
    Use a batch of varied (random) inputs: symmetric inputs can hide a broken symmetry.
    """
    from .spec import check_is_spec

    check_is_spec(spec)
    pairs = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0]
    validate_leaves(spec, {p: tuple(x.shape) if wtree.is_atomic(x) else tuple(np.shape(x)) for p, x in pairs})
    key = jax.random.key(0) if key is None else key
    wtree.check_key(key)
    f = jax.jit(apply_fn)
    y0 = f(params, batch)
    if not all(bool(jnp.all(jnp.isfinite(jnp.asarray(y)))) for y in jax.tree.leaves(y0)):
        raise SymmetryError("check_spec: apply_fn(params, batch) is not finite; cannot compare outputs")
    worst = 0.0
    for t in range(trials):
        perms = _moving(random_perms(spec, jax.random.fold_in(key, t)))
        for g in spec.groups:
            sub = {g: perms[g]}
            err = _relerr(f(permute(spec, sub, params), batch), y0)
            worst = max(worst, err)
            if not err <= rtol:
                p, a = spec.leaves(g)[0] if spec.leaves(g) else (None, None)
                where = ", ".join(f"'{q}' axis {b}" for q, b in spec.leaves(g)[:8])
                hint = _hint(spec, g, apply_fn, params, batch)
                if _CULPRIT is not None:  # the leaf axis the traced symmetry says is wrong
                    p, a = _CULPRIT
                raise SymmetryError(
                    f"permuting group '{g}' (size {spec.groups[g].size}) changes the outputs (relative error "
                    f"{err:.3g} > {rtol:g}); it moves {where}{hint}", p, a)
        err = _relerr(f(permute(spec, perms, params), batch), y0)
        worst = max(worst, err)
        if not err <= rtol:
            raise SymmetryError(f"permuting all groups together changes the outputs (relative error {err:.3g} > "
                                f"{rtol:g}) although each group alone does not; check nested groups and shared axes")
    return worst
