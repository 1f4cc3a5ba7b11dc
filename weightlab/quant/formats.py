"""Number formats for weight quantization.

A :class:`Format` says how a b-bit code maps to a value before the group scale is applied:

* ``int`` — signed/unsigned integers, symmetric (``(c - 2^(b-1)) * s``) or asymmetric with a
  zero point (``(c - z) * s``), b = 2..8;
* ``lut`` — a 16-entry (or 2^b-entry) table: NF4 (Dettmers et al., QLoRA 2023), FP4 E2M1 (OCP
  Microscaling spec v1.0), or a learned per-row table (any4, Elhoushi et al. 2025);
* ``fp8`` — the code is an FP8 bit pattern (E4M3 "fn" or E5M2, OCP FP8 spec).

Block-scaled formats fix the group size and how the scale itself is stored: MXFP4 (block 32,
E8M0 power-of-two scale, OCP MX v1.0) and NVFP4 (block 16, FP8 E4M3 scale times one FP32 tensor
scale, NVIDIA Blackwell).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np

from ..errors import QuantizationError

__all__ = ["Format", "get_format", "format_for", "FORMATS", "NF4_VALUES", "FP4_E2M1_VALUES", "DEFAULTS",
           "DEFAULT_SELECT"]

from .defaults import DEFAULTS  # noqa: E402  (one table, importable without NumPy extensions)


def _default_select():
    from ..tree import selector

    return selector(DEFAULTS["select"], exclude=DEFAULTS["exclude"], min_ndim=2)


DEFAULT_SELECT = _default_select()
"""The :class:`~weightlab.tree.Selector` of :data:`DEFAULTS`' ``select``/``exclude``, 2-D and up."""

# QLoRA's NormalFloat4 levels (quantiles of N(0,1), normalised to [-1, 1], exact zero).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# E2M1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; code order = bit pattern.
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    kind: str                      # "int" | "lut" | "fp8"
    bits: int
    symmetric: bool = True         # int: symmetric (no zero point) or asymmetric
    lut: Optional[tuple] = None    # lut: fixed table (None = learned per row)
    fp8_dtype: Optional[str] = None
    block_size: Optional[int] = None   # fixed group size of block-scaled formats
    scale_kind: str = "float"      # "float" | "e8m0" (MX power of two) | "fp8_e4m3" (NVFP4)

    @property
    def qmax(self) -> float:
        """Largest code magnitude after centring (int) or largest table/format value."""
        if self.kind == "int":  # symmetric: half a step past the top code, so all 2^b codes are used
            return float(2 ** (self.bits - 1)) - 0.5 if self.symmetric else float(2 ** self.bits - 1)
        if self.kind == "lut":
            return float(np.max(np.abs(self.lut))) if self.lut is not None else 1.0
        return float(ml_dtypes.finfo(np.dtype(getattr(ml_dtypes, self.fp8_dtype))).max)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["lut"] = list(self.lut) if self.lut is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Format":
        d = dict(d)
        d["lut"] = tuple(d["lut"]) if d.get("lut") is not None else None
        return cls(**d)


def _int(bits: int, symmetric: bool) -> Format:
    return Format(f"int{bits}" + ("" if symmetric else "_asym"), "int", bits, symmetric)


FORMATS: dict[str, Format] = {
    **{f"int{b}": _int(b, True) for b in range(2, 9)},
    **{f"int{b}_asym": _int(b, False) for b in range(2, 9)},
    **{f"uint{b}": _int(b, False) for b in range(2, 9)},
    "nf4": Format("nf4", "lut", 4, lut=tuple(float(v) for v in NF4_VALUES)),
    "fp4_e2m1": Format("fp4_e2m1", "lut", 4, lut=tuple(float(v) for v in FP4_E2M1_VALUES)),
    "any4": Format("any4", "lut", 4, lut=None),
    "fp8_e4m3": Format("fp8_e4m3", "fp8", 8, fp8_dtype="float8_e4m3fn"),
    "fp8_e5m2": Format("fp8_e5m2", "fp8", 8, fp8_dtype="float8_e5m2"),
    "mxfp4": Format("mxfp4", "lut", 4, lut=tuple(float(v) for v in FP4_E2M1_VALUES), block_size=32, scale_kind="e8m0"),
    "nvfp4": Format("nvfp4", "lut", 4, lut=tuple(float(v) for v in FP4_E2M1_VALUES), block_size=16,
                    scale_kind="fp8_e4m3"),
}


def get_format(fmt: "str | Format", bits: int | None = None, symmetric: bool | None = None) -> Format:
    """Resolve ``"int"`` + bits, ``"int4"``, ``"nf4"``, ``"mxfp4"`` ... to a :class:`Format`."""
    if isinstance(fmt, Format):
        return fmt
    name = str(fmt).lower()
    if name in ("int", "uint"):
        if bits is None:
            raise QuantizationError(f"format {fmt!r} needs bits=")
        if not 2 <= bits <= 8:
            raise QuantizationError(f"integer formats support 2..8 bits, got bits={bits}")
        sym = (name == "int") if symmetric is None else symmetric
        return FORMATS[f"int{bits}" + ("" if sym else "_asym")]
    if name not in FORMATS:
        raise QuantizationError(f"unknown format {fmt!r}; known: int/uint + bits, {sorted(FORMATS)}")
    f = FORMATS[name]
    if bits is not None and bits != f.bits:
        raise QuantizationError(f"format {name} is {f.bits}-bit; bits={bits} is not supported with it")
    if symmetric is not None and f.kind == "int" and symmetric != f.symmetric:
        f = _int(f.bits, symmetric)
    return f


def format_for(fmt: "str | Format", bits: int | None, symmetric: bool | None = None) -> Format:
    """Like :func:`get_format`, but ``bits`` only sets the width of ``"int"``/``"uint"``: the
    quantizers take a ``bits`` argument that named formats (``"nf4"``, ``"fp8_e4m3"``) ignore."""
    generic = isinstance(fmt, str) and fmt.lower() in ("int", "uint")
    return get_format(fmt, bits if generic else None, symmetric)
