"""Out-of-core merging of Hugging Face safetensors checkpoints, tensor by tensor: the execution half
(planning and validation are :mod:`.plan`).

Memory holds one tensor from each input model plus at most one output shard, never whole models.
The output directory (sharded safetensors with ``{"format": "pt"}`` and a recipe hash in their
metadata, the index, ``config.json``, the tokenizer, a model card and the config: :mod:`.hfout`)
appears atomically at the end; an interrupted merge leaves nothing that looks complete. The engine
names no method: it calls every method as ``fn(base, models, **kw)`` on one tensor, uses the
method's numpy fast path when its entry declares one (linear, task arithmetic: no JAX at all), and
computes magnitude cut-offs on the host for methods that declare ``host_topk``.

Nothing non-finite is written: every input block and every output tensor (after the cast to its
output dtype) is checked, one reduction pass each, and a NaN/Inf is a :class:`MergeError` naming
the tensor. Non-float tensors (position ids ...) are copied only when every model has the same
values; they are compared before the output is opened.
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
from .plan import Job, Plan, has_base, order, plan
from .registry import METHODS
from .stats import GlobalMagnitude, tensor_thresholds

__all__ = ["run_merge"]


def _merge_tensor(job: Job, block: np.ndarray, shape: tuple, key, scratch, global_thr=None) -> np.ndarray:
    """Merge one tensor; ``block`` holds the checkpoints of :func:`.plan.order` as (len, numel) rows of
    ``job.compute`` (float32, or float64 on a fast path)."""
    cfg, name, kw = job.cfg, job.out, dict(job.kw)
    entry = METHODS[cfg.method]
    base_row = has_base(cfg)
    if entry.fast is not None and entry.fast.applies(kw, base_row):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by the finite check
            return entry.fast.run(block, kw, base_row).reshape(shape)
    if block.dtype != np.float32:
        block = block.astype(np.float32)
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
    fn_j = _compiled(cfg.method, _freeze(kw), base_row)
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


def _finite(a: np.ndarray) -> bool:
    """All finite, in one pass: a float sum is finite unless some entry is not (or the sum overflows,
    then the exact elementwise test decides)."""
    acc = np.float64 if a.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(a.reshape(-1), dtype=acc)) or np.all(np.isfinite(a)))


class _ReadPool:
    """Reusable read buffers: every tensor of every checkpoint is read (pread) into the same float32
    block of ``sources x max_numel`` (a float64 one for float64 jobs on a fast path; plus one raw
    buffer for inputs of another dtype), so the merge loop
    touches no fresh memory per tensor; on this class of machine page faults on new buffers cost more
    than the reads themselves. The block for one job is (sources, numel), contiguous, in
    :func:`.plan.order` (base first)."""

    def __init__(self, ckpts, plan_: Plan):
        self.ckpts, self.truncate = ckpts, plan_.truncate
        biggest, width, raw, wide = 0, 1, 0, 0
        for j in plan_.jobs:
            width = max(width, len(order(j.cfg)))
            for ref, n in j.src.items():
                dt = np.dtype(ckpts[ref].dtype(n))
                if is_floating(dt):
                    numel = int(np.prod(ckpts[ref].shape(n), dtype=np.int64))
                    biggest = max(biggest, numel)
                    wide = max(wide, numel) if j.compute == np.float64 else wide
                    if dt != j.compute or j.out in plan_.truncate:
                        raw = max(raw, dt.itemsize)
        self.block = np.empty(width * biggest, np.float32)
        self.block64 = np.empty(width * wide, np.float64)
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
                pool = self.block64 if job.compute == np.float64 else self.block
                blk = pool[:len(refs) * k].reshape(len(refs), k)
            if c.dtype(name) == blk.dtype and rows is None:
                c.read_into(name, blk[i])
            else:
                a = c.read_into(name, self.raw)
                np.copyto(blk[i], a[:rows].reshape(-1) if rows is not None else a.reshape(-1), casting="unsafe")
            if not _finite(blk[i]):
                raise MergeError(f"tensor '{name}' of {ref} has NaN/Inf values")
        return blk, shape


def _same_nonfloat_values(p: Plan, ckpts) -> None:
    """Compare every non-float tensor across its models: a MergeError naming the tensor and the
    models where they differ (which one to keep is not ours to guess)."""
    for j in p.jobs:
        if j.kw is not None:
            continue
        refs = list(j.src)
        first = ckpts[refs[0]].get(j.src[refs[0]])
        for ref in refs[1:]:
            if not np.array_equal(first, ckpts[ref].get(j.src[ref])):
                raise MergeError(f"tensor '{j.out}' ({first.dtype}) differs between {refs[0]} and {ref}: a non-float "
                                 "tensor cannot be merged and the models disagree on it")


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

    jobs = [j for j in p.jobs if j.kw is not None]
    dens = None
    for j in jobs:
        n = j.out
        d = j.kw.get("density", [1.0] * (len(order(j.cfg)) - 1))
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


def _output_is_not_an_input(config: MergeConfig, out_dir) -> None:
    """The output may not be, or contain, an input model or the config (``--overwrite`` would
    replace it)."""
    out = Path(out_dir).resolve()
    inputs = [part for ref in config.model_paths() for part in ref.split("+")]
    if config.tokenizer_source and config.tokenizer_source != "base":
        inputs.append(config.tokenizer_source)
    if Path(config.source).exists():
        inputs.append(config.source)
    for p in inputs:
        rp = Path(p).resolve()
        if rp == out or out in rp.parents:
            raise MergeError(f"the output {out_dir} is or contains the input {p}; write the merge elsewhere")


def run_merge(config: MergeConfig, out_dir, *, dry_run: bool = False, overwrite: bool = False,
              max_shard_bytes: int = 2 * 1024**3, seed: int = 0, progress: bool = True,
              echo: Callable[[str], None] = print, copy_tokenizer: bool = True, write_model_card: bool = True,
              allow_crimes: bool = False) -> Plan:
    """Validate, then (unless ``dry_run``) merge tensor by tensor into ``out_dir``, a directory that
    ``transformers.AutoModel.from_pretrained`` loads (side files: :func:`.hfout.prepare`).
    ``copy_tokenizer``, ``write_model_card`` and ``allow_crimes`` are mergekit's options."""
    from . import hfout
    from ..io.atomic import refuse_existing

    _output_is_not_an_input(config, out_dir)
    if not dry_run:
        refuse_existing(out_dir, overwrite)
    ckpts = {}
    for ref in config.model_paths():
        for part in ref.split("+"):
            if not Path(part).exists():
                line = next((m.line for m in config.models if m.model == ref), 1)
                raise MergeError(f"{config.source}:{line}: model path {part!r} does not exist (weightlab merges "
                                 "local checkpoints; nothing is downloaded)")
        ckpts[ref] = _open(ref)
    try:
        hfout.check_architectures(config, allow_crimes)
        p = plan(config, ckpts)
        for w in p.warnings:
            echo(f"warning: {w}")
        echo(f"plan: {config.method} over {len(config.model_paths())} checkpoints, {len(p.names)} tensors, "
             f"{p.num_layers} layers; recipe {config.recipe_hash[:12]}")
        _same_nonfloat_values(p, ckpts)

        def first(j):
            return ckpts[order(j.cfg)[0]], j.src[order(j.cfg)[0]]

        layout = [(j.out, first(j)[0].shape(j.src[order(j.cfg)[0]]), j.dtype) for j in p.jobs]
        side = hfout.prepare(config, p, ckpts, layout, copy_tokenizer=copy_tokenizer, allow_crimes=allow_crimes,
                             write_model_card=write_model_card, warn=lambda m: echo(f"warning: {m}"))
        if dry_run:
            echo(f"output files: {', '.join(sorted(side)) or 'tensors only'}")
            return p
        key = seed  # a jax key is made only for random methods (keeps the JAX backend out of linear merges)
        meta = {"format": "pt", "weightlab.merge_method": config.method, "weightlab.recipe_sha256": config.recipe_hash}
        from tqdm import tqdm

        t0 = time.time()
        with PlannedShardWriter(out_dir, layout, max_shard_bytes=max_shard_bytes, metadata=meta,
                                overwrite=overwrite) as w:
            pool = _ReadPool(ckpts, p)
            global_thr = _global_pass(config, p, pool, progress) if _is_global(config) else None
            for job in tqdm(p.jobs, desc="merge", disable=None if progress else True, leave=False):
                c0, n0 = first(job)
                if job.kw is None:  # non-float buffers (position ids ...): equal in every model, copied
                    w.add(job.out, c0.get(n0))
                    continue
                block, shape = pool.read(job)
                merged = _merge_tensor(job, block, shape, key, pool.scratch, global_thr)
                rows = p.truncate.get(job.out)
                if rows is not None:  # keep the reference model's extra vocabulary rows
                    full = c0.get(n0).astype(merged.dtype)
                    full[:rows] = merged
                    merged = full
                out = merged.astype(job.dtype, copy=False)
                if not _finite(out):
                    raise MergeError(f"tensor '{job.out}': the merge produced NaN/Inf values"
                                     f"{'' if out.dtype == merged.dtype else f' (after the cast to {out.dtype})'}; "
                                     "nothing was written (check the weights / parameters)")
                w.add(job.out, out)
            w.close(extra_files={**side, "mergekit_config.yml": config.text})
        echo(f"wrote {out_dir} ({w.total / 2**20:.1f} MiB) in {time.time() - t0:.2f}s")
        return p
    finally:
        for c in ckpts.values():
            c.close()
