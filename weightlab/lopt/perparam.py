"""Per-parameter learned optimizers: a small MLP applied to every parameter (small_fc / μLO).

The optimizer keeps, per parameter tensor, momenta at four decays, a second moment and Adafactor's
row/column second-moment means; from them it builds 14 features per parameter (listed in
:mod:`weightlab.kernels.lopt_update`, the one definition shared with the fused Pallas kernel),
normalises each over the tensor, and maps them through a shared MLP to a direction ``d`` and a
log-magnitude ``s``: ``update = -lr * mult * d * exp(s)``. A step embedding (``tanh(t / tau)``
at ten timescales) enters the first layer's bias.

Follows Metz et al. 2022 (small_fc_lopt / AdafacMLPLOpt, arXiv 2203.11860); ``mup_base=`` is μLO
(Thérien et al. 2024, arXiv 2406.00153): ``mult = fan_in(base) / fan_in(leaf)`` for matrices, the
μP learning-rate rule for Adam-like updates, so an optimizer meta-trained at the base width keeps
its per-coordinate step size meaning on wider models. Deliberate difference: a fresh optimizer
(``meta_params=None`` or :func:`init_meta`) is *not* random: a linear skip from the features starts
it as a per-tensor-normalised Adam (direction ``m_0.9 / sqrt(v)``), which meta-training then
improves; this makes laptop-scale meta-training start from a working optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import tree as wtree
from ..errors import LoptError, MissingExtraError, StructureMismatchError, UsageError
from ..kernels import lopt_update as K
from .registry import lopt_method

__all__ = ["small_fc", "mulo", "init_meta", "meta_shapes", "SmallFCState", "TIMESCALES", "step_embedding",
           "check_meta", "mup_multipliers", "ARCH"]

TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4)
V_DECAY = 0.999         # second moment
FACTOR_DECAY = 0.999    # Adafactor row/col
ARCH = "small_fc/v1"    # bump when the features, the MLP or the state change meaning


class SmallFCState(NamedTuple):
    """Optimizer state: step count, per-tensor accumulators (trees mirroring the params), the
    per-tensor modulation state of a hierarchical optimizer (``extra``), and how many steps were
    skipped for non-finite gradients."""

    count: jax.Array
    mom: Any        # (4, *shape) per leaf
    v: Any          # shape per leaf ((0,) placeholder when factored)
    row: Any        # (R,) per leaf
    col: Any        # (C,) per leaf
    extra: Any
    skipped: jax.Array


def meta_shapes(hidden_size: int = 32) -> dict[str, tuple[int, ...]]:
    """Shapes of a small_fc optimizer's meta-parameters."""
    f, h, t = K.N_FEATURES, int(hidden_size), len(TIMESCALES)
    return {"w1": (f, h), "b1": (h,), "wt": (t, h), "w2": (h, h), "b2": (h,), "w3": (h, 2), "b3": (2,), "skip": (f, 2)}


def init_meta(key: jax.Array | None = None, hidden_size: int = 32, *, scale: float = 0.01) -> dict:
    """Fresh meta-parameters: the MLP path randomly initialised (He-normal; output layer ``* scale``),
    the skip set so the optimizer starts as a per-tensor-normalised Adam (direction = feature 7,
    ``m_0.9 / sqrt(v)``; log-magnitude 0)."""
    key = jax.random.key(0) if key is None else key
    wtree.check_key(key)
    shapes = meta_shapes(hidden_size)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    he = lambda k, s: jax.random.normal(k, s, jnp.float32) * np.sqrt(2.0 / s[0])
    skip = jnp.zeros(shapes["skip"], jnp.float32).at[7, 0].set(1.0)
    return {"w1": he(k1, shapes["w1"]), "b1": jnp.zeros(shapes["b1"]), "wt": he(k2, shapes["wt"]) * 0.1,
            "w2": he(k3, shapes["w2"]), "b2": jnp.zeros(shapes["b2"]), "w3": he(k4, shapes["w3"]) * scale,
            "b3": jnp.zeros(shapes["b3"]), "skip": skip}


