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

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import QuantizationError
from . import grid
from .formats import DEFAULTS, format_for
from .second_order import input_axis
from .qarray import QArray
from .registry import method
from .rounding import build, group, validate_leaf

__all__ = ["awq_quantize", "awq_leaf"]


def _out_err(xtx, d):
    """tr(dᵀ XᵀX d) for d (K, N)."""
    return jnp.sum((xtx @ d) * d)


def awq_quantize(w, xtx, abs_mean, *, fmt=DEFAULTS["fmt"], bits: int = DEFAULTS["bits"],
                 group_size=DEFAULTS["group_size"], n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
                 axis=DEFAULTS["axis"], scale_dtype=DEFAULTS["scale_dtype"], path: str = "") -> QArray:
    """AWQ-quantize one 2-D weight with its input Gram matrix ``xtx`` (K, K) and mean |x| (K,)."""
    f = format_for(fmt, bits)
    if f.kind != "int":
        raise QuantizationError(f"'{path}': AWQ supports int formats, not {f.name}")
    if np.ndim(w) != 2:
        raise QuantizationError(f"'{path}': AWQ needs a 2-D weight, found shape {np.shape(w)}")
    ax, g = validate_leaf(path, w, f, group_size, -2 if axis is None else axis)
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
        wg, red = group(wk * s[:, None], 0, g)
        deq = grid.fake(wg, red, f, scale_dtype).reshape(k, n) / s[:, None]
        return _out_err(xtx, wk - deq)

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    errs = jax.lax.map(try_alpha, alphas)
    alpha = alphas[jnp.argmin(errs)]
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    ws = wk * s[:, None]
    wg, red = group(ws, 0, g)                        # (K/g, g, N)
    ratio = jnp.ones((k // g, 1, n), jnp.float32)
    if clip:
        xg = xtx.reshape(k // g, g, k // g, g)
        blocks = jnp.stack([xg[i, :, i, :] for i in range(k // g)]) / (s.reshape(k // g, g)[:, :, None] *
                                                                        s.reshape(k // g, g)[:, None, :])

        def group_err(r):  # per (group, column) error of the scaled-back weights, diagonal blocks of XᵀX
            d = wg - grid.fake(wg, red, f, scale_dtype, r)         # (G, g, N), in the scaled space
            return jnp.einsum("gin,gij,gjn->gn", d, blocks, d)

        ratios = 1.0 - jnp.arange(int(max_shrink * n_grid) + 1, dtype=jnp.float32) / n_grid
        errs = jax.lax.map(lambda r: group_err(r), ratios)        # (R, G, N)
        ratio = ratios[jnp.argmin(errs, axis=0)][:, None, :]
    gr = grid.fit(wg, red, f, scale_dtype, ratio)
    stored, zero = gr.stored, gr.zero
    codes = grid.encode(wg, f, gr.scale, zero)
    pre = (1.0 / s).astype(scale_dtype)
    if ax == 1:
        codes = jnp.swapaxes(codes.reshape(k, n), 0, 1)
        stored, zero = jnp.transpose(stored, (2, 0, 1)), None if zero is None else jnp.transpose(zero, (2, 0, 1))
        q = build(jnp.asarray(w), f, 1, g, codes, stored, zero)
    else:
        q = build(jnp.asarray(w), f, 0, g, codes.reshape(k, n), stored, zero)
    return q.replace(pre=pre)


@method("awq", calibrated=True, formats="int2-8 (sym/asym)", params_of=awq_quantize,
        paper="Lin et al. 2024 (AWQ)")
def awq_leaf(w, *, path: str = "", stats=None, axis=DEFAULTS["axis"], **hp) -> QArray:
    """Activation-aware input-channel scaling (kept as the QArray's input transform) and clipping search."""
    if stats.abs_sum is None:
        raise QuantizationError(f"'{path}': AWQ needs mean |x| per input channel, which these statistics lack "
                                "(rotated statistics keep only XᵀX: quantize with AWQ before rotating, or use GPTQ)")
    return awq_quantize(w, stats.xtx / jnp.maximum(stats.n, 1), stats.abs_mean, axis=input_axis(stats, axis),
                        path=path, **hp)
