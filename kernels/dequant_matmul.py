"""Fused dequantize-matmul ``y = x @ dequant(W)`` for group-quantized 4/8-bit weights (Pallas).

Weight-only quantized matmuls at small batch are memory-bound: the kernel reads packed codes
(4 or 8 bits per weight) plus one scale (and zero) per group, dequantizes in registers and feeds
the matrix unit, so the ideal speed-up over bf16 is ``16 / b_eff``.

Kernel weight layout (:func:`pack_weights` builds it once from plain arrays — unpacked codes, group
scales and zeros or a table — as Marlin/ExLlama repack offline; ``weightlab.quant.matmul.prepare`` calls
it for a QArray): W is (K, N) with K the contracted axis. K is cut into blocks of
``block_k`` rows, one quantization group per block (or several blocks per group). For 4 bits, byte
r of a K-block holds row r in its low nibble and row ``r + block_k/2`` in its high nibble, so the
kernel splits x's block into two contiguous halves instead of de-interleaving nibbles. Values:

* ``mode="int"``: ``(code - zero) * scale`` (symmetric formats use zero = 2^(b-1));
* ``mode="lut"``: ``table[code] * scale`` with a fixed 16-entry table (NF4, FP4) or one table per
  output column (any4), evaluated as a 16-way select (no gathers in the kernel).

One kernel serves GPU (Triton lowering) and TPU (Mosaic): it uses only blocked refs, static slices,
elementwise ops and ``jnp.dot``. ``dequant_matmul_reference`` has the same signature in plain jnp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

__all__ = ["KernelWeights", "pack_weights", "dequant_matmul", "dequant_matmul_reference", "supports",
           "supports_platform"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale", "zero", "lut"],
                   meta_fields=["bits", "group", "block_k", "k", "n", "mode"])
@dataclasses.dataclass(frozen=True)
class KernelWeights:
    codes: jax.Array            # (K*bits/8, N) uint8, kernel layout
    scale: jax.Array            # (K/group, N) float
    zero: Optional[jax.Array]   # (K/group, N) float, or None
    lut: Optional[jax.Array]    # (16,) or (16, N) float, or None
    bits: int
    group: int
    block_k: int
    k: int
    n: int
    mode: str                   # "int" | "lut"


def supports(bits: int, mode: str, group: int) -> bool:
    """Whether the kernel handles a layout: 4/8-bit ``"int"`` codes or 4-bit ``"lut"`` codes, with
    per-group float scales (``group > 0``)."""
    return group > 0 and ((mode == "int" and bits in (4, 8)) or (mode == "lut" and bits == 4))


def _block_k(k: int, g: int) -> int:
    for b in (128, 64, 32, 16):
        if g % b == 0 and k % b == 0:
            return b
    return g


def pack_weights(codes, scale, zero=None, lut=None, *, bits: int, group: int, mode: str,
                 block_k: int | None = None) -> KernelWeights:
    """Kernel layout of a group-quantized (K, N) weight from plain arrays.

    ``codes``: (K, N) integers in ``[0, 2^bits)``, unpacked; ``scale``: (K/group, N) float; ``mode="int"``:
    values ``(code - zero) * scale`` with ``zero`` (K/group, N) (pass ``2^(bits-1)`` everywhere for a
    symmetric grid); ``mode="lut"``: ``lut[code] * scale`` with ``lut`` (16,) or one table per column
    (16, N).
    """
    if not supports(bits, mode, group):
        raise ValueError(f"the dequant-matmul kernel does not support bits={bits} mode={mode!r} group={group}")
    k, n = codes.shape
    if tuple(scale.shape) != (k // group, n):
        raise ValueError(f"scale must be (K/group, N) = {(k // group, n)}, got {tuple(scale.shape)}")
    if mode == "int" and (zero is None or tuple(zero.shape) != tuple(scale.shape)):
        raise ValueError("mode='int' needs zero with the scale's shape (2^(bits-1) for symmetric grids)")
    if mode == "lut" and lut is None:
        raise ValueError("mode='lut' needs the table")
    bk = block_k or _block_k(k, group)
    if k % bk or (group % bk and bk % group):
        raise ValueError(f"block_k {bk} must divide K={k} and align with group {group}")
    codes = jnp.asarray(codes).astype(jnp.uint8)
    if bits == 4:
        c = codes.reshape(k // bk, 2, bk // 2, n)
        codes = (c[:, 0] | (c[:, 1] << 4)).reshape(k // 2, n)
    return KernelWeights(codes, jnp.asarray(scale), None if zero is None else jnp.asarray(zero, jnp.float32),
                         None if lut is None else jnp.asarray(lut, jnp.float32), bits, group, bk, k, n, mode)


def _values(c, mode, zero_row, scale_row, lut_ref):
    """Dequantized float32 values of a block of codes (rows, bn)."""
    cf = c.astype(jnp.float32)
    if mode == "int":
        return (cf - zero_row) * scale_row
    v = jnp.zeros(cf.shape, jnp.float32)
    for j in range(16):  # 16-way select: no gather inside the kernel; entries read from the ref
        entry = lut_ref[pl.ds(j, 1), :] if len(lut_ref.shape) == 2 else lut_ref[j]
        v = jnp.where(c == j, entry.astype(jnp.float32), v)
    return v * scale_row


def _kernel(x_ref, c_ref, s_ref, z_ref, l_ref, o_ref, *, bits, mode, bk, group_rows):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    if group_rows:  # TPU: the scale block holds every group's row; pick this K-block's group
        row = jax.lax.div(kk, jnp.int32(group_rows[0]))  # not //: floor division lowers via sign, which
        # Mosaic lowers by querying the TPU generation (export without a TPU fails)
        s = s_ref[pl.ds(row, 1), :].astype(jnp.float32)
        z = z_ref[pl.ds(row, 1), :].astype(jnp.float32) if z_ref is not None else None
    else:           # GPU: the scale block is this K-block's (1, bn) row
        s = s_ref[...].astype(jnp.float32)
        z = z_ref[...].astype(jnp.float32) if z_ref is not None else None
    lut = l_ref
    c = c_ref[...]
    xdt = x_ref.dtype
    if bits == 4:
        half = bk // 2
        lo = _values(c & jnp.uint8(15), mode, z, s, lut).astype(xdt)
        hi = _values(c >> jnp.uint8(4), mode, z, s, lut).astype(xdt)
        acc = jnp.dot(x_ref[:, pl.ds(0, half)], lo, preferred_element_type=jnp.float32)
        acc += jnp.dot(x_ref[:, pl.ds(half, half)], hi, preferred_element_type=jnp.float32)
    else:
        acc = jnp.dot(x_ref[...], _values(c, mode, z, s, lut).astype(xdt), preferred_element_type=jnp.float32)
    o_ref[...] += acc


def _platform(platform):
    p = platform or jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(p, p)


def supports_platform(w: KernelWeights, platform: str | None = None) -> bool:
    """TPU (Mosaic) needs K-blocks that are multiples of 128 lanes; GPU (Triton) power-of-two blocks."""
    p = _platform(platform)
    if p == "tpu":
        return w.block_k % 128 == 0
    if p == "gpu":
        return w.block_k & (w.block_k - 1) == 0 and w.block_k >= 32
    return True


def dequant_matmul(x, w: KernelWeights, *, block_m: int | None = None, block_n: int = 128,
                   interpret: bool | None = None, platform: str | None = None):
    """``x @ dequant(W)`` with the Pallas kernel. x: (M, K); returns (M, N) in x.dtype.

    ``interpret=None`` runs the kernel in interpret mode on CPU (tests) and compiled elsewhere.
    ``platform`` ("gpu"/"cuda" -> Triton, "tpu" -> Mosaic) defaults to the default backend; it
    only needs setting when lowering for another platform (e.g. ``jax.export``).
    """
    plat = _platform(platform)
    if interpret is None:
        interpret = plat == "cpu"
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has {k} features, W has {w.k} inputs")
    if not interpret and not supports_platform(w, plat):
        raise ValueError(f"block_k={w.block_k} is not supported by the {plat} kernel; use the reference")
    bm = block_m or min(128, max(16, int(pl.next_power_of_2(m))))
    bn = min(block_n, w.n) if plat != "gpu" else block_n
    mp, np_ = -(-m // bm) * bm, -(-w.n // bn) * bn
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    padn = lambda a: None if a is None else jnp.pad(a, ((0, 0), (0, np_ - w.n)))
    codes, scale, zero = padn(w.codes), padn(w.scale), padn(w.zero)
    lut = w.lut if (w.lut is None or w.lut.ndim == 1) else padn(w.lut)
    bk = w.block_k
    rows_c = bk * w.bits // 8
    blocks_per_group = max(w.group // bk, 1)
    n_groups = w.k // w.group
    tpu = plat == "tpu" and not interpret
    if tpu:  # Mosaic wants (8, 128)-aligned blocks or full dims: give the kernel all group rows
        sspec = pl.BlockSpec((n_groups, bn), lambda i, j, kk: (0, j))
    else:
        sspec = pl.BlockSpec((1, bn), lambda i, j, kk: (kk // blocks_per_group, j))
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((rows_c, bn), lambda i, j, kk: (kk, j)), sspec,
                sspec if zero is not None else None]
    args = [xp, codes, scale, zero]
    if lut is None:
        in_specs.append(None)
    elif lut.ndim == 1:
        in_specs.append(pl.BlockSpec((16,), lambda i, j, kk: (0,)))
    else:
        in_specs.append(pl.BlockSpec((16, bn), lambda i, j, kk: (0, j)))
    args.append(lut)
    keep = [a is not None for a in args]
    kern = functools.partial(_kernel, bits=w.bits, mode=w.mode, bk=bk,
                             group_rows=(blocks_per_group,) if tpu else ())

    def body(*refs):
        it = iter(refs[:-1])
        full = [next(it) if k_ else None for k_ in keep]
        kern(*full, refs[-1])

    params = {}
    if plat == "gpu" and not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=3)
    out = pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // bm, np_ // bn, w.k // bk),
        in_specs=[s_ for s_, k_ in zip(in_specs, keep) if k_],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        interpret=interpret, **params,
    )(*[a for a in args if a is not None])
    return out[:m, :w.n].astype(x.dtype)


def dequant_matmul_reference(x, w: KernelWeights, *, block_m: int | None = None, block_n: int = 128,
                             interpret: bool | None = None):
    """Pure-jnp ``x @ dequant(W)`` on the same kernel layout (same signature, ignores tiling args)."""
    del block_m, block_n, interpret
    bk, k, n = w.block_k, w.k, w.n
    if w.bits == 4:
        c = w.codes.reshape(k // bk, bk // 2, n)
        codes = jnp.concatenate([c & 15, c >> 4], axis=1).reshape(k, n)
    else:
        codes = w.codes
    rep = lambda a: jnp.repeat(a, w.group, axis=0)
    s = rep(w.scale.astype(jnp.float32))
    if w.mode == "int":
        vals = (codes.astype(jnp.float32) - rep(w.zero.astype(jnp.float32))) * s
    else:
        table = w.lut.astype(jnp.float32)
        vals = (table[codes.astype(jnp.int32)] if table.ndim == 1
                else jnp.take_along_axis(table, codes.astype(jnp.int32), axis=0)) * s
    return jnp.dot(x, vals.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