def check_meta(meta: dict, hidden_size: int | None = None, what: str = "small_fc") -> int:
    """:class:`LoptError` unless ``meta`` has exactly the small_fc keys and shapes (naming the first
    wrong one); returns the hidden size."""
    if not isinstance(meta, dict):
        raise LoptError(f"{what}: meta_params must be a dict of arrays {sorted(meta_shapes())}, got {type(meta).__name__}")
    if "w1" not in meta or len(np.shape(meta["w1"])) != 2:
        raise LoptError(f"{what}: meta_params has no 2-D 'w1' (keys: {sorted(meta)}); not a small_fc optimizer")
    h = int(np.shape(meta["w1"])[1]) if hidden_size is None else int(hidden_size)
    want = meta_shapes(h)
    if set(meta) != set(want):
        raise LoptError(f"{what}: meta_params keys {sorted(meta)} differ from the architecture's {sorted(want)} "
                        f"(missing {sorted(set(want) - set(meta))}, unexpected {sorted(set(meta) - set(want))})")
    for k, s in want.items():
        if tuple(np.shape(meta[k])) != s:
            raise LoptError(f"{what}: meta_params['{k}'] has shape {tuple(np.shape(meta[k]))}, expected {s} "
                            f"(features {K.N_FEATURES}, hidden {h}, {len(TIMESCALES)} timescales; arch {ARCH})")
    return h


def step_embedding(count) -> jax.Array:
    """``tanh(t / tau)`` for each timescale: ``(len(TIMESCALES),)``."""
    return jnp.tanh(jnp.asarray(count, jnp.float32) / jnp.asarray(TIMESCALES, jnp.float32))


def _fan_in(shape) -> int:
    return int(np.prod(shape[:-1])) if len(shape) >= 2 else 0


def mup_multipliers(params, mup_base) -> Any:
    """Per-leaf μP step multipliers: ``fan_in(base) / fan_in(leaf)`` for matrices (fan-in: every
    axis but the last, the flax ``(in, out)`` convention), 1 for vectors and scalars. ``mup_base``
    mirrors ``params`` (arrays or ``ShapeDtypeStruct``s of the base-width model)."""
    if mup_base is None:
        return jax.tree.map(lambda _: 1.0, params)
    pp, tdef = wtree.flatten_with_paths(params)
    visible = {p for p, _ in pp}  # under optax.multi_transform / masked the other leaves are MaskedNodes
    pb = [(p, b) for p, b in wtree.flatten_with_paths(mup_base)[0] if p in visible]
    if [p for p, _ in pb] != [p for p, _ in pp]:
        only_p = sorted(set(p for p, _ in pp) - set(p for p, _ in pb))
        only_b = sorted(set(p for p, _ in pb) - set(p for p, _ in pp))
        where = (only_p or only_b or [""])[0]
        raise StructureMismatchError(where, "mup_base mirroring the params",
                                     f"params-only leaves {only_p[:3]}, mup_base-only leaves {only_b[:3]}",
                                     what="mup_base structure")
    mults = []
    for (path, b), (_, x) in zip(pb, pp):
        fb, fx = _fan_in(np.shape(b)), _fan_in(np.shape(x))
        if (fb == 0) != (fx == 0):
            raise StructureMismatchError(path, f"a base of the same rank as {tuple(np.shape(x))}",
                                         f"{tuple(np.shape(b))}", what="mup_base rank")
        mults.append(1.0 if fx == 0 else fb / fx)
    return tdef.unflatten(mults)


def _check_nonfinite_mode(mode):
    if mode not in ("skip", "error", "propagate"):
        raise UsageError(f"nonfinite must be 'skip', 'error' or 'propagate', got {mode!r}")


def _learning_rate(lr):
    if callable(lr):
        return lr
    if not isinstance(lr, (int, float, np.floating)) and not hasattr(lr, "dtype"):
        raise UsageError(f"learning_rate must be a number or a schedule, got {type(lr).__name__}")
    if isinstance(lr, (int, float, np.floating)) and not lr > 0:
        raise UsageError(f"learning_rate must be > 0, got {lr}")
    return lambda count: lr


