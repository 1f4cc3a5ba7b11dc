"""weightlab.quant: quantized arrays, formats, and every quantizer as a weight transform.

>>> q = quant.quantize(params, "rtn", bits=4, group_size=128)            # linear weights -> QArray
>>> t = wl.partition({"attn/.*kernel$": quant.gptq(bits=4), "mlp/.*kernel$": quant.awq(bits=3)},
...                  default=wl.identity())
>>> q = wl.apply_once(t, params, stats=quant.capture(apply_fn, params, batches))   # mixed precision
>>> dense = quant.dequantize(q)

Methods (one registry, :data:`METHODS`; each also a factory ``quant.<name>(**hp) -> WeightTransform``):
``rtn`` (every fixed format in :mod:`.formats`), ``hqq`` (Badri & Shaji 2023), ``any4`` (Elhoushi et
al. 2025), and the calibrated ``gptq`` (Frantar et al. 2023) and ``awq`` (Lin et al. 2024), which read
the ``stats=`` extra from :func:`capture` (traced from any ``apply_fn``). Wrappers of any quantizer:
:func:`rotate` (random Hadamard incoherence), :func:`lorc` / :func:`qera` (low-rank error
correction); :func:`qat` is the fake-quantizing projection for training. One grid (:mod:`.grid`) and
one defaults table (:data:`DEFAULTS`). Every leaf is validated (format, group size, dtype, NaN/Inf,
already quantized, missing statistics) before any is quantized; errors name the leaf path.

Names load on first use, so ``weightlab info`` can read quantized headers without JAX.
"""

from __future__ import annotations

import importlib as _importlib

from .. import _lazy

_WHERE = {
    **{n: "qarray" for n in ("QArray", "is_qarray")},
    **{n: "formats" for n in ("Format", "FORMATS", "DEFAULTS", "DEFAULT_SELECT", "get_format")},
    **{n: "registry" for n in ("METHODS", "transform", "check_quantizable")},
    **{n: "rounding" for n in ("quantize_rtn",)},
    **{n: "halfquad" for n in ("quantize_hqq",)},
    **{n: "lut" for n in ("quantize_any4",)},
    **{n: "second_order" for n in ("gptq_quantize",)},
    **{n: "act_aware" for n in ("awq_quantize",)},
    **{n: "calibrate" for n in ("Stats", "capture", "matmul_weights")},
    **{n: "rotation" for n in ("rotate", "random_hadamard", "rotate_quantize", "fold_rotation")},
    **{n: "lowrank" for n in ("lorc", "qera", "add_lorc", "add_qera")},
    **{n: "training" for n in ("qat", "fake_quant", "lsq_init", "lsq_fake_quant", "lsq_export", "qat_apply_fn")},
    **{n: "api" for n in ("quantize", "quantize_array", "dequantize")},
    **{n: "matmul" for n in ("dot", "prepare", "kernel_supports")},
    **{n: "checkpoint" for n in ("save", "load", "METADATA_KEY", "qarray_specs", "DequantizedCheckpoint")},
    **{n: "flax" for n in ("QBox", "QParam", "box_nnx", "nnx_apply_fn", "quantize_module")},  # and flax.TRAINABLE
}
_METHOD_FACTORIES = ("rtn", "hqq", "any4", "gptq", "awq")  # checked against METHODS in tests
_SUBMODULES = {"formats", "defaults", "grid", "qarray", "packing", "registry", "rounding", "halfquad", "lut",
               "second_order", "act_aware", "calibrate", "rotation", "lowrank", "training", "api", "matmul", "checkpoint",
               "cli", "cli_calib", "flax"}

__all__ = sorted(set(_WHERE) | set(_METHOD_FACTORIES))


__getattr__, __dir__ = _lazy.namespace(
    __name__, globals(), _WHERE, _SUBMODULES,
    factories=(set(_METHOD_FACTORIES), lambda name: _importlib.import_module(".registry", __name__).factory(name)))
