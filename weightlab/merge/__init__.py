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

import jax as _jax

from . import steps
from .lora import LoRA, apply_lora, extract_lora, is_lora, lora_delta, merge_loras
from .adamerging import AdaMergingResult, adamerging, merge_with
from .fisher import diagonal_fisher, fisher_merge
from .regmean import regmean, regmean_from_grams
from .continual import OPCMState, opcm, opcm_init, opcm_update
from .masking import EMRResult, arcee_fusion, consensus, emr, magmax, pcb, ram, ramplus_tl, tall_masks
from .spherical import multislerp, nuslerp
from .subspace import iso_c, iso_cts, tsv_m, wudi
from .methods import (METHODS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear,
                      generalized_task_arithmetic, karcher, linear, model_stock, nearswap, passthrough, sce, slerp,
                      task_arithmetic, ties)

__all__ = ["steps", "METHODS", "generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties",
           "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap",
           "karcher", "model_stock", "passthrough", "diagonal_fisher", "fisher_merge", "regmean", "regmean_from_grams",
           "adamerging", "AdaMergingResult", "merge_with", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl",
           "magmax", "tall_masks", "consensus", "emr", "EMRResult", "pcb", "tsv_m", "iso_c", "iso_cts", "wudi",
           "opcm", "opcm_init", "opcm_update", "OPCMState", "LoRA", "extract_lora", "merge_loras",
           "apply_lora", "lora_delta", "is_lora"]


def _dequantized(x):
    """``x`` with every QArray leaf replaced by its float32 array (lists of trees handled)."""
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


for _name in ["generalized_task_arithmetic", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
              "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nearswap", "karcher",
              "model_stock", "passthrough", "fisher_merge", "nuslerp", "multislerp", "arcee_fusion", "ram",
              "ramplus_tl", "magmax", "tall_masks", "consensus", "emr", "pcb", "tsv_m", "iso_c", "iso_cts", "wudi",
              "opcm", "extract_lora"]:
    globals()[_name] = _accepts_quantized(globals()[_name])
