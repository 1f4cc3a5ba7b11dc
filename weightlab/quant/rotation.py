"""Incoherence processing: random orthogonal / randomized Hadamard rotations of any size.

QuIP (Chee et al., 2023), QuIP# (Tseng et al., 2024) and QuaRot (Ashkboos et al., 2024) multiply
weights by random orthogonal matrices so that outliers are spread over all coordinates before
rounding; since ``x W = (x R)(Rᵀ W)`` for orthogonal R, the function is unchanged once the inverse
is folded into the neighbour (or applied online to the activations).

``random_hadamard(n, key)``: for n = 2^a · m, the Kronecker product of a random m x m orthogonal
matrix (QR of a Gaussian) with the normalised 2^a Walsh-Hadamard matrix, times random signs — so
any dimension works (384 = 3 · 128, 1536 = 3 · 512), and for powers of two it is the usual
randomized Hadamard transform.

Three ways to use it:
* :func:`rotate` wraps any quantizer transform (``quant.rotate(quant.gptq(bits=3))``): every 2-D
  weight it sees is rotated over its input axis by R drawn from the ``key`` extra folded with the
  leaf's path, calibration statistics are rotated with it (``Rᵀ XᵀX R``), and R is kept as the
  QArray's ``pre`` input transform (QuaRot's "online" rotation): ``x @ W_eff = (x R) @ dequant(Q(Rᵀ W))``.
  Works for any model, no graph needed.
* :func:`rotate_quantize` does the same for one array and a quantize function.
* :func:`fold_rotation` rewrites a producer/consumer pair exactly (``W_prev ← W_prev R``,
  ``b_prev ← b_prev R``, ``W_next ← Rᵀ W_next``) when nothing nonlinear sits between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..core import WeightTransform
from ..errors import MissingExtraError, QuantizationError, ShapeMismatchError
from .qarray import QArray, is_qarray

__all__ = ["walsh_hadamard", "random_hadamard", "rotate", "rotate_quantize", "fold_rotation"]


def walsh_hadamard(n: int) -> np.ndarray:
    """Normalised Sylvester-Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise QuantizationError(f"walsh_hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def random_hadamard(n: int, key: jax.Array) -> jax.Array:
    """Random orthogonal n x n matrix with Hadamard structure on the largest power-of-two factor."""
    a = n & (-n)  # largest power of two dividing n
    m = n // a
    k1, k2 = jax.random.split(key)
    h = jnp.asarray(walsh_hadamard(a), jnp.float32)
    if m > 1:
        q, r = jnp.linalg.qr(jax.random.normal(k1, (m, m)))
        q = q * jnp.sign(jnp.diagonal(r))[None, :]
        h = jnp.kron(q, h)
    signs = jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), 1.0, -1.0)
    return h * signs[None, :]


def rotate_quantize(w, key: jax.Array, quantize_fn, *, axis: int = -2, path: str = "", **kwargs) -> QArray:
    """Quantize ``Rᵀ W`` (R random Hadamard over the input axis) with ``quantize_fn`` (e.g.
    ``quantize_rtn`` or ``gptq_quantize``; a ``hessian=`` keyword is rotated to ``Rᵀ H R``, the
    Hessian of the rotated inputs ``x R``) and keep R as the QArray's online input rotation."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"'{path}': rotation needs a 2-D weight, found {w.shape}")
    ax = axis % 2
    k = w.shape[ax]
    r = random_hadamard(k, key)
    wr = r.T @ w if ax == 0 else w @ r
    if kwargs.get("hessian") is not None:
        kwargs["hessian"] = r.T @ jnp.asarray(kwargs["hessian"], jnp.float32) @ r
    q = quantize_fn(wr.astype(w.dtype), axis=axis, path=path, **kwargs)
    return q.replace(pre=r.astype(jnp.float32))


def fold_rotation(w_prev, b_prev, w_next, r):
    """Exact rewrite of ``(x W_prev + b_prev) W_next`` with R folded in: returns
    ``(W_prev R, b_prev R, Rᵀ W_next)``; layouts are (in, out)."""
    k = r.shape[0]
    if w_prev.shape[-1] != k or w_next.shape[0] != k:
        raise ShapeMismatchError("rotation", (k,), (w_prev.shape[-1], w_next.shape[0]))
    return w_prev @ r, (None if b_prev is None else b_prev @ r), r.T @ w_next


def _input_axis(path, x, stats, axis):
    if axis is not None:
        return axis % 2
    st = (stats or {}).get(path)
    return 0 if st is None else st.axis


def _fold_pre(q: QArray, r) -> QArray:
    """Compose R with what the inner quantizer already put on the input side (AWQ's diag scale,
    a low-rank correction): W = R · W' = (R P') dequant + (R A) B."""
    pre = r if q.pre is None else (r * q.pre.astype(jnp.float32)[None, :] if q.pre.ndim == 1
                                   else r @ q.pre.astype(jnp.float32))
    lr_a = None if q.lr_a is None else (r @ q.lr_a.astype(jnp.float32)).astype(q.lr_a.dtype)
    return q.replace(pre=pre.astype(jnp.float32), lr_a=lr_a)


def rotate(inner: WeightTransform, *, axis: int | None = None, salt: str = "rotate") -> WeightTransform:
    """``inner`` (a quantizer transform) applied to randomly rotated weights, R kept in the QArray.

    Each 2-D weight leaf is rotated over its input axis (``axis``; default: the axis the ``stats=``
    extra saw contracted, else 0 = the (in, out) layout) by :func:`random_hadamard` with the key
    ``leaf_key(key, path, salt)``; its statistics (if any) become ``Rᵀ XᵀX R``. Needs ``key=``.
    """
    def apply(params, state, **extras):
        key, stats = extras.get("key"), extras.get("stats")
        if key is None:
            raise MissingExtraError("rotate(...) is random: call apply(..., key=jax.random.key(n))")
        pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
        leaves, rots, new_stats = [x for _, x in pairs], {}, dict(stats or {})
        for i, (p, x) in enumerate(pairs):
            if not wtree.is_array(x) or np.ndim(x) != 2:
                continue
            ax = _input_axis(p, x, stats, axis)
            r = random_hadamard(x.shape[ax], wtree.leaf_key(key, p, salt))
            w = jnp.asarray(x, jnp.float32)
            leaves[i] = (r.T @ w if ax == 0 else w @ r).astype(x.dtype)
            rots[p] = r
            if p in new_stats:
                new_stats[p] = new_stats[p].rotated(r)
        extras = dict(extras, stats=new_stats if stats is not None else None)
        out, state = inner.apply(treedef.unflatten(leaves), state, **extras)
        out_leaves = treedef.flatten_up_to(out)
        for i, (p, _) in enumerate(pairs):
            if p in rots:
                if not is_qarray(out_leaves[i]):
                    raise QuantizationError(f"'{p}': rotate() wraps a quantizer, but the inner transform returned "
                                            f"{type(out_leaves[i]).__name__}")
                out_leaves[i] = _fold_pre(out_leaves[i], rots[p])
        return treedef.unflatten(out_leaves), state

    return WeightTransform(inner.init, apply)
