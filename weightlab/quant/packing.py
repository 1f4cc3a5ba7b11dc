"""Bit-exact packing of b-bit codes along one axis.

b in {1, 2, 4, 8}: ``8 // b`` codes per uint8, code i of a byte in bits ``[i*b, (i+1)*b)`` (low
bits first). Other b (3, 5, 6, 7): a little-endian bit stream in uint32 words, 32 codes per ``b``
words, so 3-bit codes really take 3 bits. The packed axis is padded with zero codes to a whole
word; the true length is kept by the caller (QArray's shape).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["packed_dtype", "codes_per_block", "packed_length", "pack", "unpack"]


def packed_dtype(bits: int):
    return jnp.uint8 if bits in (1, 2, 4, 8) else jnp.uint32


def codes_per_block(bits: int) -> int:
    """Codes in one packing block: one byte for b | 8, 32 codes (= b words) otherwise."""
    return 8 // bits if bits in (1, 2, 4, 8) else 32


def packed_length(n: int, bits: int) -> int:
    """Packed size of an axis of n codes."""
    per = codes_per_block(bits)
    blocks = -(-n // per)
    return blocks if bits in (1, 2, 4, 8) else blocks * bits


def pack(codes, bits: int, axis: int = 0):
    """Pack integer codes in ``[0, 2^bits)`` along ``axis``."""
    codes = jnp.moveaxis(jnp.asarray(codes), axis, -1)
    n = codes.shape[-1]
    per = codes_per_block(bits)
    pad = (-n) % per
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    lead = codes.shape[:-1]
    if bits in (1, 2, 4, 8):
        c = codes.astype(jnp.uint8).reshape(*lead, -1, per)
        shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
        out = jnp.bitwise_or.reduce(c << shifts, axis=-1) if per > 1 else c[..., 0]
    else:
        c = codes.astype(jnp.uint32).reshape(*lead, -1, 32)
        bitpos = jnp.arange(bits, dtype=jnp.uint32)
        bitarr = ((c[..., None] >> bitpos) & 1).reshape(*lead, -1, bits, 32)  # 32*b bits -> b words
        out = jnp.sum(bitarr << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
        out = out.reshape(*lead, -1)
    return jnp.moveaxis(out, -1, axis)


def unpack(packed, bits: int, n: int, axis: int = 0):
    """Inverse of :func:`pack`: ``n`` codes (uint8, or uint32 for > 8 bits never used) along ``axis``."""
    p = jnp.moveaxis(jnp.asarray(packed), axis, -1)
    lead = p.shape[:-1]
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
        mask = jnp.uint8((1 << bits) - 1) if bits < 8 else jnp.uint8(0xFF)
        c = ((p[..., None] >> shifts) & mask).reshape(*lead, -1)
    else:
        words = p.reshape(*lead, -1, bits)
        bitarr = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # (..., blocks, b, 32)
        bitarr = bitarr.reshape(*lead, -1, 32, bits)                          # code-major order
        c = jnp.sum(bitarr << jnp.arange(bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
        c = c.reshape(*lead, -1).astype(jnp.uint8)
    return jnp.moveaxis(c[..., :n], -1, axis)
