"""Default sharding rules for the bundled model families, and data-parallel batches.

Tensor parallelism as Megatron-LM lays it out (Shoeybi et al. 2019, arXiv 1909.08053): the first
matmul of each attention and MLP block is split along its *output* features (column-parallel:
q/k/v, gate/up), the second along its *input* features (row-parallel: o, down), so a block needs
one reduction at its end. Embedding tables are split along the hidden axis (vocabularies such as
BERT's 30522 rarely divide a mesh), the LM head along the vocabulary. Norms and biases of
row-parallel layers are replicated. ``fsdp=True`` additionally splits the other axis of every
matrix over the data axis (ZeRO-3 / FSDP style), which is what lets a model larger than one device
fit (see docs/scale.md).

Each family's rules are written for its checkpoint layout: LLaMA and BERT keep Hugging Face's
``(out, in)`` ``.weight`` tensors; weightlab's flax models (``models.mlp``/``transformer``/``cnn``)
keep flax's ``(in, out)`` ``kernel``. :func:`default_rules` picks the family from the paths.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import tree as wtree
from ..errors import ShardingError

__all__ = ["FAMILY_RULES", "default_rules", "batch_sharding", "shard_batch"]


def _torch(col_out: str, row_in: str, extra=(), *, model: str, data: str | None):
    """Rules for (out, in) weights: column-parallel ``col_out`` regex, row-parallel ``row_in``."""
    return [(col_out + r"\.weight$", P(model, data)), (col_out + r"\.bias$", P(model)),
            (row_in + r"\.weight$", P(data, model)), *extra]


def _llama(model, data):
    return _torch(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)", r"(o_proj|down_proj)",
                  [(r"embed_tokens\.weight$", P(data, model)), (r"lm_head\.weight$", P(model, data))],
                  model=model, data=data)


def _bert(model, data):
    return _torch(r"(attention\.self\.(query|key|value)|intermediate\.dense)", r"(attention\.output\.dense|"
                  r"layer\.\d+\.output\.dense)", [(r"word_embeddings\.weight$", P(data, model))], model=model, data=data)


def _flax(model, data):
    col, row = r"(attn/(query|key|value)|mlp/(up|gate)|dense_\d+)", r"(attn/out|mlp/down)"
    return [(col + r"/kernel$", P(data, model)), (col + r"/bias$", P(model)), (row + r"/kernel$", P(model, data)),
            # (width, in, out) convolutions: a whole path component, and rank 3 only (not q_proj/kernel)
            (wtree.selector(r"(^|/)(conv_\d+|proj|stem)/kernel$") & wtree.selector(lambda p, x: x.ndim == 3),
             P(None, data, model)),
            (r"embed/kernel$", P(data, model)), (r"head/kernel$", P(data, None))]


FAMILY_RULES = {"llama": _llama, "bert": _bert, "flax": _flax}
_MARKERS = {"llama": r"self_attn\.(q|k|v|o)_proj\.weight$|mlp\.(gate|up|down)_proj\.weight$",
            "bert": r"attention\.self\.(query|key|value)\.weight$", "flax": r"/kernel$"}


def default_rules(params: Any = None, family: str | None = None, *, model_axis: str = "model",
                  data_axis: str = "data", fsdp: bool = False) -> list:
    """Tensor-parallel rules over ``model_axis`` for ``family`` (``"llama"``, ``"bert"``,
    ``"flax"``), or the family ``params``' paths show. ``fsdp=True`` also splits every matrix's
    other axis over ``data_axis``. Use with ``indivisible="replicate"`` on models whose sizes a
    mesh axis may not divide (``shard(params, mesh)`` without rules does)."""
    if family is None:
        if params is None:
            raise ShardingError("", "default_rules needs params (to recognise the family) or family=")
        paths = wtree.paths(params)
        import re

        family = next((f for f, rx in _MARKERS.items() if any(re.search(rx, p) for p in paths)), None)
        if family is None:
            return []  # unknown layout: everything replicated (explain() shows it)
    if family not in FAMILY_RULES:
        raise ShardingError("", f"unknown model family {family!r}; known: {sorted(FAMILY_RULES)}")
    return FAMILY_RULES[family](model_axis, data_axis if fsdp else None)


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: str | tuple = "data") -> NamedSharding:
    """The sharding of a data-parallel batch: leading (example) axis split over ``axis``."""
    return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh, axis: str | tuple = "data") -> Any:
    """``device_put`` every array of ``batch`` split along its first axis over ``axis`` (the
    calibration, meta-training and statistics batches); a first axis the mesh axis does not divide
    is a ShardingError naming the leaf."""
    from .rules import axis_size

    n = axis_size(mesh, axis)

    def one(path, x):
        if not wtree.is_array(x):
            return x
        if x.ndim == 0 or x.shape[0] % n:
            raise ShardingError(path, f"batch axis 0 (length {x.shape[0] if x.ndim else 'scalar'}) is not divisible "
                                      f"by mesh axis {axis!r} (size {n})", axis=axis, shape=tuple(x.shape))
        from .run import put

        return put(x, batch_sharding(mesh, x.ndim, axis))

    return wtree.map_with_path(one, batch)
