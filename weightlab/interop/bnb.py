"""The bitsandbytes NF4 layout (``Linear4bit`` / ``Params4bit`` state dicts, transformers
``load_in_4bit`` checkpoints), as bitsandbytes 0.50 writes and reads it.

For a weight ``X.weight`` of any shape with n elements, in blocks of ``blocksize`` consecutive
elements of the *flattened* weight (QLoRA, Dettmers et al. 2023):

* ``X.weight`` uint8 (ceil(n/2), 1): two 4-bit NF4 codes per byte, the first element of each pair
  in the **high** nibble (weightlab's own packing puts it in the low one);
* ``X.weight.absmax`` float32 (n_blocks,): each block's absmax, the scale; with double quantization
  (``nested``) uint8 codes of the blockwise 8-bit quantization of ``absmax - nested_offset``, with
  ``X.weight.nested_absmax`` float32 and ``X.weight.nested_quant_map`` float32 (256,);
* ``X.weight.quant_map`` float32 (16,): the NF4 table;
* ``X.weight.quant_state.bitsandbytes__nf4`` uint8: UTF-8 JSON of {quant_type, blocksize, dtype,
  shape} (+ nested_blocksize, nested_dtype, nested_offset);
* the weight is ``quant_map[code] * absmax[i // blocksize]`` in float32, cast to ``dtype``.

A weightlab ``nf4`` QArray grouped along its *last* axis with group g is exactly this with blocksize
g (blocks of consecutive flattened elements). Export needs such a QArray (g one of bitsandbytes'
block sizes 32..4096); import reads plain and double-quantized files (the nested absmax decoded to
float32 scales as bitsandbytes decodes them). Export writes no double quantization: the 8-bit
absmax would change the scales, so the file would no longer hold the QArray's values.

transformers (``Bnb4BitHfQuantizer``) turns *every* ``nn.Linear`` / ``Conv1D`` of the model into a
``Linear4bit`` except the modules listed in ``llm_int8_skip_modules`` (when that is null: its own
defaults, the tied and output embeddings and the last parameter's module). A float ``X.weight`` read
into a ``Linear4bit`` fails at the first forward (bitsandbytes asserts the packed ``(n, 1)`` shape),
so export lists the module of every 2-D float ``.weight`` that it keeps unquantized (BERT's pooler,
embeddings, lm_head ...), plus ``lm_head`` unless a QArray has that name (tied output embeddings
have no tensor of their own). The names are full module names as in the file; transformers 5 reads
each as a regex from the start of a module name or as a suffix, so export refuses a list that would
also catch one of its NF4 modules.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

import numpy as np

from ..errors import CheckpointError, QuantizationError
from ._common import check_groups, codes_of, float_dtype, host, pack_qarray_codes

__all__ = ["BLOCKSIZES", "QS_KEY", "check", "export", "load", "skip_modules"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = ("float16", "bfloat16", "float32")
_NAME = "bitsandbytes NF4"


def check(items: dict) -> None:
    """Static checks of every QArray (name -> QArray) before any work."""
    if not items:
        raise QuantizationError("bitsandbytes export: the tree holds no QArray")
    for name, q in items.items():
        if q.fmt.name != "nf4":
            raise QuantizationError(f"'{name}': bitsandbytes NF4 stores format nf4; found {q.fmt.name}")
        if q.axis != q.ndim - 1 or q.codes.ndim != q.ndim:
            raise QuantizationError(f"'{name}': bitsandbytes blocks the flattened weight, which is a QArray grouped "
                                    f"along its last axis ({q.ndim - 1}); found axis={q.axis}")
        if q.group_size not in BLOCKSIZES:
            raise QuantizationError(f"'{name}': bitsandbytes block sizes are {BLOCKSIZES}; found group size "
                                    f"{q.group_size}")
        check_groups(name, q)
        extra = [n for n in ("zero", "lut", "tensor_scale", "pre", "lr_a", "lr_b", "g_idx")
                 if getattr(q, n) is not None]
        if extra:
            raise QuantizationError(f"'{name}': bitsandbytes NF4 has no tensor for the QArray's {extra[0]!r} child")
        if q.dtype.name not in _DTYPES:
            raise QuantizationError(f"'{name}': bitsandbytes dequantizes to {_DTYPES}; the QArray's dtype is "
                                    f"{q.dtype.name}")


def _skips_module(pattern: str, module: str) -> bool:
    """Whether transformers 5 would leave ``module`` unconverted for ``llm_int8_skip_modules`` entry
    ``pattern``: a regex matching from the start up to a module boundary, or a plain suffix."""
    try:
        hit = re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error as e:
        raise QuantizationError(f"module name {pattern!r} is not a valid regex, which transformers' "
                                f"llm_int8_skip_modules requires ({e})") from None
    return hit or module.endswith(pattern)


def skip_modules(items: dict, plain: Mapping | None) -> list[str] | None:
    """``llm_int8_skip_modules`` for a file holding QArrays ``items`` and the arrays ``plain``
    (name -> array): the module of every 2-D float ``.weight`` array, and ``lm_head`` unless it is
    quantized; None (transformers' defaults) when ``plain`` is None."""
    if plain is None:
        return None
    suffix = ".weight"
    mods = {n[:-len(suffix)] for n, a in plain.items()
            if n.endswith(suffix) and np.ndim(a) == 2 and np.issubdtype(np.asarray(a).dtype, np.floating)}
    quantized = sorted(n[:-len(suffix)] if n.endswith(suffix) else n for n in items)
    if not any(m == "lm_head" or m.endswith(".lm_head") for m in quantized):
        mods.add("lm_head")
    for p in sorted(mods):
        caught = [m for m in quantized if _skips_module(p, m)]
        if caught:
            raise QuantizationError(f"'{caught[0]}': transformers would leave this NF4 module unconverted, since "
                                    f"the unquantized module {p!r} (in llm_int8_skip_modules) matches its name")
    return sorted(mods)


def export(items: dict, plain: Mapping | None = None) -> tuple[dict, dict, dict]:
    """The bitsandbytes tensors of every QArray (name -> QArray), the ``quantization_config`` (the
    transformers ``BitsAndBytesConfig`` fields; ``llm_int8_skip_modules`` from the tree's other
    arrays ``plain``, see :func:`skip_modules`) and no extra files. Nothing is written here."""
    from ..quant.formats import NF4_VALUES

    check(items)
    skips = skip_modules(items, plain)
    tensors, dtypes = {}, set()
    for name, q in sorted(items.items()):
        flat = codes_of(q).reshape(-1)
        tensors[name] = ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)[:, None]
        tensors[f"{name}.absmax"] = host(q.scale).astype(np.float32).reshape(-1)
        tensors[f"{name}.quant_map"] = NF4_VALUES.astype(np.float32).copy()
        state = {"quant_type": "nf4", "blocksize": q.group_size, "dtype": q.dtype.name, "shape": list(q.shape)}
        tensors[f"{name}.{QS_KEY}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
        dtypes.add(q.dtype.name)
    compute = dtypes.pop() if len(dtypes) == 1 else "float32"
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
          "llm_int8_threshold": 6.0, "llm_int8_skip_modules": skips, "llm_int8_has_fp16_weight": False,
          "llm_int8_enable_fp32_cpu_offload": False}
    return tensors, qc, {}


