"""Out-of-core merging of Hugging Face safetensors checkpoints, tensor by tensor: the execution half
(planning and validation are :mod:`.plan`).

Memory holds one tensor from each input model plus at most one output shard, never whole models.
The output directory (sharded safetensors + index + the config + a recipe hash in the metadata)
appears atomically at the end; an interrupted merge leaves nothing that looks complete. The engine
names no method: it calls every method as ``fn(base, models, **kw)`` on one tensor, uses the
method's numpy fast path when its entry declares one (linear, task arithmetic: no JAX at all), and
computes magnitude cut-offs on the host for methods that declare ``host_topk``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..dtypes import is_floating
from ..errors import MergeError
from ..io.shards import PlannedShardWriter
from .config import MergeConfig
from .plan import Job, Plan, kwargs, order, out_dtype, plan
from .registry import METHODS
from .stats import GlobalMagnitude, tensor_thresholds

__all__ = ["run_merge"]


def _merge_tensor(cfg: MergeConfig, name: str, t: float, block: np.ndarray, shape: tuple, key, scratch,
                  global_thr=None) -> np.ndarray:
    """Merge one tensor; ``block`` holds the checkpoints of :func:`.plan.order` as (len, numel) float32."""
    entry = METHODS[cfg.method]
    kw = kwargs(cfg, name, t)
    has_base = entry.base != "unused" and cfg.base_model is not None
    fast = entry.fast(block, kw, has_base) if entry.fast is not None else None
    if fast is not None:
        return fast.reshape(shape)
    import jax  # only methods that need it start JAX (a linear merge never does)
    import jax.numpy as jnp

    thr = None
    if entry.host_topk:  # top-k cut-offs on the host (np.partition / the global statistics pass)
        kw.pop("scope", None)
        dens = kw.get("density", [1.0] * (block.shape[0] - 1))
        if global_thr is not None:
            thr = jnp.asarray(global_thr)
        elif min(dens) < 1:
            thr = jnp.asarray(tensor_thresholds(block, dens, scratch))
    key_kw = None
    if entry.random:  # per-tensor key from the name; inside, the tree has the fixed key "w"
        from .. import tree as wtree

        key_kw = wtree.leaf_key(jax.random.key(key) if isinstance(key, int) else key, name, "stream")
    fn_j = _compiled(cfg.method, _freeze(kw), has_base)
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
        entry = METHODS[method]
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in frozen}

        def call(full, key, thr):
            extra = {"key": key} if entry.random and key is not None else {}
            if thr is not None:
                extra["threshold"] = thr
            base, stacked = ({"w": full[0]}, {"w": full[1:]}) if has_base else (None, {"w": full})
            return entry.fn(base, stacked, **kw, **extra)

        _CACHE.clear() if len(_CACHE) > 256 else None
        import jax

        _CACHE[ck] = jax.jit(call)
    return _CACHE[ck]


class _ReadPool:
    """Reusable read buffers: every tensor of every checkpoint is read (pread) into the same float32
    block of ``sources x max_numel`` (plus one raw buffer for non-float32 inputs), so the merge loop
    touches no fresh memory per tensor; on this class of machine page faults on new buffers cost more
    than the reads themselves. The block for one job is (sources, numel), contiguous, in
    :func:`.plan.order` (base first)."""

    def __init__(self, ckpts, plan_: Plan):
        self.ckpts, self.truncate = ckpts, plan_.truncate
        biggest, width, raw = 0, 1, 0
        for j in plan_.jobs:
            width = max(width, len(order(j.cfg)))
            for ref, n in j.src.items():
                dt = np.dtype(ckpts[ref].dtype(n))
                if is_floating(dt):
                    biggest = max(biggest, int(np.prod(ckpts[ref].shape(n), dtype=np.int64)))
                    if dt != np.float32 or j.out in plan_.truncate:
                        raw = max(raw, dt.itemsize)
        self.block = np.empty(width * biggest, np.float32)
        self.scratch = np.empty(biggest if METHODS[plan_.config.method].host_topk else 0, np.float32)
        self.raw = np.empty(biggest * raw, np.uint8)

    def read(self, job: Job):
        rows = self.truncate.get(job.out)
        refs = order(job.cfg)
        shape = None
        for i, ref in enumerate(refs):
            c, name = self.ckpts[ref], job.src[ref]
            full = c.shape(name)
            shape = full if rows is None else (rows,) + tuple(full[1:])
            k = int(np.prod(shape, dtype=np.int64))
            if i == 0:
                blk = self.block[:len(refs) * k].reshape(len(refs), k)
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
    from ..io.safetensors import Checkpoint
    from ..quant.checkpoint import DequantizedCheckpoint, qarray_specs

    c = Checkpoint(ref)
    if qarray_specs(c.metadata, ref):
        return DequantizedCheckpoint(c)
    return c


def _is_global(cfg: MergeConfig) -> bool:
    return METHODS[cfg.method].host_topk and cfg.parameters.get("scope", "tensor") == "global"


def _global_pass(cfg: MergeConfig, p: Plan, pool: "_ReadPool", progress: bool) -> np.ndarray:
    """Statistics pass for ``scope: global`` trimming: two histogram sweeps over every float tensor
    (see :mod:`.stats`); returns the per-model cut-offs used by the apply pass."""
    from tqdm import tqdm

    jobs = [j for j in p.jobs if is_floating(pool.ckpts[order(j.cfg)[0]].dtype(j.src[order(j.cfg)[0]]))]
    dens = None
    for j in jobs:
        n = j.out
        d = kwargs(j.cfg, n, j.t).get("density", [1.0] * (len(order(j.cfg)) - 1))
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
    to_dtype = out_dtype(config.out_dtype or config.dtype)
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
            return ckpts[order(j.cfg)[0]], j.src[order(j.cfg)[0]]

        def out_dt(j):
            c, n = first(j)
            d = c.dtype(n)
            return (to_dtype or d) if is_floating(d) else d

        layout = [(j.out, first(j)[0].shape(j.src[order(j.cfg)[0]]), out_dt(j)) for j in p.jobs]
        with PlannedShardWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, metadata=meta,
                                overwrite=overwrite) as w:
            pool = _ReadPool(ckpts, p)
            global_thr = _global_pass(config, p, pool, progress) if _is_global(config) else None
            for job in tqdm(p.jobs, desc="merge", disable=None if progress else True, leave=False):
                c0, n0 = first(job)
                if not is_floating(c0.dtype(n0)):  # integer buffers (position ids ...): copy the first source
                    w.add(job.out, c0.get(n0))
                    continue
                block, shape = pool.read(job)
                merged = _merge_tensor(job.cfg, job.out, job.t, block, shape, key, pool.scratch, global_thr)
                rows = p.truncate.get(job.out)
                if rows is not None:  # keep the reference model's extra vocabulary rows
                    full = c0.get(n0).astype(np.float32)
                    full[:rows] = merged
                    merged = full
                w.add(job.out, merged.astype(to_dtype or c0.dtype(n0), copy=False))
            w.close(extra_files={"mergekit_config.yml": config.text})
        echo(f"wrote {out_dir} ({w.total / 2**20:.1f} MiB) in {time.time() - t0:.2f}s")
        return p
    finally:
        for c in ckpts.values():
            c.close()
