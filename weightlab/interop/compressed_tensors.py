"""compressed-tensors ``pack-quantized``: the llm-compressor / vLLM format for integer weights.

For a linear module ``X`` with weight (out, in) (compressed-tensors 0.20 ``PackedQuantizationCompressor``):

* ``X.weight_packed`` int32 (out, ceil(in·b/32)): the signed codes ``q`` in [-2^(b-1), 2^(b-1))
  stored as ``q + 2^(b-1)`` in the dense little-endian bit stream of :mod:`._common` along the
  input axis (no padding between words; for b in {4, 8} this is 32/b codes per word);
* ``X.weight_scale`` (out, n_groups) in the model's float dtype (n_groups = 1 for ``channel``);
* ``X.weight_zero_point`` int32 (ceil(out·b/32), n_groups), asymmetric only: the signed zero points
  ``zp`` stored the same way but packed along the *output* axis (``packed_dim=0``);
* ``X.weight_shape`` int64 (2,): (out, in);
* the weight is ``(q - zp) · scale`` per group of ``group_size`` consecutive inputs.

weightlab's unsigned codes ``c`` and zero points ``z`` map as ``q = c - 2^(b-1)``, ``zp = z - 2^(b-1)``
(asymmetric) and, symmetric, ``q = c - 2^(b-1)`` with no zero point: the stored words are ``c`` and
``z`` unchanged. ``config.json`` gets ``quantization_config`` (quant_method ``compressed-tensors``,
format ``pack-quantized``, status ``compressed``) with one config group per distinct (bits,
symmetric, strategy, group size), targeting the module names exactly. Act-order (``g_idx``) is not
written: compressed-tensors 0.20 no longer reads ``weight_g_idx``.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import CheckpointError, QuantizationError
from ._common import (check_linear, codes_of, grouped_2d, integer_zeros, module_of, pack_qarray_codes, pack_stream,
                      unpack_stream)

__all__ = ["check", "export", "load"]

_NAME = "compressed-tensors"


def _scheme(q) -> dict:
    k = q.shape[1]
    channel = q.group_size == k
    return {"num_bits": q.fmt.bits, "type": "int", "symmetric": q.fmt.symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else q.group_size,
            "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": None, "zp_dtype": None,
            "observer": "minmax", "observer_kwargs": {}}


def check(items: dict) -> None:
    """Static checks of every QArray (name -> QArray) before any work."""
    if not items:
        raise QuantizationError("compressed-tensors export: the tree holds no QArray")
    for name, q in items.items():
        module_of(name, _NAME)
        check_linear(name, q, _NAME, children=("zero",))
        if q.fmt.kind != "int":
            raise QuantizationError(f"'{name}': pack-quantized stores integer codes; found format {q.fmt.name} "
                                    "(a table or float format)")


def export(items: dict) -> tuple[dict, dict, dict]:
    """The pack-quantized tensors of every QArray (name -> QArray), the ``quantization_config`` and
    no extra files. Nothing is written here."""
    check(items)
    tensors, groups = {}, []
    for name, q in sorted(items.items()):
        x, b = module_of(name, _NAME), q.fmt.bits
        tensors[f"{x}.weight_packed"] = pack_stream(codes_of(q), b, axis=1)
        tensors[f"{x}.weight_scale"] = grouped_2d(q.scale).T.copy()                    # (out, n_groups)
        if not q.fmt.symmetric:
            z = integer_zeros(name, grouped_2d(q.zero).T, 0, 2 ** b - 1, "compressed-tensors")
            tensors[f"{x}.weight_zero_point"] = pack_stream(z, b, axis=0)
        tensors[f"{x}.weight_shape"] = np.asarray(q.shape, np.int64)
        scheme = _scheme(q)
        for s, targets in groups:
            if s == scheme:
                targets.append(x)
                break
        else:
            groups.append((scheme, [x]))
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {f"group_{i}": {"targets": t, "weights": s, "input_activations": None,
                                           "output_activations": None, "format": "pack-quantized"}
                            for i, (s, t) in enumerate(groups)},
          "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}
    return tensors, qc, {}


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error:
            return False
    return target == module


def _weights_of(qc: dict, module: str, path) -> dict:
    """The weight quantization arguments of the config group whose targets name ``module``; a
    single group with class targets (``Linear``) applies to every packed module."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{path}: compressed-tensors quantization_config has no config_groups")
    hits = [g for g in groups.values()
            if isinstance(g, dict) and any(_matches(t, module) for t in g.get("targets", []))]
    if not hits and len(groups) == 1:
        hits = list(groups.values())
    if len(hits) != 1 or not isinstance(hits[0].get("weights"), dict):
        raise CheckpointError(f"{path}: module '{module}' is matched by {len(hits)} config groups with weight "
                              "arguments; expected exactly one")
    fmt = hits[0].get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise CheckpointError(f"{path}: module '{module}' has format {fmt!r}; only 'pack-quantized' is read")
    return hits[0]["weights"]


