"""Weight matching (Git Re-Basin), head-aware, with restarts — and the cost machinery the other
matchers share.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries" (ICLR
2023), Algorithm 1: find permutations ``pi`` of model B's units maximising
``sum_leaves <W_a, pi(W_b)>``. Coordinate descent: for one group at a time, with every other group
fixed, the objective is linear in that group's permutation, ``sum_i S[i, pi[i]]`` with
``S = sum over the leaf axes it moves of A_axis @ B_axis^T`` (each leaf reshaped to (units, rest),
B already permuted by the other groups), so one linear assignment solves it exactly. Groups are
visited in a random order (from ``key``) until a full pass improves nothing.

Deliberate differences from the reference code: cost matrices are built with JAX (jit-compiled per
group) and solved by a choice of solvers (:mod:`.lap`); several restarts from random permutations
keep the best objective; and nested groups (dims within attention heads) are matched head-aware:
a top-level group with nested groups scores each pair (head i of A, head j of B) by the best inner
assignment of each nested group (one small assignment per pair, batched), assigns heads with those
scores, then re-solves the inner assignments — so heads move as units and their dims follow.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import AlignError
from . import lap
from .registry import align_method
from .spec import Spec, axis_index, identity_perms, random_perms, validate_leaves

__all__ = ["Perms", "weight_matching", "flat_params", "objective", "group_score", "permute_flat"]


class Perms(dict):
    """``{group: permutation}`` plus how it was found: ``objective`` (the matched similarity),
    ``history`` (objective after each pass of the best restart), ``restarts`` (each restart's final
    objective)."""

    objective: float = float("nan")
    history: tuple = ()
    restarts: tuple = ()

    def __repr__(self) -> str:
        return f"Perms({len(self)} groups, objective={self.objective:.6g})"


def flat_params(spec: Spec, params: Any, what: str) -> dict[str, jax.Array]:
    """Leaves of ``params`` by path, QArrays dequantized, float32; checked against ``spec``."""
    pairs = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0]
    validate_leaves(spec, {p: tuple(x.shape) if wtree.is_atomic(x) else tuple(np.shape(x)) for p, x in pairs})
    out = {}
    for p, x in pairs:
        if isinstance(x, jax.core.Tracer):
            raise AlignError(f"'{p}' is traced: matching runs on the host (assignment solvers, convergence loops), so "
                             "call it outside jax.jit / vmap; jit the permuted model afterwards")
        if spec.leaves_of(p):
            x = x.dequantize() if wtree.is_atomic(x) else jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise AlignError(f"'{p}' in {what}: a permuted leaf must be floating point, found {x.dtype}")
            out[p] = x.astype(jnp.float32)
    return out


def permute_flat(spec: Spec, perms: Mapping[str, Any], flat: Mapping[str, jax.Array], skip=()) -> dict:
    """``flat`` leaves permuted by ``perms`` (groups in ``skip`` left out)."""
    perms = {n: p for n, p in perms.items() if n not in skip}
    out = {}
    for p, x in flat.items():
        for a, fs in enumerate(spec.axes[p]):
            idx = axis_index(spec, fs, perms, x.shape[a])
            if idx is not None:
                x = jnp.take(x, idx, axis=a)
        out[p] = x
    return out


def objective(spec: Spec, perms, fa: Any, fb: Any) -> float:
    """``sum <A, pi(B)>`` over every leaf some group moves (params trees, or flat dicts from
    :func:`flat_params`)."""
    if not (isinstance(fa, Mapping) and set(fa) <= set(spec.axes)):
        fa = flat_params(spec, fa, "params_a")
    if not (isinstance(fb, Mapping) and set(fb) <= set(spec.axes)):
        fb = flat_params(spec, fb, "params_b")
    pb = permute_flat(spec, perms, fb)
    return float(sum(jnp.vdot(fa[p], pb[p]) for p in fa))


def _unit_view(spec: Spec, x, path: str, axis: int, group: str, inner: str | None = None):
    """``x`` with ``group``'s factor of ``axis`` first (and ``inner``'s second), the rest flattened."""
    fs = spec.axes[path][axis]
    sizes = [f if isinstance(f, int) else spec.groups[f].size for f in fs]
    y = x.reshape(x.shape[:axis] + tuple(sizes) + x.shape[axis + 1:])
    front = [axis + fs.index(group)] + ([axis + fs.index(inner)] if inner else [])
    y = jnp.moveaxis(y, front, list(range(len(front))))
    return y.reshape(y.shape[:len(front)] + (-1,))


def group_score(spec: Spec, group: str, fa, pb) -> jax.Array:
    """S[i, j] = sum over the group's leaf axes of <A unit i, B unit j> (B already permuted by the
    other groups). For a nested group: (parent_size, size, size), one score matrix per parent
    position (A and B aligned on the parent)."""
    g = spec.groups[group]
    total = None
    for p, a in spec.leaves(group):
        if g.parent is None:
            s = _unit_view(spec, fa[p], p, a, group) @ _unit_view(spec, pb[p], p, a, group).T
        else:
            va = _unit_view(spec, fa[p], p, a, g.parent, group)
            vb = _unit_view(spec, pb[p], p, a, g.parent, group)
            s = jnp.einsum("hir,hjr->hij", va, vb)
        total = s if total is None else total + s
    return total


def _pair_scores(spec: Spec, parent: str, child: str, fa, pb) -> jax.Array:
    """(n, n, m, m): for head i of A and head j of B, the inner score matrix of ``child``."""
    total = None
    for p, a in spec.leaves(child):
        va = _unit_view(spec, fa[p], p, a, parent, child)
        vb = _unit_view(spec, pb[p], p, a, parent, child)
        s = jnp.einsum("ipr,jqr->ijpq", va, vb)
        total = s if total is None else total + s
    return total


def _solve_value(s, solver):
    perm = lap.solve(s, solver)
    return perm, jnp.take_along_axis(s, perm[..., None], axis=-1)[..., 0].sum(-1)


def _scorer(spec: Spec) -> "_Scorer":
    """The compiled scorer of ``spec``, kept on the spec (so repeated matchings with one spec
    compile once, and the scorer goes when the spec goes)."""
    sc = getattr(spec, "_scorer", None)
    if sc is None:
        sc = _Scorer(spec)
        object.__setattr__(spec, "_scorer", sc)
    return sc


class _Scorer:
    """Per-group score builders, jit-compiled once per group (and the objective)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.kids = {n: [c for c, g in spec.groups.items() if g.parent == n] for n in spec.groups}
        self._jit: dict = {}
        self.objective = jax.jit(lambda perms, fa, fb: sum(jnp.vdot(fa[p], x) for p, x in
                                                           permute_flat(spec, perms, fb).items()))

    def _fn(self, group):
        if group not in self._jit:
            spec, kids = self.spec, self.kids[group]
            g = spec.groups[group]

            def scores(perms, fa, fb):
                if g.parent is not None:
                    return group_score(spec, group, fa, permute_flat(spec, perms, fb, skip=(group,))), ()
                pb = permute_flat(spec, perms, fb, skip=(group, *kids))
                if not kids:
                    return group_score(spec, group, fa, pb), ()
                return _direct_score(spec, group, kids, fa, pb), tuple(_pair_scores(spec, group, c, fa, pb)
                                                                        for c in kids)

            self._jit[group] = jax.jit(scores)
        return self._jit[group]

    def update(self, group: str, perms: dict, fa, fb, solver: str, fixed=()) -> dict:
        """New permutations for ``group`` (and its nested groups) with every other group fixed; a
        top-level group with nested groups is assigned head-aware (see the module docstring). A
        nested group in ``fixed`` keeps its permutation (indexed by the new head position), and
        the head pairs are scored with it."""
        score, pairs = self._fn(group)(perms, fa, fb)
        if not pairs:
            return {group: lap.solve(score, solver)}
        for c, ps in zip(self.kids[group], pairs):
            if c in fixed:  # pair (i, j) with head i's fixed inner order: sum_p ps[i, j, p, pi[i, p]]
                pi = jnp.broadcast_to(perms[c][:, None, :, None], ps.shape[:3] + (1,))
                score = score + jnp.take_along_axis(ps, pi, axis=3)[..., 0].sum(-1)
            else:
                score = score + _solve_value(ps, solver)[1]
        heads = lap.solve(score, solver)
        new = {group: heads}
        for c, ps in zip(self.kids[group], pairs):
            if c not in fixed:
                new[c] = lap.solve(ps[jnp.arange(ps.shape[0]), heads], solver)
        return new