def _is_traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _leaf_step(g, p, mom, v, row, col, *, b1, lr, meta, exp_mult, factored, state_dtype, kernel):
    """One tensor: new accumulators and the update."""
    shape, r, c = p.shape, *K.as_matrix(p.shape)
    g2 = g.astype(jnp.float32).reshape(r, c)
    decays = jnp.asarray(K.MOMENTUM_DECAYS, jnp.float32)[:, None, None]
    mom2 = decays * mom.astype(jnp.float32).reshape(4, r, c) + (1 - decays) * g2[None]
    gsq = jnp.square(g2)
    row2 = FACTOR_DECAY * row + (1 - FACTOR_DECAY) * jnp.mean(gsq, axis=1)
    col2 = FACTOR_DECAY * col + (1 - FACTOR_DECAY) * jnp.mean(gsq, axis=0)
    full_v = not (factored and r > 1 and c > 1)
    if full_v:
        v2 = V_DECAY * v.astype(jnp.float32).reshape(r, c) + (1 - V_DECAY) * gsq
    else:  # low-memory: the factored estimate stands in for the full second moment
        v2 = row2[:, None] * col2[None, :] / jnp.maximum(jnp.mean(row2), K.EPS)
    p2 = p.reshape(r, c)
    scales = K.feature_scales(g2, p2.astype(jnp.float32), mom2, v2, row2, col2)
    upd = kernel(g2, p2, mom2, v2, row2, col2, scales, meta["w1"], b1, meta["w2"], meta["b2"], meta["w3"],
                 meta["b3"], meta["skip"], lr, exp_mult)
    new_v = v2.reshape(shape).astype(v.dtype) if full_v else v
    return upd.reshape(shape), mom2.reshape((4,) + shape).astype(state_dtype or mom.dtype), new_v, row2, col2


def _pick_kernel(use_kernel):
    if use_kernel in (False, "reference", None):
        return K.lopt_update_reference
    if use_kernel in ("auto", True):
        return getattr(K, "lopt_update_auto", K.lopt_update_reference)
    raise UsageError(f"use_kernel must be 'auto', True or False, got {use_kernel!r}")


def _warn_wide(params, max_fan_in, name):
    if max_fan_in is None:
        return
    import warnings

    for path, x in wtree.flatten_with_paths(params)[0]:
        f = _fan_in(np.shape(x))
        if f > 1.5 * max_fan_in:
            warnings.warn(f"{name}: '{path}' has fan-in {f}, but these meta-weights were trained on nets with fan-in "
                          f"<= {max_fan_in}; without mup_base= (μLO scaling) such steps are too large and training "
                          "can diverge. Pass mup_base=<the params of the same model at a trained width>.",
                          stacklevel=3)
            return


def build(meta: dict, *, learning_rate, exp_mult: float, mup_base, factored: bool, state_dtype, nonfinite: str,
          use_kernel, name: str, tensor_init: Callable | None = None, tensor_step: Callable | None = None,
          max_fan_in: int | None = None):
    """The optax transform shared by :func:`small_fc` and the hierarchical optimizer. ``tensor_step``
    (optional) maps ``(extra_state, stats, count, loss) -> (extra_state, b1_delta tree, log_lr tree)``
    to modulate each tensor's first-layer bias and step size."""
    _check_nonfinite_mode(nonfinite)
    lr_fn = _learning_rate(learning_rate)
    kernel = _pick_kernel(use_kernel)
    sdt = None if state_dtype is None else jnp.dtype(state_dtype)

    def init(params):
        def one(p):
            r, c = K.as_matrix(p.shape)
            dt = sdt or jnp.float32
            fact = factored and r > 1 and c > 1
            return (jnp.zeros((4,) + p.shape, dt), jnp.zeros((0,) if fact else p.shape, dt),
                    jnp.zeros((r,), jnp.float32), jnp.zeros((c,), jnp.float32))

        parts = jax.tree.map(one, params)
        pick = lambda i: jax.tree.map(lambda p, t: t[i], params, parts)
        extra = tensor_init(params) if tensor_init else ()
        mup_multipliers(params, mup_base)  # validate now
        if mup_base is None:
            _warn_wide(params, max_fan_in, name)
        return SmallFCState(jnp.zeros([], jnp.int32), pick(0), pick(1), pick(2), pick(3), extra,
                            jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise MissingExtraError(f"{name}: update needs params (its features include the parameter): "
                                    "call update(grads, state, params)")
        loss = extra.get("loss")
        if nonfinite == "error":
            if _is_traced(updates):
                raise UsageError(f"{name}(nonfinite='error') checks gradients on the host, so it cannot run under "
                                 "jit; use nonfinite='skip' (state.skipped counts the skipped steps)")
            bad = wtree.nonfinite(updates)
            if bad:
                raise LoptError(f"{name}: non-finite gradient in '{bad[0]}' ({len(bad)} tensor(s): {bad[:5]})")
        mults = mup_multipliers(params, mup_base)
        count = state.count
        lr0 = jnp.asarray(lr_fn(count), jnp.float32)
        emb_bias = meta["b1"] + step_embedding(count) @ meta["wt"]
        if tensor_step is not None:
            new_extra, db1, log_lr = tensor_step(state.extra, updates, params, state, count, loss)
        else:
            new_extra, db1, log_lr = state.extra, None, None
        treedef = jax.tree.structure(params)
        leaves = lambda t: treedef.flatten_up_to(t)
        outs = []
        for i, (g, p, m, v, r, c, mu) in enumerate(zip(leaves(updates), leaves(params), leaves(state.mom),
                                                        leaves(state.v), leaves(state.row), leaves(state.col),
                                                        leaves(mults))):
            b1 = emb_bias if db1 is None else emb_bias + db1[i]
            lr = lr0 * mu if log_lr is None else lr0 * mu * jnp.exp(log_lr[i])
            outs.append(_leaf_step(g, p, m, v, r, c, b1=b1, lr=lr, meta=meta, exp_mult=exp_mult,
                                   factored=factored, state_dtype=sdt, kernel=kernel))
        unflat = lambda i: treedef.unflatten([o[i] for o in outs])
        new_updates = unflat(0)
        new_state = SmallFCState(count + 1, unflat(1), unflat(2), unflat(3), unflat(4), new_extra, state.skipped)
        if nonfinite == "skip":
            ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(updates)] or [True]))
            new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
            new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
            new_state = new_state._replace(skipped=state.skipped + (1 - ok.astype(jnp.int32)))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _meta_or_default(meta_params, hidden_size, name):
    if meta_params is None:
        return init_meta(None, 32 if hidden_size is None else hidden_size)
    check_meta(meta_params, hidden_size, name)
    return meta_params


