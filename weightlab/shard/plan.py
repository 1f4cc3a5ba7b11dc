"""Per-device memory of every pillar's job on a mesh, planned from shapes alone (``jax.eval_shape``).

:func:`plan_memory` takes a params tree of ``ShapeDtypeStruct`` (a 1B or 70B model costs nothing
to describe), mesh axis sizes (``{"data": 32, "model": 8}``: no devices needed) and sharding rules,
and returns one row per (job, component) with the bytes one device holds:

* ``params``: the model as sharded by the rules.
* ``quantize-rtn``: the params plus the quantized output (codes, scales, zeros: the
  :class:`~weightlab.quant.QArray` shapes ``eval_shape`` of the real transform gives, sharded by
  :mod:`.qarray`) plus one float32 working copy of the largest weight shard.
* ``quantize-gptq``: the same, plus input Hessians (K x K float32, one per distinct matmul input:
  q/k/v share one, gate/up share one; replicated over the tensor-parallel axis because the column
  sweep needs all of H⁻¹), both for one layer at a time (sequential GPTQ) and for all layers
  resident; row-parallel weights are gathered along their inputs for the sweep (one weight at a time).
* ``merge-N``: N fine-tuned models stacked, the base, and the output, all sharded like the params.
* ``align``: two models, the permuted output, and one cost matrix per permutation group (n x n
  float32, built sharded over all devices), here the MLP hidden units of every layer.
* ``align``: also one cost matrix gathered whole for its (sequential) LAP solve.
* ``lopt-<name>`` (``-lowmem``: factored second moments, bfloat16 state), ``optax-<name>`` (e.g.
  ``optax-adam``, for comparison): params, gradients and the optimizer's state (``eval_shape`` of
  the real ``init``), which follows the params' sharding.

The numbers are exact for the arrays listed (XLA's temporaries are not modelled): a lower bound
that :func:`measure` checks against ``addressable_shards`` on a real (CPU) mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..dtypes import true_bytes
from .rules import bytes_per_device, partition_specs

__all__ = ["AxisSizes", "plan_memory", "measure", "markdown"]


class AxisSizes:
    """Stands in for a ``Mesh`` where only axis sizes matter (planning for devices one lacks)."""

    def __init__(self, sizes: Mapping[str, int]):
        self.shape = dict(sizes)
        self.axis_names = tuple(sizes)
        self.size = math.prod(self.shape.values())


def _mesh(m):
    return m if hasattr(m, "shape") and hasattr(m, "axis_names") else AxisSizes(m)


def _per_device(tree, mesh, rules) -> int:
    specs = partition_specs(tree, rules, mesh, indivisible="replicate")
    total = 0

    def one(path, x, s):
        nonlocal total
        if wtree.is_weight(x):
            total += bytes_per_device(x, s, mesh)
        return None

    wtree.map_with_path(one, tree, specs, is_leaf=wtree.is_atomic)
    return total


def _largest_shard(tree, mesh, rules, sel, dtype=jnp.float32) -> int:
    specs = partition_specs(tree, rules, mesh, indivisible="replicate")
    best = 0

    def one(path, x, s):
        nonlocal best
        if wtree.is_array(x) and sel(path, x):
            best = max(best, bytes_per_device(jax.ShapeDtypeStruct(x.shape, dtype), s, mesh))
        return None

    wtree.map_with_path(one, tree, specs, is_leaf=wtree.is_atomic)
    return best


_NUMBERED = r"(\d+|.*_\d+)"                         # "3" (model.layers.3), "layer_3", "EncoderBlock_3"
_ATTN_IN = r"q|k|v|query|key|value|wq|wk|wv|q_proj|k_proj|v_proj"
_MLP_IN = r"gate|up|w1|w3|gate_proj|up_proj|wi_0|wi_1"


def _hessian_groups(shapes: Mapping[str, Any], select) -> dict[str, list[int]]:
    """Per layer, the input sizes K of the distinct matmul inputs of the selected 2-D weights: Q/K/V
    of one attention share one input, gate/up (w1/w3) of one MLP or expert another, every other
    weight has its own. A layer is the path up to the first numbered segment that numbers a list
    (``model.layers.3``, ``encoder/layer_3``, ``Encoder_0/EncoderBlock_3``: ``Encoder_0`` has no
    siblings, so it is not the list). K is the last axis of a PyTorch-layout ``weight`` (out, in)
    and the first of a flax ``kernel`` (in, out); a (in, out) ``weight`` (GPT-2's Conv1D) is
    mis-sized."""
    import re

    picked = {p: re.split(r"[./]", p) for p, x in shapes.items()
              if wtree.is_array(x) and len(x.shape) == 2 and select(p, x)}
    siblings: dict[tuple, set] = {}
    for segs in picked.values():
        for i, seg in enumerate(segs[:-1]):
            if re.fullmatch(_NUMBERED, seg):
                siblings.setdefault((tuple(segs[:i]), re.sub(r"\d+$", "", seg)), set()).add(seg)
    layers: dict[str, dict[str, int]] = {}
    for path, segs in picked.items():
        cut = next((i + 1 for i, seg in enumerate(segs[:-1]) if re.fullmatch(_NUMBERED, seg)
                    and len(siblings[(tuple(segs[:i]), re.sub(r"\d+$", "", seg))]) > 1), 0)
        rest = segs[cut:-1]  # the weight's name inside its layer, without 'weight'/'kernel'
        shared = [("attn_in" if re.fullmatch(_ATTN_IN, s) else "mlp_in" if re.fullmatch(_MLP_IN, s) else s)
                  for s in rest] if rest else [segs[-1]]
        x = shapes[path]
        k = int(x.shape[0] if segs[-1] == "kernel" else x.shape[-1])
        layers.setdefault(".".join(segs[:cut]), {})[".".join(shared)] = k
    return {k: list(v.values()) for k, v in layers.items()}


def plan_memory(shapes: Any, mesh, rules, *, jobs=("params", "quantize-rtn", "quantize-gptq", "merge-3", "align",
                                                    "lopt-small_fc", "lopt-small_fc-lowmem", "optax-adam"), quant_hp: dict | None = None,
                select: wtree.SelectorLike = r"(proj|dense|query|key|value)\.weight$|kernel$",
                ) -> list[dict]:
    """Rows ``{"job", "component", "bytes_per_device"}`` (plus a ``"total"`` component per job)
    for ``shapes`` (ShapeDtypeStruct tree) on ``mesh`` (a Mesh or ``{axis: size}``) sharded by
    ``rules``. ``quant_hp``: the quantizer's hyper-parameters (default 4-bit, groups of 128 along
    the input axis -1, the HF layout)."""
    from .. import core
    from ..quant import registry as qreg

    mesh = _mesh(mesh)
    sel = wtree.selector(select)
    hp = dict(bits=4, group_size=128, axis=-1) if quant_hp is None else dict(quant_hp)
    rows = []
    add = lambda job, comp, b: rows.append({"job": job, "component": comp, "bytes_per_device": int(b)})  # noqa
    p_bytes = _per_device(shapes, mesh, rules)
    for job in jobs:
        if job == "params":
            add(job, "params", p_bytes)
        elif job.startswith("quantize-"):
            method = job.split("-", 1)[1]
            t = core.select(sel, qreg.transform("rtn", **hp))  # GPTQ's output has RTN's layout
            out = jax.eval_shape(lambda p: core.apply_once(t, p), shapes)
            q_bytes = _per_device(out, mesh, rules)
            work = _largest_shard(shapes, mesh, rules, sel)
            add(job, "params (input)", p_bytes)
            add(job, "quantized output", q_bytes)
            add(job, "float32 working copy of the largest weight shard", work)
            total = p_bytes + q_bytes + work
            if method == "gptq":
                groups = _hessian_groups(shapes, sel)
                per_layer = [sum(4 * k * k for k in ks) for ks in groups.values()]
                one = max(per_layer, default=0)
                add(job, "Hessians, one layer (sequential)", one)
                add(job, "Hessians, all layers resident", sum(per_layer))
                specs = wtree.to_flat_dict(partition_specs(shapes, rules, mesh, indivisible="replicate"))
                gathered = max((true_bytes(x.shape, jnp.float32) for p, x in wtree.to_flat_dict(shapes).items()
                                if wtree.is_array(x) and len(x.shape) == 2 and sel(p, x)
                                and list(specs[p])[-1] is not None), default=0)
                add(job, "row-parallel weight gathered for its sweep", gathered)
                total += one + gathered
            add(job, "total", total)
        elif job.startswith("merge-"):
            n = int(job.split("-", 1)[1])
            add(job, f"{n} models (stacked)", n * p_bytes)
            add(job, "base + output", 2 * p_bytes)
            add(job, "total", (n + 2) * p_bytes)
        elif job == "align":
            flat = wtree.to_flat_dict(shapes)
            hidden = [int(x.shape[0]) for p, x in flat.items() if wtree.is_array(x) and p.endswith("up_proj.weight")]
            cost = sum(4 * n * n for n in hidden) / mesh.size
            solve = max((4 * n * n for n in hidden), default=0)
            add(job, "two models + permuted output", 3 * p_bytes)
            add(job, "cost matrices (MLP hidden units, all layers, sharded over all devices)", cost)
            add(job, "one cost matrix gathered for its LAP solve", solve)
            add(job, "total", 3 * p_bytes + cost + solve)
        elif job.startswith(("lopt-", "optax-")):
            import optax

            from ..lopt import optimizer

            name = job.split("-", 1)[1]
            if job.startswith("optax-"):
                opt = getattr(optax, name)(1e-3)
            elif name.endswith("-lowmem"):
                opt = optimizer(name[: -len("-lowmem")], factored=True, state_dtype=jnp.bfloat16)
            else:
                opt = optimizer(name)
            state = 0
            cache: dict = {}
            specs = partition_specs(shapes, rules, mesh, indivisible="replicate")

            def one(path, x, s):
                nonlocal state
                if not wtree.is_array(x):
                    return None
                key = (tuple(x.shape), str(x.dtype))
                if key not in cache:
                    st = jax.eval_shape(opt.init, {"w": x})
                    cache[key] = sum(true_bytes(a.shape, a.dtype) for a in jax.tree.leaves(st))
                shards = math.prod(int(np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else e)]))
                                   for e in s if e is not None)
                state += cache[key] / shards
                return None

            wtree.map_with_path(one, shapes, specs)
            add(job, "params", p_bytes)
            add(job, "gradients", p_bytes)
            add(job, "optimizer state", state)
            add(job, "total", 2 * p_bytes + state)
        else:
            raise ValueError(f"unknown job {job!r}")
    return rows


def measure(tree: Any) -> int:
    """Bytes the most loaded device really holds of ``tree``'s arrays (from ``addressable_shards``)."""
    per: dict = {}
    for x in jax.tree.leaves(tree):
        for s in getattr(x, "addressable_shards", []):
            per[s.device] = per.get(s.device, 0) + true_bytes(s.data.shape, s.data.dtype)
    return max(per.values(), default=0)


def markdown(plans: Mapping[str, list[dict]], unit: float = 2 ** 30) -> str:
    """A table: one row per (job, component), one column per plan (e.g. per mesh), in GiB."""
    names = list(plans)
    first = plans[names[0]]
    head = "| job | component | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    lines = []
    for i, r in enumerate(first):
        vals = [plans[n][i]["bytes_per_device"] / unit for n in names]
        comp = f"**{r['component']}**" if r["component"] == "total" else r["component"]
        lines.append(f"| {r['job']} | {comp} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return head + "\n".join(lines) + "\n"
