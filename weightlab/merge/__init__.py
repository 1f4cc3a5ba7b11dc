"""weightlab.merge: model merging as composable pure steps.

Every method is one function ``fn(base, models, *, key=None, **hp)`` registered in
:data:`METHODS` (:mod:`.registry`): mergekit's 20 methods with mergekit's names, parameters and
defaults (:mod:`.methods`, :mod:`.spherical`, :mod:`.masking`), research methods (MagMax, TALL
masks/consensus, PCB, TSV-M, Iso-C/Iso-CTS, WUDI, OPCM continual merging, Fisher, RegMean,
AdaMerging), each also a :class:`~weightlab.WeightTransform` via :func:`transform` and a YAML
method where it works tensor by tensor (:mod:`.config`, :mod:`.stream`). ``models`` is a list of
pytrees or a stacked pytree (leading model axis); QArray inputs are dequantized. Documented choices
where the anchors differ: per-tensor trimming (mergekit) by default, ``scope="global"`` for the TIES
paper; DARE rescale by L1 match (mergekit) by default, ``rescale="inverse"`` for the paper's 1/p.

Tools around the methods: :func:`generalized_task_arithmetic` (the task-vector pipeline),
:func:`emr` (per-task models), :func:`tall_masks`, :func:`diagonal_fisher`, :func:`regmean_grams`,
:func:`adamerging_fit`, LoRA extraction and factor-space merges (:mod:`.lora`, :mod:`.peft`).
Names load on first use: ``weightlab merge`` validates a config without importing JAX.
"""

import importlib as _importlib

_TOOLS = {
    **{n: "methods" for n in ("generalized_task_arithmetic",)},
    **{n: "registry" for n in ("METHODS", "transform", "inputs", "mergekit_names")},
    **{n: "lora" for n in ("LoRA", "apply_lora", "extract_lora", "is_lora", "lora_delta", "merge_loras",
                           "merge_factors")},
    **{n: "peft" for n in ("extract_lora_checkpoint", "merge_adapters", "read_adapter", "write_adapter",
                           "LoraAppliedCheckpoint")},
    **{n: "learned" for n in ("AdaMergingResult", "adamerging_fit", "merge_with")},
    **{n: "fisher" for n in ("diagonal_fisher",)},
    **{n: "regression" for n in ("regmean_grams",)},
    **{n: "continual" for n in ("OPCMState",)},
    **{n: "masking" for n in ("EMRResult", "emr", "tall_masks")},
}
_SUBMODULES = {"steps", "methods", "lora", "peft", "learned", "fisher", "regression", "continual", "masking", "spherical",
               "subspace", "config", "plan", "stream", "registry", "stats", "cli", "params", "yamlsafe"}


def _method_names():
    from .registry import METHODS

    return list(METHODS)


def __getattr__(name):
    if name == "__all__":
        return sorted(set(_TOOLS) | set(_method_names()))
    if name in _TOOLS:
        obj = getattr(_importlib.import_module(f".{_TOOLS[name]}", __name__), name)
    elif name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    elif not name.startswith("_") and name in _method_names():
        from .registry import METHODS

        obj = METHODS[name].fn
    else:
        raise AttributeError(f"module 'weightlab.merge' has no attribute {name!r}")
    globals()[name] = obj
    return obj


def __dir__():
    return sorted(set(globals()) | set(_TOOLS) | set(_method_names()))

