"""Run flax modules (linen and NNX) on quantized weights, dequantizing each one where it is read.

A :class:`~weightlab.quant.QArray` is a pytree node whose leaves (packed codes, scales, zeros ...)
have other shapes than the weight it stands for, so a flax module cannot read it as a parameter
(linen checks every parameter's shape against its initializer: ``ScopeParamShapeError``). Both
flavours of flax have a hook at the point where a module *reads* a parameter; this module puts a
box there that holds the QArray and hands the module the dequantized array:

* linen: :class:`QBox`, a ``flax.core.meta.AxisMetadata`` box (the mechanism flax's own
  ``Partitioned`` uses): ``Module.param`` unboxes what it reads, and unboxing dequantizes.
  :func:`apply` boxes every QArray of the variables and calls ``module.apply``; with ``dot=True``
  ``nn.Dense`` layers call :func:`weightlab.quant.dot` (the fused Pallas kernel on GPU/TPU) through
  ``nn.intercept_methods`` instead of reading the kernel at all.
* NNX: :class:`QParam`, an ``nnx.Param`` whose reads (``kernel[...]``, ``get_value()``) dequantize
  a QArray value. :func:`box_nnx` turns the QArrays of a pure-dict params tree or an ``nnx.State``
  into QParams (so a pure ``apply_fn(params, x)`` built on ``nnx.merge`` runs as is, see
  :func:`nnx_apply_fn`); :func:`quantize_module` quantizes an NNX module's weights in place.

Inside ``jax.jit`` the jitted function's inputs are the packed codes and scales; each weight is
dequantized inside the traced computation at its point of use, never as a whole tree up front
(XLA is free to fuse the dequantization into the consumer). The same idea as qwix's boxed
parameters; nothing here copies it. Deliberate difference: the dequantized value takes the
QArray's original dtype, and the module's own ``dtype``/``param_dtype`` promotion then applies as
for a float parameter.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx, struct
from flax.core import meta

from .. import tree as wtree
from ..errors import UsageError
from .api import quantize
from .formats import DEFAULT_SELECT
from .qarray import QArray, is_qarray

__all__ = ["QBox", "box", "apply", "QParam", "TRAINABLE", "box_nnx", "nnx_apply_fn", "quantize_module"]


# ------------------------------------------------------------------------------------------ linen

@struct.dataclass
class QBox(meta.AxisMetadata):
    """A QArray as a linen parameter: ``Module.param`` unboxes it to the dequantized weight.

    Its pytree leaves are the QArray's (codes, scales ...), so a boxed tree jits, shards and saves
    like the QArray itself. Axis metadata (``nn.scan``/``nn.vmap`` over a boxed parameter) is not
    supported: a QArray has no per-axis layout to add an axis to."""

    q: QArray

    def unbox(self):
        return self.q.dequantize()

    def replace_boxed(self, val):
        return self.replace(q=val)

    def add_axis(self, index: int, params: dict) -> "QBox":
        raise UsageError("a QBox (quantized linen parameter) cannot be mapped over by nn.scan / nn.vmap")

    def remove_axis(self, index: int, params: dict) -> "QBox":
        raise UsageError("a QBox (quantized linen parameter) cannot be mapped over by nn.scan / nn.vmap")


def box(tree: Any) -> Any:
    """Every QArray of ``tree`` wrapped in a :class:`QBox`; other leaves unchanged."""
    return jax.tree.map(lambda x: QBox(x) if is_qarray(x) else x, tree, is_leaf=is_qarray)


def _dense_via_dot(next_fun, args, kwargs, context):
    """Interceptor: an ``nn.Dense`` call whose kernel is a boxed 2-D QArray runs as
    ``quant.dot(x, q) + bias`` (no float kernel is materialised on the kernel path)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from .matmul import dot

    mod = context.module
    if (context.method_name != "__call__" or not isinstance(mod, nn.Dense) or len(args) != 1 or kwargs
            or getattr(mod, "dot_general", None) is not None or getattr(mod, "dot_general_cls", None) is not None
            or not mod.has_variable("params", "kernel")):
        return next_fun(*args, **kwargs)
    kernel = mod.get_variable("params", "kernel")
    if not isinstance(kernel, QBox) or kernel.q.ndim != 2 or kernel.q.codes.ndim != 2:
        return next_fun(*args, **kwargs)
    q, x = kernel.q, args[0]
    bias = meta.unbox(mod.get_variable("params", "bias")) if mod.use_bias else None
    dtype = mod.dtype or jnp.result_type(x.dtype, q.dtype, *(() if bias is None else (bias.dtype,)))
    y = dot(x.astype(dtype), q)
    return y if bias is None else y + bias.astype(dtype)


