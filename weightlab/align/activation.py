"""Activation matching: pair units whose activations on the same inputs correlate best.

Git Re-Basin (Ainsworth et al., ICLR 2023), Section 3.1, after Li et al. (2016) "Convergent
learning": for each group of units, run both models on the same data, accumulate the
cross-correlation of the two models' activations of those units, and solve one linear assignment
per group. Where the activations are read is found in the traced program, not from layer names:
every matmul or convolution operand whose contracted axis is exactly a group's units (the hidden
activations entering the next layer; for a transformer's residual stream, every normalised input
to a projection and the pooled features — all summed). Statistics are streamed over batches
(sums, sums of squares and cross products, in one compiled pass per batch for both models).

Groups with no such site — heads and the dims inside them, whose activations only reach a matmul
together with other factors — are matched by weight matching with the activation-matched groups
held fixed (head-aware, see :mod:`.matching`). ``normalize=True`` (default) uses Pearson
correlation, so units of different scale compete fairly; ``False`` is the raw ``E[a bᵀ]`` of the
paper.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .. import tree as wtree
from ..errors import AlignError
from . import lap
from .infer import _CALLS, _sub_jaxpr, analyse
from .matching import Perms, _scorer, flat_params, weight_matching
from .registry import align_method
from .registry import as_batches
from .spec import Spec, identity_perms

__all__ = ["activation_matching", "correlations"]


def _eval(jaxpr, consts, args, wanted: dict, seen: dict):
    """Evaluate ``jaxpr``; for each eqn in ``wanted`` ({id(eqn): [(operand, axis, group)]}) store the
    operand's values as rows x units in ``seen[group]`` (a list)."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        for k, axis, group in wanted.get(id(eqn), ()):
            x = jnp.moveaxis(ins[k], axis, -1)
            seen.setdefault(group, []).append(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        sub = _sub_jaxpr(eqn) if eqn.primitive.name in _CALLS else None
        if sub is not None:
            n_in = len(sub[0].invars)
            outs = _eval(sub[0], sub[1], ins[len(ins) - n_in:], wanted, seen)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def correlations(apply_fn: Callable, params_a: Any, params_b: Any, batches: Iterable[Any], *,
                 analysis=None, normalize: bool = True) -> dict[str, jax.Array]:
    """Per group with activation sites: the (n, n) matrix ``C[i, j]`` = correlation (or mean product)
    of unit ``i`` of model A with unit ``j`` of model B over every row of every batch."""
    batches = as_batches(batches)
    if not batches:
        raise AlignError("activation matching needs at least one batch")
    an = analysis or analyse(apply_fn, params_a, batches[0])
    wanted: dict = {}
    for group, sites in an.sites.items():
        for eqn, k, axis in sites:
            wanted.setdefault(id(eqn), []).append((k, axis, group))

    def stats(la, lb, bl):
        out = {}
        for leaves, tag in ((la, "a"), (lb, "b")):
            seen: dict = {}
            _eval(an.closed.jaxpr, an.closed.consts, list(leaves) + list(bl), wanted, seen)
            out[tag] = {g: jnp.concatenate(xs, axis=0) for g, xs in seen.items()}
        res = {}
        for g in out["a"]:
            xa, xb = out["a"][g], out["b"][g]
            res[g] = (xa.T @ xb, xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), jnp.float32(xa.shape[0]))
        return res

    f = jax.jit(stats)
    deq = lambda x: x.dequantize() if wtree.is_atomic(x) else x  # noqa: E731
    la = [deq(x) for _, x in wtree.flatten_with_paths(params_a, is_leaf=wtree.is_atomic)[0]]
    lb = [deq(x) for _, x in wtree.flatten_with_paths(params_b, is_leaf=wtree.is_atomic)[0]]
    total: dict = {}
    for b in batches:
        bl = jax.tree.leaves(b)
        for g, s in f(la, lb, bl).items():
            total[g] = s if g not in total else tuple(x + y for x, y in zip(total[g], s))
    out = {}
    for g, (ab, sa, sb, qa, qb, n) in total.items():
        if normalize:
            ma, mb = sa / n, sb / n
            cov = ab / n - jnp.outer(ma, mb)
            sd_a = jnp.sqrt(jnp.maximum(qa / n - ma * ma, 0.0)) + 1e-8
            sd_b = jnp.sqrt(jnp.maximum(qb / n - mb * mb, 0.0)) + 1e-8
            out[g] = cov / jnp.outer(sd_a, sd_b)
        else:
            out[g] = ab / n
    return out


@align_method("activation_matching", data="activations", paper="Ainsworth et al. 2023 (Git Re-Basin), Sec. 3.1")
def activation_matching(spec: Spec, apply_fn: Callable, params_a: Any, params_b: Any, batches: Iterable[Any], *,
                        key: jax.Array | None = None, normalize: bool = True, solver: str = "scipy",
                        max_iter: int = 100) -> Perms:
    """Permutations of ``params_b``'s units that best match ``params_a``'s activations on ``batches``.

    ``spec`` must be the symmetry of ``apply_fn`` (from :func:`infer_spec`, or hand-written with
    the same group names it infers: activation sites are located by tracing). Groups without an
    activation site (attention heads, dims within heads) fall back to weight matching with the
    others fixed; ``key``/``max_iter`` drive that step. Returns :class:`Perms` with ``objective``
    (the weight-matching objective of the result, for comparison) and ``sources`` ({group:
    "activation" | "weight"}).
    """
    if solver not in lap.SOLVERS:
        raise AlignError(f"activation_matching: unknown solver {solver!r}; choose one of {lap.SOLVERS}")
    flat_params(spec, params_a, "params_a")
    flat_params(spec, params_b, "params_b")
    wtree.check_compatible(params_a, params_b)
    batches = as_batches(batches)
    if not batches:
        raise AlignError("activation_matching needs at least one batch")
    an = analyse(apply_fn, params_a, batches[0])
    unknown = sorted(set(an.sites) - set(spec.groups))
    sites = {g: s for g, s in an.sites.items() if g in spec.groups}
    if unknown and not sites:
        raise AlignError(f"activation_matching: the spec's groups {sorted(spec.groups)[:4]} ... are not the ones "
                         f"traced from apply_fn ({sorted(an.sites)[:4]} ...); use infer_spec(apply_fn, ...)")
    an = an._replace(sites=sites)
    corr = correlations(apply_fn, params_a, params_b, batches, analysis=an, normalize=normalize)
    perms = {g: lap.solve(c, solver) for g, c in corr.items()}
    # ties (units with no activation variance on this data: correlation 0 with everything) are
    # broken by the weights: a small multiple of the weight-matching score, others at these perms
    fa, fb = flat_params(spec, params_a, "params_a"), flat_params(spec, params_b, "params_b")
    sc = _scorer(spec)
    full = {**identity_perms(spec), **perms}
    for g, c in corr.items():
        w, pairs = sc._fn(g)(full, fa, fb)
        if pairs:
            continue
        w = w / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
        perms[g] = full[g] = lap.solve(c + 1e-3 * w, solver)
    out = weight_matching(spec, params_a, params_b, key=key, init=perms, fixed=tuple(perms), solver=solver,
                          max_iter=max_iter)
    res = Perms(out)
    res.objective, res.history, res.restarts = out.objective, out.history, out.restarts
    res.sources = {g: ("activation" if g in perms else "weight") for g in spec.groups}
    return res