def load(c, qc: dict, path, dtype=None) -> dict:
    """QArrays of every pack-quantized module of checkpoint ``c`` under ``quantization_config`` ``qc``;
    other tensors are returned as NumPy arrays. ``dtype``: the QArrays' dtype (default: the scales')."""
    from ..quant.formats import get_format
    from ..quant.qarray import QArray

    names = set(c.keys())
    used, out = set(), {}
    for x in sorted(n[:-len(".weight_packed")] for n in names if n.endswith(".weight_packed")):
        w = _weights_of(qc, x, path)
        b, sym, strat, g = w.get("num_bits"), w.get("symmetric", True), w.get("strategy"), w.get("group_size")
        if w.get("type", "int") != "int" or type(b) is not int or not 2 <= b <= 8 or strat not in ("group", "channel"):
            raise CheckpointError(f"{path}: module '{x}': weightlab reads int weights of 2..8 bits with strategy "
                                  f"group or channel; found type={w.get('type')!r}, num_bits={b!r}, strategy={strat!r}")
        parts = [f"{x}.weight_packed", f"{x}.weight_scale", f"{x}.weight_shape"]
        parts += [] if sym else [f"{x}.weight_zero_point"]
        missing = [t for t in parts if t not in names]
        if missing:
            raise CheckpointError(f"{path}: module '{x}': tensor '{missing[0]}' is missing")
        used.update(parts)
        shape = tuple(int(v) for v in np.asarray(c[f"{x}.weight_shape"]).reshape(-1))
        if len(shape) != 2 or min(shape) <= 0:
            raise CheckpointError(f"{path}: '{x}.weight_shape' must hold two positive sizes, found {shape}")
        out_f, k = shape
        g = k if strat == "channel" else g
        if type(g) is not int or g <= 0 or k % g:
            raise CheckpointError(f"{path}: module '{x}': group_size {g!r} does not divide its {k} inputs")
        expect = {f"{x}.weight_packed": ((out_f, -(-k * b // 32)), "i"), f"{x}.weight_scale": ((out_f, k // g), "f")}
        if not sym:
            expect[f"{x}.weight_zero_point"] = ((-(-out_f * b // 32), k // g), "i")
        for t, (shp, kind) in expect.items():
            dt = np.dtype(c.dtype(t))
            if tuple(c.shape(t)) != shp or dt.kind != kind or (kind == "i" and dt != np.int32):
                raise CheckpointError(f"{path}: '{t}' is {dt.name}{tuple(c.shape(t))}; {b}-bit {strat} quantization "
                                      f"of a {shape} weight needs {'int32' if kind == 'i' else 'float'}{shp}")
        scale = c[f"{x}.weight_scale"]
        codes = unpack_stream(c[f"{x}.weight_packed"], b, k, axis=1)
        zero = None if sym else unpack_stream(c[f"{x}.weight_zero_point"], b, out_f, axis=0).astype(scale.dtype)
        out[f"{x}.weight"] = QArray(pack_qarray_codes(codes, b, 1), scale[:, :, None],
                                    None if zero is None else zero[:, :, None], shape=shape,
                                    dtype=dtype or scale.dtype, fmt=get_format("int", b, symmetric=sym), group_size=g,
                                    axis=1)
    for n in sorted(names - used):
        out[n] = c[n]
    return out

