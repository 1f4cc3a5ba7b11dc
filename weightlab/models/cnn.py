"""ResNet-20-style 1-D convolutional network (flax NNX) for MNIST-1D-like signals.

He et al., "Deep Residual Learning for Image Recognition" (2016), CIFAR variant: a stem conv, three
stages of ``blocks`` basic blocks with widths (16, 32, 64) x ``width``, stride 2 between stages,
global average pooling and a linear head (``blocks=3`` gives 20 layers). Deliberate differences: 1-D
convolutions, and LayerNorm (over channels) or no normalisation instead of BatchNorm, so that
``apply_fn`` stays a pure function of the weights (no running statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .base import Model, from_nnx, scaled

__all__ = ["ResNet1D", "cnn"]


class _Norm(nnx.Module):
    def __init__(self, c: int, kind: str, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "layer":
            self.ln = nnx.LayerNorm(c, rngs=rngs)

    def __call__(self, x):
        return self.ln(x) if self.kind == "layer" else x


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, rngs: nnx.Rngs):
        self.conv_0 = nnx.Conv(cin, cout, (3,), strides=(stride,), use_bias=norm == "none", rngs=rngs)
        self.norm_0 = _Norm(cout, norm, rngs)
        self.conv_1 = nnx.Conv(cout, cout, (3,), use_bias=norm == "none", rngs=rngs)
        self.norm_1 = _Norm(cout, norm, rngs)
        self.has_proj = stride != 1 or cin != cout
        if self.has_proj:
            self.proj = nnx.Conv(cin, cout, (1,), strides=(stride,), use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.norm_0(self.conv_0(x)))
        h = self.norm_1(self.conv_1(h))
        return jax.nn.relu(h + (self.proj(x) if self.has_proj else x))


class ResNet1D(nnx.Module):
    def __init__(self, in_channels: int, num_classes: int, blocks: int, widths, norm: str, *, rngs: nnx.Rngs):
        if norm not in ("layer", "none"):
            raise ValueError(f"norm must be 'layer' or 'none', got {norm!r}")
        self.stem = nnx.Conv(in_channels, widths[0], (3,), use_bias=norm == "none", rngs=rngs)
        self.stem_norm = _Norm(widths[0], norm, rngs)
        self.names = []
        c = widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks):
                name = f"stage_{s}_block_{b}"
                setattr(self, name, BasicBlock(c, w, 2 if (b == 0 and s > 0) else 1, norm, rngs))
                self.names.append(name)
                c = w
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x):
        if x.ndim == 2:
            x = x[..., None]  # (B, L) -> (B, L, 1)
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for name in self.names:
            x = getattr(self, name)(x)
        return self.head(jnp.mean(x, axis=1))


def cnn(key: jax.Array, in_channels: int = 1, num_classes: int = 10, blocks: int = 3, width: float = 1.0,
        norm: str = "layer") -> Model:
    """ResNet-(6*blocks+2) for 1-D inputs (B, L) or (B, L, C)."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    widths = [scaled(c, width) for c in (16, 32, 64)]
    return from_nnx(ResNet1D(in_channels, num_classes, blocks, widths, norm, rngs=nnx.Rngs(seed)), "cnn")
