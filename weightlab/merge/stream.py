"""Out-of-core merging of Hugging Face safetensors checkpoints, tensor by tensor.

Memory holds one tensor from each input model plus at most one output shard, never whole models.
Everything is validated before the first tensor is merged (:func:`plan`): the config, every model's
tensor names, shapes and dtypes (from the headers only), embedding/vocab size mismatches and tied
``lm_head``/embedding layouts. The output directory (sharded safetensors + index + the config + a
recipe hash in the metadata) appears atomically at the end; an interrupted merge leaves nothing
that looks complete.

Layer position for gradient parameters: the first ``.<layers|layer|h|blocks>.<i>.`` index in a
tensor name, ``t = i / (L - 1)``; other tensors use ``t = 0`` (as mergekit's pre/post weights).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..errors import MergeError
from ..io.safetensors import Checkpoint
from ..io.shards import PlannedShardWriter
from .config import MergeConfig, _IGNORED, _RENAME
from .registry import SPECS

__all__ = ["Plan", "plan", "run_merge"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_EMBED = re.compile(r"(embed|wte|word_embeddings|lm_head|output\.weight$)")


@dataclasses.dataclass
class Plan:
    config: MergeConfig
    names: list[str]
    num_layers: int
    warnings: list[str]
    truncate: dict  # tensor name -> rows to keep (vocab mismatch on embeddings)


def _floating(dtype) -> bool:
    """numpy float dtypes and ml_dtypes' bfloat16 (which numpy does not class as floating)."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def _layer_t(name: str, num_layers: int) -> float:
    m = _LAYER.search(name)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def plan(config: MergeConfig, ckpts: dict[str, Checkpoint]) -> Plan:
    """Validate everything from the headers; raise :class:`MergeError` naming tensor and model."""
    refs = config.model_paths()
    ref0 = config.base_model or refs[0]
    names = list(ckpts[ref0].keys())
    warnings, truncate = [], {}
    name_set = set(names)
    for ref in refs:
        other = set(ckpts[ref].keys())
        missing = [n for n in names if n not in other]
        extra = [n for n in other if n not in name_set]
        for n in missing:
            if "lm_head" in n:
                raise MergeError(f"{ref} has no '{n}' but {ref0} does: one model ties lm_head to the embeddings "
                                 "and the other does not; untie (copy the embedding) or tie both first")
            raise MergeError(f"tensor '{n}' is missing from {ref}")
        if extra:
            if any("lm_head" in n for n in extra):
                raise MergeError(f"{ref} has '{[n for n in extra if 'lm_head' in n][0]}' but {ref0} does not "
                                 "(tied vs untied embeddings); make them consistent first")
            warnings.append(f"{ref}: {len(extra)} tensors not in {ref0} are ignored (e.g. {sorted(extra)[0]})")
    for n in names:
        s0, d0 = ckpts[ref0].shape(n), ckpts[ref0].dtype(n)
        for ref in refs:
            s, d = ckpts[ref].shape(n), ckpts[ref].dtype(n)
            if s != s0:
                if _EMBED.search(n) and len(s) == len(s0) and s[1:] == s0[1:]:
                    rows = min(s[0], s0[0])
                    truncate[n] = min(truncate.get(n, rows), rows)
                    warnings.append(f"'{n}': vocab size {s[0]} in {ref} vs {s0[0]} in {ref0}; merging the first "
                                    f"{truncate[n]} rows (output keeps {ref0}'s shape, extra rows from {ref0})")
                    continue
                raise MergeError(f"tensor '{n}': shape {tuple(s)} in {ref} vs {tuple(s0)} in {ref0}")
            if not _floating(d) and d != d0:
                raise MergeError(f"tensor '{n}': dtype {d} in {ref} vs {d0} in {ref0}")
    layers = [int(m.group(1)) for n in names for m in [_LAYER.search(n)] if m]
    num_layers = max(layers) + 1 if layers else 1
    n_models = len([m for m in config.models if m.model != config.base_model])
    if SPECS[config.method].kind == "pair" and n_models != 1:
        raise MergeError(f"{config.method} merges base_model with exactly one other model, got {n_models}")
    if config.method == "nuslerp" and n_models != 2:
        raise MergeError(f"nuslerp merges exactly two models (plus an optional base_model), got {n_models}")
    if config.method == "model_stock" and n_models < 2:
        raise MergeError("model_stock needs at least two models besides base_model")
    return Plan(config, names, num_layers, warnings, truncate)


def _dtype(name):
    if name is None:
        return None
    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "fp32": np.float32,
             "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
    if name not in table:
        raise MergeError(f"unsupported dtype {name!r} (use float32, float16 or bfloat16)")
    return np.dtype(table[name])


