"""AWQ: activation-aware per-input-channel scaling and clipping search.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024). Input channels that see large activations matter more, so before quantizing, each
input row k of W is multiplied by ``s_k = mean|x_k|^α`` (normalised by ``sqrt(max s · min s)``),
and the inverse goes onto the input: ``x W = (x / s)(s W)``. α is grid-searched (``n_grid`` points
in [0, 1)) to minimise the layer's output error ``||X W - X Ŵ||²``, then a per-group clipping ratio
is searched (down to ``1 - max_shrink``) the same way. Errors are computed exactly from the
calibration Gram matrix ``XᵀX`` (no need to keep activations): ``tr(Dᵀ XᵀX D)`` with ``D = W - Ŵ``.

Deliberate difference from the reference: instead of folding ``1/s`` into the previous operator
(which needs the model graph), we keep it in the QArray as its ``pre`` input transform
(``x @ W_eff = (x · pre) @ dequant``); folding it into a neighbouring LayerNorm or linear layer is
an exact rewrite that a caller with the graph can still do. The reference searches the clip ratio
with a subsample of tokens; we use the full Gram matrix.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import QuantizationError
from .formats import get_format
from .qarray import QArray
from .rtn import _group, build, encode, validate_leaf

__all__ = ["awq_quantize", "awq"]


def _fake(wg, red, fmt, ratio):
    """Dequantized grouped weights with the group range shrunk by ``ratio`` (broadcastable)."""
    if fmt.symmetric:
        amax = jnp.max(jnp.abs(wg), axis=red, keepdims=True) * ratio
        s = amax / fmt.qmax
        s = jnp.where(s == 0, 1.0, s)
        h = 2 ** (fmt.bits - 1)
        c = jnp.clip(jnp.round(wg / s), -h, h - 1)
        return c * s, s, None
    lo = jnp.minimum(jnp.min(wg, axis=red, keepdims=True), 0.0) * ratio
    hi = jnp.maximum(jnp.max(wg, axis=red, keepdims=True), 0.0) * ratio
    s = (hi - lo) / (2 ** fmt.bits - 1)
    s = jnp.where(s == 0, 1.0, s)
    z = jnp.clip(jnp.round(-lo / s), 0, 2 ** fmt.bits - 1)
    c = jnp.clip(jnp.round(wg / s) + z, 0, 2 ** fmt.bits - 1)
    return (c - z) * s, s, z


def _out_err(xtx, d):
    """tr(dᵀ XᵀX d) for d (K, N)."""
    return jnp.sum((xtx @ d) * d)


def awq_quantize(w, xtx, abs_mean, *, fmt="uint", bits: int = 4, group_size=128, n_grid: int = 20,
                 clip: bool = True, max_shrink: float = 0.5, axis: int = -2, scale_dtype=jnp.float16,
                 path: str = "") -> QArray:
    """AWQ-quantize one 2-D weight with its input Gram matrix ``xtx`` (K, K) and mean |x| (K,)."""
    f = get_format(fmt, bits)
    if f.kind != "int":
        raise QuantizationError(f"'{path}': AWQ supports int formats, not {f.name}")
    if np.ndim(w) != 2:
        raise QuantizationError(f"'{path}': AWQ needs a 2-D weight, found shape {np.shape(w)}")
    ax, g = validate_leaf(path, w, f, group_size, axis)
    wk = jnp.asarray(w, jnp.float32)
    wk = wk if ax == 0 else wk.T
    k, n = wk.shape
    if g == 0:
        raise QuantizationError(f"'{path}': AWQ needs per-group or per-channel scales")
    xtx = jnp.asarray(xtx, jnp.float32)
    x_mean = jnp.maximum(jnp.asarray(abs_mean, jnp.float32), 1e-8)

    def try_alpha(alpha):
        s = jnp.maximum(x_mean ** alpha, 1e-4)
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        wg, red = _group(wk * s[:, None], 0, g)
        deq = _fake(wg, red, f, 1.0)[0].reshape(k, n) / s[:, None]
        return _out_err(xtx, wk - deq)

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    errs = jax.lax.map(try_alpha, alphas)
    alpha = alphas[jnp.argmin(errs)]
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    ws = wk * s[:, None]
    wg, red = _group(ws, 0, g)                       # (K/g, g, N)
    ratio = jnp.ones((k // g, 1, n), jnp.float32)
    if clip:
        xg = xtx.reshape(k // g, g, k // g, g)
        blocks = jnp.stack([xg[i, :, i, :] for i in range(k // g)]) / (s.reshape(k // g, g)[:, :, None] *
                                                                        s.reshape(k // g, g)[:, None, :])

        def group_err(r):  # per (group, column) error of the scaled-back weights, diagonal blocks of XᵀX
            d = wg - _fake(wg, red, f, r)[0]                       # (G, g, N), in the scaled space
            return jnp.einsum("gin,gij,gjn->gn", d, blocks, d)

        ratios = 1.0 - jnp.arange(int(max_shrink * n_grid) + 1, dtype=jnp.float32) / n_grid
        errs = jax.lax.map(lambda r: group_err(r), ratios)        # (R, G, N)
        ratio = ratios[jnp.argmin(errs, axis=0)][:, None, :]
    _, sc, z = _fake(wg, red, f, ratio)
    stored = sc.astype(scale_dtype)
    zero = None if f.symmetric else z.astype(scale_dtype)
    codes = encode(wg, f, stored.astype(jnp.float32), None if zero is None else zero.astype(jnp.float32))
    pre = (1.0 / s).astype(scale_dtype)
    if ax == 1:
        codes = jnp.swapaxes(codes.reshape(k, n), 0, 1)
        stored, zero = jnp.transpose(stored, (2, 0, 1)), None if zero is None else jnp.transpose(zero, (2, 0, 1))
        q = build(jnp.asarray(w), f, 1, g, codes, stored, zero)
    else:
        q = build(jnp.asarray(w), f, 0, g, codes.reshape(k, n), stored, zero)
    return q.replace(pre=pre)


def awq(apply_fn: Callable, params, batches: Iterable[Any], *, select_re: str | None = r"kernel$",
        row_mask: Callable | None = None, **kwargs):
    """AWQ every matmul weight whose path matches ``select_re`` (statistics from one traced
    calibration pass over ``batches``). Keyword arguments go to :func:`awq_quantize`."""
    from .calibrate import capture

    rx = re.compile(select_re) if select_re else None
    flat = wtree.to_flat_dict(params)
    chosen = [p for p, x in flat.items() if wtree.is_array(x) and np.ndim(x) == 2 and (rx is None or rx.search(p))]
    if not chosen:
        raise QuantizationError(f"no 2-D weight matches {select_re!r}")
    stats = capture(apply_fn, params, batches, select=lambda p: p in set(chosen), row_mask=row_mask)
    missing = [p for p in chosen if p not in stats]
    if missing:
        raise QuantizationError(f"calibration batches never reach '{missing[0]}' as a matmul operand")
    out = dict(flat)
    for p in chosen:
        st = stats[p]
        kw = dict(kwargs)
        kw.setdefault("axis", -2 if st.axis == 0 else -1)
        out[p] = awq_quantize(flat[p], st.xtx / jnp.maximum(st.n, 1), st.abs_mean, path=p, **kw)
    return wtree.from_flat_dict(out, params, check=False)
