"""The reference-model contract: a pure ``apply_fn(params, batch)`` plus a params pytree.

Params are plain nested dicts with string keys (``dense_0/kernel``), so they round-trip through
safetensors without a template and every pillar can treat them as ordinary pytrees.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

__all__ = ["Model", "from_nnx", "scaled"]

Params = Any


class Model(NamedTuple):
    """``apply_fn(params, batch) -> outputs`` (pure, jit-able) and initial ``params``."""

    apply_fn: Callable[[Params, Any], Any]
    params: Params
    name: str = "model"


def from_nnx(module, name: str = "model") -> Model:
    """Split a flax NNX module into a pure apply function over a pure-dict params pytree."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    params = state.to_pure_dict()

    def apply_fn(params, batch):
        return nnx.merge(graphdef, params)(batch)

    return Model(apply_fn, params, name)


def scaled(n: int, width: float) -> int:
    """Width multiplier: ``max(1, round(n * width))``."""
    return max(1, int(round(n * width)))
