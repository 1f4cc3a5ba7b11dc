"""Shared pure-jnp pieces: scaled dot-product attention (with GQA) and rotary embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention", "rope"]


def attention(q, k, v, key_mask=None):
    """Softmax attention. q: (B, T, H, D); k, v: (B, S, G, D) with H a multiple of G (GQA: each
    group of H/G query heads shares one key/value head). key_mask: (B, S) bool, True = attend to
    that key (padding mask). Returns (B, T, H, D)."""
    b, t, h, d = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} key/value heads")
    q = q.reshape(b, t, g, h // g, d)
    s = jnp.einsum("btgrd,bsgd->bgrts", q, k) / jnp.sqrt(d).astype(q.dtype)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, None, :], s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bgrts,bsgd->btgrd", p, v).reshape(b, t, h, d)


def rope(x, positions, base: float = 10000.0):
    """Rotary position embedding (Su et al., RoFormer 2021), half-split convention: the first and
    second halves of the head dimension form the rotated pairs. x: (B, T, H, D), positions: (T,)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    inv = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)