def _merge_tensor(cfg: MergeConfig, name: str, t: float, tensors: dict[str, np.ndarray], key) -> np.ndarray:
    method = cfg.method
    spec = SPECS[method]
    others = [m.model for m in cfg.models if m.model != cfg.base_model]
    used = [m.model for m in cfg.models] if spec.kind == "nobase" else others
    accepted = spec.parameters
    kw = {}
    defaults = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
    for p in accepted - _IGNORED:
        if p in spec.per_model:
            vals = [cfg.parameter(p, name, t, model=m) for m in used]
            if any(v is not None for v in vals):
                kw[p] = [defaults.get(p, 1.0) if v is None else float(v) for v in vals]
        else:
            v = cfg.parameter(p, name, t)
            if v is not None:
                kw[_RENAME.get(p, p)] = v
    kw.update(dict(spec.fixed))
    key_kw = None
    if "key" in _keywords(spec.fn):  # per-tensor key from the name; inside, the tree has the fixed key "w"
        from .. import tree as wtree

        key_kw = wtree.leaf_key(key, name, "stream")
    fn_j = _compiled(method, _freeze(kw))
    tree = lambda a: {"w": jnp.asarray(a, jnp.float32)}
    stack = lambda refs: {"w": jnp.stack([jnp.asarray(tensors[r], jnp.float32) for r in refs])}
    if spec.kind == "nobase":
        refs = [m.model for m in cfg.models]
        out = fn_j(stack(refs), key_kw) if method != "passthrough" else tree(tensors[refs[0]])
    elif spec.kind == "pair":
        out = fn_j(tree(tensors[cfg.base_model]), tree(tensors[others[0]]), key_kw)
    elif spec.kind == "opt":
        out = fn_j(stack(others), tree(tensors[cfg.base_model]) if cfg.base_model else None, key_kw)
    else:
        out = fn_j(tree(tensors[cfg.base_model]), stack(others), key_kw)
    return np.asarray(out["w"])


def _keywords(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _freeze(kw: dict):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


_CACHE: dict = {}


def _compiled(method: str, frozen):
    """jit-compiled merge of one tensor, cached per method and parameter values (jit itself caches
    per shape, so a transformer compiles a handful of times, not once per tensor)."""
    ck = (method, frozen)
    if ck not in _CACHE:
        spec = SPECS[method]
        fn = spec.fn
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in frozen}
        takes_key = "key" in _keywords(fn)

        def call(*args):
            *trees, key = args
            extra = {"key": key} if takes_key and key is not None else {}
            if spec.kind == "opt":
                return fn(trees[0], base=trees[1], **kw, **extra)
            return fn(*trees, **kw, **extra)

        _CACHE.clear() if len(_CACHE) > 256 else None
        _CACHE[ck] = jax.jit(call)
    return _CACHE[ck]


def run_merge(config: MergeConfig, out_dir, *, dry_run: bool = False, overwrite: bool = False,
              max_shard_bytes: int = 2 * 1024**3, seed: int = 0, progress: bool = True,
              echo: Callable[[str], None] = print) -> Plan:
    """Validate, then (unless ``dry_run``) merge tensor by tensor into ``out_dir``."""
    from ..io.atomic import refuse_existing

    if not dry_run:
        refuse_existing(out_dir, overwrite)
    out_dtype = _dtype(config.out_dtype or config.dtype)
    ckpts = {}
    for ref in config.model_paths():
        if not Path(ref).exists():
            line = next((m.line for m in config.models if m.model == ref), 1)
            raise MergeError(f"{config.source}:{line}: model path {ref!r} does not exist (weightlab merges local "
                             "checkpoints; nothing is downloaded)")
        ckpts[ref] = Checkpoint(ref)
    try:
        p = plan(config, ckpts)
        for w in p.warnings:
            echo(f"warning: {w}")
        echo(f"plan: {config.method} over {len(config.model_paths())} checkpoints, {len(p.names)} tensors, "
             f"{p.num_layers} layers; recipe {config.recipe_hash[:12]}")
        if dry_run:
            return p
        key = jax.random.key(seed)
        meta = {"weightlab.merge_method": config.method, "weightlab.recipe_sha256": config.recipe_hash}
        from tqdm import tqdm

        t0 = time.time()
        ref0 = ckpts[config.base_model or config.models[0].model]

        def out_dt(n):
            d = ref0.dtype(n)
            return (out_dtype or d) if _floating(d) else d

        layout = [(n, ref0.shape(n), out_dt(n)) for n in p.names]
        with PlannedShardWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, metadata=meta,
                                overwrite=overwrite) as w:
            for name in tqdm(p.names, desc="merge", disable=None if progress else True, leave=False):
                ref_arr = ref0.get(name)
                if not _floating(ref_arr.dtype):  # integer buffers (position ids ...): copy the reference
                    w.add(name, ref_arr)
                    continue
                rows = p.truncate.get(name)
                tensors = {}
                for ref, c in ckpts.items():
                    a = ref_arr if c is ref0 else c.get(name)
                    a = a if rows is None else a[:rows]
                    if not np.all(np.isfinite(a.astype(np.float32))):
                        raise MergeError(f"tensor '{name}' of {ref} has NaN/Inf values")
                    tensors[ref] = a
                merged = _merge_tensor(config, name, _layer_t(name, p.num_layers), tensors, key)
                if rows is not None:  # keep the reference model's extra vocabulary rows
                    full = ref_arr.astype(np.float32)
                    full[:rows] = merged
                    merged = full
                merged = merged.astype(out_dtype or ref_arr.dtype)
                w.add(name, merged)
            w.close(extra_files={"mergekit_config.yml": config.text})
        echo(f"wrote {out_dir} ({w.total / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")
        return p
    finally:
        for c in ckpts.values():
            c.close()
