"""PEFT LoRA adapters on disk: extract one from a fine-tune, apply one to a base while streaming, and
merge several *as adapters* (in factor space, never forming a dense ``out x in`` delta).

Layout (PEFT's): ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r), and ``adapter_config.json`` (``r``, ``lora_alpha``, optional
``rank_pattern`` / ``alpha_pattern`` per module, ``use_rslora``); the update of ``<module>.weight`` is
``scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Adapters we write fold
the scale into B and set ``lora_alpha = r`` per module, so PEFT's scale is 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import MergeError
from ..io.safetensors import CheckpointView
from .lora import LoRA, _factor, _rank_for, merge_factors

__all__ = ["read_adapter", "write_adapter", "extract_lora_checkpoint", "merge_adapters", "LoraAppliedCheckpoint"]

_NOT_LINEAR = r"(embed|wte|wpe|lm_head|norm|ln_)"
_PREFIX = "base_model.model."


def read_adapter(adapter_dir) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """``(config, {module: (B (out, r), A (r, in), scale)})`` of a PEFT LoRA adapter directory."""
    from ..io.safetensors import Checkpoint

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{d}: not a PEFT adapter (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA").upper() != "LORA":
        raise MergeError(f"{d}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("fan_in_fan_out"):
        raise MergeError(f"{d}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported")
    parts: dict[str, dict[str, np.ndarray]] = {}
    with Checkpoint(d / "adapter_model.safetensors") as ad:
        for k in ad.keys():
            m = re.match(r"(.*)\.(lora_A|lora_B)(?:\.default)?\.weight$", k)
            if m:
                mod = m.group(1)[len(_PREFIX):] if m.group(1).startswith(_PREFIX) else m.group(1)
                parts.setdefault(mod, {})[m.group(2)] = ad.get(k).astype(np.float32)
    out = {}
    for mod, f in parts.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise MergeError(f"{d}: module '{mod}' has {sorted(f)}, needs lora_A and lora_B")
        leaf = mod.split(".")[-1]
        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r = rp.get(mod, rp.get(leaf, cfg.get("r", f["lora_A"].shape[0])))
        alpha = ap.get(mod, ap.get(leaf, cfg.get("lora_alpha", r)))
        scale = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
        out[mod] = (f["lora_B"], f["lora_A"], float(scale))
    if not out:
        raise MergeError(f"{d}: adapter has no lora_A/lora_B tensors")
    return cfg, out


def write_adapter(out_dir, modules: dict[str, tuple[np.ndarray, np.ndarray]], *, base_path: str, metadata=None,
                  overwrite: bool = False) -> None:
    """Write ``{module: (B (out, r), A (r, in))}`` (scale already folded in) as a PEFT adapter,
    atomically."""
    from ..io.atomic import atomic_dir
    from ..io.safetensors import _write_file

    tensors, ranks = [], {}
    for mod, (b, a) in modules.items():
        tensors.append((f"{_PREFIX}{mod}.lora_A.weight", np.ascontiguousarray(a, np.float32)))
        tensors.append((f"{_PREFIX}{mod}.lora_B.weight", np.ascontiguousarray(b, np.float32)))
        ranks[mod] = int(a.shape[0])
    r0 = max(ranks.values())
    cfg = {"peft_type": "LORA", "r": r0, "lora_alpha": r0, "rank_pattern": ranks, "alpha_pattern": ranks,
           "target_modules": sorted({m.split(".")[-1] for m in ranks}), "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "base_model_name_or_path": str(base_path), "task_type": None,
           "inference_mode": True}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_file(tmp / "adapter_model.safetensors", tensors, {k: str(v) for k, v in (metadata or {}).items()})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def extract_lora_checkpoint(base_dir, finetuned_dir, out_dir, *, rank=16, select=None,
                            overwrite: bool = False, echo=print) -> dict:
    """Extract a PEFT LoRA adapter from two Hugging Face safetensors checkpoints, tensor by tensor.

    Every 2-D ``*.weight`` tensor ``select`` picks (any :func:`weightlab.tree.selector` of tensor
    names; default: all except embeddings, the LM head and norms) becomes ``lora_B`` (out, r) ``lora_A`` (r, in) with ``B @ A`` the best rank-r
    approximation of ``finetuned - base`` (Eckart-Young). Validation (names, shapes, rank) happens
    before any SVD. Returns ``{tensor name: relative Frobenius error}``."""
    from ..io.safetensors import Checkpoint

    base, ft = Checkpoint(base_dir), Checkpoint(finetuned_dir)
    try:
        from .. import tree as wtree

        pick = wtree.selector(select) if select is not None else ~wtree.selector(_NOT_LINEAR)
        names = [n for n in base.keys() if n.endswith(".weight") and len(base.shape(n)) == 2 and pick(n)]
        if not names:
            raise MergeError(f"no 2-D weight matched {select or 'the default selection'} in {base_dir}")
        for n in names:
            if n not in ft:
                raise MergeError(f"tensor '{n}' is missing from {finetuned_dir}")
            if ft.shape(n) != base.shape(n):
                raise MergeError(f"tensor '{n}': shape {tuple(ft.shape(n))} in {finetuned_dir} vs "
                                 f"{tuple(base.shape(n))} in {base_dir}")
        _rank_for(np.ones(2), rank)  # validates rank before any work
        modules, errors = {}, {}
        for n in names:
            d = ft.get(n).astype(np.float32) - base.get(n).astype(np.float32)
            if not np.all(np.isfinite(d)):
                raise MergeError(f"tensor '{n}': NaN/Inf in the difference")
            left, right, errors[n] = _factor(d, rank)
            modules[n[: -len(".weight")]] = (np.asarray(left), np.asarray(right))
        write_adapter(out_dir, modules, base_path=str(base_dir), overwrite=overwrite,
                      metadata={"weightlab.extracted_from": str(finetuned_dir)})
        worst = max(errors, key=errors.get)
        echo(f"wrote {out_dir}: {len(names)} LoRA modules, rank <= {max(b.shape[1] for b, _ in modules.values())}; "
             f"worst relative error {errors[worst]:.3g} ({worst})")
        return errors
    finally:
        base.close()
        ft.close()


def merge_adapters(adapter_dirs, out_dir, *, weights=None, method: str = "concat", rank: int | None = None,
                   overwrite: bool = False, echo=print) -> dict[str, int]:
    """Merge PEFT LoRA adapters of one base into one adapter: per module ``sum_i w_i scale_i B_i A_i``
    kept in factor form — ``concat`` (exact, ranks add up) or ``svd`` (best rank-``rank``
    re-factoring via QR + a small SVD). A module present in only some adapters gets only their terms.
    Shapes are checked for every module before anything is computed. Returns the output ranks."""
    if not adapter_dirs:
        raise MergeError("no adapters to merge")
    w = np.ones(len(adapter_dirs)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(adapter_dirs),):
        raise MergeError(f"weights needs {len(adapter_dirs)} values (one per adapter), got {list(np.atleast_1d(w))}")
    if method not in ("concat", "svd"):
        raise MergeError(f"method must be 'concat' or 'svd', got {method!r}")
    read = [read_adapter(d) for d in adapter_dirs]
    mods = list(dict.fromkeys(m for _, ms in read for m in ms))
    plan = {}
    for mod in mods:
        terms = [(wi, ms[mod]) for wi, (_, ms) in zip(w, read) if mod in ms]
        shapes = {(b.shape[0], a.shape[1]) for _, (b, a, _) in terms}
        if len(shapes) != 1:
            raise MergeError(f"module '{mod}': adapters disagree on its (out, in) shape: {sorted(shapes)}")
        plan[mod] = terms
    out = {}
    for mod, terms in plan.items():
        xs = [LoRA(s * b, a) for _, (b, a, s) in terms]  # (out, r) @ (r, in)
        m = merge_factors(xs, [wi for wi, _ in terms], method, rank)
        out[mod] = (np.asarray(m.a), np.asarray(m.b))
    base = read[0][0].get("base_model_name_or_path", "")
    write_adapter(out_dir, out, base_path=base, overwrite=overwrite,
                  metadata={"weightlab.merged_adapters": json.dumps([str(d) for d in adapter_dirs]),
                            "weightlab.merge_weights": json.dumps(w.tolist()), "weightlab.method": method})
    ranks = {m: int(a.shape[1]) for m, (a, _) in out.items()}
    echo(f"wrote {out_dir}: {len(out)} modules, rank <= {max(ranks.values())} ({method})")
    return ranks


class LoraAppliedCheckpoint(CheckpointView):
    """A base checkpoint with a PEFT LoRA adapter applied, tensor by tensor (mergekit's
    ``model: base+adapter`` syntax): ``W + scale * lora_B @ lora_A`` for every adapted module, other
    tensors as in the base. The adapter's factors are read once (they are small)."""

    def __init__(self, base, adapter_dir):
        super().__init__(base)
        _, mods = read_adapter(adapter_dir)
        self._delta = {}
        for mod, (b, a, scale) in mods.items():
            name = f"{mod}.weight"
            if name not in base.keys():
                raise MergeError(f"{adapter_dir}: adapter module '{mod}' has no '{name}' in the base checkpoint")
            if (b.shape[0], a.shape[1]) != tuple(base.shape(name)):
                raise MergeError(f"{adapter_dir}: '{mod}' adapter is {(b.shape[0], a.shape[1])}, base weight is "
                                 f"{tuple(base.shape(name))}")
            self._delta[name] = (b, a, scale)

    def _compute(self, name):
        if name not in self._delta:
            return None
        w = self._base.get(name)
        b, a, s = self._delta[name]
        return (w.astype(np.float32) + s * (b @ a)).astype(w.dtype)
