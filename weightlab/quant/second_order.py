"""GPTQ: second-order weight quantization, compiled (``lax`` loops, no Python loop over columns).

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023). For a weight W (K inputs x N outputs, our (in, out) layout) and H = 2 XᵀX / n from the
layer's calibration inputs: dead inputs (H_ii = 0) are zeroed, H is dampened by ``damp`` x mean
diag(H), and ``U = chol(H⁻¹)`` (upper). Input rows are quantized one at a time; the error of row i,
``e = (w_i - q_i) / U_ii``, is pushed onto the rows not yet quantized (``W_j -= U_ij e``), inside
blocks of ``block_size`` rows with one lazy batched update per block (exactly equal to the
unblocked sweep). Options from the reference implementation: ``act_order`` (rows in order of
decreasing H_ii) with ``static_groups`` (group scales fixed from the original weights, so inference
needs no permutation), asymmetric or symmetric int grids, and any fixed-table format (NF4, FP4).
With ``act_order`` and ``static_groups=False`` group j is the j-th run of ``g`` rows in the sweep
order, not in the array: the QArray then carries ``g_idx`` (each input row's group, GPTQ's
``desc_act`` layout), which its dequantization and the GPTQ checkpoint export read.

The grid is :mod:`.grid`'s, shared by every quantizer. Deliberate difference from the reference: its
symmetric grid (``2 max|w| / (2^b - 1)``) is replaced by weightlab's idempotent one (``max(max(w⁺) /
(2^(b-1) - 1), max(w⁻) / 2^(b-1))``); the asymmetric grid is the reference's. Group scales are
computed when the sweep reaches a group's first row, from the weights as updated so far. (The reference code reads the not-yet-block-updated copy for groups that start inside a block;
we always use the current values, which is what the unblocked algorithm does.)

The sweep is independent per output column given U, so W sharded along outputs on a mesh
(``P(None, "model")``) runs sharded under jit with U replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import QuantizationError
from . import grid
from .formats import DEFAULTS, Format, format_for
from .packing import pack
from .qarray import QArray
from .registry import method
from .rounding import validate_leaf

__all__ = ["gptq_quantize", "gptq_leaf", "choose_block"]


def choose_block(k: int, g: int, max_block: int = 128) -> int:
    """Largest block <= max_block dividing K and aligned with the groups (so every group's first
    row is seen with all earlier updates applied)."""
    for b in range(min(max_block, k), 0, -1):
        if k % b == 0 and (g % b == 0 or b % g == 0):
            return b
    return 1  # pragma: no cover


def _params(rows, fmt, scale_dtype):
    """(stored scale, float scale, zero or zeros) of a group of rows (g, N) -> each (N,)."""
    gr = grid.fit(rows, (0,), fmt, scale_dtype)
    z = jnp.zeros_like(gr.scale) if gr.zero is None else gr.zero.astype(jnp.float32)
    return gr.stored[0], gr.scale[0], z[0]


@functools.partial(jax.jit, static_argnames=("fmt", "g", "block", "act_order", "static_groups", "scale_dtype"))
def _sweep(w, h, damp, *, fmt: Format, g: int, block: int, act_order: bool, static_groups: bool, scale_dtype):
    k, n = w.shape
    ng = k // g
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    perm = jnp.argsort(-jnp.diagonal(h)) if act_order else jnp.arange(k)
    inv = jnp.argsort(perm)
    static = act_order and static_groups
    if static:  # group parameters from the original (un-permuted) weights
        st_stored, st_s, st_z = jax.vmap(lambda r: _params(r, fmt, scale_dtype))(w.reshape(ng, g, n))
    w = w[perm]
    h = h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
    l = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((l, True), jnp.eye(k, dtype=h.dtype))
    u = jnp.linalg.cholesky(hinv).T  # upper factor of H^-1
    sdt = jnp.dtype(scale_dtype)
    codes = jnp.zeros((k, n), jnp.uint8)
    scales = jnp.zeros((ng, n), sdt)
    zeros = jnp.zeros((ng, n), sdt)
    cur = (jnp.zeros((n,), sdt), jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    rows_idx = jnp.arange(k)

    def block_body(bi, carry):
        w, codes, scales, zeros, cur = carry
        i1 = bi * block
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (block, n))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))

        def row_body(j, c):
            w1, err1, codes, scales, zeros, cur = c
            i = i1 + j
            if static:
                gi = perm[i] // g
                params = (st_stored[gi], st_s[gi], st_z[gi])
            else:
                def fresh(_):
                    rows = (jax.lax.dynamic_slice(w1, (j, 0), (g, n)) if block % g == 0
                            else jax.lax.dynamic_slice(w, (i, 0), (g, n)))
                    return _params(rows, fmt, scale_dtype)

                params = jax.lax.cond(i % g == 0, fresh, lambda _: cur, None)
                scales = jax.lax.cond(i % g == 0, lambda s: s.at[i // g].set(params[0]), lambda s: s, scales)
                zeros = jax.lax.cond(i % g == 0, lambda z: z.at[i // g].set(params[2].astype(sdt)), lambda z: z, zeros)
            stored, s, z = params
            x = w1[j]
            q_codes = grid.encode(x[None], fmt, s[None], z[None])[0]
            q = grid.decode(q_codes, fmt, s, z)
            err = (x - q) / u1[j, j]
            w1 = w1 - jnp.where(jnp.arange(block) >= j, u1[j], 0.0)[:, None] * err[None, :]
            err1 = err1.at[j].set(err)
            codes = codes.at[i].set(q_codes)
            return w1, err1, codes, scales, zeros, params

        w1, err1, codes, scales, zeros, cur = jax.lax.fori_loop(
            0, block, row_body, (w1, jnp.zeros((block, n), w.dtype), codes, scales, zeros, cur))
        upd = jax.lax.dynamic_slice(u, (i1, 0), (block, k)).T @ err1  # (k, n); only rows after the block used
        w = jnp.where((rows_idx >= i1 + block)[:, None], w - upd, w)
        return w, codes, scales, zeros, cur

    w, codes, scales, zeros, _ = jax.lax.fori_loop(0, k // block, block_body, (w, codes, scales, zeros, cur))
    if static:
        scales, zeros = st_stored, st_z.astype(sdt)
    # Without static groups, group j holds the rows quantized j-th in the (permuted) sweep order:
    # original row r sits at position inv[r], so its group is inv[r] // g (act-order's g_idx).
    return codes[inv], scales, zeros, (inv // g).astype(jnp.int32)


def gptq_quantize(w, hessian, *, fmt=DEFAULTS["fmt"], bits: int | None = DEFAULTS["bits"],
                  group_size=DEFAULTS["group_size"], act_order: bool = False, static_groups: bool = True,
                  damp: float = 0.01, block_size: int = 128, axis=DEFAULTS["axis"],
                  scale_dtype=DEFAULTS["scale_dtype"], path: str = "") -> QArray:
    """GPTQ-quantize one 2-D weight given its input Hessian (K x K, K = ``w.shape[axis]``).

    ``axis`` is the input (contracted) axis: -2 (default) for (in, out) kernels, -1 for PyTorch
    (out, in). Default grid: asymmetric int4, groups of 128 (the paper's "4-bit g128"); ``fmt`` may
    also be ``"int"`` (symmetric) or a fixed table format (``"nf4"``, ``"fp4_e2m1"``).
    """
    fmt = format_for(fmt, bits)
    if fmt.kind == "fp8" or fmt.scale_kind != "float" or (fmt.kind == "lut" and fmt.lut is None):
        raise QuantizationError(f"'{path}': GPTQ supports int and fixed-table formats, not {fmt.name}")
    if np.ndim(w) != 2:
        raise QuantizationError(f"'{path}': GPTQ needs a 2-D weight, found shape {np.shape(w)}")
    ax, g = validate_leaf(path, w, fmt, group_size, -2 if axis is None else axis)
    if g == 0:
        raise QuantizationError(f"'{path}': GPTQ needs per-group or per-channel scales, not per-tensor")
    wk = jnp.asarray(w, jnp.float32)
    wk = wk if ax == 0 else wk.T
    k = wk.shape[0]
    if tuple(np.shape(hessian)) != (k, k):
        raise QuantizationError(f"'{path}': Hessian shape {np.shape(hessian)} does not match {k} inputs")
    block = choose_block(k, g, block_size)
    codes, scales, zeros, g_idx = _sweep(wk, jnp.asarray(hessian, jnp.float32), jnp.float32(damp), fmt=fmt, g=g,
                                         block=block, act_order=act_order, static_groups=static_groups,
                                         scale_dtype=jnp.dtype(scale_dtype))
    g_idx = g_idx if (act_order and not static_groups) else None  # else row i is in group i // g
    zero = zeros[:, None, :] if (fmt.kind == "int" and not fmt.symmetric) else None
    scale = scales[:, None, :]
    if ax == 1:  # back to (out, in): grouped layout (N, n_groups, 1)
        codes, scale = codes.T, jnp.transpose(scale, (2, 0, 1))
        zero = None if zero is None else jnp.transpose(zero, (2, 0, 1))
    return QArray(pack(codes, fmt.bits, ax), scale, zero, g_idx=g_idx, shape=np.shape(w), dtype=np.dtype(w.dtype),
                  fmt=fmt, group_size=g, axis=ax)


def input_axis(stats, axis):
    """The input axis of a weight for :func:`gptq_quantize`: ``axis`` if given, else the axis the
    calibration capture saw contracted (-2 for (in, out) kernels, -1 for (out, in) weights)."""
    if axis is not None:
        return axis
    return -2 if stats.axis == 0 else -1


@method("gptq", calibrated=True, formats="int2-8 (sym/asym), nf4, fp4_e2m1", params_of=gptq_quantize,
        paper="Frantar et al. 2023 (GPTQ)")
def gptq_leaf(w, *, path: str = "", stats=None, axis=DEFAULTS["axis"], **hp) -> QArray:
    """GPTQ one weight from its calibration statistics (H = 2 XᵀX / n)."""
    return gptq_quantize(w, stats.hessian, axis=input_axis(stats, axis), path=path, **hp)
