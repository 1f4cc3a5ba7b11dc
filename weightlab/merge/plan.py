"""Planning a streamed merge: everything is validated from the checkpoint headers (names, shapes,
dtypes, vocab-size mismatches, tied ``lm_head`` layouts, slices) before the first tensor is read, and
the output is laid out as a list of :class:`Job` s (one per output tensor). The engine that runs
them is :mod:`.stream`; neither names a method: what a method needs (its base and model-count rules,
per-model parameters, fixed streaming arguments) comes from its registry entry.

Layer position for gradient parameters: the first ``.<layers|layer|h|blocks>.<i>.`` index in a
tensor name, ``t = i / (L - 1)``; other tensors use ``t = 0`` (as mergekit's pre/post weights).

The plan also evaluates every planned tensor's parameters (gradients and filters included): a
required parameter no filter covers, or a method's ``check`` failing for one tensor (linear weights
summing to zero there), is an error naming the config line and the tensor. Non-float tensors must
have one dtype in every model (their values are compared before merging). Output dtypes: ``dtype``
/``out_dtype`` if given, else float64 when any source is float64, else the first source's dtype;
float64 tensors are computed in float64 by a method's numpy fast path, otherwise in float32 (JAX
x64 off), which the plan reports as a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import ml_dtypes
import numpy as np

from ..dtypes import is_floating
from ..errors import MergeError
from ..io.safetensors import Checkpoint
from .config import _IGNORED, _RENAME, DTYPES, MergeConfig, method_parameters
from .registry import METHODS, precheck

__all__ = ["Job", "Plan", "plan", "order", "kwargs", "out_dtype"]

_YAML_NAME = {v: k for k, v in _RENAME.items()}
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
    kw: dict | None = None  # the method's keyword arguments (None: a non-float tensor, copied)
    dtype: np.dtype | None = None  # output dtype
    compute: type = np.float32  # the read block's dtype (float64 on a fast path for float64 inputs)


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
    all_names = names
    if config.slices:  # layer tensors are matched per slice (models may differ in depth)
        names = [n for n in names if not _LAYER.search(n)]
    name_set = set(names)
    for ref in refs:
        other = {n for n in ckpts[ref].keys() if not (config.slices and _LAYER.search(n))}
        missing = [n for n in names if n not in other]
        extra = [n for n in other if n not in name_set]
        buffers = [n for n in missing if not is_floating(ckpts[ref0].dtype(n))]
        if buffers:  # e.g. BERT's position_ids, which transformers' save_pretrained leaves out
            warnings.append(f"{ref} lacks the non-float buffers {buffers[:3]}; they are not written (transformers "
                            "rebuilds such buffers)")
            names = [n for n in names if n not in buffers]
            name_set -= set(buffers)
            missing = [n for n in missing if n not in buffers]
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
    layers = [int(m.group(1)) for n in names for m in [_LAYER.search(n)] if m]
    num_layers = max(layers) + 1 if layers else 1
    if config.slices:
        jobs = _slice_jobs(config, ckpts, all_names)
        num_layers = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in config.slices)
    else:
        refs_in_order = order(config)
        jobs = [Job(n, {r: n for r in refs_in_order}, _layer_t(n, num_layers), config) for n in names]
    _prepare(jobs, ckpts, out_dtype(config.out_dtype or config.dtype), warnings)
    return Plan(config, [j.out for j in jobs], num_layers, warnings, truncate, jobs)


def has_base(cfg: MergeConfig) -> bool:
    """Whether the read block starts with a base row (see :func:`order`)."""
    return METHODS[cfg.method].base != "unused" and cfg.base_model is not None


def _prepare(jobs: list[Job], ckpts, to_dtype, warnings: list[str]) -> None:
    """Per job: dtype rules, output and compute dtypes, and the parameters evaluated and checked."""
    narrowed = []
    for j in jobs:
        dts = {ref: np.dtype(ckpts[ref].dtype(n)) for ref, n in j.src.items()}
        floats = {ref: is_floating(d) for ref, d in dts.items()}
        if not all(floats.values()):
            if any(floats.values()) or len(set(dts.values())) > 1:
                shown = ", ".join(f"{ref}: {d}" for ref, d in dts.items())
                raise MergeError(f"tensor '{j.out}': a non-float tensor must have the same dtype in every model, "
                                 f"got {shown}")
            j.dtype = next(iter(dts.values()))
            continue
        wide = any(d == np.float64 for d in dts.values())
        j.dtype = to_dtype or (np.dtype(np.float64) if wide else dts[order(j.cfg)[0]])
        j.kw = kwargs(j.cfg, j.out, j.t)
        try:
            precheck(j.cfg.method, j.kw)
        except MergeError as e:
            raise MergeError(f"{j.cfg.source}:{j.cfg.line}: tensor '{j.out}': {e}") from None
        if wide:
            fast = METHODS[j.cfg.method].fast
            if fast is not None and fast.applies(j.kw, has_base(j.cfg)):
                j.compute = np.float64
            else:
                narrowed.append(j.out)
    if narrowed:
        warnings.append(f"{len(narrowed)} float64 tensors (e.g. '{narrowed[0]}') are merged in float32 (JAX's x64 "
                        f"mode is off) and stored as {'float64' if to_dtype is None else to_dtype}")


def out_dtype(name):
    """The numpy dtype of a config's ``dtype``/``out_dtype`` (None: keep each tensor's own)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise MergeError(f"unsupported dtype {name!r} (use one of {', '.join(DTYPES)})")
    canon = DTYPES[name]
    return np.dtype(ml_dtypes.bfloat16) if canon == "bfloat16" else np.dtype(canon)


def order(cfg: MergeConfig) -> list[str]:
    """Checkpoint order in the read buffer: the base (if the method uses one) first, then the models,
    so the models' rows are one contiguous (N, ...) block."""
    entry = METHODS[cfg.method]
    if entry.base == "unused":
        return [m.model for m in cfg.models]
    return ([cfg.base_model] if cfg.base_model else []) + cfg.merged_models()


def kwargs(cfg: MergeConfig, name: str, t: float) -> dict:
    """The method's keyword arguments for tensor ``name`` at layer position ``t`` (per-model
    parameters as one value per model in :func:`order`), plus the method's ``stream_kwargs``."""
    entry = METHODS[cfg.method]
    used = [m.model for m in cfg.models] if entry.base == "unused" else cfg.merged_models()
    kw = {}
    params = entry.parameters
    for p in method_parameters(cfg.method) - _IGNORED:
        arg = _RENAME.get(p, p)
        if arg in entry.per_model:
            vals = [cfg.parameter(p, name, t, model=m) for m in used]
            if any(v is not None for v in vals):
                dflt = params[arg].default
                if any(v is None for v in vals) and dflt is inspect.Parameter.empty:
                    raise MergeError(f"{cfg.source}:{cfg.line}: {cfg.method} needs {p!r} for every model (no filter "
                                     f"covers tensor '{name}')")
                kw[arg] = [float(dflt) if v is None else float(v) for v in vals]
        else:
            v = cfg.parameter(p, name, t)
            if v is not None:
                kw[arg] = v
    missing = sorted(entry.required - set(kw) - set(entry.extras))
    if missing:
        raise MergeError(f"{cfg.source}:{cfg.line}: {cfg.method} needs {_YAML_NAME.get(missing[0], missing[0])!r} "
                         f"(no filter covers tensor '{name}')")
    kw.update(dict(entry.stream_kwargs))
    return kw
