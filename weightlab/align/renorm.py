"""REPAIR: reset the per-channel statistics of an interpolated network (variance collapse repair).

Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair" (ICLR 2023, arXiv 2211.08403). Interpolating two aligned networks shrinks the
variance of their hidden pre-activations; REPAIR rescales and shifts each channel of the interpolated
model so its mean and standard deviation become the interpolation of the endpoints' statistics:
``μ_t = (1-α) μ_A + α μ_B`` and ``σ_t = (1-α) σ_A + α σ_B``.

What is a layer here: a *producer* is a parameter leaf used as one operand of a ``dot_general`` or a
``conv_general_dilated`` in the traced program (``apply_fn`` is traced to a jaxpr, like
:mod:`weightlab.quant.calibrate`; no module hooks), with one non-contracted axis: its output channels.
Its pre-activation is the matmul/conv output, plus the bias when the next ``add`` adds a 1-D parameter
broadcast along the channel axis (through reshape / broadcast_in_dim / dtype conversions). The
correction is folded into the weights: kernel output channel ``c`` scaled by
``s_c = σ_t / sqrt(var_i + eps)`` and the bias set to ``b'_c = μ_t - s_c (μ_i - b_c)``, so the
channel's mean becomes ``μ_t`` and its std ``σ_t`` (up to eps). Without a bias only the scale is
applied (the mean moves to ``s_c μ_i``); those layers are listed in ``RepairInfo.no_bias``. With
``cnn(norm="layer")`` the convs have no bias and LayerNorm follows: LayerNorm normalises each
position over the channels, so the per-channel scale of the conv output still changes what LN sees
(it restores the relative channel spread); the channel means cannot be reset there.

Deliberate differences from the reference implementation (which inserts BatchNorm "reset layers"
after every conv, recomputes them in one training-mode pass and fuses them): statistics are exact
full-data statistics (streamed per batch under jit, merged with Chan's parallel mean/M2 update in
float64, not concatenated), and layers are corrected sequentially in program order, re-measuring the
interpolated model after each correction; layers none of whose upstream selected producers is
pending are corrected in the same pass (equivalent, fewer passes). By default the head, i.e. every
producer whose output reaches the model output without passing another producer, is not repaired
(the reference leaves the classifier alone too). Weights used by several matmuls (tied) are skipped,
as are producers inside control flow (``scan``/``while``/``cond``), which are not entered.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .. import tree as wtree
from ..errors import AlignError, NoMatchError
from ..quant.calibrate import _CALLS, _TRANSPARENT, _sub_jaxpr, _trace

__all__ = ["repair", "repair_stats", "RepairInfo", "LayerRepair", "ChannelStats"]


class _Tag(NamedTuple):
    param: Any = None          # (pidx, perm): the value is a parameter leaf (up to transposes/casts)
    bias: Any = None           # (pidx, axis): a 1-D parameter laid out along `axis`
    prod: Any = None           # (pidx, channel axis, bias added?): a producer's pre-activation
    heads: frozenset = frozenset()  # producers reaching this value with no producer in between
    anc: frozenset = frozenset()    # every producer upstream of this value


_NONE = _Tag()


def _producer(name, eqn, intags, invals):
    """(weight pidx, weight axis in the leaf, channel axis of the output) or None."""
    if name == "dot_general":
        sides = [i for i in (0, 1) if intags[i].param is not None]
        if len(sides) != 1:
            return None
        w = sides[0]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        wc, wb = (lc, lb) if w == 0 else (rc, rb)
        free = [d for d in range(np.ndim(invals[w])) if d not in wc and d not in wb]
        if wb or len(free) != 1:
            return None
        pidx, perm = intags[w].param
        ch = len(lb) if w == 0 else len(eqn.outvars[0].aval.shape) - 1
        return pidx, perm[free[0]], ch
    if name == "conv_general_dilated" and intags[1].param is not None and intags[0].param is None:
        if eqn.params["batch_group_count"] != 1:
            return None
        dn = eqn.params["dimension_numbers"]
        pidx, perm = intags[1].param
        return pidx, perm[dn.rhs_spec[0]], dn.out_spec[1]
    return None


def _bias_tag(name, eqn, t, invals, out):
    """Follow a 1-D parameter through reshape / broadcast_in_dim / casts."""
    if t.bias is None:
        return None
    pidx, ax = t.bias
    size = np.shape(invals[0])[ax]
    if name in _TRANSPARENT:
        return t.bias
    if name == "broadcast_in_dim":
        return pidx, eqn.params["broadcast_dimensions"][ax]
    if name == "reshape":
        big = [d for d, s in enumerate(np.shape(out)) if s != 1]
        if len(big) == 1 and np.shape(out)[big[0]] == size and np.size(invals[0]) == size:
            return pidx, big[0]
    return None


def _walk(jaxpr, consts, args, tags, ctx):
    """Evaluate ``jaxpr`` propagating :class:`_Tag` s. ``ctx["pending"][pidx] = (value, channel
    axis, bias pidx)`` collects each producer's pre-activation; ``ctx["info"]`` its static facts."""
    env, tenv = {}, {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    rtag = lambda v: _NONE if isinstance(v, jcore.Literal) else tenv.get(v, _NONE)  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    tenv.update(zip(jaxpr.invars, tags))
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invals, intags = [read(v) for v in eqn.invars], [rtag(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn) if name in _CALLS else None
        if sub is not None:
            outs, outtags = _walk(sub[0], sub[1], invals, intags, ctx)
            env.update(zip(eqn.outvars, outs))
            tenv.update(zip(eqn.outvars, outtags))
            continue
        outs = eqn.primitive.bind(*invals, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
        heads = frozenset().union(*(t.heads for t in intags))
        anc = frozenset().union(*(t.anc for t in intags))
        tag = _Tag(heads=heads, anc=anc)
        prod = _producer(name, eqn, intags, invals)
        if prod is not None:
            pidx, w_axis, ch = prod
            info = ctx["info"].setdefault(pidx, {"w_axis": w_axis, "bias": None, "uses": 0, "upstream": anc})
            info["uses"] += 1
            if pidx not in ctx["order"]:
                ctx["order"].append(pidx)
            ctx["pending"][pidx] = (outs[0], ch, None)
            tag = _Tag(prod=(pidx, ch, False), heads=frozenset({pidx}), anc=anc | {pidx})
        elif name == "add" and len(intags) == 2:
            for i in (0, 1):
                p, b = intags[i].prod, intags[1 - i].bias
                if p is None or p[2] or b is None:
                    continue
                offset = np.ndim(outs[0]) - np.ndim(invals[1 - i])
                if b[1] + offset == p[1] and np.shape(invals[1 - i])[b[1]] == np.shape(outs[0])[p[1]]:
                    ctx["pending"][p[0]] = (outs[0], p[1], b[0])
                    ctx["info"][p[0]]["bias"] = b[0]
                    tag = tag._replace(prod=(p[0], p[1], True))
                    break
        elif len(intags) == 1:
            t = intags[0]
            if name in _TRANSPARENT:
                tag = tag._replace(param=t.param, prod=t.prod)
            elif name == "transpose" and t.param is not None:
                tag = tag._replace(param=(t.param[0], tuple(t.param[1][p] for p in eqn.params["permutation"])))
            tag = tag._replace(bias=_bias_tag(name, eqn, t, invals, outs[0]))
        for v in eqn.outvars:
            tenv[v] = tag
    return [read(v) for v in jaxpr.outvars], [rtag(v) for v in jaxpr.outvars]


class ChannelStats(NamedTuple):
    """Per-output-channel statistics of one producer's pre-activation (population std)."""
    mean: np.ndarray
    std: np.ndarray
    count: float
    bias: str | None      # path of the bias leaf included in the pre-activation, if any


class LayerRepair(NamedTuple):
    """What :func:`repair` did to one layer: ``kernel *= scale`` (per output channel), bias set."""
    bias: str | None
    scale: np.ndarray
    before: ChannelStats
    target_mean: np.ndarray
    target_std: np.ndarray


class RepairInfo(NamedTuple):
    layers: dict          # kernel path -> LayerRepair, in program order
    no_bias: tuple        # kernel paths only rescaled (no bias leaf to reset the mean with)
    skipped: dict         # kernel path -> why it was not repaired (head, tied weight)
    passes: int           # passes over ``batches`` with the interpolated model

    def __repr__(self) -> str:
        return (f"RepairInfo(repaired={list(self.layers)}, no_bias={list(self.no_bias)}, "
                f"skipped={self.skipped}, passes={self.passes})")


class _Program:
    """The traced program of ``apply_fn`` for one params structure: its producers and a jitted
    per-batch statistics function."""

    def __init__(self, closed, pairs):
        self.paths = [p for p, _ in pairs]
        n = len(pairs)
        tags = [_Tag(param=(i, tuple(range(v.aval.ndim))), bias=(i, 0) if v.aval.ndim == 1 else None)
                for i, v in enumerate(closed.jaxpr.invars[:n])] + [_NONE] * (len(closed.jaxpr.invars) - n)

        def walk(args):
            ctx = {"info": {}, "order": [], "pending": {}}
            _, outtags = _walk(closed.jaxpr, closed.consts, list(args), tags, ctx)
            return ctx, frozenset().union(*(t.heads for t in outtags))

        args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
        facts = {}

        def probe(*a):
            facts["ctx"], facts["heads"] = walk(a)
            return 0

        jax.eval_shape(probe, *args)
        self.info, self.order, self.heads = facts["ctx"]["info"], facts["ctx"]["order"], facts["heads"]

        def stats(leaves, b_leaves):
            ctx, _ = walk(list(leaves) + list(b_leaves))
            out = {}
            for pidx, (val, ch, _) in ctx["pending"].items():
                x = jnp.moveaxis(val, ch, -1).astype(jnp.float32).reshape(-1, val.shape[ch])
                mean = jnp.mean(x, axis=0)
                out[pidx] = (jnp.float32(x.shape[0]), mean, jnp.sum(jnp.square(x - mean), axis=0))
            return out

        self._stats = jax.jit(stats)

    def measure(self, leaves, batches) -> dict[int, tuple]:
        """Streamed (count, mean, M2) per producer over ``batches`` (float64, Chan's merge)."""
        acc: dict[int, tuple] = {}
        for b in batches:
            for pidx, s in self._stats(leaves, jax.tree.leaves(b)).items():
                nb, mb, m2b = (np.asarray(v, np.float64) for v in s)
                if pidx not in acc:
                    acc[pidx] = (nb, mb, m2b)
                    continue
                na, ma, m2a = acc[pidx]
                n, d = na + nb, mb - ma
                acc[pidx] = (n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n)
        return acc

    def channel_stats(self, acc) -> dict[str, ChannelStats]:
        bias = lambda i: None if self.info[i]["bias"] is None else self.paths[self.info[i]["bias"]]  # noqa: E731
        return {self.paths[i]: ChannelStats(acc[i][1], np.sqrt(acc[i][2] / acc[i][0]), float(acc[i][0]), bias(i))
                for i in self.order if i in acc}


_CACHE: dict = {}


def _program(apply_fn, params, batch) -> _Program:
    """The :class:`_Program` of ``apply_fn`` for this params/batch layout. ``apply_fn`` is traced on
    every call; a few programs are kept, keyed by the jaxpr's text and its constants' identities (the
    cache holds them, so ids stay unique), so measuring A, B and the interpolated model, or calling
    :func:`repair_stats` again, compiles once, while a changed function or closure never hits."""
    closed, pairs, _ = _trace(apply_fn, params, batch)
    key = (str(closed.jaxpr), tuple(id(c) for c in closed.consts), tuple(p for p, _ in pairs))
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (_Program(closed, pairs), closed.consts)
    return _CACHE[key][0]


def _deq(tree):
    return jax.tree.map(lambda x: x.dequantize() if wtree.is_atomic(x) else x, tree, is_leaf=wtree.is_atomic)


def _leaves(tree, what):
    pairs, _ = wtree.flatten_with_paths(_deq(tree))
    for p, x in pairs:
        if not wtree.is_array(x):
            raise AlignError(f"leaf '{p}' of {what} is a {type(x).__name__}, not an array")
    return [x for _, x in pairs]


def _batches(batches) -> list:
    from .registry import as_batches

    batches = as_batches(batches)
    if not batches:
        raise AlignError("REPAIR needs at least one batch of inputs to measure statistics on")
    return batches


def repair_stats(apply_fn: Callable, params, batches: Iterable[Any]) -> dict[str, ChannelStats]:
    """Per-output-channel mean/std of every producer's pre-activation (matmul/conv output plus its
    bias) over ``batches``, keyed by kernel path in program order (the quantity REPAIR resets)."""
    batches = _batches(batches)
    prog = _program(apply_fn, params, batches[0])
    return prog.channel_stats(prog.measure(_leaves(params, "params"), batches))


def repair(apply_fn: Callable, params, endpoints, batches: Iterable[Any], *, alpha: float = 0.5,
           select: wtree.SelectorLike = None, eps: float = 1e-5, return_info: bool = False, weights=None):
    """REPAIR the interpolated ``params`` (Jordan et al. 2023; see the module docstring).

    ``endpoints=(params_a, params_b)`` are the aligned endpoints it interpolates (QArrays
    dequantized), ``alpha`` its position, ``batches`` an iterable of inputs for ``apply_fn(params,
    batch)`` (read several times: materialised as a list). Each selected producer's kernel output
    channels are scaled and its bias set so that, on ``batches``, the channel's pre-activation mean
    and std in the interpolated model equal ``(1-α)·stat_A + α·stat_B``. ``select`` (any
    :func:`weightlab.tree.selector`, matched on the kernel path) overrides the default: every
    producer but the head. Returns the repaired params (same structure and dtypes), and with
    ``return_info=True`` also a :class:`RepairInfo`. More than two endpoints (a MergeMany average):
    the targets are ``sum_k weights[k] * stat_k`` (``weights`` default: equal; ``alpha`` is then
    unused).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= alpha <= 1.0:
        raise AlignError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps > 0):
        raise AlignError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(endpoints, (tuple, list)) or len(endpoints) < 2:
        raise AlignError("endpoints must be the pair (params_a, params_b), or a list of the models averaged")
    if weights is None:
        weights = [1 - alpha, alpha] if len(endpoints) == 2 else [1.0 / len(endpoints)] * len(endpoints)
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(endpoints),) or not np.all(np.isfinite(weights)):
        raise AlignError(f"weights must be {len(endpoints)} finite numbers (one per endpoint), got {weights.tolist()}")
    for p, x in wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)[0]:
        if wtree.is_atomic(x):
            raise AlignError(f"leaf '{p}' of params is quantized: REPAIR rewrites weights, dequantize first")
    wtree.check_compatible(params, *[_deq(e) for e in endpoints], dtypes=False,
                           names=("params",) + tuple(f"endpoints[{k}]" for k in range(len(endpoints))))
    ends = [_leaves(e, f"endpoints[{k}]") for k, e in enumerate(endpoints)]
    treedef = wtree.flatten_with_paths(params)[1]
    leaves = _leaves(params, "params")
    bad = wtree.nonfinite(params)
    if bad:
        raise AlignError(f"leaf '{bad[0]}' of params has NaN/Inf values")
    batches = _batches(batches)
    prog = _program(apply_fn, params, batches[0])
    paths, info = prog.paths, prog.info
    if not prog.order:
        raise AlignError("no parameter is used as a matmul/conv operand in apply_fn: nothing to REPAIR")
    sel, skipped, chosen = wtree.selector(select), {}, []
    for i in prog.order:
        if info[i]["uses"] > 1:
            skipped[paths[i]] = "used by several matmuls (tied weight)"
        elif not jnp.issubdtype(leaves[i].dtype, jnp.floating):
            skipped[paths[i]] = f"not a float weight ({leaves[i].dtype})"
        elif select is None and i in prog.heads:
            skipped[paths[i]] = "head: reaches the output with no producer after it"
        elif sel(paths[i], leaves[i]):
            chosen.append(i)
    if select is not None and not chosen:
        raise NoMatchError(f"select={sel!r} matched no repairable layer; layers: {[paths[i] for i in prog.order]}")
    stats = [prog.measure(e, batches) for e in ends]
    std = lambda s: np.sqrt(s[2] / s[0])  # noqa: E731
    leaves, done, layers, passes = list(leaves), set(), {}, 0
    while len(done) < len(chosen):  # a pass corrects every layer with no pending selected layer upstream
        si, passes = prog.measure(leaves, batches), passes + 1
        for i in [i for i in chosen if i not in done and not info[i]["upstream"] & (set(chosen) - done)]:
            mu_t = sum(w * st[i][1] for w, st in zip(weights, stats))
            sd_t = sum(w * std(st[i]) for w, st in zip(weights, stats))
            n, mu_i, m2 = si[i]
            s = sd_t / np.sqrt(m2 / n + eps)
            w, bi = leaves[i], info[i]["bias"]
            shape = [-1 if d == info[i]["w_axis"] else 1 for d in range(w.ndim)]
            leaves[i] = (jnp.asarray(w, jnp.float32) * jnp.asarray(s.reshape(shape), jnp.float32)).astype(w.dtype)
            if bi is not None:
                leaves[bi] = jnp.asarray(mu_t - s * (mu_i - np.asarray(leaves[bi], np.float64)), leaves[bi].dtype)
            before = ChannelStats(mu_i, np.sqrt(m2 / n), float(n), None if bi is None else paths[bi])
            layers[paths[i]] = LayerRepair(before.bias, s, before, mu_t, sd_t)
            done.add(i)
    out = treedef.unflatten(leaves)
    if not return_info:
        return out
    no_bias = tuple(p for p, r in layers.items() if r.bias is None)
    return out, RepairInfo(layers, no_bias, skipped, passes)