@lopt_method("small_fc", kind="learned", paper="Metz et al. 2022, arXiv 2203.11860")
def small_fc(meta_params: dict | None = None, *, hidden_size: int | None = None, learning_rate=1e-3,
             exp_mult: float = 1.0, mup_base=None, factored: bool = False, state_dtype=None,
             nonfinite: str = "skip", use_kernel="auto", max_fan_in: int | None = None
             ) -> optax.GradientTransformationExtraArgs:
    """Per-parameter MLP learned optimizer (small_fc-style) as an optax transform.

    ``meta_params``: the MLP's weights (:func:`init_meta`, :func:`~weightlab.lopt.pretrained`, or
    meta-training); None starts from the Adam-like initialisation. ``learning_rate``: the step
    multiplier (a number or an optax schedule). ``mup_base``: a params-shaped tree of the base-width
    model for μLO scaling. ``factored``: keep only Adafactor factors for matrices (no full second
    moment); ``state_dtype``: e.g. ``jnp.bfloat16`` momenta. ``nonfinite``: ``"skip"`` (zero update,
    state unchanged, ``state.skipped`` counts; jit-safe), ``"error"`` (eager only: LoptError naming
    the tensor) or ``"propagate"``. ``max_fan_in``: the widest fan-in seen in meta-training (set by
    :func:`~weightlab.lopt.pretrained`); ``init`` warns, naming the leaf, when a matrix is much wider
    and no ``mup_base`` is given. The update needs ``params``; ``loss=`` is accepted and ignored.
    """
    meta = _meta_or_default(meta_params, hidden_size, "small_fc")
    return build(meta, learning_rate=learning_rate, exp_mult=exp_mult, mup_base=mup_base, factored=factored,
                 state_dtype=state_dtype, nonfinite=nonfinite, use_kernel=use_kernel, name="small_fc",
                 max_fan_in=max_fan_in)


@lopt_method("mulo", kind="learned", paper="Thérien et al. 2024, arXiv 2406.00153")
def mulo(meta_params: dict | None = None, *, mup_base=None, hidden_size: int | None = None, learning_rate=1e-3,
         exp_mult: float = 1.0, factored: bool = False, state_dtype=None, nonfinite: str = "skip",
         use_kernel="auto") -> optax.GradientTransformationExtraArgs:
    """μLO: small_fc with μP step scaling, relative to ``mup_base`` (required: the params or shapes of
    the base-width model the optimizer was meta-trained on)."""
    if mup_base is None:
        raise MissingExtraError("mulo needs mup_base=: the params (or shapes) of the base-width model, so each "
                                "matrix's step is scaled by fan_in(base)/fan_in(leaf)")
    return small_fc(meta_params, mup_base=mup_base, hidden_size=hidden_size, learning_rate=learning_rate,
                    exp_mult=exp_mult, factored=factored, state_dtype=state_dtype, nonfinite=nonfinite,
                    use_kernel=use_kernel)
