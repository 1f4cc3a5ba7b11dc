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
import re
import time
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from ..errors import MergeError
from ..io.safetensors import Checkpoint, qarray_specs
from ..io.shards import PlannedShardWriter
from .config import MergeConfig, _IGNORED, _RENAME
from .registry import SPECS
from .stats import GlobalMagnitude, tensor_thresholds

__all__ = ["Plan", "plan", "run_merge"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_EMBED = re.compile(r"(embed|wte|word_embeddings|lm_head|output\.weight$)")


@dataclasses.dataclass
class Job:
    """One output tensor: its name, the input tensor name in each checkpoint, the gradient position
    and the (slice) configuration that merges it."""
    out: str
    src: dict
    t: float
    cfg: MergeConfig


@dataclasses.dataclass
class Plan:
    config: MergeConfig
    names: list[str]
    num_layers: int
    warnings: list[str]
    truncate: dict  # tensor name -> rows to keep (vocab mismatch on embeddings)
    jobs: list = dataclasses.field(default_factory=list)


def _with_layer(name: str, i: int) -> str:
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(i) + name[m.end(1):]


def _slice_jobs(config: MergeConfig, ckpts, names: list[str]) -> list[Job]:
    """Output tensors of a ``slices`` config (see :mod:`.config`), validated against the headers."""
    jobs, offset = [], 0
    first = config.slices[0].sources[0].model
    outside = [n for n in names if not _LAYER.search(n)]
    pre = [n for n in outside if re.search(r"embed|wte|wpe", n)]
    post = [n for n in outside if n not in pre]
    for n in pre:
        sub = config.for_slice(0)
        jobs.append(Job(n, {m.model: n for m in sub.models}, 0.0, sub))
    for i, sl in enumerate(config.slices):
        sub = config.for_slice(i)
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for m in sl.sources:
            have = {int(x.group(1)) for n in ckpts[m.model].keys() for x in [_LAYER.search(n)] if x}
            if m.layer_range[1] > (max(have) + 1 if have else 0):
                raise MergeError(f"{config.source}:{m.line}: layer_range {list(m.layer_range)} but {m.model} has "
                                 f"{len(have)} layers")
        src0 = sl.sources[0]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 0.0
            layer_names = [n for n in ckpts[src0.model].keys()
                           if _LAYER.search(n) and int(_LAYER.search(n).group(1)) == src0.layer_range[0] + idx]
            for n in layer_names:
                src = {m.model: _with_layer(n, m.layer_range[0] + idx) for m in sl.sources}
                for ref, nm in src.items():
                    if nm not in ckpts[ref]:
                        raise MergeError(f"slice at line {sl.line}: tensor '{nm}' is missing from {ref}")
                    if ckpts[ref].shape(nm) != ckpts[src0.model].shape(n):
                        raise MergeError(f"slice at line {sl.line}: '{nm}' has shape {ckpts[ref].shape(nm)} in "
                                         f"{ref} vs {ckpts[src0.model].shape(n)} for '{n}' in {src0.model}")
                jobs.append(Job(_with_layer(n, offset + idx), src, t, sub))
        offset += length
    last = config.for_slice(len(config.slices) - 1)
    for n in post:
        jobs.append(Job(n, {m.model: n for m in last.models}, 0.0, last))
    for j in jobs:
        for ref, nm in j.src.items():
            if nm not in ckpts[ref]:
                raise MergeError(f"tensor '{nm}' is missing from {ref} (needed for output '{j.out}'; "
                                 f"first slice source {first})")
    return jobs


def _floating(dtype) -> bool:
    """numpy float dtypes and ml_dtypes' bfloat16 (which numpy does not class as floating)."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def _layer_t(name: str, num_layers: int) -> float:
    m = _LAYER.search(name)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def _check_counts(config: MergeConfig) -> None:
    n_models = len([m for m in config.models if m.model != config.base_model])
    if SPECS[config.method].kind == "pair" and n_models != 1:
        raise MergeError(f"{config.method} merges base_model with exactly one other model, got {n_models}")
    scope = config.parameters.get("scope", "tensor")
    if scope not in ("tensor", "global"):
        raise MergeError(f"{config.source}: scope must be 'tensor' or 'global', got {scope!r}")
    if config.method == "nuslerp" and n_models != 2:
        raise MergeError(f"nuslerp merges exactly two models (plus an optional base_model), got {n_models}")
    if config.method == "model_stock" and n_models < 2:
        raise MergeError("model_stock needs at least two models besides base_model")


def plan(config: MergeConfig, ckpts: dict[str, Checkpoint]) -> Plan:
    """Validate everything from the headers; raise :class:`MergeError` naming tensor and model."""
    refs = config.model_paths()
    ref0 = config.base_model or refs[0]
    names = list(ckpts[ref0].keys())
    warnings, truncate = [], {}
    all_names = names
    if config.slices:  # layer tensors are matched per slice (models may differ in depth)
        names = [n for n in names if not _LAYER.search(n)]
    name_set = set(names)
    for ref in refs:
        other = {n for n in ckpts[ref].keys() if not (config.slices and _LAYER.search(n))}
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
    for sub in ([config.for_slice(i) for i in range(len(config.slices))] if config.slices else [config]):
        _check_counts(sub)
    if config.slices:
        jobs = _slice_jobs(config, ckpts, all_names)
        num_layers = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in config.slices)
    else:
        order = _order(config)
        jobs = [Job(n, {r: n for r in order}, _layer_t(n, num_layers), config) for n in names]
    return Plan(config, [j.out for j in jobs], num_layers, warnings, truncate, jobs)


def _dtype(name):
    if name is None:
        return None
    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "fp32": np.float32,
             "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
    if name not in table:
        raise MergeError(f"unsupported dtype {name!r} (use float32, float16 or bfloat16)")
    return np.dtype(table[name])


def _order(cfg: MergeConfig) -> list[str]:
    """Checkpoint order in the read buffer: the base (if the method uses one) first, then the models,
    so the models' rows are one contiguous (N, ...) block."""
    spec = SPECS[cfg.method]
    others = [m.model for m in cfg.models if m.model != cfg.base_model]
    if spec.kind == "nobase":
        return [m.model for m in cfg.models]
    return ([cfg.base_model] if cfg.base_model else []) + others


def _kwargs(cfg: MergeConfig, name: str, t: float) -> dict:
    spec = SPECS[cfg.method]
    used = [m.model for m in cfg.models] if spec.kind == "nobase" else \
        [m.model for m in cfg.models if m.model != cfg.base_model]
    kw = {}
    defaults = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
    for p in spec.parameters - _IGNORED:
        if p in spec.per_model:
            vals = [cfg.parameter(p, name, t, model=m) for m in used]
            if any(v is not None for v in vals):
                kw[p] = [defaults.get(p, 1.0) if v is None else float(v) for v in vals]
        else:
            v = cfg.parameter(p, name, t)
            if v is not None:
                kw[_RENAME.get(p, p)] = v
    kw.update(dict(spec.fixed))
    return kw


def _fast_numpy(method: str, kw: dict, block: np.ndarray):
    """In-place float32 numpy evaluation of the purely linear methods (no jit dispatch, no new
    buffers): ``linear`` with mergekit's operation order (sum of w_i x_i, then / sum w), and plain
    ``task_arithmetic``. Returns None for anything else. ``block``: (models, numel), base first
    for task_arithmetic; it is overwritten."""
    if method == "linear" and set(kw) <= {"weight", "normalize"}:
        n = block.shape[0]
        w = np.broadcast_to(np.asarray(kw.get("weight", 1.0), np.float32), (n,))
        acc = block[0]
        acc *= w[0]
        for i in range(1, n):
            block[i] *= w[i]
            acc += block[i]
        if kw.get("normalize", True):
            acc /= np.float32(w.sum())
        return acc
    if method == "task_arithmetic" and set(kw) <= {"weight", "lambda_", "normalize"} and not kw.get("normalize"):
        base, models = block[0], block[1:]
        w = np.broadcast_to(np.asarray(kw.get("weight", 1.0), np.float32), (models.shape[0],))
        lam = np.float32(kw.get("lambda_", 1.0))
        for i in range(models.shape[0]):
            models[i] -= base
            models[i] *= np.float32(w[i]) * lam
        for i in range(models.shape[0]):
            base += models[i]
        return base
    return None


def _merge_tensor(cfg: MergeConfig, name: str, t: float, block: np.ndarray, shape: tuple, key, scratch,
                  global_thr=None) -> np.ndarray:
    """Merge one tensor; ``block`` holds the checkpoints of :func:`_order` as (len, numel) float32."""
    method = cfg.method
    spec = SPECS[method]
    kw = _kwargs(cfg, name, t)
    fast = _fast_numpy(method, kw, block)
    if fast is not None:
        return fast.reshape(shape)
    import jax  # only methods that need it start JAX (a linear merge never does)
    import jax.numpy as jnp

    thr = None
    if spec.magnitude:  # top-k cut-offs on the host (np.partition / the global statistics pass)
        kw.pop("scope", None)
        dens = kw.get("density", [1.0] * (block.shape[0] - 1))
        if global_thr is not None:
            thr = jnp.asarray(global_thr)
        elif min(dens) < 1:
            thr = jnp.asarray(tensor_thresholds(block, dens, scratch))
    key_kw = None
    if "key" in spec.parameters_all:  # per-tensor key from the name; inside, the tree has the fixed key "w"
        from .. import tree as wtree

        key_kw = wtree.leaf_key(jax.random.key(key) if isinstance(key, int) else key, name, "stream")
    has_base = spec.kind != "nobase" and cfg.base_model is not None
    fn_j = _compiled(method, _freeze(kw), has_base)
    out = fn_j(jnp.asarray(block.reshape((block.shape[0],) + tuple(shape))), key_kw, thr)
    return np.asarray(out["w"])




def _freeze(kw: dict):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


_CACHE: dict = {}


def _compiled(method: str, frozen, has_base: bool):
    """jit-compiled merge of one tensor from its whole (sources, ...) block, cached per method and
    parameter values (jit caches per shape, so a transformer compiles a handful of times; slicing
    the block inside the jit avoids compiling a gather per shape outside it)."""
    ck = (method, frozen, has_base)
    if ck not in _CACHE:
        spec = SPECS[method]
        fn = spec.fn
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in frozen}
        takes_key = "key" in spec.parameters_all

        def call(full, key, thr):
            extra = {"key": key} if takes_key and key is not None else {}
            if thr is not None:
                extra["threshold"] = thr
            base, stacked = ({"w": full[0]}, {"w": full[1:]}) if has_base else (None, {"w": full})
            if spec.kind == "nobase":
                return {"w": full[0]} if method == "passthrough" else fn(stacked, **kw, **extra)
            if spec.kind == "pair":
                return fn(base, {"w": full[1]}, **kw, **extra)
            if spec.kind == "opt":
                return fn(stacked, base=base, **kw, **extra)
            return fn(base, stacked, **kw, **extra)

        _CACHE.clear() if len(_CACHE) > 256 else None
        import jax

        _CACHE[ck] = jax.jit(call)
    return _CACHE[ck]


