"""Hand-designed optimizer variants from recent papers, each an ``optax.GradientTransformationExtraArgs``.

Every factory is registered in :data:`weightlab.lopt.registry.METHODS` with ``kind="variant"``. They
follow optax conventions: ``learning_rate`` is a float or a schedule ``step -> lr`` (evaluated at the
transform's own step count, starting at 0, like :func:`optax.scale_by_learning_rate`), the update
is the *signed step* (``params + updates`` is the new point), states are NamedTuples of arrays (jit,
vmap and :func:`optax.multi_transform` safe). Transforms that read the parameters raise
:class:`~weightlab.errors.MissingExtraError` when ``update`` gets ``params=None``; bad
hyper-parameters raise :class:`~weightlab.errors.UsageError` when the factory is called.

Sign convention used in the docstrings: ``g`` is the gradient, ``u`` the *descent direction* a paper
subtracts (``x <- x - lr * u``); the optax update is ``-lr * u``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from ..errors import MissingExtraError, UsageError
from .registry import lopt_method

__all__ = ["cautious", "cautious_adamw", "cautious_weight_decay", "adamw_cwd", "tam", "adatam",
           "adamp", "sgdp", "grams", "switch_ema"]

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]
_GT = optax.GradientTransformationExtraArgs
_COS_TINY = 1e-30  # TAM: cos(m, g) := 0 when |m||g| == 0 (first step, m_0 = 0)


# --- validation helpers -------------------------------------------------------------------------

def _real(name: str, what: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise UsageError(f"{name}: {what} must be a finite real number, got {x!r}")
    return float(x)


def _lr(name: str, lr):
    if callable(lr):
        return lr
    if _real(name, "learning_rate", lr) < 0:
        raise UsageError(f"{name}: learning_rate must be >= 0 (or a schedule), got {lr!r}")
    return lr


def _nonneg(name: str, what: str, x) -> float:
    if _real(name, what, x) < 0:
        raise UsageError(f"{name}: {what} must be >= 0, got {x!r}")
    return float(x)


def _unit(name: str, what: str, x) -> float:
    if not 0.0 <= _real(name, what, x) < 1.0:
        raise UsageError(f"{name}: {what} must be in [0, 1), got {x!r}")
    return float(x)


def _positive(name: str, what: str, x) -> float:
    if _real(name, what, x) <= 0:
        raise UsageError(f"{name}: {what} must be > 0, got {x!r}")
    return float(x)


def _need_params(name: str, params) -> None:
    if params is None:
        raise MissingExtraError(f"{name} reads the parameters: call update(grads, state, params) "
                                f"(optax: opt.update(grads, state, params)), params=None was given")


def _lr_at(lr, count):
    return lr(count) if callable(lr) else lr


def _inc(count):
    return optax.safe_int32_increment(count)


def _masked(tx: _GT, mask) -> _GT:
    return tx if mask is None else optax.masked(tx, mask)


def _bias_corr(beta, t, dtype):
    return 1.0 - jnp.asarray(beta, dtype) ** t.astype(dtype)


def _decay(name: str, weight_decay: float, mask) -> _GT:
    """Decoupled weight decay ``u + wd * x`` (before lr scaling) that names itself when params are missing."""
    def update(updates, state, params=None, **extra):
        _need_params(f"{name} (weight_decay > 0)", params)
        return jax.tree.map(lambda u, x: u + weight_decay * x, updates, params), state

    return _masked(_GT(lambda params: optax.EmptyState(), update), mask)


def _count():
    return jnp.zeros([], jnp.int32)


# --- 1. Cautious optimizers (Liang et al. 2024) -------------------------------------------------

class CautiousState(NamedTuple):
    inner: Any


_RESCALES = ("paper", "mean", "none")


@lopt_method("cautious", kind="variant", paper="Liang et al. 2024, arXiv 2411.16085")
def cautious(base, rescale: str = "paper") -> _GT:
    """Cautious wrapper: zero the components of ``base``'s step that move against the gradient.

    With ``u`` the base optimizer's descent direction (``base`` returns ``-lr * u``), per tensor
    ``phi = 1[u * g > 0]`` and the step becomes ``-lr * (d / (sum(phi) + 1)) * phi * u`` with ``d``
    the tensor's size (``rescale="paper"``: ``d / (||phi||_0 + 1)`` as in the authors' original
    per-tensor code; the paper's one-line listing writes the same as ``1 / (mean(phi) + eps)``).
    ``rescale="mean"`` uses ``1 / max(mean(phi), 1e-3)`` (the form the authors' repository switched
    to after timm), ``"none"`` only masks. ``g`` is the
    gradient this wrapper receives, so put it first in a chain (or wrap the whole optimizer).

    Wrapping a full optimizer that already contains weight decay (``optax.adamw``) also masks the
    decay; the paper's C-AdamW does not, see :func:`cautious_adamw`.
    """
    return _cautious_tx(base, rescale, descent=False)


def _cautious_tx(base, rescale: str, descent: bool) -> _GT:
    """The cautious mask around ``base``; ``descent=True`` when ``base`` returns a descent
    direction ``u`` (``scale_by_adam``) rather than an optax step ``-lr * u``."""
    if not (hasattr(base, "init") and hasattr(base, "update")):
        raise UsageError(f"cautious: base must be an optax GradientTransformation, got {type(base).__name__}")
    if rescale not in _RESCALES:
        raise UsageError(f"cautious: rescale must be one of {_RESCALES}, got {rescale!r}")
    base = optax.with_extra_args_support(base)

    def init(params):
        return CautiousState(base.init(params))

    def one(u, g):
        agree = (u * g > 0) if descent else (u * g < 0)  # a step -lr*u agrees with g when step*g < 0
        keep = agree.astype(u.dtype)
        if rescale == "paper":
            keep = keep * (keep.size / (jnp.sum(keep) + 1.0))
        elif rescale == "mean":
            keep = keep / jnp.maximum(jnp.mean(keep), 1e-3)
        return u * keep

    def update(updates, state, params=None, **extra):
        steps, inner = base.update(updates, state.inner, params, **extra)
        return jax.tree.map(one, steps, updates), CautiousState(inner)

    return _GT(init, update)


@lopt_method("cautious_adamw", kind="variant", paper="Liang et al. 2024, arXiv 2411.16085")
def cautious_adamw(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, rescale: str = "paper",
                   mask=None) -> _GT:
    """C-AdamW: Adam's direction masked by the cautious rule, plus *unmasked* decoupled weight decay.

    ``m, v`` are Adam's moments, ``u = m_hat / (sqrt(v_hat) + eps)``, ``phi = 1[u * g > 0]`` per tensor
    and ``x <- x - lr * (d / (sum(phi) + 1)) * phi * u - lr * weight_decay * x`` (the decay uses the
    pre-step ``x`` and is not masked, as the authors' code applies it before the masked step).
    Deliberate difference: ``eps`` sits outside the bias correction (optax/paper form), while the
    reference code folds ``sqrt(1 - b2^t)`` into the step size (``eps`` inside). ``mask`` restricts
    the weight decay as in :func:`optax.adamw`.
    """
    _lr("cautious_adamw", learning_rate)
    _unit("cautious_adamw", "b1", b1), _unit("cautious_adamw", "b2", b2)
    _nonneg("cautious_adamw", "eps", eps), _nonneg("cautious_adamw", "weight_decay", weight_decay)
    parts = [_cautious_tx(optax.scale_by_adam(b1, b2, eps), rescale, descent=True)]
    if weight_decay:
        parts.append(_decay("cautious_adamw", weight_decay, mask))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


# --- 2. Cautious weight decay (Chen et al. 2025) ------------------------------------------------

class CwdState(NamedTuple):
    count: jax.Array


@lopt_method("cautious_weight_decay", kind="variant", paper="Chen et al. 2025, arXiv 2510.12402")
def cautious_weight_decay(weight_decay: float = 1e-4, learning_rate: ScalarOrSchedule | None = None,
                          mask=None) -> _GT:
    """Cautious weight decay: decoupled decay only on coordinates where ``sign(u) == sign(x)``.

    The paper's Algorithm 1: ``x <- x - lr * (u + weight_decay * 1[u * x >= 0] * x)``. Two placements:

    * ``learning_rate=None`` (like :func:`optax.add_decayed_weights`): chain it after the base
      *direction* and before :func:`optax.scale_by_learning_rate`; it receives ``u`` and returns
      ``u + weight_decay * 1[u * x >= 0] * x``, so the same ``lr`` multiplies both terms.
    * ``learning_rate=lr`` (float or schedule): chain it after a *complete* optimizer whose step is
      ``s = -lr * u``; it returns ``s - lr_t * weight_decay * 1[s * x <= 0] * x``.

    Needs ``params``. ``mask`` restricts the decay (optax mask pytree or callable).
    """
    _nonneg("cautious_weight_decay", "weight_decay", weight_decay)
    post = learning_rate is not None
    if post:
        _lr("cautious_weight_decay", learning_rate)

    def init(params):
        return CwdState(_count())

    def update(updates, state, params=None, **extra):
        _need_params("cautious_weight_decay", params)
        if post:
            scale = -_lr_at(learning_rate, state.count) * weight_decay
            out = jax.tree.map(lambda s, x: s + scale * jnp.where(s * x <= 0, x, 0).astype(s.dtype),
                               updates, params)
        else:
            out = jax.tree.map(lambda u, x: u + weight_decay * jnp.where(u * x >= 0, x, 0).astype(u.dtype),
                               updates, params)
        return out, CwdState(_inc(state.count))

    return _masked(_GT(init, update), mask)


@lopt_method("adamw_cwd", kind="variant", paper="Chen et al. 2025, arXiv 2510.12402")
def adamw_cwd(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 1e-4, mask=None) -> _GT:
    """AdamW with cautious weight decay: ``x <- x - lr * (u + wd * 1[u * x >= 0] * x)``.

    ``u = m_hat / (sqrt(v_hat) + eps)`` is Adam's direction (optax :func:`optax.scale_by_adam`),
    the decay mask compares it with the pre-step parameters. Needs ``params``.
    """
    _lr("adamw_cwd", learning_rate)
    _unit("adamw_cwd", "b1", b1), _unit("adamw_cwd", "b2", b2), _nonneg("adamw_cwd", "eps", eps)
    return optax.chain(optax.scale_by_adam(b1, b2, eps), cautious_weight_decay(weight_decay, mask=mask),
                       optax.scale_by_learning_rate(learning_rate))


# --- 3. Torque-aware momentum (Malviya et al. 2024) ---------------------------------------------

class TamState(NamedTuple):
    count: jax.Array
    mu: Any  # momentum buffer, like params
    s: Any   # smoothed cosine, one scalar per tensor


def _torque(m, g, s, decay_rate):
    """Per tensor: smoothed cos(m_{t-1}, g_t) and damping ``d = (1 + s) / 2``."""
    cos = jnp.sum(m * g) / jnp.maximum(jnp.linalg.norm(m) * jnp.linalg.norm(g), _COS_TINY)
    s = decay_rate * s + (1.0 - decay_rate) * cos
    return s, (1.0 + s) / 2.0


@lopt_method("tam", kind="variant", paper="Malviya et al. 2024, arXiv 2412.18790")
def tam(learning_rate: ScalarOrSchedule = 0.1, momentum: float = 0.9, decay_rate: float = 0.9,
        eps: float = 1e-8) -> _GT:
    """SGD with torque-aware momentum: the gradient enters the momentum damped by its angle to it.

    Per tensor: ``c_t = <m_{t-1}, g_t> / (|m_{t-1}| |g_t|)``, ``s_t = decay_rate * s_{t-1} +
    (1 - decay_rate) * c_t``, ``d_t = (1 + s_t) / 2``, ``m_t = momentum * m_{t-1} + (eps + d_t) * g_t``
    and ``x <- x - lr * m_t``. Conventions (the paper leaves them open): ``m_0 = 0``, ``s_0 = 0`` and
    ``c_1 = 0`` (0/0 := 0), so the first step uses ``d = 1/2``; the cosine is over the whole tensor.
    No weight decay: chain :func:`optax.add_decayed_weights` before it for the L2 form.
    """
    _lr("tam", learning_rate), _unit("tam", "momentum", momentum)
    _unit("tam", "decay_rate", decay_rate), _nonneg("tam", "eps", eps)

    def init(params):
        return TamState(_count(), jax.tree.map(jnp.zeros_like, params),
                        jax.tree.map(lambda p: jnp.zeros([], p.dtype), params))

    def update(updates, state, params=None, **extra):
        def one(g, m, s):
            s, d = _torque(m, g, s, decay_rate)
            return momentum * m + (eps + d) * g, s

        mu_s = jax.tree.map(one, updates, state.mu, state.s)
        mu = jax.tree.map(lambda _, t: t[0], updates, mu_s)
        s = jax.tree.map(lambda _, t: t[1], updates, mu_s)
        lr = _lr_at(learning_rate, state.count)
        return jax.tree.map(lambda m: -lr * m, mu), TamState(_inc(state.count), mu, s)

    return _GT(init, update)


class AdaTamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any
    s: Any


@lopt_method("adatam", kind="variant", paper="Malviya et al. 2024, arXiv 2412.18790")
def adatam(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
           decay_rate: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0) -> _GT:
    """AdaTAM(W): Adam whose first moment takes the torque-damped gradient ``(eps + d_t) * g_t``.

    ``s_t, d_t`` as in :func:`tam` (cosine between ``m_{t-1}`` and ``g_t``), ``m_t = b1 * m_{t-1} +
    (1 - b1) * (eps + d_t) * g_t``, ``v_t = b2 * v_{t-1} + (1 - b2) * g_t**2``, bias-corrected ``m_hat,
    v_hat`` and ``x <- x - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * x)`` (AdamW decay,
    needs ``params`` when ``weight_decay > 0``). Deliberate choice: the ``(1 - b1)`` factor and bias
    correction make it *exactly Adam when d = 1*, so Adam's learning rate transfers.
    """
    _lr("adatam", learning_rate), _unit("adatam", "b1", b1), _unit("adatam", "b2", b2)
    _unit("adatam", "decay_rate", decay_rate), _nonneg("adatam", "eps", eps)
    _nonneg("adatam", "weight_decay", weight_decay)

    def init(params):
        z = jax.tree.map(jnp.zeros_like, params)
        return AdaTamState(_count(), z, z, jax.tree.map(lambda p: jnp.zeros([], p.dtype), params))

    def update(updates, state, params=None, **extra):
        if weight_decay:
            _need_params("adatam (weight_decay > 0)", params)
        t = _inc(state.count)

        def one(g, m, v, s):
            s, d = _torque(m, g, s, decay_rate)
            m = b1 * m + (1.0 - b1) * (eps + d) * g
            v = b2 * v + (1.0 - b2) * g * g
            bc1, bc2 = _bias_corr(b1, t, m.dtype), _bias_corr(b2, t, m.dtype)
            return m, v, s, (m / bc1) / (jnp.sqrt(v / bc2) + eps)

        out = jax.tree.map(one, updates, state.mu, state.nu, state.s)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        lr = _lr_at(learning_rate, state.count)
        u = pick(3)
        if weight_decay:
            u = jax.tree.map(lambda a, x: a + weight_decay * x, u, params)
        return jax.tree.map(lambda a: -lr * a, u), AdaTamState(t, pick(0), pick(1), pick(2))

    return _GT(init, update)


# --- 4. AdamP / SGDP (Heo et al. 2021) ----------------------------------------------------------

def _project(x, g, p, delta, wd_ratio, eps, channel_axis):
    """AdamP's projection for one tensor: ``(p', wd_scale)``.

    Views: per channel (``channel_axis`` first, rest flattened) then the whole tensor. The first view
    whose max |cos(g, x)| < delta / sqrt(view width) is taken as scale-invariant: the radial part of
    ``p`` (along x / |x| per row) is removed and the decay is scaled by ``wd_ratio``."""
    if x.ndim <= 1:
        return p, jnp.ones([], x.dtype)

    def rows(a):
        return jnp.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1)

    def cos_max(xv, gv):
        c = jnp.abs(jnp.sum(xv * gv, 1)) / jnp.maximum(jnp.linalg.norm(xv, axis=1) * jnp.linalg.norm(gv, axis=1), eps)
        return jnp.max(c)

    def proj(xv, pv):
        xn = xv / (jnp.linalg.norm(xv, axis=1, keepdims=True) + eps)
        return pv - xn * jnp.sum(xn * pv, 1, keepdims=True)

    xc, gc, pc = rows(x), rows(g), rows(p)
    xl, gl, pl = x.reshape(1, -1), g.reshape(1, -1), p.reshape(1, -1)
    chan = cos_max(xc, gc) < delta / math.sqrt(xc.shape[1])
    layer = cos_max(xl, gl) < delta / math.sqrt(xl.shape[1])
    p_chan = jnp.moveaxis(proj(xc, pc).reshape(jnp.moveaxis(p, channel_axis, 0).shape), 0, channel_axis)
    p_layer = proj(xl, pl).reshape(p.shape)
    out = jnp.where(chan, p_chan, jnp.where(layer, p_layer, p))
    return out, jnp.where(chan | layer, wd_ratio, 1.0).astype(x.dtype)


class AdamPState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def _check_p(name, delta, wd_ratio, eps, weight_decay):
    _positive(name, "delta", delta), _nonneg(name, "wd_ratio", wd_ratio)
    _nonneg(name, "eps", eps), _nonneg(name, "weight_decay", weight_decay)


@lopt_method("adamp", kind="variant", paper="Heo et al. 2021 (ICLR), arXiv 2006.08217")
def adamp(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
          channel_axis: int = 0) -> _GT:
    """AdamP: Adam that removes the radial part of the step on scale-invariant weights.

    ``m, v`` Adam moments, ``p = m_t / (sqrt(v_t / (1 - b2^t)) + eps)`` (Nesterov: ``b1 * m_t + (1 - b1)
    * g`` in place of ``m_t``). For tensors with ``ndim > 1`` the projection test of the reference
    code (per-channel rows along ``channel_axis``, then the whole tensor; scale-invariant when
    ``max |cos(g, x)| < delta / sqrt(row width)``) removes ``p``'s component along ``x`` per row and
    scales the decay by ``wd_ratio``. Then ``x <- x - lr * wd * ratio * x - lr / (1 - b1^t) * p``.
    Needs ``params``. ``channel_axis=0`` is PyTorch's layout (out channels first); Flax kernels keep
    output channels last, pass ``channel_axis=-1`` for them.
    """
    _lr("adamp", learning_rate), _unit("adamp", "b1", b1), _unit("adamp", "b2", b2)
    _check_p("adamp", delta, wd_ratio, eps, weight_decay)

    def init(params):
        z = jax.tree.map(jnp.zeros_like, params)
        return AdamPState(_count(), z, z)

    def update(updates, state, params=None, **extra):
        _need_params("adamp", params)
        t = _inc(state.count)
        lr = _lr_at(learning_rate, state.count)

        def one(g, m, v, x):
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            denom = jnp.sqrt(v) / jnp.sqrt(_bias_corr(b2, t, v.dtype)) + eps
            p = ((b1 * m + (1.0 - b1) * g) if nesterov else m) / denom
            p, r = _project(x, g, p, delta, wd_ratio, eps, channel_axis)
            return m, v, -lr * weight_decay * r * x - lr / _bias_corr(b1, t, x.dtype) * p

        out = jax.tree.map(one, updates, state.mu, state.nu, params)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        return pick(2), AdamPState(t, pick(0), pick(1))

    return _GT(init, update)


class SgdPState(NamedTuple):
    count: jax.Array
    mu: Any


@lopt_method("sgdp", kind="variant", paper="Heo et al. 2021 (ICLR), arXiv 2006.08217")
def sgdp(learning_rate: ScalarOrSchedule = 0.1, momentum: float = 0.9, dampening: float = 0.0,
         nesterov: bool = False, eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1,
         wd_ratio: float = 0.1, channel_axis: int = 0) -> _GT:
    """SGDP: SGD-momentum that removes the radial part of the step on scale-invariant weights.

    ``b_t = momentum * b_{t-1} + (1 - dampening) * g`` (``b_0 = 0``), ``p = b_t`` or, Nesterov,
    ``g + momentum * b_t``; the projection of :func:`adamp` then
    ``x <- x - lr * wd * ratio / (1 - momentum) * x - lr * p`` (the reference code's decay scaling).
    Needs ``params``.
    """
    _lr("sgdp", learning_rate), _unit("sgdp", "momentum", momentum), _unit("sgdp", "dampening", dampening)
    _check_p("sgdp", delta, wd_ratio, eps, weight_decay)

    def init(params):
        return SgdPState(_count(), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, **extra):
        _need_params("sgdp", params)
        lr = _lr_at(learning_rate, state.count)

        def one(g, b, x):
            b = momentum * b + (1.0 - dampening) * g
            p, r = _project(x, g, (g + momentum * b) if nesterov else b, delta, wd_ratio, eps, channel_axis)
            return b, -lr * weight_decay * r / (1.0 - momentum) * x - lr * p

        out = jax.tree.map(one, updates, state.mu, params)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        return pick(1), SgdPState(_inc(state.count), pick(0))

    return _GT(init, update)


# --- 5. Grams (Cao et al. 2024) -----------------------------------------------------------------

@lopt_method("grams", kind="variant", paper="Cao et al. 2024, arXiv 2412.17107")
def grams(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, mask=None) -> _GT:
    """Grams: Adam's per-coordinate step size with the sign of the current gradient.

    ``u = m_hat / (sqrt(v_hat) + eps)`` (Adam), ``x <- x - lr * (sign(g) * |u| + weight_decay * x)``
    (decoupled decay on the pre-step ``x``, as AdamW; needs ``params`` when ``weight_decay > 0``).
    ``mask`` restricts the decay as in :func:`optax.adamw`.
    """
    _lr("grams", learning_rate), _unit("grams", "b1", b1), _unit("grams", "b2", b2)
    _nonneg("grams", "eps", eps), _nonneg("grams", "weight_decay", weight_decay)
    adam = optax.scale_by_adam(b1, b2, eps)

    def update(updates, state, params=None, **extra):
        u, state = adam.update(updates, state, params)
        return jax.tree.map(lambda a, g: jnp.sign(g) * jnp.abs(a), u, updates), state

    parts = [_GT(adam.init, update)]
    if weight_decay:
        parts.append(_decay("grams", weight_decay, mask))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


# --- 6. Switch EMA (Li et al. 2024) -------------------------------------------------------------

class SwitchEmaState(NamedTuple):
    count: jax.Array
    ema: Any
    inner: Any


@lopt_method("switch_ema", kind="variant", paper="Li et al. 2024, arXiv 2402.09240")
def switch_ema(base, decay: float = 0.9998, switch_every: int = 100, warmup_steps: int = 0) -> _GT:
    """Switch EMA: keep an EMA of the parameters and, at every "epoch end", move the model onto it.

    Step ``t = 1, 2, ...``: ``x' = x + base_step``, ``e <- (1 - a_t) * e + a_t * x'`` with ``a_t = 1 -
    decay`` (``e_0`` = the parameters given to ``init``); when ``t % switch_every == 0`` the update is
    ``e - x`` so the new parameters *are* the EMA (the EMA itself continues). With ``warmup_steps >
    0``, ``a_t = (1 - a) * exp(-t / warmup_steps) + a`` (the reference's exponential momentum
    warm-up, ``a = 1 - decay``). ``base``'s state advances every step. Needs ``params``; set
    ``switch_every`` to the number of steps in an epoch to match the paper.
    """
    if not (hasattr(base, "init") and hasattr(base, "update")):
        raise UsageError(f"switch_ema: base must be an optax GradientTransformation, got {type(base).__name__}")
    _unit("switch_ema", "decay", decay)
    if isinstance(switch_every, bool) or not isinstance(switch_every, numbers.Integral) or switch_every < 1:
        raise UsageError(f"switch_ema: switch_every must be an integer >= 1, got {switch_every!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise UsageError(f"switch_ema: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    base = optax.with_extra_args_support(base)
    a = 1.0 - decay

    def init(params):
        return SwitchEmaState(_count(), jax.tree.map(jnp.asarray, params), base.init(params))

    def update(updates, state, params=None, **extra):
        _need_params("switch_ema", params)
        steps, inner = base.update(updates, state.inner, params, **extra)
        t = _inc(state.count)
        switch = (t % switch_every) == 0

        def one(s, e, x):
            new = x + s
            rate = jnp.asarray(a, e.dtype)
            if warmup_steps:
                rate = (1.0 - rate) * jnp.exp(-t.astype(e.dtype) / warmup_steps) + rate
            e = e + rate * (new - e)
            return e, jnp.where(switch, e - x, s)

        out = jax.tree.map(one, steps, state.ema, params)
        ema = jax.tree.map(lambda _, o: o[0], steps, out)
        return jax.tree.map(lambda _, o: o[1], steps, out), SwitchEmaState(t, ema, inner)

    return _GT(init, update)
