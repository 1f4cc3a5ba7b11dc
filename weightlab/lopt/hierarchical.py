"""Hierarchical learned optimizers (VeLO-style): a per-tensor network modulating the per-parameter MLP.

Every step, each parameter tensor is summarised by a few statistics (log RMS of its gradient,
parameter and momentum, the gradient-momentum cosine, its size), global loss features (loss relative
to the first loss, fast/slow loss EMA ratio; zeros and a 0 flag when no ``loss=`` is given) and time
features (``tanh(t / tau)``; with ``num_steps=`` also the fraction of training done: the
horizon-conditioned variant). A small network shared by all tensors — an LSTM carrying a state per
tensor, or a stateless MLP — maps them to a shift of the per-parameter MLP's first-layer bias and a
log step-size for that tensor; the per-parameter part is :func:`~weightlab.lopt.small_fc`'s.

Follows VeLO (Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv 2211.09760: per-tensor LSTM, loss and horizon inputs). Deliberate differences: VeLO's LSTM
emits the weights of the per-parameter MLP as a mixture of a bank of MLPs; here it emits a FiLM-style
bias shift and a step size (cheaper, and the fused kernel is unchanged); the output heads start at
zero, so a fresh hierarchical optimizer equals the small_fc it wraps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import tree as wtree
from ..errors import LoptError, MissingExtraError, UsageError
from .perparam import build, check_meta, init_meta as init_perparam
from .registry import lopt_method

__all__ = ["hyper", "init_hyper_meta", "N_TENSOR_FEATURES"]

N_TENSOR_FEATURES = 13
_TAUS = (10.0, 100.0, 1000.0)
_LOSS_FAST, _LOSS_SLOW = 0.9, 0.99


def init_hyper_meta(key: jax.Array | None = None, hidden_size: int = 32, *, tensor_hidden: int = 16,
                    network: str = "lstm") -> dict:
    """Fresh meta-parameters ``{"perparam": small_fc's, "tensor": the per-tensor network's}``; the
    per-tensor output heads are zero, so the optimizer starts as the small_fc it wraps."""
    _check_network(network)
    key = jax.random.key(1) if key is None else key
    wtree.check_key(key)
    k1, k2 = jax.random.split(key)
    d, t = N_TENSOR_FEATURES, int(tensor_hidden)
    n_in = d + t if network == "lstm" else d
    n_gates = 4 * t if network == "lstm" else t
    tensor = {"w_in": jax.random.normal(k2, (n_in, n_gates)) / np.sqrt(n_in), "b_in": jnp.zeros((n_gates,)),
              "w_b1": jnp.zeros((t, hidden_size)), "w_lr": jnp.zeros((t,))}
    return {"perparam": init_perparam(k1, hidden_size), "tensor": tensor}


def _check_network(network):
    if network not in ("lstm", "mlp"):
        raise UsageError(f"hyper: network must be 'lstm' or 'mlp', got {network!r}")


def _check_hyper_meta(meta, network):
    if not isinstance(meta, dict) or set(meta) != {"perparam", "tensor"}:
        raise LoptError("hyper: meta_params must be {'perparam': ..., 'tensor': ...} (init_hyper_meta); got "
                        f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    h = check_meta(meta["perparam"], None, "hyper")
    t = meta["tensor"]
    need = {"w_in", "b_in", "w_b1", "w_lr"}
    if not isinstance(t, dict) or set(t) != need:
        raise LoptError(f"hyper: meta_params['tensor'] must have keys {sorted(need)}")
    th = int(np.shape(t["w_lr"])[0])
    n_in = N_TENSOR_FEATURES + th if network == "lstm" else N_TENSOR_FEATURES
    want = {"w_in": (n_in, (4 if network == "lstm" else 1) * th), "b_in": ((4 if network == "lstm" else 1) * th,),
            "w_b1": (th, h), "w_lr": (th,)}
    for k, s in want.items():
        if tuple(np.shape(t[k])) != s:
            raise LoptError(f"hyper: meta_params['tensor']['{k}'] has shape {tuple(np.shape(t[k]))}, expected {s} "
                            f"for network={network!r} (trained with the other network?)")
    return th


def _log_rms(x):
    return 0.5 * jnp.log(jnp.mean(jnp.square(x.astype(jnp.float32))) + 1e-24) / 10.0


def _tensor_features(g, p, m9, loss_feats, time_feats):
    gf, mf = g.astype(jnp.float32).ravel(), m9.astype(jnp.float32).ravel()
    cos = jnp.dot(gf, mf) * jax.lax.rsqrt((jnp.dot(gf, gf) + 1e-30) * (jnp.dot(mf, mf) + 1e-30))
    own = jnp.stack([_log_rms(g), _log_rms(p), _log_rms(m9), cos, jnp.log(float(max(p.size, 1))) / 10.0])
    return jnp.concatenate([own, loss_feats, time_feats])


@lopt_method("hyper", kind="learned", paper="Metz et al. 2022 (VeLO), arXiv 2211.09760",
             needs_loss="use_loss=True")
def hyper(meta_params: dict | None = None, *, network: str = "lstm", num_steps: int | None = None,
          use_loss="optional", learning_rate=1e-3, exp_mult: float = 1.0, mup_base=None, factored: bool = False,
          state_dtype=None, nonfinite: str = "skip", use_kernel="auto") -> optax.GradientTransformationExtraArgs:
    """Hierarchical (VeLO-style) learned optimizer: a per-tensor LSTM/MLP modulates a per-parameter MLP.

    ``network``: ``"lstm"`` (a state per tensor) or ``"mlp"``. ``num_steps``: the training horizon
    (horizon-conditioned; None = horizon-free). ``use_loss``: ``"optional"`` (loss features when
    ``update(..., loss=)`` is given), ``True`` (calling without ``loss=`` raises
    MissingExtraError), ``False`` (ignored). The rest as :func:`~weightlab.lopt.small_fc`.
    """
    _check_network(network)
    if use_loss not in ("optional", True, False):
        raise UsageError(f"hyper: use_loss must be 'optional', True or False, got {use_loss!r}")
    if num_steps is not None and (not isinstance(num_steps, (int, np.integer)) or num_steps < 1):
        raise UsageError(f"hyper: num_steps must be a positive int (the horizon) or None, got {num_steps!r}")
    meta = init_hyper_meta(None, network=network) if meta_params is None else meta_params
    th = _check_hyper_meta(meta, network)
    tm = meta["tensor"]

    def tensor_init(params):
        per = jax.tree.map(lambda p: jnp.zeros((2, th), jnp.float32), params) if network == "lstm" else ()
        return {"cells": per, "loss": jnp.zeros((4,), jnp.float32)}  # first, fast, slow, seen

    def tensor_step(extra, grads, params, state, count, loss):
        if loss is None and use_loss is True:
            raise MissingExtraError("hyper(use_loss=True): update needs loss= (the training loss at these params), "
                                    "e.g. opt.update(grads, state, params, loss=loss)")
        ls = extra["loss"]
        if loss is None or use_loss is False:
            loss_feats, new_ls = jnp.zeros((3,)), ls
        else:
            lv = jnp.asarray(loss, jnp.float32)
            seen = ls[3] > 0
            first = jnp.where(seen, ls[0], lv)
            fast = jnp.where(seen, _LOSS_FAST * ls[1] + (1 - _LOSS_FAST) * lv, lv)
            slow = jnp.where(seen, _LOSS_SLOW * ls[2] + (1 - _LOSS_SLOW) * lv, lv)
            rel = jnp.clip((lv - first) / (jnp.abs(first) + 1e-8), -5, 5)
            trend = jnp.clip((fast - slow) / (jnp.abs(slow) + 1e-8), -5, 5)
            loss_feats, new_ls = jnp.stack([1.0, rel, trend]), jnp.stack([first, fast, slow, 1.0])
        t = jnp.asarray(count, jnp.float32)
        frac = jnp.zeros(()) if num_steps is None else jnp.clip(t / num_steps, 0.0, 2.0)
        time_feats = jnp.concatenate([jnp.tanh(t / jnp.asarray(_TAUS)),
                                      jnp.stack([frac, jnp.asarray(0.0 if num_steps is None else 1.0)])])
        treedef = jax.tree.structure(params)
        gs, ps = treedef.flatten_up_to(grads), treedef.flatten_up_to(params)
        ms = treedef.flatten_up_to(state.mom)
        cells = treedef.flatten_up_to(extra["cells"]) if network == "lstm" else [None] * len(gs)
        db1, log_lr, new_cells = [], [], []
        for g, p, m, cell in zip(gs, ps, ms, cells):
            x = _tensor_features(g, p, m[1], loss_feats, time_feats)
            if network == "lstm":
                h, c = cell[0], cell[1]
                z = jnp.concatenate([x, h]) @ tm["w_in"] + tm["b_in"]
                i, f, o, u = jnp.split(z, 4)
                c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                new_cells.append(jnp.stack([h, c]))
            else:
                h = jnp.tanh(x @ tm["w_in"] + tm["b_in"])
            db1.append(h @ tm["w_b1"])
            log_lr.append(jnp.clip(h @ tm["w_lr"], -5.0, 5.0))
        cells_out = treedef.unflatten(new_cells) if network == "lstm" else ()
        return {"cells": cells_out, "loss": new_ls}, db1, log_lr

    return build(meta["perparam"], learning_rate=learning_rate, exp_mult=exp_mult, mup_base=mup_base,
                 factored=factored, state_dtype=state_dtype, nonfinite=nonfinite, use_kernel=use_kernel,
                 name="hyper", tensor_init=tensor_init, tensor_step=tensor_step)
