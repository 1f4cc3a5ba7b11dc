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

Group scales are computed when the sweep reaches a group's first row, from the weights as updated so
far. (The reference code reads the not-yet-block-updated copy for groups that start inside a block;
we always use the current values, which is what the unblocked algorithm does.)

The sweep is independent per output column given U, so W sharded along outputs on a mesh
(``P(None, "model")``) runs sharded under jit with U replicated.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import QuantizationError
from .formats import Format, format_for
from .packing import pack
from .qarray import QArray
from .rtn import _scales, encode, validate_leaf

__all__ = ["gptq_quantize", "gptq", "choose_block"]


def choose_block(k: int, g: int, max_block: int = 128) -> int:
    """Largest block <= max_block dividing K and aligned with the groups (so every group's first
    row is seen with all earlier updates applied)."""
    for b in range(min(max_block, k), 0, -1):
        if k % b == 0 and (g % b == 0 or b % g == 0):
            return b
    return 1  # pragma: no cover


def _decode(codes, fmt: Format, s, z):
    c = codes.astype(jnp.float32)
    if fmt.kind == "int":
        return ((c - 2 ** (fmt.bits - 1)) if fmt.symmetric else (c - z)) * s
    return jnp.asarray(np.asarray(fmt.lut, np.float32))[codes.astype(jnp.int32)] * s


def _params(rows, fmt, scale_dtype):
    """(stored scale, float scale, zero or zeros) of a group of rows (g, N) -> each (N,)."""
    stored, s, z, _ = _scales(rows, (0,), fmt, scale_dtype)
    z = jnp.zeros_like(s) if z is None else z.astype(jnp.float32)
    return stored[0], s[0], z[0]


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
            q_codes = encode(x[None], fmt, s[None], z[None])[0]
            q = _decode(q_codes, fmt, s, z)
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
    return codes[inv], scales, zeros


def gptq_quantize(w, hessian, *, fmt="uint", bits: int | None = 4, group_size=128, act_order: bool = False,
                  static_groups: bool = True, damp: float = 0.01, block_size: int = 128, axis: int = -2,
                  scale_dtype=jnp.float16, path: str = "") -> QArray:
    """GPTQ-quantize one 2-D weight given its input Hessian (K x K, K = ``w.shape[axis]``).

    ``axis`` is the input (contracted) axis: -2 for (in, out) kernels, -1 for PyTorch (out, in).
    Default grid: asymmetric int4, groups of 128 (the paper's "4-bit g128"); ``fmt`` may also be
    ``"int"`` (symmetric) or a fixed table format (``"nf4"``, ``"fp4_e2m1"``).
    """
    fmt = format_for(fmt, bits)
    if fmt.kind == "fp8" or fmt.scale_kind != "float" or (fmt.kind == "lut" and fmt.lut is None):
        raise QuantizationError(f"'{path}': GPTQ supports int and fixed-table formats, not {fmt.name}")
    if np.ndim(w) != 2:
        raise QuantizationError(f"'{path}': GPTQ needs a 2-D weight, found shape {np.shape(w)}")
    ax, g = validate_leaf(path, w, fmt, group_size, axis)
    if g == 0:
        raise QuantizationError(f"'{path}': GPTQ needs per-group or per-channel scales, not per-tensor")
    wk = jnp.asarray(w, jnp.float32)
    wk = wk if ax == 0 else wk.T
    k = wk.shape[0]
    if tuple(np.shape(hessian)) != (k, k):
        raise QuantizationError(f"'{path}': Hessian shape {np.shape(hessian)} does not match {k} inputs")
    block = choose_block(k, g, block_size)
    codes, scales, zeros = _sweep(wk, jnp.asarray(hessian, jnp.float32), jnp.float32(damp), fmt=fmt, g=g, block=block,
                                  act_order=act_order, static_groups=static_groups, scale_dtype=jnp.dtype(scale_dtype))
    zero = zeros[:, None, :] if (fmt.kind == "int" and not fmt.symmetric) else None
    scale = scales[:, None, :]
    if ax == 1:  # back to (out, in): grouped layout (N, n_groups, 1)
        codes, scale = codes.T, jnp.transpose(scale, (2, 0, 1))
        zero = None if zero is None else jnp.transpose(zero, (2, 0, 1))
    return QArray(pack(codes, fmt.bits, ax), scale, zero, shape=np.shape(w), dtype=np.dtype(w.dtype), fmt=fmt,
                  group_size=g, axis=ax)


def gptq(apply_fn: Callable, params, batches: Iterable[Any], *, select_re: str | None = r"kernel$",
         sequential: bool = True, row_mask: Callable | None = None, rotate: jax.Array | None = None, **kwargs):
    """GPTQ every matmul weight of ``apply_fn`` whose path matches ``select_re``.

    Calibration statistics come from :mod:`.calibrate` (traced, any JAX function). With
    ``sequential`` (the paper's default) each weight's Hessian is measured with all earlier weights
    already quantized, in execution order. Keyword arguments go to :func:`gptq_quantize`. With a
    ``rotate`` key every weight is first rotated by a random Hadamard matrix over its inputs (QuIP /
    QuaRot incoherence, kept as the QArray's online input rotation; key folded per path).
    A selected weight that the calibration batches never reach raises before anything is quantized.
    """
    from .calibrate import Capturer, matmul_weights

    batches = list(batches)
    if not batches:
        raise QuantizationError("gptq() needs calibration batches")
    rx = re.compile(select_re) if select_re else None
    flat = wtree.to_flat_dict(params)
    chosen = [p for p, x in flat.items() if wtree.is_array(x) and np.ndim(x) == 2 and (rx is None or rx.search(p))]
    order = matmul_weights(apply_fn, params, batches[0])
    missing = [p for p in chosen if p not in order]
    if missing:
        raise QuantizationError(f"calibration batches never reach '{missing[0]}' as a matmul operand "
                                f"({len(missing)} selected weights unreached); select fewer weights")
    if not chosen:
        raise QuantizationError(f"no 2-D weight matches {select_re!r}")
    from . import check_quantizable

    for p in chosen:  # validate every layer before doing any work (traced on shapes, see check_quantizable)
        k = np.shape(flat[p])[kwargs.get("axis", -2)]  # jnp.eye below is traced abstractly: no K x K buffer
        check_quantizable(p, flat[p], lambda w, p=p, k=k: gptq_quantize(w, jnp.eye(k), path=p, **kwargs))
    targets = [p for p in order if p in set(chosen)]
    cap = Capturer(apply_fn, params, batches[0], select=lambda p: p in set(targets), row_mask=row_mask)
    current = dict(flat)
    stats = None if sequential else cap(params, batches)
    out = dict(flat)
    for p in targets:
        if sequential:
            stats = cap(wtree.from_flat_dict(current, params), batches)
        st = stats[p]
        kw = dict(kwargs)
        kw.setdefault("axis", -2 if st.axis == 0 else -1)
        if rotate is not None:
            from .rotate import rotate_quantize

            q = rotate_quantize(flat[p], wtree.leaf_key(rotate, p, "rotate"), gptq_quantize, hessian=st.hessian,
                                path=p, **kw)
        else:
            q = gptq_quantize(flat[p], st.hessian, path=p, **kw)
        out[p] = q
        current[p] = q.dequantize()
    return wtree.from_flat_dict(out, params, check=False)
