"""What the three interop formats share: host copies of QArray children, the little-endian int32
bit stream they all pack codes into, the checks every exported QArray must pass, and the atomic
writer / reader of a Hugging Face model directory (``model.safetensors`` + ``config.json``).

The bit stream: code i of a row occupies bits ``[i*b, (i+1)*b)`` of the row's stream and bit j of
the stream is bit ``j % 32`` of int32 word ``j // 32``. For b in {2, 4, 8} that is "32/b codes per
word, low bits first" (AutoGPTQ's ``pack``); for b = 3 it is AutoGPTQ's three-words-per-32-codes
layout; for any b it is compressed-tensors' dense ``pack_to_int32`` (before its signed offset).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import QuantizationError

__all__ = ["host", "codes_of", "unpack_qarray_codes", "pack_qarray_codes", "grouped_2d", "pack_stream",
           "unpack_stream", "check_linear", "check_groups", "module_of", "integer_zeros", "exact_cast", "write_model_dir",
           "float_dtype", "WEIGHT"]

WEIGHT = ".weight"


def host(x) -> np.ndarray | None:
    """A NumPy copy of a (possibly device) array; None stays None."""
    if x is None:
        return None
    import jax

    return np.asarray(jax.device_get(x))


def codes_of(q) -> np.ndarray:
    """The unpacked codes of a QArray (uint8, the array's layout)."""
    return unpack_qarray_codes(host(q.codes), q.fmt.bits, q.shape[q.axis], q.axis)


def unpack_qarray_codes(packed: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """:func:`weightlab.quant.packing.unpack` in NumPy (no device work, no compilation per shape)."""
    p = np.moveaxis(np.asarray(packed), axis, -1)
    if bits in (1, 2, 4, 8):
        shifts = (np.arange(8 // bits) * bits).astype(np.uint8)
        c = ((p[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(*p.shape[:-1], -1)[..., :n]
    else:
        c = unpack_stream(p.astype(np.uint32), bits, n, axis=-1)
    return np.moveaxis(c.astype(np.uint8), -1, axis)


def pack_qarray_codes(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """:func:`weightlab.quant.packing.pack` in NumPy: uint8 for b in {1, 2, 4, 8}, else the uint32
    bit stream padded to whole blocks of 32 codes."""
    c = np.moveaxis(np.asarray(codes, np.uint8), axis, -1)
    per = 8 // bits if bits in (1, 2, 4, 8) else 32
    pad = (-c.shape[-1]) % per
    c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    if bits in (1, 2, 4, 8):
        shifts = (np.arange(per) * bits).astype(np.uint8)
        out = np.bitwise_or.reduce(c.reshape(*c.shape[:-1], -1, per) << shifts, axis=-1).astype(np.uint8)
    else:
        out = pack_stream(c, bits, axis=-1).view(np.uint32)
    return np.moveaxis(out, -1, axis)


def grouped_2d(x) -> np.ndarray:
    """A grouped-layout child of a (out, in) QArray grouped along axis 1, (out, n_groups, 1), as the
    (n_groups, out) matrix the GPTQ tensors use."""
    a = host(x)
    return a.reshape(a.shape[0], a.shape[1]).T


def pack_stream(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned b-bit codes along ``axis`` into the int32 bit stream (module docstring); the
    axis gets ``ceil(n * b / 32)`` words (the last one zero-padded)."""
    c = np.moveaxis(np.asarray(codes, np.uint32), axis, -1)
    lead, n = c.shape[:-1], c.shape[-1]
    stream = ((c[..., :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(*lead, n * bits)
    words = -(-n * bits // 32)
    stream = np.concatenate([stream, np.zeros((*lead, words * 32 - n * bits), np.uint8)], axis=-1)
    out = (stream.reshape(*lead, words, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
    return np.moveaxis(out.astype(np.uint32).view(np.int32), -1, axis)


def unpack_stream(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """Inverse of :func:`pack_stream`: ``n`` codes (uint8) along ``axis``."""
    w = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
    lead = w.shape[:-1]
    stream = ((w[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8).reshape(*lead, -1)
    c = stream[..., :n * bits].reshape(*lead, n, bits).astype(np.uint32) << np.arange(bits, dtype=np.uint32)
    return np.moveaxis(c.sum(-1).astype(np.uint8), -1, axis)


def module_of(name: str, fmt: str) -> str:
    """``X`` for a tensor ``X.weight`` (the formats name their tensors after the linear module)."""
    if not name.endswith(WEIGHT) or len(name) == len(WEIGHT):
        raise QuantizationError(f"'{name}': {fmt} stores quantized linear weights named '<module>.weight'; "
                                f"found the name '{name}'")
    return name[:-len(WEIGHT)]


def check_linear(name: str, q, fmt: str, *, children: tuple[str, ...] = ()) -> None:
    """The layout every exported QArray needs: a 2-D (out, in) Hugging Face linear weight, grouped along
    its input axis (1), not a stack, without children the format has no tensor for (besides
    ``codes``/``scale`` and the optional ``children``)."""
    if q.ndim != 2 or q.codes.ndim != 2:
        raise QuantizationError(f"'{name}': {fmt} stores 2-D linear weights; found shape {q.shape} "
                                f"(codes {tuple(np.shape(q.codes))})")
    if q.axis != 1:
        raise QuantizationError(f"'{name}': {fmt} groups a (out, in) weight along its input axis 1 (axis=-1 when "
                                f"quantizing Hugging Face '.weight' tensors); found axis={q.axis}")
    if q.group_size == 0:
        raise QuantizationError(f"'{name}': {fmt} needs per-group or per-channel scales; found one scale per tensor")
    check_groups(name, q)
    if q.fmt.kind == "int" and (q.zero is None) != q.fmt.symmetric:
        raise QuantizationError(f"'{name}': a {'symmetric' if q.fmt.symmetric else 'asymmetric'} {q.fmt.name} QArray "
                                f"must {'not ' if q.fmt.symmetric else ''}have a zero child")
    extra = [n for n in ("zero", "lut", "tensor_scale", "pre", "lr_a", "lr_b", "g_idx")
             if getattr(q, n) is not None and n not in children]
    if extra:
        raise QuantizationError(f"'{name}': {fmt} has no tensor for the QArray's {extra[0]!r} child "
                                f"(set: {extra}); expected only codes and scale"
                                + (f" (and {', '.join(children)})" if children else ""))


def check_groups(name: str, q) -> None:
    """The group size divides the group axis and the scale (and zero) have the grouped layout
    ``shape[:a] + (n_groups, 1) + shape[a+1:]`` (with ``g_idx``: any number of groups)."""
    from ..quant.qarray import grouped_shape

    n, g = q.shape[q.axis], q.group_size
    if g <= 0 or (n % g and q.g_idx is None):
        raise QuantizationError(f"'{name}': group size {g} does not divide axis {q.axis} of shape {q.shape}")
    want = list(grouped_shape(q.shape, q.axis, g) if n % g == 0 else q.shape)
    want[q.axis + 1] = 1
    for child in ("scale", "zero"):
        x = getattr(q, child)
        if x is None:
            continue
        found = list(np.shape(x))
        if q.g_idx is not None and len(found) == len(want):
            want[q.axis] = found[q.axis]  # act-order: the number of groups is the file's
        if found != want:
            raise QuantizationError(f"'{name}': the QArray's {child} has shape {tuple(found)}; groups of {g} along "
                                    f"axis {q.axis} of {q.shape} need {tuple(want)}")


def integer_zeros(name: str, zero: np.ndarray, lo: int, hi: int, fmt: str) -> np.ndarray:
    """A QArray's zero points as int64, which must be whole numbers in ``[lo, hi]``."""
    z = np.asarray(zero, np.float64)
    bad = (z != np.round(z)) | (z < lo) | (z > hi)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise QuantizationError(f"'{name}': {fmt} stores integer zero points in [{lo}, {hi}]; found {z[i]} at {i}")
    return z.astype(np.int64)


def exact_cast(name: str, x: np.ndarray, dtype, what: str, fmt: str) -> np.ndarray:
    """``x`` in ``dtype`` when every value survives the cast exactly, else a QuantizationError."""
    y = np.asarray(x).astype(dtype)
    if not np.array_equal(y.astype(np.float64), np.asarray(x).astype(np.float64)):
        raise QuantizationError(f"'{name}': {fmt} stores {what} as {np.dtype(dtype).name}; the QArray's "
                                f"{np.dtype(x.dtype).name} {what} are not all representable exactly (re-quantize "
                                f"with scale_dtype='{np.dtype(dtype).name}')")
    return y


def write_model_dir(out_dir, tensors: Mapping[str, np.ndarray], json_files: Mapping[str, dict], *,
                    overwrite: bool, files: Mapping[str, bytes] | None = None) -> Path:
    """Publish ``out_dir`` atomically (weightlab.io.atomic_dir): ``model.safetensors`` holding
    ``tensors`` with metadata ``{"format": "pt"}`` (what transformers expects), plus JSON files and
    verbatim side ``files`` (tokenizer ...)."""
    from ..io import atomic_dir
    from ..io import save as save_safetensors

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(tmp / "model.safetensors", dict(tensors), metadata={"format": "pt"})
        for fname, obj in json_files.items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        for fname, data in (files or {}).items():
            (tmp / fname).write_bytes(data)
    return Path(out_dir)


def float_dtype(name: str) -> np.dtype:
    """NumPy dtype of a float dtype name ("float16", "bfloat16", "float32")."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)

