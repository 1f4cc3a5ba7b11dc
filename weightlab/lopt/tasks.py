"""Task families for meta-training and evaluating optimizers: small models on bundled data.

A :class:`Task` is one training problem with a fixed architecture: ``init(key) -> params``,
``batch(run_key, step) -> batch`` (deterministic in the run's key and the step, jit-able: it indexes
device arrays), ``loss(params, batch) -> scalar``, ``evaluate(params) -> {"loss", "accuracy"}``
on the test split, and ``valid_batch(run_key, step)``: batches of a meta-validation split (the last
1/8 of the training data, never in ``batch``) for the ``objective="valid"`` meta-loss. A :class:`Family` draws tasks: its ``configs`` are the architectures and batch
sizes it varies (each one compiled once), and ``sample(key)`` picks one. Families (:func:`family`):

* ``mnist1d_mlp`` / ``digits_mlp``: MLPs of width 32-128 and depth 1-3 on MNIST-1D (40-dim, 10
  classes, generated locally) and scikit-learn's 8x8 digits (the scale of learned_optimization's own
  CPU tutorial); ``digits_cnn``: small CNNs on the digits as 8x8 images;
* ``sequence_transformer``: a one-layer causal transformer on a synthetic task (predict the running
  maximum of a token sequence).

Task augmentation (``reparam=True``): each run stores every tensor divided by a random per-tensor
scale in ``[0.1, 10]`` and the model multiplies it back, so the same function sees gradients of very
different scales (learned_optimization's weight reparameterisation augmentation). Batch-size changes
are part of the configs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import LoptError
from ..tree import leaf_key

__all__ = ["Task", "Family", "family", "FAMILIES", "mlp_task", "cnn_task", "sequence_task"]


class Task(NamedTuple):
    """One training problem (see the module docstring)."""

    name: str
    init: Callable
    batch: Callable
    loss: Callable
    evaluate: Callable
    apply_fn: Callable
    config: dict
    valid_batch: Callable | None = None   # (run_key, step) -> a held-out batch (meta-objective "valid")


class Family(NamedTuple):
    """A set of task configs; ``sample(key)`` draws one (uniformly)."""

    name: str
    configs: tuple
    make: Callable

    def task(self, i: int) -> Task:
        """Config ``i``'s task; the same Task object every time (also from another Family instance
        with that config), so jitted meta-steps keyed on it are compiled once."""
        return _built(self.make, tuple(sorted(self.configs[i].items())))

    def sample(self, key) -> Task:
        i = int(jax.random.randint(key, (), 0, len(self.configs)))
        return self.task(i)


@functools.lru_cache(maxsize=256)
def _built(make: Callable, config: tuple) -> "Task":
    return make(**dict(config))


# --------------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=None)
def _data(name: str) -> dict:
    from ..data import load_digits, load_mnist1d

    d = load_mnist1d() if name == "mnist1d" else load_digits() if name == "digits" else None
    if d is None:
        raise LoptError(f"unknown dataset {name!r}; known: 'mnist1d', 'digits'")
    x, xt = np.asarray(d["x"], np.float32), np.asarray(d["x_test"], np.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6  # standardised with training statistics
    return {"x": (x - mu) / sd, "y": np.asarray(d["y"], np.int32), "x_test": (xt - mu) / sd,
            "y_test": np.asarray(d["y_test"], np.int32)}


def _xent(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def role(key, name: str):
    """The key of one role (``"init"``, ``"batch"``, ``"valid"``, ``"noise"``, ...) of ``key``:
    ``fold_in(key, crc32("role", name))``. Every consumer of randomness in :mod:`weightlab.lopt`
    takes its own role before splitting or folding in indices, so no two roles share a stream
    (under partitionable threefry ``split(k, n)[j] == fold_in(k, j)``, so bare indices would)."""
    return leaf_key(key, name, "role")


def _reparam_scales(params, run_key):
    leaves, tdef = jax.tree.flatten(params)
    ks = jax.random.split(role(run_key, "reparam"), len(leaves))
    return tdef.unflatten([10.0 ** jax.random.uniform(k, (), minval=-1.0, maxval=1.0) for k in ks])


def _classification(name, dataset, init_fn, apply_fn, batch_size, reparam, config) -> Task:
    d = _data(dataset)
    n_valid = d["x"].shape[0] // 8  # the last 1/8 of the training split: meta-validation, never trained on
    x, y = jnp.asarray(d["x"][:-n_valid]), jnp.asarray(d["y"][:-n_valid])
    xv, yv = jnp.asarray(d["x"][-n_valid:]), jnp.asarray(d["y"][-n_valid:])
    xt, yt = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])
    n = x.shape[0]

    def init(key):
        p = init_fn(role(key, "init"))
        return jax.tree.map(lambda a, s: a / s, p, _reparam_scales(p, key)) if reparam else p

    def batch(run_key, step, _x=x, _y=y, which="batch"):
        idx = jax.random.randint(jax.random.fold_in(role(run_key, which), step), (batch_size,), 0, _x.shape[0])
        b = {"x": _x[idx], "y": _y[idx]}
        if reparam:
            b["scale"] = _reparam_scales(jax.eval_shape(init_fn, run_key), run_key)
        return b

    def valid_batch(run_key, step):
        return batch(run_key, step, xv, yv, "valid")

    def real(params, b):
        return jax.tree.map(lambda a, s: a * s, params, b["scale"]) if "scale" in b else params

    def loss(params, b):
        return _xent(apply_fn(real(params, b), b["x"]), b["y"])

    def evaluate(params, run_key=None):
        p = params if not reparam else jax.tree.map(lambda a, s: a * s, params, _reparam_scales(params, run_key))
        logits = apply_fn(p, xt)
        return {"loss": _xent(logits, yt), "accuracy": jnp.mean(jnp.argmax(logits, -1) == yt)}

    return Task(name, init, lambda k, t: batch(k, t), loss, evaluate, apply_fn, dict(config), valid_batch)


# --------------------------------------------------------------------------------------------- models

def _dense_init(key, fan_in, fan_out, mup_out=False):
    std = 0.0 if mup_out else np.sqrt(2.0 / fan_in)
    return {"kernel": jax.random.normal(key, (fan_in, fan_out)) * std, "bias": jnp.zeros((fan_out,))}


def mlp_task(dataset: str = "mnist1d", width: int = 64, depth: int = 2, batch_size: int = 128,
             reparam: bool = False, mup: bool = False) -> Task:
    """An MLP (``depth`` hidden ReLU layers of ``width``) on ``dataset``. ``mup=True``: μP
    parametrisation (zero-initialised readout, logits scaled by ``64 / width``), the setting μLO's
    width transfer assumes."""
    d_in = _data(dataset)["x"].shape[1]
    dims = [d_in] + [width] * depth + [10]
    mult = 64.0 / width if mup else 1.0

    def init_fn(key):
        ks = jax.random.split(key, len(dims) - 1)
        return {f"layer_{i}": _dense_init(ks[i], dims[i], dims[i + 1], mup_out=mup and i == len(dims) - 2)
                for i in range(len(dims) - 1)}

    def apply_fn(p, x):
        h = x
        for i in range(len(dims) - 1):
            h = h @ p[f"layer_{i}"]["kernel"] + p[f"layer_{i}"]["bias"]
            if i < len(dims) - 2:
                h = jax.nn.relu(h)
        return h * mult

    cfg = dict(dataset=dataset, width=width, depth=depth, batch_size=batch_size, reparam=reparam, mup=mup)
    return _classification(f"{dataset}_mlp_w{width}_d{depth}_b{batch_size}", dataset, init_fn, apply_fn,
                           batch_size, reparam, cfg)


def cnn_task(width: int = 16, depth: int = 2, batch_size: int = 128, reparam: bool = False) -> Task:
    """A CNN on the 8x8 digits: ``depth`` 3x3 conv + ReLU layers of ``width`` channels, global
    average pooling, a linear readout."""
    def init_fn(key):
        ks = jax.random.split(key, depth + 1)
        p, c = {}, 1
        for i in range(depth):
            p[f"conv_{i}"] = {"kernel": jax.random.normal(ks[i], (3, 3, c, width)) * np.sqrt(2.0 / (9 * c)),
                              "bias": jnp.zeros((width,))}
            c = width
        p["head"] = _dense_init(ks[-1], width, 10)
        return p

    def apply_fn(p, x):
        h = x.reshape(x.shape[0], 8, 8, 1)
        for i in range(depth):
            h = jax.lax.conv_general_dilated(h, p[f"conv_{i}"]["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + p[f"conv_{i}"]["bias"])
        return h.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]

    cfg = dict(width=width, depth=depth, batch_size=batch_size, reparam=reparam)
    return _classification(f"digits_cnn_w{width}_d{depth}_b{batch_size}", "digits", init_fn, apply_fn, batch_size,
                           reparam, cfg)


def sequence_task(dim: int = 32, seq_len: int = 16, vocab: int = 16, heads: int = 2, batch_size: int = 64,
                  reparam: bool = False) -> Task:
    """A one-layer causal transformer (pre-LN attention + MLP) predicting, at every position, the
    running maximum of a random token sequence (synthetic, unlimited data; ``evaluate`` uses a fixed
    held-out set of 512 sequences)."""
    def sample(key, n):
        toks = jax.random.randint(key, (n, seq_len), 0, vocab)
        return toks, jax.lax.cummax(toks, axis=1)

    def init_fn(key):
        ks = jax.random.split(key, 6)
        s = 1.0 / np.sqrt(dim)
        return {"embed": jax.random.normal(ks[0], (vocab, dim)) * 0.5,
                "pos": jax.random.normal(ks[1], (seq_len, dim)) * 0.1,
                "attn": {"qkv": jax.random.normal(ks[2], (dim, 3 * dim)) * s,
                         "out": jax.random.normal(ks[3], (dim, dim)) * s},
                "mlp": {"up": _dense_init(ks[4], dim, 4 * dim), "down": _dense_init(ks[5], 4 * dim, dim)},
                "head": {"kernel": jnp.zeros((dim, vocab)), "bias": jnp.zeros((vocab,))}}

    def _ln(h):
        return (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)

    def apply_fn(p, toks):
        h = p["embed"][toks] + p["pos"]
        b, t, _ = h.shape
        q, k, v = jnp.split(_ln(h) @ p["attn"]["qkv"], 3, -1)
        split = lambda a: a.reshape(b, t, heads, dim // heads)
        att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(dim // heads)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), split(v)).reshape(b, t, dim)
        h = h + o @ p["attn"]["out"]
        u = jax.nn.relu(_ln(h) @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
        h = h + u @ p["mlp"]["down"]["kernel"] + p["mlp"]["down"]["bias"]
        return _ln(h) @ p["head"]["kernel"] + p["head"]["bias"]

    xt, yt = sample(jax.random.key(12345), 512)

    def init(key):
        p = init_fn(role(key, "init"))
        return jax.tree.map(lambda a, s: a / s, p, _reparam_scales(p, key)) if reparam else p

    def batch(run_key, step, which="batch"):
        x, y = sample(jax.random.fold_in(role(run_key, which), step), batch_size)
        b = {"x": x, "y": y}
        if reparam:
            b["scale"] = _reparam_scales(jax.eval_shape(init_fn, run_key), run_key)
        return b

    def valid_batch(run_key, step):
        return batch(run_key, step, "valid")

    def seq_xent(p, x, y):
        logits = apply_fn(p, x)
        return _xent(logits.reshape(-1, vocab), y.reshape(-1)), logits

    def loss(params, b):
        p = jax.tree.map(lambda a, s: a * s, params, b["scale"]) if "scale" in b else params
        return seq_xent(p, b["x"], b["y"])[0]

    def evaluate(params, run_key=None):
        p = params if not reparam else jax.tree.map(lambda a, s: a * s, params, _reparam_scales(params, run_key))
        lv, logits = seq_xent(p, xt, yt)
        return {"loss": lv, "accuracy": jnp.mean(jnp.argmax(logits, -1) == yt)}

    cfg = dict(dim=dim, seq_len=seq_len, vocab=vocab, heads=heads, batch_size=batch_size, reparam=reparam)
    return Task(f"runmax_transformer_d{dim}_b{batch_size}", init, lambda k, t: batch(k, t), loss, evaluate, apply_fn, cfg,
                valid_batch)


def _grid(**axes: Sequence[Any]) -> tuple:
    out = [{}]
    for k, vs in axes.items():
        out = [dict(c, **{k: v}) for c in out for v in vs]
    return tuple(out)


FAMILIES: dict[str, Callable[..., Family]] = {
    "mnist1d_mlp": lambda reparam=False, mup=False: Family(
        "mnist1d_mlp", _grid(dataset=["mnist1d"], width=[32, 64, 128], depth=[1, 2], batch_size=[64, 128],
                             reparam=[reparam], mup=[mup]), mlp_task),
    "digits_mlp": lambda reparam=False, mup=False: Family(
        "digits_mlp", _grid(dataset=["digits"], width=[32, 64], depth=[1, 2], batch_size=[64, 128],
                            reparam=[reparam], mup=[mup]), mlp_task),
    "digits_cnn": lambda reparam=False: Family(
        "digits_cnn", _grid(width=[8, 16], depth=[1, 2], batch_size=[64, 128], reparam=[reparam]), cnn_task),
    "sequence_transformer": lambda reparam=False: Family(
        "sequence_transformer", _grid(dim=[32], batch_size=[32, 64], reparam=[reparam]), sequence_task),
}


def family(name: str, **options) -> Family:
    """Task family ``name`` (one of :data:`FAMILIES`) with ``options`` (``reparam=``, ``mup=`` where
    the models support it)."""
    if name not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(name, FAMILIES, n=2)
        raise LoptError(f"unknown task family {name!r}{f' (did you mean {close}?)' if close else ''}; "
                        f"known: {sorted(FAMILIES)}")
    try:
        return FAMILIES[name](**options)
    except TypeError:
        raise LoptError(f"task family {name!r} does not take options {sorted(options)}") from None
