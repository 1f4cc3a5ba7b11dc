"""Calibration capture for any JAX function, by tracing it to a jaxpr (no module hooks).

Given ``apply_fn(params, batch)``, we trace it once, find every ``dot_general`` one of whose operands
is a parameter leaf (directly, or through dtype conversions / copies / transposes), and evaluate the
jaxpr with an interpreter that, beside computing the outputs, accumulates for each such weight the
statistics of the *other* operand (its input activations ``x``, features = the contracted axis):

* ``xtx = Σ xᵀx`` (the GPTQ/QERA/RegMean Gram matrix; GPTQ's Hessian is ``2·xtx / n``),
* ``abs_sum = Σ |x|`` per feature (AWQ's activation scale), ``n`` = number of rows.

The interpreter itself is jit-compiled, so calibration runs at compiled speed. Nested ``jit`` /
``custom_jvp`` / ``custom_vjp`` / ``remat`` calls are entered; weights used only inside control flow
(``scan``, ``while``, ``cond``) are not seen and are reported as missing. A weight used by several
matmuls (tied embeddings) accumulates all of them. Works for flax NNX/linen, equinox and plain
functions alike, since it only looks at the traced program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .. import tree as wtree
from ..errors import QuantizationError

__all__ = ["Stats", "Capturer", "capture", "matmul_weights"]

_TRANSPARENT = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "custom_lin"}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["xtx", "abs_sum", "n"], meta_fields=["axis"])
@dataclasses.dataclass(frozen=True)
class Stats:
    """Input statistics of one weight (a pytree: it passes through ``jit``; ``axis`` is static).
    ``axis``: the weight's axis contracted with ``x``."""

    xtx: jax.Array       # (F, F) float32, Σ xᵀx
    abs_sum: Any         # (F,) Σ |x| (None in rotated statistics, which cannot derive it)
    n: jax.Array         # rows seen
    axis: int

    @property
    def hessian(self):
        """GPTQ's H = 2 XᵀX / n."""
        return 2.0 * self.xtx / jnp.maximum(self.n, 1)

    @property
    def abs_mean(self):
        """AWQ's mean |x| per input feature."""
        return self.abs_sum / jnp.maximum(self.n, 1)

    def __add__(self, o: "Stats") -> "Stats":
        a = None if self.abs_sum is None or o.abs_sum is None else self.abs_sum + o.abs_sum
        return Stats(self.xtx + o.xtx, a, self.n + o.n, self.axis)

    def rotated(self, r) -> "Stats":
        """Statistics of the rotated inputs ``x R``: ``Rᵀ XᵀX R`` (mean |x R| is not derivable: None)."""
        return Stats(r.T @ self.xtx @ r, None, self.n, self.axis)


def _sub_jaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        if j is not None and hasattr(j, "eqns" if not hasattr(j, "jaxpr") else "jaxpr"):
            return (j.jaxpr, j.consts) if hasattr(j, "jaxpr") else (j, ())
    return None