def _state(c, x: str, path) -> dict:
    try:
        st = json.loads(bytes(np.asarray(c[f"{x}.{QS_KEY}"], np.uint8)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: '{x}.{QS_KEY}' is not UTF-8 JSON ({str(e)[:100]})") from None
    ok = (isinstance(st, dict) and st.get("quant_type") == "nf4" and st.get("blocksize") in BLOCKSIZES
          and st.get("dtype") in _DTYPES and isinstance(st.get("shape"), list)
          and all(type(d) is int and d > 0 for d in st["shape"]) and st["shape"])
    if not ok:
        raise CheckpointError(f"{path}: '{x}.{QS_KEY}' must hold quant_type 'nf4', blocksize in {BLOCKSIZES}, "
                              f"dtype in {_DTYPES} and a shape; found {str(st)[:200]}")
    return st


def _absmax(c, x: str, st: dict, n_blocks: int, path) -> np.ndarray:
    """float32 block scales, decoding double quantization as bitsandbytes does:
    ``nested_quant_map[code] * nested_absmax[i // nested_blocksize] + nested_offset`` in float32."""
    a = np.asarray(c[f"{x}.absmax"]).reshape(-1)
    if a.shape != (n_blocks,):
        raise CheckpointError(f"{path}: '{x}.absmax' has {a.size} entries; {n_blocks} blocks need {n_blocks}")
    if f"{x}.nested_absmax" not in c:
        if a.dtype != np.float32:
            raise CheckpointError(f"{path}: '{x}.absmax' must be float32, found {a.dtype}")
        return a
    nb, off = st.get("nested_blocksize"), st.get("nested_offset")
    a2 = np.asarray(c[f"{x}.nested_absmax"], np.float32).reshape(-1)
    code = np.asarray(c[f"{x}.nested_quant_map"], np.float32).reshape(-1)
    if (a.dtype != np.uint8 or type(nb) is not int or nb <= 0 or not isinstance(off, (int, float))
            or code.shape != (256,) or a2.shape != (-(-n_blocks // nb),)):
        raise CheckpointError(f"{path}: '{x}' double quantization needs uint8 absmax codes, a 256-entry "
                              f"nested_quant_map, nested_blocksize, nested_offset and one nested_absmax per "
                              f"{nb} blocks; found absmax {a.dtype}, map {code.shape}, nested_absmax {a2.shape}")
    blocks = np.arange(n_blocks) // nb
    return (code[a.astype(np.int64)] * a2[blocks]).astype(np.float32) + np.float32(off)


def load(c, qc: dict, path) -> dict:
    """QArrays of every NF4 weight of checkpoint ``c``; other tensors are returned as NumPy arrays."""
    from ..quant.formats import NF4_VALUES, get_format
    from ..quant.qarray import QArray

    names = set(c.keys())
    used, out = set(), {}
    for x in sorted(n[:-len(QS_KEY) - 1] for n in names if n.endswith("." + QS_KEY)):
        st = _state(c, x, path)
        parts = [x, f"{x}.absmax", f"{x}.quant_map", f"{x}.{QS_KEY}"]
        parts += [t for t in (f"{x}.nested_absmax", f"{x}.nested_quant_map") if t in names]
        missing = [t for t in parts if t not in names]
        if missing:
            raise CheckpointError(f"{path}: NF4 weight '{x}': tensor '{missing[0]}' is missing")
        used.update(parts)
        shape, bs = tuple(st["shape"]), st["blocksize"]
        n = int(np.prod(shape))
        if shape[-1] % bs:
            raise CheckpointError(f"{path}: '{x}': blocks of {bs} do not tile its last axis ({shape}); weightlab "
                                  "holds NF4 blocks along the last axis only")
        packed = np.asarray(c[x])
        if packed.dtype != np.uint8 or packed.size != -(-n // 2):
            raise CheckpointError(f"{path}: '{x}' must hold {-(-n // 2)} uint8 bytes for shape {shape}, found "
                                  f"{packed.dtype.name}{tuple(packed.shape)}")
        if not np.array_equal(np.asarray(c[f"{x}.quant_map"], np.float32).reshape(-1), NF4_VALUES):
            raise CheckpointError(f"{path}: '{x}.quant_map' is not the NF4 table")
        b = packed.reshape(-1)
        flat = np.stack([b >> 4, b & 0xF], axis=-1).reshape(-1)[:n].astype(np.uint8)
        scale = _absmax(c, x, st, n // bs, path).reshape(*shape[:-1], shape[-1] // bs, 1)
        out[x] = QArray(pack_qarray_codes(flat.reshape(shape), 4, len(shape) - 1), scale, shape=shape,
                        dtype=float_dtype(st["dtype"]), fmt=get_format("nf4"), group_size=bs, axis=len(shape) - 1)
    for t in sorted(names - used):
        out[t] = c[t]
    return out