class _ReadPool:
    """Reusable read buffers: every tensor of every checkpoint is read (pread) into the same float32
    block of ``sources x max_numel`` (plus one raw buffer for non-float32 inputs), so the merge loop
    touches no fresh memory per tensor; on this class of machine page faults on new buffers cost more
    than the reads themselves. The block for one job is (sources, numel), contiguous, in
    :func:`_order` (base first)."""

    def __init__(self, ckpts, plan_: Plan):
        self.ckpts, self.truncate = ckpts, plan_.truncate
        biggest, width, raw = 0, 1, 0
        for j in plan_.jobs:
            width = max(width, len(_order(j.cfg)))
            for ref, n in j.src.items():
                dt = np.dtype(ckpts[ref].dtype(n))
                if _floating(dt):
                    biggest = max(biggest, int(np.prod(ckpts[ref].shape(n), dtype=np.int64)))
                    if dt != np.float32 or j.out in plan_.truncate:
                        raw = max(raw, dt.itemsize)
        self.block = np.empty(width * biggest, np.float32)
        self.scratch = np.empty(biggest if SPECS[plan_.config.method].magnitude else 0, np.float32)
        self.raw = np.empty(biggest * raw, np.uint8)

    def read(self, job: Job):
        rows = self.truncate.get(job.out)
        order = _order(job.cfg)
        shape = None
        for i, ref in enumerate(order):
            c, name = self.ckpts[ref], job.src[ref]
            full = c.shape(name)
            shape = full if rows is None else (rows,) + tuple(full[1:])
            k = int(np.prod(shape, dtype=np.int64))
            if i == 0:
                blk = self.block[:len(order) * k].reshape(len(order), k)
            if c.dtype(name) == np.float32 and rows is None:
                c.read_into(name, blk[i])
            else:
                a = c.read_into(name, self.raw)
                np.copyto(blk[i], a[:rows].reshape(-1) if rows is not None else a.reshape(-1), casting="unsafe")
            if not np.isfinite(np.add.reduce(blk[i], dtype=np.float32)) and not np.all(np.isfinite(blk[i])):
                raise MergeError(f"tensor '{name}' of {ref} has NaN/Inf values")
        return blk, shape