def _direct_score(spec: Spec, group: str, kids: list[str], fa, pb) -> jax.Array:
    """Head-pair score from the leaf axes where ``group`` appears without any nested group."""
    n = spec.groups[group].size
    total = jnp.zeros((n, n), jnp.float32)
    for p, a in spec.leaves(group):
        if not any(k in spec.axes[p][a] for k in kids):
            total = total + _unit_view(spec, fa[p], p, a, group) @ _unit_view(spec, pb[p], p, a, group).T
    return total


@align_method("weight_matching", paper="Ainsworth et al. 2023 (Git Re-Basin), Alg. 1")
def weight_matching(spec: Spec, params_a: Any, params_b: Any, *, key: jax.Array | None = None, max_iter: int = 100,
                    restarts: int = 1, solver: str = "scipy", init: Mapping[str, Any] | None = None,
                    tol: float = 1e-7, fixed: tuple = ()) -> Perms:
    """Permutations of ``params_b``'s units that best match ``params_a`` (Git Re-Basin weight matching).

    ``spec``: from :func:`infer_spec` or :func:`make_spec`. ``key``: the random visiting order and
    the restarts' random starts (default ``jax.random.key(0)``); ``restarts``: independent runs
    (the first from ``init`` or the identity, the others from random permutations), the best kept;
    ``max_iter``: passes over all groups per run; ``solver``: ``"scipy"``, ``"hungarian"`` or
    ``"auction"`` (:mod:`weightlab.align.lap`); ``tol``: a pass must raise the objective by more
    than ``tol`` times its magnitude to continue; ``fixed``: groups kept at ``init`` (e.g. groups
    another matcher solved). Returns :class:`Perms` (a dict
    ``{group: int array}`` for :func:`permute`) with the ``objective`` and its ``history``.
    QArray leaves are matched on their dequantized values. Raises :class:`SpecError` /
    :class:`AlignError` for params that do not fit the spec or each other, before any solving.
    """
    if solver not in lap.SOLVERS:
        raise AlignError(f"weight_matching: unknown solver {solver!r}; choose one of {lap.SOLVERS}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise AlignError(f"weight_matching: restarts must be an integer >= 1, got {restarts!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise AlignError(f"weight_matching: max_iter must be an integer >= 1, got {max_iter!r}")
    fa, fb = flat_params(spec, params_a, "params_a"), flat_params(spec, params_b, "params_b")
    if not spec.groups:
        import warnings

        warnings.warn("weight_matching: the spec has no permutation groups (everything is pinned; see spec.report): "
                      "nothing to align", stacklevel=2)
    key = jax.random.key(0) if key is None else key
    wtree.check_key(key)
    start = dict(identity_perms(spec))
    if init is not None:
        from .spec import check_perms

        check_perms(spec, init)
        start.update({n: jnp.asarray(v, jnp.int32) for n, v in init.items()})
    bad = [g for g in fixed if g not in spec.groups]
    if bad:
        raise AlignError(f"weight_matching: fixed= names unknown group(s) {bad}")
    names = [n for n in spec.groups if n not in fixed]
    sc = _scorer(spec)
    best, finals = None, []
    for r in range(restarts):
        rk = jax.random.fold_in(key, r)
        perms = dict(start) if r == 0 else {**random_perms(spec, jax.random.fold_in(rk, 10**6)),
                                            **{n: start[n] for n in fixed}}
        if not names:
            best = (perms, float(sc.objective(perms, fa, fb)), ())
            break
        obj = float(sc.objective(perms, fa, fb))
        hist = [obj]
        for it in range(max_iter):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(rk, it), len(names)))
            before = obj
            for i in order:
                cand = dict(perms)
                cand.update({k: v for k, v in sc.update(names[int(i)], perms, fa, fb, solver, fixed).items()
                             if k not in fixed})
                new = float(sc.objective(cand, fa, fb))
                if new >= obj - 1e-9 * max(abs(obj), 1.0):
                    perms, obj = cand, new
            hist.append(obj)
            if obj - before <= tol * max(abs(before), 1.0):
                break
        finals.append(obj)
        if best is None or obj > best[1]:
            best = (perms, obj, tuple(hist))
    out = Perms({n: jnp.asarray(v, jnp.int32) for n, v in best[0].items()})
    out.objective, out.history, out.restarts = best[1], best[2], tuple(finals)
    return out
