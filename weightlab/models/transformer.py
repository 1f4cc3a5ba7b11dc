"""Small pre-LN transformer classifier (flax NNX): multi-head attention with optional GQA and RoPE.

Vaswani et al. (2017) with pre-LayerNorm blocks (Xiong et al., 2020); grouped-query attention
(Ainslie et al., 2023) via ``num_kv_heads``; rotary embeddings (Su et al., 2021) via ``rope=True``
(otherwise learned absolute positions). Each input position (a scalar for MNIST-1D, or a vector)
is linearly embedded; the sequence is mean-pooled before the head. The layout (``block_i/attn/
{query,key,value,out}``, ``block_i/mlp/{up,down}``) is what the alignment pillar's head-aware
permutation spec expects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .base import Model, from_nnx, scaled
from .layers import attention, rope

__all__ = ["Transformer", "transformer"]


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, use_rope: bool, rngs: nnx.Rngs):
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"dim {dim}, heads {num_heads}, kv heads {num_kv_heads} are incompatible")
        self.h, self.g, self.hd, self.use_rope = num_heads, num_kv_heads, dim // num_heads, use_rope
        self.query = nnx.Linear(dim, num_heads * self.hd, rngs=rngs)
        self.key = nnx.Linear(dim, num_kv_heads * self.hd, rngs=rngs)
        self.value = nnx.Linear(dim, num_kv_heads * self.hd, rngs=rngs)
        self.out = nnx.Linear(num_heads * self.hd, dim, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, self.h, self.hd)
        k = self.key(x).reshape(b, t, self.g, self.hd)
        v = self.value(x).reshape(b, t, self.g, self.hd)
        if self.use_rope:
            pos = jnp.arange(t)
            q, k = rope(q, pos), rope(k, pos)
        return self.out(attention(q, k, v).reshape(b, t, self.h * self.hd))


class Block(nnx.Module):
    def __init__(self, dim, num_heads, num_kv_heads, mlp_ratio, use_rope, rngs):
        self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, num_kv_heads, use_rope, rngs)
        self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = _MLP(dim, mlp_ratio * dim, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class _MLP(nnx.Module):
    def __init__(self, dim, hidden, rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Transformer(nnx.Module):
    def __init__(self, in_features, num_classes, seq_len, dim, depth, num_heads, num_kv_heads, mlp_ratio, use_rope,
                 *, rngs: nnx.Rngs):
        self.depth, self.use_rope = depth, use_rope
        self.embed = nnx.Linear(in_features, dim, rngs=rngs)
        if not use_rope:
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
        for i in range(depth):
            setattr(self, f"block_{i}", Block(dim, num_heads, num_kv_heads, mlp_ratio, use_rope, rngs))
        self.final_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        if x.ndim == 2:
            x = x[..., None]  # (B, T) scalars -> (B, T, 1)
        h = self.embed(x)
        if not self.use_rope:
            h = h + self.pos[...][: h.shape[1]]
        for i in range(self.depth):
            h = getattr(self, f"block_{i}")(h)
        return self.head(jnp.mean(self.final_norm(h), axis=1))


def transformer(key: jax.Array, in_features: int = 1, num_classes: int = 10, seq_len: int = 40, dim: int = 64,
                depth: int = 2, num_heads: int = 4, num_kv_heads: int | None = None, mlp_ratio: int = 4,
                rope: bool = False, width: float = 1.0) -> Model:
    """Pre-LN transformer classifier; ``width`` scales ``dim`` (kept a multiple of ``num_heads``)."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    dim = max(num_heads, scaled(dim // num_heads, width) * num_heads)
    m = Transformer(in_features, num_classes, seq_len, dim, depth, num_heads, num_kv_heads or num_heads, mlp_ratio,
                    rope, rngs=nnx.Rngs(seed))
    return from_nnx(m, "transformer")