def _open(ref: str):
    """A checkpoint; one written by ``weightlab quantize`` / ``quant.save`` is read through a view that
    dequantizes each QArray when its tensor is read (JAX is imported only then); ``base+adapter``
    (mergekit's syntax) is the base with a PEFT LoRA adapter applied tensor by tensor."""
    if "+" in ref:
        from .peft import LoraAppliedCheckpoint

        base, adapter = ref.split("+", 1)
        return LoraAppliedCheckpoint(_open(base), adapter)
    c = Checkpoint(ref)
    if qarray_specs(c.metadata):
        from ..quant.checkpoint import DequantizedCheckpoint

        return DequantizedCheckpoint(c)
    return c


def _is_global(cfg: MergeConfig) -> bool:
    return SPECS[cfg.method].magnitude and cfg.parameters.get("scope", "tensor") == "global"


def _global_pass(cfg: MergeConfig, p: Plan, pool: "_ReadPool", progress: bool) -> np.ndarray:
    """Statistics pass for ``scope: global`` trimming: two histogram sweeps over every float tensor
    (see :mod:`.stats`); returns the per-model cut-offs used by the apply pass."""
    from tqdm import tqdm

    jobs = [j for j in p.jobs if _floating(pool.ckpts[_order(j.cfg)[0]].dtype(j.src[_order(j.cfg)[0]]))]
    dens = None
    for j in jobs:
        n = j.out
        d = _kwargs(j.cfg, n, j.t).get("density", [1.0] * (len(_order(j.cfg)) - 1))
        if dens is not None and list(d) != list(dens):
            raise MergeError(f"scope: global needs one density per model for the whole model; '{n}' has {d}, "
                             f"earlier tensors {dens}")
        dens = d
    stats = GlobalMagnitude(dens)
    for sweep in (stats.add_first, stats.add_second):
        for j in tqdm(jobs, desc="statistics", disable=None if progress else True, leave=False):
            block, _ = pool.read(j)
            sweep(block, pool.scratch)
        if sweep == stats.add_first:
            stats.finish_first()
    return stats.thresholds()


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
        for part in ref.split("+"):
            if not Path(part).exists():
                line = next((m.line for m in config.models if m.model == ref), 1)
                raise MergeError(f"{config.source}:{line}: model path {part!r} does not exist (weightlab merges "
                                 "local checkpoints; nothing is downloaded)")
        ckpts[ref] = _open(ref)
    try:
        p = plan(config, ckpts)
        for w in p.warnings:
            echo(f"warning: {w}")
        echo(f"plan: {config.method} over {len(config.model_paths())} checkpoints, {len(p.names)} tensors, "
             f"{p.num_layers} layers; recipe {config.recipe_hash[:12]}")
        if dry_run:
            return p
        key = seed  # a jax key is made only for random methods (keeps the JAX backend out of linear merges)
        meta = {"weightlab.merge_method": config.method, "weightlab.recipe_sha256": config.recipe_hash}
        from tqdm import tqdm

        t0 = time.time()
        def first(j):
            return ckpts[_order(j.cfg)[0]], j.src[_order(j.cfg)[0]]

        def out_dt(j):
            c, n = first(j)
            d = c.dtype(n)
            return (out_dtype or d) if _floating(d) else d

        layout = [(j.out, first(j)[0].shape(j.src[_order(j.cfg)[0]]), out_dt(j)) for j in p.jobs]
        with PlannedShardWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, metadata=meta,
                                overwrite=overwrite) as w:
            pool = _ReadPool(ckpts, p)
            global_thr = _global_pass(config, p, pool, progress) if _is_global(config) else None
            for job in tqdm(p.jobs, desc="merge", disable=None if progress else True, leave=False):
                c0, n0 = first(job)
                if not _floating(c0.dtype(n0)):  # integer buffers (position ids ...): copy the first source
                    w.add(job.out, c0.get(n0))
                    continue
                block, shape = pool.read(job)
                merged = _merge_tensor(job.cfg, job.out, job.t, block, shape, key, pool.scratch, global_thr)
                rows = p.truncate.get(job.out)
                if rows is not None:  # keep the reference model's extra vocabulary rows
                    full = c0.get(n0).astype(np.float32)
                    full[:rows] = merged
                    merged = full
                w.add(job.out, merged.astype(out_dtype or c0.dtype(n0), copy=False))
            w.close(extra_files={"mergekit_config.yml": config.text})
        echo(f"wrote {out_dir} ({w.total / 2**20:.1f} MiB) in {time.time() - t0:.2f}s")
        return p
    finally:
        for c in ckpts.values():
            c.close()
