"""Multi-layer perceptron (flax NNX) with a width multiplier."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from .base import Model, from_nnx, scaled

__all__ = ["MLP", "mlp"]


class MLP(nnx.Module):
    """``dense_0 .. dense_{L-1}`` (ReLU) then ``head``; input (B, D) or (B, ...) flattened."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *, rngs: nnx.Rngs):
        self.depth = len(hidden)
        d = in_dim
        for i, h in enumerate(hidden):
            setattr(self, f"dense_{i}", nnx.Linear(d, h, rngs=rngs))
            d = h
        self.head = nnx.Linear(d, out_dim, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
        return self.head(x)


def mlp(key: jax.Array, in_dim: int = 40, hidden: Sequence[int] = (128, 128), out_dim: int = 10,
        width: float = 1.0) -> Model:
    """An MLP classifier; hidden sizes are multiplied by ``width``."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    m = MLP(in_dim, [scaled(h, width) for h in hidden], out_dim, rngs=nnx.Rngs(seed))
    return from_nnx(m, "mlp")
