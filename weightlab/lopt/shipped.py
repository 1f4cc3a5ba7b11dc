"""Meta-weights on disk: the ones shipped inside the package (:func:`pretrained`) and any a user
meta-trains (:func:`save_meta` / :func:`load_meta`).

A meta-weights file is a safetensors file whose metadata records what is needed to rebuild and to
trust the optimizer: ``lopt`` (the learned optimizer, e.g. ``small_fc``), ``arch`` (the feature/
network version, :data:`weightlab.lopt.perparam.ARCH`: features and MLP layout must mean the same
thing), ``hp`` (its factory's hyper-parameters, e.g. ``learning_rate``), ``version`` (of these
weights), and the ``recipe``: task family, estimator and its settings, meta-steps, seed and CPU-hours
that reproduce them. Loading checks the architecture before any tensor is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointNotFoundError, LoptError

__all__ = ["pretrained", "available", "save_meta", "load_meta", "info"]

_DIR = Path(__file__).parent / "pretrained"


def _arch_of(lopt: str) -> str:
    from .perparam import ARCH

    if lopt == "hyper":
        from .hierarchical import N_TENSOR_FEATURES

        return f"{ARCH}+hyper/v1/{N_TENSOR_FEATURES}"
    return ARCH if lopt in ("small_fc", "mulo") else f"{lopt}/unknown"


def save_meta(path, meta_params: dict, *, lopt: str, hp: dict | None = None, recipe: dict | None = None,
              version: str = "1", overwrite: bool = False) -> Path:
    """Write ``meta_params`` with the metadata above (atomically; no silent overwrite)."""
    from .. import io as wio

    md = {"weightlab_lopt": json.dumps({"lopt": lopt, "arch": _arch_of(lopt), "hp": hp or {}, "version": str(version),
                                        "recipe": recipe or {}}, sort_keys=True)}
    return wio.save(path, {k: np.asarray(v) for k, v in _flat(meta_params).items()}, metadata=md, overwrite=overwrite)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def info(path) -> dict:
    """The metadata of a meta-weights file (``lopt``, ``arch``, ``hp``, ``version``, ``recipe``)."""
    from .. import io as wio

    md = wio.read_metadata(path) or {}
    if "weightlab_lopt" not in md:
        raise LoptError(f"{path}: not a weightlab meta-weights file (no 'weightlab_lopt' metadata)")
    return json.loads(md["weightlab_lopt"])


def load_meta(path) -> tuple[dict, dict]:
    """``(meta_params, info)`` of a meta-weights file; :class:`LoptError` when its architecture is not
    the one this weightlab computes (the features or the network changed meaning)."""
    import jax.numpy as jnp

    from .. import io as wio

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no meta-weights file")
    meta_info = info(path)
    want = _arch_of(meta_info.get("lopt", "?"))
    if meta_info.get("arch") != want:
        raise LoptError(f"{path}: meta-weights of architecture {meta_info.get('arch')!r}, but this weightlab's "
                        f"{meta_info.get('lopt')!r} is {want!r}; re-train them (weightlab lopt meta-train)")
    params = wio.load(path, as_jax=False)
    return {k: _as_jnp(v, jnp) for k, v in params.items()}, meta_info


def _as_jnp(v, jnp):
    return {k: _as_jnp(x, jnp) for k, x in v.items()} if isinstance(v, dict) else jnp.asarray(v)


def available() -> dict[str, dict]:
    """The shipped meta-weights: name -> their metadata."""
    return {p.stem: info(p) for p in sorted(_DIR.glob("*.safetensors"))}


def pretrained(name: str = "small_fc_mnist1d", **overrides) -> Any:
    """The shipped learned optimizer ``name`` as an optax transform, built with the hyper-parameters
    it was meta-trained with (``overrides`` replace them, e.g. ``learning_rate=`` a schedule,
    ``mup_base=``). ``weightlab.lopt.shipped.available()`` lists the names and their recipes."""
    from .registry import optimizer

    path = _DIR / f"{name}.safetensors"
    if not path.is_file():
        import difflib

        names = sorted(available())
        close = difflib.get_close_matches(str(name), names, n=2)
        raise LoptError(f"no shipped meta-weights {name!r}{f' (did you mean {close}?)' if close else ''}; "
                        f"shipped: {names}")
    meta, meta_info = load_meta(path)
    hp = dict(meta_info.get("hp", {}))
    if "max_fan_in" in meta_info.get("recipe", {}) and meta_info["lopt"] == "small_fc":
        hp["max_fan_in"] = int(meta_info["recipe"]["max_fan_in"])
    return optimizer(meta_info["lopt"], meta, **{**hp, **overrides})
