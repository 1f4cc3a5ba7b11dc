"""Reusable merge steps over one tensor's stack of task vectors (leading axis = models).

The pipeline behind task arithmetic / TIES / DARE / breadcrumbs / DELLA / SCE (Ilharco et al. 2023;
Yadav et al. 2023; Yu et al. 2024; Davari & Belilovsky 2024; Deep et al. 2024; Wan et al. 2024):
task vectors -> sparsify -> weight -> sign election -> combine -> x lambda -> add to base.

Semantics follow mergekit (per tensor) unless said otherwise:
* ``magnitude``: keep the ``int(density * numel)`` largest |delta| of each model's tensor;
* ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma * numel)`` largest, then the smallest,
  keeping ``int(density * numel)``;
* ``random`` (DARE): keep each entry with probability ``density``;
* ``della_magprune`` (DELLA): per row, keep probability rises linearly with the magnitude rank from
  ``density - epsilon`` to ``density + epsilon``;
* rescale after masking: ``"l1"`` (mergekit: match the L1 norm before masking; also ``"l2"``,
  ``"linf"``), ``"inverse"`` (the DARE/DELLA papers: divide by the keep probability) or ``None``;
* sign election: ``"sum"`` (TIES: sign of the summed weighted deltas, ties -> +) or ``"count"``
  (majority of signs); an entry is kept where its sign equals the elected sign (zeros never are);
* combine: sum of kept weighted deltas, optionally divided by the sum of the kept weights
  (``normalize``; TIES' "disjoint mean" when every weight is 1).

``scope="global"`` (FusionBench / the TIES paper) computes magnitude thresholds over the whole model
instead of per tensor: :func:`global_thresholds` provides the per-model cut-offs.
"""

from __future__ import annotations

from .. import _lazy

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")

__all__ = ["model_sum", "magnitude_mask", "outlier_mask", "bernoulli_mask", "della_mask", "rescale", "sparsify",
           "consensus_mask", "combine", "global_thresholds"]


def model_sum(x):
    """Sum over the leading (model) axis as an unrolled chain of adds for up to 16 models: XLA on CPU
    runs a reduction over a short leading axis ~8x slower than the same adds fused elementwise."""
    if x.shape[0] > 16:
        return jnp.sum(x, axis=0)
    out = x[0]
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out


def _per_model(x, fn):
    return jax.vmap(fn)(x)


def _kth_largest(a, k):
    """The k-th largest value of a non-negative 1-D float array, by bisection on the float32 bit
    pattern (monotonic for non-negative floats): 32 counting passes instead of an O(n log n) sort,
    which XLA on CPU does slowly."""
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)

    def body(_, lohi):
        lo, hi = lohi  # invariant: count(bits >= lo) >= k, count(bits >= hi + 1) < k
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(bits >= mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800000)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


@_lazy.jit(static_argnames="k")
def _topk_mask(a, k):
    """Mask of the k largest entries of a non-negative 1-D array (magnitudes); among equal values
    the lower index wins (the set a stable descending argsort picks). Jitted (cached per shape and
    k): called eagerly, the bisection loop would be traced again for every tensor."""
    n = a.shape[0]
    if k <= 0:
        return jnp.zeros(a.shape, bool)
    if k >= n:
        return jnp.ones(a.shape, bool)
    a = a.astype(jnp.float32)
    thr = _kth_largest(a, k)
    above = a > thr
    need = k - jnp.sum(above)
    at = a == thr
    return above | (at & (jnp.cumsum(at) <= need))


def magnitude_mask(delta, density: float, threshold=None):
    """Per model: keep the ``int(density*numel)`` largest |delta| (or |delta| >= ``threshold``)."""
    if threshold is not None:
        return jnp.abs(delta) >= jnp.reshape(threshold, (-1,) + (1,) * (delta.ndim - 1))
    n = delta[0].size
    k = int(density * n)
    if density >= 1:
        return jnp.ones_like(delta, bool)
    return _per_model(delta, lambda d: _topk_mask(jnp.abs(d).reshape(-1), k).reshape(d.shape))


def outlier_mask(delta, density: float, gamma: float):
    """Breadcrumbs: drop the top ``gamma`` fraction and the smallest, keep ``density``."""
    if density >= 1:
        return jnp.ones_like(delta, bool)
    n = delta[0].size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0

    def one(d):
        a = jnp.abs(d).reshape(-1)
        order = jnp.argsort(a, stable=True)  # ascending
        ranks = jnp.zeros_like(order).at[order].set(jnp.arange(n))
        return ((ranks >= n_bot) & (ranks < n - n_top)).reshape(d.shape)

    return _per_model(delta, one)


