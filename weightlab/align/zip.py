"""ZipIt-style merging: units matched by activation correlation *within and across* models.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training" (ICLR 2024). A permutation pairs each unit of A with one of B; ZipIt instead
pools the 2n units of both models and greedily merges the most correlated pairs — two units of
the same model may merge when they are redundant — until n units remain. A *merge* matrix M
(n x 2n, 1/2 on each pair) averages the producing weights of a pair (kernel output axes, biases,
norm scales); an *unmerge* matrix U (2n x n) sends a merged unit back to the places of both members,
so each model's consuming weights (the next layer's input axis) read the merged units; consuming
weights of the two models are then averaged. With ``within=False`` only cross-model pairs merge
and the result equals permutation alignment followed by averaging.

Which axes produce and which consume units is read off the traced program (a parameter axis
contracted with activations consumes; every other labelled axis produces). Deliberate
differences from the paper: "partial zipping" here means zipping only the ``groups`` given (the
other groups are aligned by weight matching and averaged) rather than stopping at a layer and
keeping two model heads — a pure ``apply_fn`` cannot grow a second branch; nested groups (dims
inside attention heads) are always aligned by permutation; ZipIt's same-model budget ``beta`` is
the boolean ``within``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import AlignError
from .activation import _eval
from .infer import analyse
from .matching import weight_matching
from .registry import as_batches
from .spec import Spec, permute

__all__ = ["zip_models", "zip_pairs"]


def zip_pairs(corr: np.ndarray, within: bool = True) -> np.ndarray:
    """Greedy ZipIt pairing of 2n units by correlation ``corr`` (2n, 2n; A's units first): returns
    ``pairs`` (n, 2), the highest remaining correlation first. ``within=False`` forbids pairs of
    two units of the same model."""
    c = np.array(corr, np.float64)
    m = c.shape[0]
    n = m // 2
    np.fill_diagonal(c, -np.inf)
    if not within:
        c[:n, :n] = -np.inf
        c[n:, n:] = -np.inf
    c = np.where(np.isnan(c), -1.0, c)
    pairs = []
    alive = np.ones(m, bool)
    for _ in range(n):
        k = int(np.argmax(c))
        i, j = divmod(k, m)
        if not np.isfinite(c[i, j]):  # only same-model pairs left while within=False: cannot happen
            raise AlignError("zip: no admissible pair left")
        pairs.append((i, j))
        alive[[i, j]] = False
        c[[i, j], :] = -np.inf
        c[:, [i, j]] = -np.inf
    return np.array(pairs)


def _full_correlation(an, params_a, params_b, batches, group_sites) -> dict:
    wanted: dict = {}
    for g, sites in group_sites.items():
        for eqn, k, axis in sites:
            wanted.setdefault(id(eqn), []).append((k, axis, g))

    def stats(la, lb, bl):
        out = {}
        for leaves, tag in ((la, 0), (lb, 1)):
            seen: dict = {}
            _eval(an.closed.jaxpr, an.closed.consts, list(leaves) + list(bl), wanted, seen)
            out[tag] = {g: jnp.concatenate(xs, axis=0) for g, xs in seen.items()}
        res = {}
        for g in out[0]:
            x = jnp.concatenate([out[0][g], out[1][g]], axis=1)
            res[g] = (x.T @ x, x.sum(0), jnp.float32(x.shape[0]))
        return res

    f = jax.jit(stats)
    la = [x for _, x in wtree.flatten_with_paths(params_a)[0]]
    lb = [x for _, x in wtree.flatten_with_paths(params_b)[0]]
    total: dict = {}
    for b in batches:
        for g, s in f(la, lb, jax.tree.leaves(b)).items():
            total[g] = s if g not in total else tuple(u + v for u, v in zip(total[g], s))
    out = {}
    for g, (xx, sx, n) in total.items():
        mean = np.asarray(sx, np.float64) / float(n)
        cov = np.asarray(xx, np.float64) / float(n) - np.outer(mean, mean)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0)) + 1e-8
        out[g] = cov / np.outer(sd, sd)
    return out


def zip_models(spec: Spec, apply_fn: Callable, params_a: Any, params_b: Any, batches: Iterable[Any], *,
               groups: Sequence[str] | None = None, within: bool = True, key: jax.Array | None = None) -> Any:
    """Merge two models of one architecture ZipIt-style (see the module docstring) and return the
    merged params (same structure and shapes as either model).

    ``groups``: the groups to zip (default: every top-level group whose activations the program
    exposes, i.e. every group activation matching can read); the others are aligned by weight
    matching (``key``) and averaged. ``within``: allow merging two units of the same model.
    """
    batches = as_batches(batches)
    if not batches:
        raise AlignError("zip_models needs at least one batch")
    for p, x in wtree.flatten_with_paths(params_a, is_leaf=wtree.is_atomic)[0] + \
            wtree.flatten_with_paths(params_b, is_leaf=wtree.is_atomic)[0]:
        if wtree.is_atomic(x):
            raise AlignError(f"'{p}' is quantized: zip_models averages weights, dequantize first")
    wtree.check_compatible(params_a, params_b)
    an = analyse(apply_fn, params_a, batches[0])
    nested = {g.parent for g in spec.groups.values() if g.parent} | {n for n, g in spec.groups.items() if g.parent}
    zippable = [g for g in spec.groups if g in an.sites and g not in nested
                and all(spec.axes[p][a] == (g,) for p, a in spec.leaves(g))]
    if groups is None:
        groups = zippable
    bad = [g for g in groups if g not in zippable]
    if bad:
        raise AlignError(f"zip_models cannot zip group(s) {bad}: a zipped group must be top-level, fill whole axes "
                         f"and have activations the program exposes (zippable: {zippable})")
    # 1. align B to A on the other groups (and start the zipped ones from the same alignment)
    perms = weight_matching(spec, params_a, params_b, key=key)
    pb = permute(spec, perms, params_b)
    # 2. pair units by correlation and build merge / unmerge matrices
    corr = _full_correlation(an, params_a, pb, batches, {g: an.sites[g] for g in groups})
    mats = {}
    for g in groups:
        n = spec.groups[g].size
        pairs = zip_pairs(corr[g], within)
        pairs = pairs[np.argsort(pairs.min(axis=1))]  # merged units in A's order where A's units lead
        merge = np.zeros((n, 2 * n), np.float32)
        unmerge = np.zeros((2 * n, n), np.float32)
        for k, (i, j) in enumerate(pairs):
            merge[k, [i, j]] = 0.5
            unmerge[[i, j], k] = 1.0
        mats[g] = (jnp.asarray(merge), jnp.asarray(unmerge))
    # 3. apply: consuming axes read merged units through U, producing axes average pairs through M
    fa = dict(wtree.flatten_with_paths(params_a)[0])
    out = {}
    for p, xb in wtree.flatten_with_paths(pb)[0]:
        xa = fa[p]
        xa, xb = jnp.asarray(xa, jnp.float32), jnp.asarray(xb, jnp.float32)
        produce = None
        for a, fs in enumerate(spec.axes[p]):
            if len(fs) != 1 or fs[0] not in mats:
                continue
            m, u = mats[fs[0]]
            n = u.shape[1]
            if (p, a) in an.consumed:
                xa = jnp.moveaxis(jnp.tensordot(u[:n].T, jnp.moveaxis(xa, a, 0), axes=1), 0, a)
                xb = jnp.moveaxis(jnp.tensordot(u[n:].T, jnp.moveaxis(xb, a, 0), axes=1), 0, a)
            elif produce is None:
                produce = (a, m)
        if produce is None:
            merged = 0.5 * (xa + xb)
        else:
            a, m = produce
            both = jnp.concatenate([xa, xb], axis=a)
            merged = jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(both, a, 0), axes=1), 0, a)
        out[p] = merged.astype(jnp.result_type(fa[p]))
    return wtree.from_flat_dict(out, like=params_a)
