"""The one argument layer of the ``weightlab`` command line: ``argparse`` value types that turn a
meaningless or mistyped value into a usage error (``weightlab quantize: error: argument
--group-size: ...``, exit code 2) before any work, and the checks shared by every command that
writes an output. Every command's parser takes its types from here, so ``--seed 2**70``, ``--weights
1,abc``, ``--group-size 0`` or an invalid ``--select`` regex fail the same way everywhere.

No JAX here: building the parser and ``--help`` stay cheap.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from .errors import UsageError

__all__ = ["UsageError", "output", "integer", "real", "seed", "size", "regex", "float_list", "group_size", "SEED_MAX"]

SEED_MAX = 2**63 - 1
"""The largest ``--seed``: JAX folds seeds into a 64-bit signed integer."""


def _fail(flag_value: str, want: str):
    raise argparse.ArgumentTypeError(f"expected {want}, got {flag_value!r}")


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (either bound may be None). Rejects ``1.5``, ``abc``, ``2**70``."""
    def parse(text: str) -> int:
        want = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + \
            (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "") + \
            (f" <= {hi}" if hi is not None and lo is None else "")
        try:
            v = int(text.strip().replace("_", ""), 10)
        except (ValueError, AttributeError):
            _fail(text, want)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(text, want)
        return v

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); NaN and Inf are refused."""
    def parse(text: str) -> float:
        left = "(" if lo_open else "["
        want = "a finite number" + (f" in {left}{lo}, {hi}]" if lo is not None and hi is not None else
                                    f" > {lo}" if lo is not None and lo_open else
                                    f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
        try:
            v = float(text)
        except (ValueError, TypeError):
            _fail(text, want)
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            _fail(text, want)
        return v

    parse.__name__ = "number"
    return parse


seed = integer(0, SEED_MAX)
"""A random seed: an integer in ``[0, 2**63 - 1]``."""


def size(text: str) -> int:
    """A byte size: ``500MB``, ``2GB``, ``1.5G`` (binary units), ``5B`` (mergekit's spelling: five
    billion bytes) or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        _fail(text, "a size such as 500MB, 2GB or 1B")
    unit = (m.group(2) or "").upper()
    if not unit and (m.group(3) or "").upper() == "B":  # mergekit's --out-shard-size spelling: "5B" = five billion bytes
        n = int(float(m.group(1)) * 10**9)
    else:
        n = int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))
    if n <= 0:
        _fail(text, "a positive size")
    return n


def regex(text: str) -> str:
    """A valid regular expression (kept as the user's text, so messages quote it)."""
    try:
        re.compile(text)
    except re.error as e:
        _fail(text, f"a valid regular expression ({e})")
    return text


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers: ``1,0.5,-0.25``."""
    parts = [p.strip() for p in text.split(",")]
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            _fail(text, f"comma-separated numbers ({p!r} is not a number)")
        if not math.isfinite(v):
            _fail(text, f"comma-separated finite numbers ({p!r} is not finite)")
        out.append(v)
    return out


def group_size(text: str):
    """``--group-size``: a positive integer, or ``auto``, ``channel`` or ``tensor`` (spelled as the
    quantizers take them)."""
    t = text.strip().lower()
    if t in ("auto", "channel", "tensor"):
        return t
    return integer(1)(t) if t.lstrip("+-").isdigit() else _fail(
        text, "a positive integer, 'auto', 'channel' or 'tensor'")


def output(path, overwrite: bool, dry_run: bool = False):
    """The pre-flight check of a command's output path, before any work (see
    :func:`weightlab.io.atomic.check_output`): its parent exists, is a directory and is writable, and
    the path is free unless ``--overwrite``. A dry run writes nothing, so only the parent is checked."""
    from .io.atomic import check_output

    return check_output(path, overwrite=overwrite or dry_run)
