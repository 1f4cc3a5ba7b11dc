"""The GPTQ checkpoint layout of AutoGPTQ / GPTQModel (read by transformers + optimum, vLLM, TGI).

For a linear module ``X`` with weight (out, in) quantized in groups of ``g`` input channels:

* ``X.qweight`` int32 (in·b/32, out): the codes packed along the input axis, low bits first (for
  b = 3, 32 codes in 3 words as one little-endian bit stream; see :mod:`._common`);
* ``X.qzeros`` int32 (n_groups, out·b/32): the integer zero points packed along the output axis.
  ``checkpoint_format: gptq`` (AutoGPTQ "v1") stores ``zero - 1`` and every reader adds the 1 back
  (so zero 0 cannot be stored: it would read as 2^b); ``gptq_v2`` (GPTQModel) stores ``zero``;
* ``X.scales`` float16 (n_groups, out); ``X.g_idx`` int32 (in,): the group of every input channel
  (``i // g``, or any assignment with ``desc_act``);
* the weight is ``W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``. Symmetric
  quantization stores zero = 2^(b-1) everywhere, which is weightlab's symmetric int grid exactly.

``config.json`` gets ``quantization_config`` = {quant_method: gptq, bits, group_size (-1: per
channel), desc_act, sym, checkpoint_format, ...}; ``quantize_config.json`` (AutoGPTQ's own file)
the same. Every quantized tensor must share bits, group size and symmetry (one config). Sizes:
in and out must be multiples of 32/b (of 32 for 3 bits), as the packed shapes require.
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError, QuantizationError
from ._common import (check_linear, codes_of, exact_cast, float_dtype, grouped_2d, host, integer_zeros, module_of,
                      pack_qarray_codes, pack_stream, unpack_stream)

__all__ = ["BITS", "CHECKPOINT_FORMATS", "check", "export", "load"]

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_NAME = "GPTQ"


def _per_word(bits: int) -> int:
    """Channels an axis must be a multiple of for whole int32 words."""
    return 32 if bits == 3 else 32 // bits


def check(items: dict, *, checkpoint_format: str = "gptq") -> dict:
    """Static checks of every QArray (``items``: name -> QArray) before any work; returns the
    ``quantization_config`` fields they share (bits, group_size, sym)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(f"GPTQ checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                                f"{checkpoint_format!r}")
    shared, first = None, None
    for name, q in items.items():
        module_of(name, _NAME)
        check_linear(name, q, _NAME, children=("zero", "g_idx"))
        f = q.fmt
        if f.kind != "int" or f.bits not in BITS:
            raise QuantizationError(f"'{name}': GPTQ stores integer codes of {BITS} bits; found format {f.name}")
        out, k = q.shape
        if out % _per_word(f.bits) or k % _per_word(f.bits):
            raise QuantizationError(f"'{name}': {f.bits}-bit GPTQ packs whole int32 words, so both dimensions of "
                                    f"the weight must be multiples of {_per_word(f.bits)}; found shape {q.shape}")
        if q.g_idx is not None and tuple(np.shape(q.g_idx)) != (k,):
            raise QuantizationError(f"'{name}': g_idx must have shape ({k},), found {tuple(np.shape(q.g_idx))}")
        facts = {"bits": f.bits, "sym": f.symmetric}
        if shared is None:
            shared, first = facts, name
        elif facts != shared:
            raise QuantizationError(f"'{name}': one GPTQ checkpoint has one bits/sym for every tensor; "
                                    f"'{first}' has {shared}, '{name}' has {facts}")
    if shared is None:
        raise QuantizationError("GPTQ export: the tree holds no QArray")
    return dict(shared, group_size=_group_size(items))


def _group_size(items: dict) -> int:
    """The config's one group_size: the group size of every tensor with more than one group (a
    tensor whose one group spans its inputs fits any group_size >= its input count), else -1."""
    grouped = {(q.group_size, name) for name, q in items.items() if q.group_size < q.shape[1]}
    sizes = sorted({g for g, _ in grouped})
    if len(sizes) > 1:
        a, b = (next(n for g, n in sorted(grouped) if g == s) for s in sizes[:2])
        raise QuantizationError(f"'{b}': one GPTQ checkpoint has one group_size for every tensor; '{a}' has "
                                f"{items[a].group_size}, '{b}' has {items[b].group_size}")
    if not sizes:
        return -1
    for name, q in items.items():
        if q.group_size == q.shape[1] and q.shape[1] > sizes[0]:
            raise QuantizationError(f"'{name}': per-channel scales over {q.shape[1]} inputs do not fit the "
                                    f"checkpoint's group_size {sizes[0]} (of '{min(n for _, n in grouped)}')")
    return sizes[0]


def _zeros(name: str, q, checkpoint_format: str) -> np.ndarray:
    """Integer zero points (n_groups, out) as the file stores them (v1: minus one)."""
    b = q.fmt.bits
    n_groups = np.shape(q.scale)[1]
    if q.fmt.symmetric:
        z = np.full((n_groups, q.shape[0]), 2 ** (b - 1), np.int64)
    elif checkpoint_format == "gptq":
        z = integer_zeros(name, grouped_2d(q.zero), 1, 2 ** b, "GPTQ (checkpoint_format 'gptq', which stores "
                          "zero - 1; use checkpoint_format='gptq_v2' for zero points of 0)")
    else:
        z = integer_zeros(name, grouped_2d(q.zero), 0, 2 ** b - 1, "GPTQ v2")
    return z - 1 if checkpoint_format == "gptq" else z


def export(items: dict, *, checkpoint_format: str = "gptq") -> tuple[dict, dict, dict]:
    """The GPTQ tensors of every QArray in ``items`` (name -> QArray), the ``quantization_config``
    and the extra JSON files (``quantize_config.json``). Nothing is written here."""
    shared = check(items, checkpoint_format=checkpoint_format)
    tensors, desc_act = {}, False
    for name, q in items.items():
        x, b = module_of(name, _NAME), q.fmt.bits
        codes = codes_of(q)                                     # (out, in)
        g = q.group_size
        trivial = np.arange(q.shape[1], dtype=np.int32) // g
        g_idx = trivial if q.g_idx is None else host(q.g_idx).astype(np.int32)
        desc_act = desc_act or not np.array_equal(g_idx, trivial)
        tensors[f"{x}.qweight"] = pack_stream(codes.T, b, axis=0)
        tensors[f"{x}.qzeros"] = pack_stream(_zeros(name, q, checkpoint_format), b, axis=1)
        tensors[f"{x}.scales"] = exact_cast(name, grouped_2d(q.scale), np.float16, "scales", "GPTQ")
        tensors[f"{x}.g_idx"] = g_idx
    qc = {"quant_method": "gptq", "bits": shared["bits"], "group_size": shared["group_size"], "desc_act": desc_act,
          "sym": shared["sym"], "checkpoint_format": checkpoint_format, "static_groups": False,
          "true_sequential": True, "damp_percent": 0.01, "lm_head": False,
          "meta": {"quantizer": ["weightlab"]}}
    return tensors, qc, {"quantize_config.json": qc}


def _fail(path, x: str, what: str):
    raise CheckpointError(f"{path}: GPTQ module '{x}': {what}")


def load(c, qc: dict, path, dtype: str = "float16") -> dict:
    """QArrays of every GPTQ module of checkpoint ``c`` (a weightlab.io Checkpoint) under the
    ``quantization_config`` ``qc``; other tensors are returned as NumPy arrays."""
    from ..quant.formats import get_format
    from ..quant.qarray import QArray

    bits, g_cfg = qc.get("bits"), qc.get("group_size", -1)
    fmt_ver = qc.get("checkpoint_format", "gptq")
    if bits not in BITS or type(g_cfg) is not int or (g_cfg <= 0 and g_cfg != -1) or fmt_ver not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{path}: GPTQ quantization_config needs bits in {BITS}, group_size a positive integer "
                              f"or -1 and checkpoint_format in {CHECKPOINT_FORMATS}; found bits={bits!r}, "
                              f"group_size={g_cfg!r}, checkpoint_format={fmt_ver!r}")
    names = set(c.keys())
    modules = sorted(n[:-len(".qweight")] for n in names if n.endswith(".qweight"))
    used, out = set(), {}
    for x in modules:
        parts = {p: f"{x}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")}
        missing = [t for t in parts.values() if t not in names]
        if missing:
            _fail(path, x, f"tensor '{missing[0]}' is missing")
        used.update(parts.values())
        want = {"qweight": np.int32, "qzeros": np.int32, "scales": np.float16, "g_idx": np.int32}
        for p, t in parts.items():
            if np.dtype(c.dtype(t)) != np.dtype(want[p]) and not (p == "g_idx" and np.dtype(c.dtype(t)).kind in "iu"):
                _fail(path, x, f"'{t}' must be {np.dtype(want[p]).name}, found {np.dtype(c.dtype(t)).name}")
        (kw, out_f), (ng, out_s) = c.shape(parts["qweight"]), c.shape(parts["scales"])
        k = kw * 32 // bits
        g = k if g_cfg == -1 or g_cfg >= k else g_cfg
        expect = {"qweight": (kw, out_f), "scales": (-(-k // g), out_f), "qzeros": (-(-k // g), out_f * bits // 32),
                  "g_idx": (k,)}
        for p, shp in expect.items():
            if tuple(c.shape(parts[p])) != shp or (p != "g_idx" and (k % _per_word(bits) or out_f % _per_word(bits))):
                _fail(path, x, f"'{parts[p]}' has shape {tuple(c.shape(parts[p]))}; {bits}-bit group_size {g_cfg} "
                               f"with {k} inputs and {out_f} outputs needs {shp}")
        g_idx = c[parts["g_idx"]].astype(np.int32)
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= ng):
            _fail(path, x, f"g_idx values must lie in [0, {ng}), found [{g_idx.min()}, {g_idx.max()}]")
        codes = unpack_stream(c[parts["qweight"]], bits, k, axis=0).T          # (out, in)
        z = unpack_stream(c[parts["qzeros"]], bits, out_f, axis=1).astype(np.int64) + (fmt_ver == "gptq")
        scales = c[parts["scales"]]
        sym = bool(qc.get("sym", False)) and bool(np.all(z == 2 ** (bits - 1)))
        trivial = np.arange(k, dtype=np.int32) // g
        keep_g_idx = k % g != 0 or not np.array_equal(g_idx, trivial)
        zero = None if sym else z.T[:, :, None].astype(np.float16)
        out[f"{x}.weight"] = QArray(
            pack_qarray_codes(codes, bits, 1), scales.T[:, :, None], zero, g_idx=g_idx if keep_g_idx else None,
            shape=(out_f, k), dtype=float_dtype(dtype), fmt=get_format("int", bits, symmetric=sym), group_size=g,
            axis=1)
    for n in sorted(names - used):
        out[n] = c[n]
    return out
