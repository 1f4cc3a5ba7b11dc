"""HQQ: calibration-free half-quadratic optimisation of the zero point.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). Asymmetric
integer quantization whose per-group scale comes from min/max (as RTN) and whose zero point is
refined to minimise an l_p (p < 1) reconstruction loss, robust to outliers. Splitting
``W - W_r = W_e`` gives alternating closed-form steps:

    W_e  <- shrink_p(W - dequant(Q), beta)       (generalised soft threshold)
    z    <- mean_group(Q - (W - W_e) / s)        (zero point; float)
    Q    <- clip(round(W / s + z))
    beta <- kappa * beta

We keep the best zero point seen (by mean |W - W_r|), as the reference implementation's early
stop does. Defaults follow the paper: p = 0.7, beta = 10, kappa = 1.01, 20 iterations. Unlike the
reference, which works with an inverse scale, we keep ``s`` as the multiplier used for dequantizing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import grid
from .formats import DEFAULTS, get_format
from .qarray import QArray
from .registry import method
from .rounding import build, group, validate_leaf

__all__ = ["quantize_hqq"]


def _shrink(x, beta, p):
    return jnp.sign(x) * jax.nn.relu(jnp.abs(x) - (1.0 / beta) * jnp.power(jnp.abs(x) + 1e-8, p - 1))


@method("hqq", formats="asymmetric int2-8 with a float zero point", paper="Badri & Shaji 2023 (HQQ)")
def quantize_hqq(w, bits: int = DEFAULTS["bits"], group_size=DEFAULTS["group_size"], axis=DEFAULTS["axis"], *,
                 iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 scale_dtype=DEFAULTS["scale_dtype"], path: str = "", stats=None) -> QArray:
    """Half-quadratic optimisation of each group's zero point (calibration-free, robust to outliers)."""
    del stats
    fmt = get_format("int", bits, symmetric=False)
    axis, g = validate_leaf(path, w, fmt, group_size, axis)
    wg, red = group(w, axis, g)
    gr = grid.fit(wg, red, fmt, scale_dtype)
    stored, s, z0 = gr.stored, gr.scale, gr.zero
    s_safe = jnp.where(s == 0, 1.0, s)
    qmax = 2 ** bits - 1

    def err_of(z):
        q = jnp.clip(jnp.round(wg / s_safe + z), 0, qmax)
        return q, jnp.mean(jnp.abs(wg - (q - z) * s))

    def body(_, carry):
        z, b, best_z, best_e = carry
        q, _ = err_of(z)
        we = _shrink(wg - (q - z) * s, b, p)
        z = jnp.mean(q - (wg - we) / s_safe, axis=red, keepdims=True)
        _, e = err_of(z)
        better = e < best_e
        return z, b * kappa, jnp.where(better, z, best_z), jnp.where(better, e, best_e)

    z0 = z0.astype(jnp.float32)
    _, e0 = err_of(z0)
    _, _, z, _ = jax.lax.fori_loop(0, iters, body, (z0, jnp.float32(beta), z0, e0))
    zs = z.astype(scale_dtype)
    codes = jnp.clip(jnp.round(wg / s_safe + zs.astype(jnp.float32)), 0, qmax).astype(jnp.uint8)
    return build(w, fmt, axis, g, codes, stored, zs)
