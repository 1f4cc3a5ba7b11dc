"""LoRA-native merging and LoRA extraction, without forming dense ``in x out`` matrices where it
can be avoided.

A :class:`LoRA` leaf holds factors ``a`` (in, r) and ``b`` (r, out) with ``delta = a @ b`` in the
Flax ``(in, out)`` kernel layout; PEFT's scaling ``alpha / r`` is folded into ``a``
(:meth:`LoRA.from_peft` converts PEFT's ``lora_A`` (r, in) / ``lora_B`` (out, r)).

* :func:`extract_lora` (as mergekit's ``extract_lora`` / LoRA-extraction by truncated SVD, Eckart-
  Young): the best rank-r approximation of each matrix leaf of ``finetuned - base``; ``rank`` is an
  int, or a float in (0, 1) = the smallest rank keeping that fraction of the squared singular values
  (the Frobenius energy). Returns the LoRA tree and the relative Frobenius error per leaf.
* :func:`merge_loras` ``method="concat"``: the exact weighted sum ``sum_i w_i a_i b_i`` as one LoRA
  of rank ``sum_i r_i`` (task arithmetic in factor space); ``method="svd"``: that sum re-factored to
  rank ``rank`` via QR of the stacked factors and an SVD of the small (R x R) core, i.e. the best
  rank-``rank`` approximation of the dense sum at O((in + out) R^2) cost instead of O(in out R).
* :func:`apply_lora` adds (scaled) LoRA deltas to a base; :func:`lora_delta` densifies one leaf.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import MergeError

__all__ = ["LoRA", "extract_lora", "merge_factors", "merge_loras", "apply_lora", "lora_delta", "is_lora"]


class LoRA(NamedTuple):
    a: jax.Array  # (in, r)
    b: jax.Array  # (r, out)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @classmethod
    def from_peft(cls, lora_A, lora_B, alpha: float | None = None) -> "LoRA":
        """PEFT factors (``lora_A`` (r, in), ``lora_B`` (out, r), delta_W = B A alpha/r in (out, in))."""
        r = lora_A.shape[0]
        s = 1.0 if alpha is None else alpha / r
        return cls(jnp.asarray(lora_A).T * s, jnp.asarray(lora_B).T)


def is_lora(x) -> bool:
    return isinstance(x, LoRA)


def lora_delta(x: LoRA) -> jax.Array:
    return x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)


def _rank_for(s: np.ndarray, rank) -> int:
    if isinstance(rank, float) and 0 < rank < 1:
        e = np.cumsum(s.astype(np.float64) ** 2)
        return int(np.searchsorted(e, rank * e[-1]) + 1) if e[-1] > 0 else 1
    if isinstance(rank, (int, np.integer)) and rank >= 1:
        return int(min(rank, s.shape[0]))
    raise MergeError(f"rank must be an int >= 1 or a float energy fraction in (0, 1), got {rank!r}")


def _factor(d, rank):
    """Best rank-r factors (left (m, r), right (r, n)) of the matrix ``d`` and the relative Frobenius
    error of the approximation (``rank``: int or energy fraction, see :func:`extract_lora`)."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(d, jnp.float32), full_matrices=False)
    r = _rank_for(np.asarray(s), rank)
    root = jnp.sqrt(s[:r])
    tot = jnp.sum(s ** 2)
    err = float(jnp.sqrt(jnp.sum(s[r:] ** 2) / jnp.where(tot == 0, 1.0, tot)))
    return u[:, :r] * root, root[:, None] * vt[:r], err


