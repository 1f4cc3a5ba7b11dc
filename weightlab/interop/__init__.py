"""weightlab.interop: quantized checkpoints in the formats other tools load, bit for bit.

>>> export_checkpoint(flat, "out/", "gptq", config=hf_config)      # flat: {hf_name: QArray | array}
>>> tensors, config = import_checkpoint("out/")                     # QArrays with identical codes

Formats (one Hugging Face model directory each: ``model.safetensors`` with metadata
``{"format": "pt"}`` and ``config.json`` holding ``quantization_config``):

* ``"gptq"`` — AutoGPTQ / GPTQModel (:mod:`.gptq`), int 2/3/4/8-bit, act-order via ``g_idx``;
  option ``checkpoint_format="gptq"`` (v1, default) or ``"gptq_v2"``;
* ``"compressed-tensors"`` — llm-compressor's ``pack-quantized`` (:mod:`.compressed_tensors`), int
  2..8-bit, group or channel strategy, symmetric or not;
* ``"nf4-bnb"`` — bitsandbytes NF4 (:mod:`.bnb`), blocks along the flattened weight.

Export validates every tensor (format, bits, group size, symmetry, axis, children the format cannot
hold) before any work, with a :class:`~weightlab.errors.QuantizationError` naming it, converts all
of them, and only then publishes the directory atomically (:func:`weightlab.io.atomic_dir`). Plain
arrays are written unchanged. Import detects the format from ``config.json`` and raises
:class:`~weightlab.errors.CheckpointError` for files whose tensors disagree with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError, QuantizationError, UsageError

__all__ = ["FORMATS", "export_checkpoint", "import_checkpoint", "detect_format"]

FORMATS = ("gptq", "compressed-tensors", "nf4-bnb")
_OPTIONS = {"gptq": ("checkpoint_format",), "compressed-tensors": (), "nf4-bnb": ()}


def _module(fmt: str):
    from . import bnb, compressed_tensors, gptq

    return {"gptq": gptq, "compressed-tensors": compressed_tensors, "nf4-bnb": bnb}[fmt]


_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|wpe|embed_in|position_embeddings|"
                        r"token_type_embeddings)\.weight$")


def _split(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    """(QArrays, plain arrays) of a flat ``{name: QArray | array}`` dict, checked."""
    from .. import tree as wtree
    from ..quant.qarray import is_qarray

    if not isinstance(tree, Mapping):
        raise UsageError(f"export_checkpoint takes a flat dict {{hf_name: QArray | array}}, got {type(tree).__name__}")
    qs, plain = {}, {}
    for k, v in tree.items():
        if not isinstance(k, str) or not k:
            raise UsageError(f"export_checkpoint: tensor names must be non-empty strings, found {k!r}")
        if is_qarray(v):
            if _EMBEDDING.search(k):
                raise QuantizationError(f"'{k}': an embedding table; GPTQ, compressed-tensors and bitsandbytes "
                                        "checkpoints quantize Linear layers only (keep it unquantized: exclude it)")
            qs[k] = v
        elif wtree.is_array(v):
            plain[k] = np.asarray(v)
        else:
            raise UsageError(f"'{k}': export_checkpoint stores QArrays and arrays, found {type(v).__name__} "
                             "(flatten nested trees to {hf_name: leaf} first)")
    return qs, plain


def check_export(tree: Mapping[str, Any], fmt: str, **options) -> None:
    """The checks :func:`export_checkpoint` runs before any conversion (format name, options, every
    QArray's representability in ``fmt``), on real or abstract (``jax.eval_shape``) QArrays, so a
    caller can run them before the work that produces the tree (calibration)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown interop format {fmt!r}; known: {list(FORMATS)}")
    bad = [k for k in options if k not in _OPTIONS[fmt]]
    if bad:
        raise UsageError(f"format {fmt!r} takes no option {bad[0]!r} (its options: {list(_OPTIONS[fmt]) or 'none'})")
    _module(fmt).check(_split(tree)[0], **options)


def export_checkpoint(tree: Mapping[str, Any], out_dir, fmt: str, *, config: Mapping[str, Any] | None = None,
                      overwrite: bool = False, files: Mapping[str, bytes] | None = None, **options) -> Path:
    """Write ``tree`` (``{hf_name: QArray | np.ndarray}``, what ``weightlab quantize`` produces) to the
    directory ``out_dir`` in format ``fmt`` (one of :data:`FORMATS`); ``config`` (a Hugging Face
    config dict) is copied into ``config.json`` with ``quantization_config`` set. ``options``: the
    format's own (GPTQ: ``checkpoint_format``). ``files``: further side files copied verbatim
    (``{file name: bytes}``: the tokenizer, ``generation_config.json`` ...). Returns ``Path(out_dir)``.

    Every check (names, format, layout, output path) runs before any conversion, every conversion
    before anything is written; a name that a converted tensor would take and ``tree`` already holds
    is refused. Deterministic: the same input gives the same bytes.
    """
    from ..io import check_output

    check_export(tree, fmt, **options)
    if config is not None and not isinstance(config, Mapping):
        raise UsageError(f"config must be a dict (a Hugging Face config), got {type(config).__name__}")
    try:
        json.dumps(dict(config or {}))
    except (TypeError, ValueError) as e:
        raise UsageError(f"config must be JSON-serialisable (it becomes config.json): {e}") from None
    files = dict(files or {})
    for fname, data in files.items():
        if (not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", "..", "config.json")
                or fname.endswith(".safetensors") or not isinstance(data, bytes)):
            raise UsageError(f"side file {fname!r}: expected a plain file name (not config.json or a .safetensors "
                             "file) with bytes")
    qs, plain = _split(tree)
    mod = _module(fmt)
    check_output(out_dir, overwrite=overwrite)
    tensors, qc, extra = mod.export(qs, plain=plain, **options) if fmt == "nf4-bnb" else mod.export(qs, **options)
    clash = sorted(set(tensors) & set(plain))
    if clash:
        raise UsageError(f"'{clash[0]}': the {fmt} tensors of a QArray take this name, which the tree also holds")
    cfg = dict(config or {})
    cfg["quantization_config"] = qc
    from ._common import write_model_dir

    side = {k: v for k, v in files.items() if k not in extra}
    return write_model_dir(out_dir, {**plain, **tensors}, {"config.json": cfg, **extra}, overwrite=overwrite,
                           files=side)


def _config(root: Path) -> dict:
    from ..io.header import read_json_object

    for fname, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        if (root / fname).is_file():
            cfg = read_json_object(root / fname)
            qc = cfg.get(key) if key else dict(cfg, quant_method=cfg.get("quant_method", "gptq"))
            if isinstance(qc, dict):
                return cfg if key else {"quantization_config": qc}
    raise CheckpointError(f"{root}: no config.json with a quantization_config (nor AutoGPTQ's quantize_config.json)")


def detect_format(path) -> str:
    """The format of a quantized model directory, from its ``quantization_config``."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root}: not a directory")
    qc = _config(root)["quantization_config"]
    method = qc.get("quant_method")
    if method == "gptq":
        return "gptq"
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "bitsandbytes" and qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "nf4") == "nf4":
        return "nf4-bnb"
    raise CheckpointError(f"{root}: quantization_config quant_method {str(method)[:40]!r} "
                          f"(load_in_4bit={qc.get('load_in_4bit')!r}) is none of {list(FORMATS)}")


def import_checkpoint(path) -> tuple[dict, dict]:
    """Read a quantized model directory in any of :data:`FORMATS`: ``({hf_name: QArray | np.ndarray},
    config)``, the QArrays holding the file's codes, scales and zero points exactly (the weight names
    are the original ``X.weight``), ``config`` the directory's config (with ``quantization_config``)."""
    from ..io import open_checkpoint

    root = Path(path)
    fmt = detect_format(root)
    cfg = _config(root)
    qc = cfg["quantization_config"]
    with open_checkpoint(root) as c:
        if fmt == "gptq":
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
            flat = _module(fmt).load(c, qc, root, dtype=dtype if dtype in ("float16", "bfloat16", "float32") else
                                     "float16")
        else:
            flat = _module(fmt).load(c, qc, root)
    return flat, cfg
