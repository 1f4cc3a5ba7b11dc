"""weightlab.merge: model merging as composable pure steps.

Every mergekit method name is a function here with mergekit's parameters and defaults
(:mod:`.methods`); the shared pipeline pieces are in :mod:`.steps`. Inputs are a ``base`` params
pytree and the fine-tuned models stacked along a leading axis (or a list). Documented choices where
the anchors differ: per-tensor trimming (mergekit) by default, ``scope="global"`` for the TIES
paper; DARE rescale by L1 match (mergekit) by default, ``rescale="inverse"`` for the paper's 1/p.

Data-driven: :func:`fisher_merge` with :func:`diagonal_fisher` (any ``apply_fn``), :func:`regmean`
(Gram matrices from the traced calibration capture). YAML/streaming: :mod:`.config`, :mod:`.stream`.
:func:`adamerging` learns task- or layer-wise coefficients by entropy minimisation (jax.grad + optax).
More mergekit methods: :func:`nuslerp`, :func:`multislerp` (:mod:`.spherical`); :func:`arcee_fusion`,
:func:`ram`, :func:`ramplus_tl` (:mod:`.masking`). Beyond mergekit: MagMax, TALL masks/consensus, EMR
and PCB (:mod:`.masking`), TSV-M, Iso-C/Iso-CTS and WUDI (:mod:`.subspace`), OPCM continual merging
(:mod:`.continual`).
"""

import functools as _functools
import importlib as _importlib

_WHERE = {  # public name -> submodule (imported on first use: `weightlab merge` need not import JAX)
    **{n: "methods" for n in ("generalized_task_arithmetic", "linear", "task_arithmetic", "ties",
                              "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                              "sce", "slerp", "nearswap", "karcher", "model_stock", "passthrough")},
    **{n: "lora" for n in ("LoRA", "apply_lora", "extract_lora", "is_lora", "lora_delta", "merge_loras",
                           "merge_factors")},
    **{n: "peft" for n in ("extract_lora_checkpoint", "merge_adapters", "read_adapter", "write_adapter",
                           "LoraAppliedCheckpoint")},
    **{n: "learned" for n in ("AdaMergingResult", "adamerging", "merge_with")},  # learned.py
    **{n: "fisher" for n in ("diagonal_fisher", "fisher_merge")},
    **{n: "regression" for n in ("regmean", "regmean_from_grams")},
    **{n: "continual" for n in ("OPCMState", "opcm", "opcm_init", "opcm_update")},
    **{n: "masking" for n in ("EMRResult", "arcee_fusion", "consensus", "emr", "magmax", "pcb", "ram", "ramplus_tl",
                              "tall_masks")},
    **{n: "spherical" for n in ("multislerp", "nuslerp")},
    **{n: "subspace" for n in ("iso_c", "iso_cts", "tsv_m", "wudi")},
}
_SUBMODULES = {"steps", "methods", "lora", "peft", "learned", "fisher", "regression", "continual", "masking", "spherical",
               "subspace", "config", "stream", "registry", "stats", "science", "cli", "demo"}
__all__ = ["steps", "METHODS", "generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties",
           "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap",
           "karcher", "model_stock", "passthrough", "diagonal_fisher", "fisher_merge", "regmean", "regmean_from_grams",
           "adamerging", "AdaMergingResult", "merge_with", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl",
           "magmax", "tall_masks", "consensus", "emr", "EMRResult", "pcb", "tsv_m", "iso_c", "iso_cts", "wudi",
           "opcm", "opcm_init", "opcm_update", "OPCMState", "LoRA", "extract_lora", "merge_loras",
           "apply_lora", "lora_delta", "is_lora", "merge_factors", "extract_lora_checkpoint", "merge_adapters",
           "read_adapter", "write_adapter", "LoraAppliedCheckpoint"]


def _dequantized(x):
    """``x`` with every QArray leaf replaced by its float32 array (lists of trees handled)."""
    import jax as _jax

    from ..quant.qarray import is_qarray

    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_dequantized(e) for e in x)
    leaves = _jax.tree.leaves(x, is_leaf=is_qarray)
    if not any(is_qarray(leaf) for leaf in leaves):
        return x
    return _jax.tree.map(lambda q: q.dequantize() if is_qarray(q) else q, x, is_leaf=is_qarray)


def _accepts_quantized(fn):
    """Merges read QArray leaves (weightlab.quant) as their dequantized float values."""
    @_functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_dequantized(a) for a in args)
        kwargs = {k: _dequantized(v) if k in ("base", "models", "multitask") else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return wrapper


_WRAPPED = {"generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
            "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap", "karcher",
            "model_stock", "passthrough", "fisher_merge", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl",
            "magmax", "tall_masks", "consensus", "emr", "pcb", "tsv_m", "iso_c", "iso_cts", "wudi", "opcm",
            "extract_lora"}


def __getattr__(name):
    if name == "METHODS":  # every method the YAML engine knows, by its config name
        from .registry import SPECS

        return {n: globals()[n] if n in globals() else __getattr__(n) for n in SPECS}
    if name in _WHERE:
        obj = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        if name in _WRAPPED:
            obj = _accepts_quantized(obj)
        globals()[name] = obj
        return obj
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'weightlab.merge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
