"""any4: a learned 16-entry lookup table per row, after group scaling.

Elhoushi et al., "any4: Learned 4-bit Numeric Representation for LLMs" (ICML 2025). Each group is
scaled by its max |w| into [-1, 1]; then every row (all weights sharing the indices other than the
group axis, i.e. one output channel of a (in, out) kernel) gets its own 16 values, fitted by
(optionally weighted) k-means / Lloyd iterations on that row's scaled weights. The paper weights the
k-means by calibration activations; ``weights`` (same shape as ``w``, e.g. mean |x| broadcast along
the input axis) does that. Initial centroids: the NF4 levels, so zero iterations equals NF4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .formats import DEFAULTS, NF4_VALUES, get_format
from .grid import rows_nearest
from .qarray import QArray
from .registry import method
from .rounding import build, group, validate_leaf

__all__ = ["quantize_any4", "kmeans_rows"]


def kmeans_rows(x, k_init, iters: int, weights=None):
    """Lloyd's algorithm independently per row. x: (rows, n); k_init: (k,); returns (rows, k)."""
    rows = x.shape[0]
    c0 = jnp.broadcast_to(jnp.asarray(k_init, jnp.float32), (rows, k_init.shape[0]))
    wts = jnp.ones_like(x) if weights is None else weights

    def step(c, _):
        a = jnp.argmin(jnp.abs(x[:, :, None] - c[:, None, :]), axis=-1)       # (rows, n)
        onehot = jax.nn.one_hot(a, c.shape[1], dtype=jnp.float32) * wts[:, :, None]
        mass = onehot.sum(1)
        new = (onehot * x[:, :, None]).sum(1) / jnp.where(mass > 0, mass, 1.0)
        return jnp.where(mass > 0, new, c), None                                # empty cluster keeps its value

    c, _ = jax.lax.scan(step, c0, None, length=iters)
    return c


@method("any4", formats="any4 (a learned 16-entry table per row)", paper="Elhoushi et al. 2025 (any4)")
def quantize_any4(w, group_size=DEFAULTS["group_size"], axis=DEFAULTS["axis"], *, iters: int = 20, weights=None,
                  scale_dtype=DEFAULTS["scale_dtype"], lut_dtype=jnp.float16, path: str = "", stats=None) -> QArray:
    """Per-row 16-entry table learned by (weighted) k-means after per-group absmax scaling."""
    del stats
    fmt = get_format("any4")
    axis, g = validate_leaf(path, w, fmt, group_size, axis)
    w = jnp.asarray(w)
    wg, red = group(w, axis, g)
    stored = jnp.max(jnp.abs(wg), axis=red, keepdims=True).astype(scale_dtype)
    s = stored.astype(jnp.float32)
    x = (wg / jnp.where(s == 0, 1.0, s)).reshape(w.shape)                       # in [-1, 1], array layout
    xr = jnp.moveaxis(x, axis, -1).reshape(-1, w.shape[axis])                   # rows x n
    wr = None if weights is None else jnp.moveaxis(jnp.asarray(weights, jnp.float32), axis, -1).reshape(xr.shape)
    tables = kmeans_rows(xr, jnp.asarray(NF4_VALUES), iters, wr)                # rows x 16
    lead = tuple(np.delete(np.array(w.shape), axis))
    lut = jnp.moveaxis(tables.reshape(*lead, 16), -1, axis).astype(lut_dtype)    # shape with axis -> 16
    codes = rows_nearest(x, lut.astype(jnp.float32), axis)
    return build(w, fmt, axis, g, codes, stored, None, lut)