def extract_lora(base, finetuned, rank=16, *, select: wtree.SelectorLike = None):
    """LoRA factors of ``finetuned - base`` for every 2-D leaf ``select`` picks (any
    :func:`weightlab.tree.selector`; default all). Other leaves hold the dense delta. QArray inputs
    are dequantized. Returns ``(tree, errors)`` with ``errors[path] = ||delta - a b||_F / ||delta||_F``."""
    from .registry import dequantized

    base, finetuned = dequantized(base), dequantized(finetuned)
    wtree.check_compatible(base, finetuned, names=("base_model", "finetuned"))
    pick = wtree.selector(select)
    errors = {}

    def one(path, b, f):
        if not wtree.is_array(b):
            return b
        d = f.astype(jnp.float32) - b.astype(jnp.float32)
        if b.ndim != 2 or not pick(path, b):
            return d
        a, b, errors[path] = _factor(d, rank)
        return LoRA(a, b)

    return wtree.map_with_path(one, base, finetuned), errors


def _refactor(a, b, rank):
    """Best rank-``rank`` factors of ``a @ b`` (a (in, R), b (R, out)) without the dense product."""
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b.T)
    u, s, vt = jnp.linalg.svd(ra @ rb.T)
    r = min(rank, s.shape[0])
    root = jnp.sqrt(s[:r])
    return LoRA(qa @ (u[:, :r] * root), (root[:, None] * vt[:r]) @ qb.T)


def merge_factors(xs: Sequence[LoRA], weights, method: str = "concat", rank: int | None = None) -> LoRA:
    """``sum_i w_i a_i b_i`` of one module's LoRAs in factor form: concatenated (exact) or re-factored
    to ``rank`` (default the largest input rank) by :func:`_refactor`."""
    a = jnp.concatenate([float(wi) * x.a.astype(jnp.float32) for wi, x in zip(weights, xs)], axis=1)
    b = jnp.concatenate([x.b.astype(jnp.float32) for x in xs], axis=0)
    if method == "svd":
        return _refactor(a, b, rank or max(x.rank for x in xs))
    return LoRA(a, b)


def merge_loras(loras: Sequence, weights=None, *, method: str = "concat", rank: int | None = None):
    """Weighted sum of several LoRA trees (same structure) kept in factor form.

    Non-LoRA leaves (dense deltas) are summed with the same weights. ``method``: ``"concat"``
    (exact, rank adds up) or ``"svd"`` (re-factor to ``rank``, default the largest input rank)."""
    if not loras:
        raise MergeError("no LoRAs to merge")
    n = len(loras)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise MergeError(f"weights needs {n} values (one per LoRA), got {np.shape(weights)}")
    if method not in ("concat", "svd"):
        raise MergeError(f"method must be 'concat' or 'svd', got {method!r}")
    flat = [wtree.flatten_with_paths(t, is_leaf=is_lora)[0] for t in loras]
    for i, f in enumerate(flat[1:], 1):
        if [p for p, _ in f] != [p for p, _ in flat[0]]:
            raise MergeError(f"LoRA tree {i} has different paths than LoRA tree 0")
    out = []
    for j, (path, x0) in enumerate(flat[0]):
        xs = [f[j][1] for f in flat]
        if is_lora(x0):
            if not all(is_lora(x) and x.a.shape[0] == x0.a.shape[0] and x.b.shape[1] == x0.b.shape[1] for x in xs):
                raise MergeError(f"'{path}': LoRA factors disagree in (in, out) shape across inputs")
            out.append(merge_factors(xs, w, method, rank))
        elif wtree.is_array(x0):
            out.append(sum(float(wi) * jnp.asarray(x, jnp.float32) for wi, x in zip(w, xs)))
        else:
            out.append(x0)
    treedef = jax.tree.structure(loras[0], is_leaf=is_lora)
    return jax.tree.unflatten(treedef, out)


def apply_lora(base, loras, scale: float = 1.0):
    """``base + scale * delta`` for every leaf (LoRA leaves densified one at a time)."""
    def one(b, d):
        if not wtree.is_array(b):
            return b
        delta = lora_delta(d) if is_lora(d) else jnp.asarray(d, jnp.float32)
        if delta.shape != b.shape:
            raise MergeError(f"LoRA delta shape {delta.shape} does not match the base leaf {b.shape}")
        return (b.astype(jnp.float32) + scale * delta).astype(b.dtype)

    return jax.tree.map(one, base, loras, is_leaf=is_lora)