def apply(module, variables: Any, *args, dot: bool = False, **kwargs):
    """``module.apply(variables, *args, **kwargs)`` with QArray parameters (see the module docstring).

    ``variables`` is the linen variables dict (``{"params": qparams, ...}``) in which some leaves
    are QArrays (``quant.quantize(params, ...)``); each is dequantized where the module reads it.
    ``dot=True`` sends ``nn.Dense`` layers with a 2-D QArray kernel through
    :func:`weightlab.quant.dot` instead. Other keyword arguments (``rngs``, ``mutable``,
    ``method`` ...) go to ``module.apply``. Jit the call (``jax.jit(lambda v, x: apply(m, v, x))``)
    and the compiled program takes the packed codes as its inputs.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise UsageError(f"quant.flax.apply takes a linen Module, got {type(module).__name__}; "
                         "for NNX use quant.flax.box_nnx / quantize_module")
    if not hasattr(variables, "keys") or "params" not in variables:
        raise UsageError("quant.flax.apply takes linen variables {'params': ...} (as module.apply does), got "
                         f"{type(variables).__name__} without a 'params' collection")
    boxed = box(variables)
    if not dot:
        return module.apply(boxed, *args, **kwargs)
    with nn.intercept_methods(_dense_via_dot):
        return module.apply(boxed, *args, **kwargs)


# -------------------------------------------------------------------------------------------- nnx

class QParam(nnx.Param):
    """An ``nnx.Param`` that may hold a QArray: reading it (``p[...]``, ``p.get_value()``) gives the
    dequantized array, so ``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum`` ... run unchanged. The raw
    value stays the QArray: ``nnx.state`` / ``nnx.split`` see its codes and scales (paths
    ``kernel/codes``), and ``nnx.update`` writes QArrays back. Writing a float array into a QParam
    makes it an ordinary parameter again."""

    def get_value(self, *, index: Any = nnx.variablelib.MISSING):
        raw = self.get_raw_value()
        if not is_qarray(raw):
            return super().get_value(index=index)
        value = raw.dequantize()
        if not isinstance(index, nnx.variablelib.Missing) and index is not Ellipsis:
            value = value[index]
        return value


TRAINABLE = nnx.All(nnx.Param, nnx.Not(QParam))
"""The nnx filter of a partly quantized model's float parameters: ``nnx.Optimizer(model, tx,
wrt=TRAINABLE)``, ``nnx.grad(f, argnums=nnx.DiffState(0, TRAINABLE))`` (the default ``wrt=nnx.Param``
would include the packed integer codes, which have no gradient)."""


def _to_qparam(x):
    if isinstance(x, nnx.Variable):
        raw = x.get_raw_value()
        return QParam(raw, **x.get_metadata()) if is_qarray(raw) and not isinstance(x, QParam) else x
    return QParam(x) if is_qarray(x) else x


def box_nnx(tree: Any) -> Any:
    """Every QArray of ``tree`` (a pure-dict params tree or an ``nnx.State``, bare or inside a
    ``Variable``) as a :class:`QParam`; ``nnx.merge(graphdef, box_nnx(qparams))`` builds a module
    that dequantizes each weight where it is read."""
    return jax.tree.map(_to_qparam, tree, is_leaf=lambda x: is_qarray(x) or isinstance(x, nnx.Variable))


def nnx_apply_fn(apply_fn: Callable) -> Callable:
    """A pure ``apply_fn(params, batch)`` built on ``nnx.merge`` (every ``weightlab.models`` model)
    turned into one that takes params with QArrays: ``nnx_apply_fn(model.apply_fn)(qparams, x)``."""
    def run(params, *args, **kwargs):
        return apply_fn(box_nnx(params), *args, **kwargs)

    run.__wrapped__ = apply_fn
    return run


def _parent(module, path: tuple):
    node = module
    for k in path[:-1]:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def quantize_module(module, method: Any = "rtn", *, select: wtree.SelectorLike = DEFAULT_SELECT,
                    key: jax.Array | None = None, **kw):
    """Quantize an NNX module's parameters in place and return it.

    Runs :func:`weightlab.quant.quantize` (any method or quantizer transform, ``select``, ``key``,
    calibration arguments, hyper-parameters as there) on ``nnx.state(module, nnx.Param)`` — every
    leaf is validated before any is quantized, with errors naming the path ``head/kernel`` — then
    replaces each quantized ``Param`` by a :class:`QParam` holding the QArray (its metadata kept).
    The module then runs as before, each weight dequantized where it is read; ``nnx.state(module)``
    holds the packed codes. A parameter shared by two modules is replaced at each of its places
    by one QParam (sharing is kept).
    """
    if not isinstance(module, nnx.Module):
        raise UsageError(f"quantize_module takes an nnx.Module, got {type(module).__name__}")
    state = nnx.state(module, nnx.Param)
    qstate = quantize(state, method, select=select, key=key, **kw)  # all checks before any change
    new = {path: var.get_raw_value() for path, var in nnx.to_flat_state(qstate) if is_qarray(var.get_raw_value())}
    nodes = list(nnx.iter_graph(module))  # a shared node comes once, under its first path
    swap = {id(v): QParam(new[p], **v.get_metadata()) for p, v in nodes if isinstance(v, nnx.Variable) and p in new}
    for path, var in nodes:
        if isinstance(var, nnx.Variable) and id(var) in swap:
            parent = _parent(module, path)
            if isinstance(path[-1], int):
                parent[path[-1]] = swap[id(var)]
            else:
                setattr(parent, path[-1], swap[id(var)])
    for _, node in nodes:  # the other places of a shared parameter
        if isinstance(node, nnx.Module):
            for name, val in list(vars(node).items()):
                if isinstance(val, nnx.Variable) and id(val) in swap:
                    setattr(node, name, swap[id(val)])
    return module