def bernoulli_mask(delta, density: float, keys):
    """DARE: keep each entry with probability ``density``; ``keys``: one key per model."""
    if density >= 1:
        return jnp.ones_like(delta, bool)
    return jax.vmap(lambda k, d: jax.random.bernoulli(k, density, d.shape))(keys, delta)


def della_probs(d, density: float, epsilon: float):
    """DELLA keep probabilities of one model's tensor (rows = first axis after promoting 1-D)."""
    x = d.reshape(1, -1) if d.ndim < 2 else d.reshape(d.shape[0], -1)
    order = jnp.argsort(jnp.abs(x), axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1).astype(jnp.float32) + 1
    lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    norm = jnp.clip((ranks - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0, 1)
    return ((density - epsilon) + norm * 2 * epsilon).reshape(d.shape)


def della_mask(delta, density: float, epsilon: float, keys):
    if density >= 1:
        return jnp.ones_like(delta, bool), jnp.ones(delta.shape, jnp.float32)
    probs = jax.vmap(lambda d: della_probs(d, density, epsilon))(delta)
    return jax.vmap(lambda k, p: jax.random.bernoulli(k, p))(keys, probs), probs


def rescale(delta, mask, norm, keep_prob=None, eps: float = 1e-7):
    """Masked deltas, rescaled per model (see module docstring)."""
    masked = delta * mask
    if norm is None:
        return masked
    if norm == "inverse":
        return masked / keep_prob
    axes = tuple(range(1, delta.ndim))
    if norm == "l1":
        before, after = jnp.sum(jnp.abs(delta), axes, keepdims=True), jnp.sum(jnp.abs(masked), axes, keepdims=True)
    elif norm == "l2":
        before, after = (jnp.sqrt(jnp.sum(delta ** 2, axes, keepdims=True)),
                         jnp.sqrt(jnp.sum(masked ** 2, axes, keepdims=True)))
    elif norm == "linf":
        before, after = jnp.max(jnp.abs(delta), axes, keepdims=True), jnp.max(jnp.abs(masked), axes, keepdims=True)
    else:
        raise ValueError(f"unknown rescale norm {norm!r}")
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def sparsify(delta, method, density, *, keys=None, gamma: float = 0.01, epsilon: float = 0.15, rescale_norm=None,
             threshold=None):
    """Apply one sparsification method to a stack of task vectors."""
    if method is None:
        return delta
    if method == "magnitude":
        return rescale(delta, magnitude_mask(delta, density, threshold), rescale_norm, density)
    if method == "magnitude_outliers":
        return rescale(delta, outlier_mask(delta, density, gamma), rescale_norm, density)
    if method == "random":
        return rescale(delta, bernoulli_mask(delta, density, keys), rescale_norm, density)
    if method == "della_magprune":
        m, p = della_mask(delta, density, epsilon, keys)
        return rescale(delta, m, rescale_norm, p)
    raise ValueError(f"unknown sparsification method {method!r}")


def consensus_mask(weighted, method: str = "sum"):
    """Entries whose sign agrees with the elected sign (TIES)."""
    sign = jnp.sign(weighted)
    total = model_sum(weighted) if method == "sum" else model_sum(sign)
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    elected = jnp.where(total >= 0, 1.0, -1.0)
    return sign == elected


def combine(weighted, weights, mask=None, normalize: bool = False):
    """Sum of (kept) weighted deltas, optionally divided by the sum of (kept) weights."""
    if mask is not None:
        mixed = model_sum(weighted * mask)
        div = model_sum(weights * mask)
        div = jnp.where(div == 0, 1.0, div)
    else:
        mixed = model_sum(weighted)
        div = model_sum(weights)
        div = jnp.where(jnp.abs(div) < 1e-8, 1.0, div)
    return mixed / div if normalize else mixed


def global_thresholds(deltas: list, density: float):
    """Per-model magnitude cut-off keeping the top ``density`` fraction over all given tensors
    (each (N, ...)): the TIES paper's / FusionBench's global trimming."""
    flat = jnp.concatenate([jnp.abs(d).reshape(d.shape[0], -1) for d in deltas], axis=1)
    k = max(int(density * flat.shape[1]), 1)
    return -jnp.sort(-flat, axis=1)[:, k - 1]