def _walk(jaxpr, consts, args, tags, on_dot, want_values=True):
    """Evaluate ``jaxpr``; ``tags``: var -> (param index, perm) for values that are parameters.
    ``on_dot(param_index, weight_axis, x_value, x_contract_axis)`` is called for each parameter matmul."""
    env: dict = {}
    tenv: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for v, t in tags.items():
        tenv[v] = t
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invals = [read(v) for v in eqn.invars]
        intags = [tenv.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
        sub = _sub_jaxpr(eqn) if name in _CALLS else None
        if sub is not None:
            inner, inner_consts = sub
            inner_tags = {iv: t for iv, t in zip(inner.invars, intags) if t is not None}
            outvals, outtags = _walk(inner, inner_consts, invals, inner_tags, on_dot)
            for v, val, t in zip(eqn.outvars, outvals, outtags):
                env[v] = val
                if t is not None:
                    tenv[v] = t
            continue
        if name == "dot_general" and any(t is not None for t in intags):
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            side = 1 if intags[1] is not None else 0
            pidx, perm = intags[side]
            wc, xc = (rc, lc) if side == 1 else (lc, rc)
            wb = rb if side == 1 else lb
            if len(wc) == 1 and not wb and intags[1 - side] is None:
                on_dot(pidx, perm[wc[0]], invals[1 - side], xc[0])
        outs = eqn.primitive.bind(*invals, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for v, val in zip(eqn.outvars, outs):
            env[v] = val
        if intags and intags[0] is not None and len(eqn.invars) == 1:
            pidx, perm = intags[0]
            if name in _TRANSPARENT:
                tenv[eqn.outvars[0]] = (pidx, perm)
            elif name == "transpose":
                tenv[eqn.outvars[0]] = (pidx, tuple(perm[p] for p in eqn.params["permutation"]))
    outvals = [read(v) for v in jaxpr.outvars]
    outtags = [tenv.get(v) if not isinstance(v, jcore.Literal) else None for v in jaxpr.outvars]
    return outvals, outtags


def _trace(apply_fn, params, batch):
    pairs, treedef = wtree.flatten_with_paths(params)
    leaves = [x for _, x in pairs]
    b_leaves, b_def = jax.tree.flatten(batch)
    closed = jax.make_jaxpr(lambda ls, bs: apply_fn(treedef.unflatten(ls), b_def.unflatten(bs)))(leaves, b_leaves)
    return closed, pairs, b_def


def matmul_weights(apply_fn: Callable, params, batch) -> list[str]:
    """Paths of the parameter leaves used as a matmul operand, in order of first use."""
    closed, pairs, _ = _trace(apply_fn, params, batch)
    n = len(pairs)
    tags = {v: (i, tuple(range(len(v.aval.shape)))) for i, v in enumerate(closed.jaxpr.invars[:n])}
    order: list[int] = []

    def on_dot(pidx, axis, x, xc):
        if pidx not in order:
            order.append(pidx)

    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    jax.eval_shape(lambda *a: _walk(closed.jaxpr, closed.consts, a, tags, on_dot)[0], *args)
    return [pairs[i][0] for i in order]


class Capturer:
    """Compiled statistics collector for one function and params structure; reuse it across
    calls with different parameter values (sequential GPTQ re-captures after every layer)."""

    def __init__(self, apply_fn: Callable, params, batch, *, select: wtree.SelectorLike = None,
                 row_mask: Callable[[Any], Any] | None = None):
        closed, pairs, _ = _trace(apply_fn, params, batch)
        self.paths = [p for p, _ in pairs]
        n = len(pairs)
        tags = {v: (i, tuple(range(len(v.aval.shape)))) for i, v in enumerate(closed.jaxpr.invars[:n])}
        sel = wtree.selector(select)
        wanted = {i for i, (p, x) in enumerate(pairs) if sel(p, x)}
        self.row_mask = row_mask
        self._axes: dict[int, int] = {}

        def run(leaves, b_leaves, mask):
            acc: dict[int, tuple] = {}

            def on_dot(pidx, axis, x, xc):
                if pidx not in wanted:
                    return
                xm = jnp.moveaxis(x, xc, -1).astype(jnp.float32)
                if mask is not None and xm.ndim - 1 == mask.ndim and mask.shape == xm.shape[:-1]:
                    xm = xm * mask[..., None].astype(jnp.float32)
                    rows = jnp.sum(mask).astype(jnp.float32)
                else:
                    rows = jnp.float32(np.prod(xm.shape[:-1]))
                x2 = xm.reshape(-1, xm.shape[-1])
                s = (x2.T @ x2, jnp.sum(jnp.abs(x2), axis=0), rows)
                acc[pidx] = tuple(a + b for a, b in zip(acc[pidx], s)) if pidx in acc else s
                self._axes[pidx] = axis

            _walk(closed.jaxpr, closed.consts, list(leaves) + list(b_leaves), tags, on_dot)
            return acc

        self._f = jax.jit(run)

    def __call__(self, params, batches: Iterable[Any]) -> dict[str, Stats]:
        leaves = [x for _, x in wtree.flatten_with_paths(params)[0]]
        total: dict[int, Stats] = {}
        for b in batches:
            mask = None if self.row_mask is None else jnp.asarray(self.row_mask(b))
            for i, (xtx, a, cnt) in self._f(leaves, jax.tree.leaves(b), mask).items():
                s = Stats(xtx, a, cnt, self._axes[i])
                total[i] = total[i] + s if i in total else s
        return {self.paths[i]: s for i, s in sorted(total.items())}


def capture(apply_fn: Callable, params, batches: Iterable[Any], *, select: wtree.SelectorLike = None,
            row_mask: Callable[[Any], Any] | None = None) -> dict[str, Stats]:
    """Input statistics of every parameter used as a matmul operand (optionally only those
    ``select`` picks, any :func:`weightlab.tree.selector`), accumulated over ``batches``: the
    ``stats=`` extra of the calibrated quantizers (``quant.gptq``, ``quant.awq``).

    ``row_mask(batch)`` may return a 0/1 array over the leading axes of the activations (e.g. the
    attention mask (B, T) of a transformer) so padding positions do not count.
    """
    batches = list(batches)
    if not batches:
        raise QuantizationError("capture() needs at least one calibration batch")
    return Capturer(apply_fn, params, batches[0], select=select, row_mask=row_mask)(params, batches)
