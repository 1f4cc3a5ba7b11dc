"""Tables in README.md and docs/ that are generated from the registries.

A generated block sits between ``<!-- registry:NAME -->`` and ``<!-- /registry:NAME -->``;
``python scripts/gen_docs.py`` rewrites every block, and the test suite fails while a committed
block differs from what the registry says (so a new method cannot be left out of the docs).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["BLOCKS", "generated", "sync", "FILES"]

ROOT = Path(__file__).resolve().parents[2]
FILES = ("README.md", "docs/merging.md", "docs/quantization.md", "docs/alignment.md", "docs/learned_optimizers.md")


def _quant() -> str:
    from ..quant.registry import markdown_table

    return markdown_table()


def _merge() -> str:
    from ..merge.registry import markdown_table

    return markdown_table()


def _align() -> str:
    from ..align.registry import markdown_table

    return markdown_table()


def _lopt() -> str:
    from ..lopt.registry import markdown_table

    return markdown_table()


BLOCKS = {"quant": _quant, "merge": _merge, "align": _align, "lopt": _lopt}


def generated(name: str) -> str:
    return BLOCKS[name]()


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- registry:{name} -->\n)(.*?)(<!-- /registry:{name} -->)", re.S)


def sync(path: Path, *, check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` only compare) the generated blocks of one file; returns the names of
    blocks that were (or would be) changed."""
    text = path.read_text()
    changed = []
    for name in BLOCKS:
        rx = _pattern(name)
        m = rx.search(text)
        if not m:
            continue
        want = generated(name) + "\n"
        if m.group(2) != want:
            changed.append(name)
            text = text[:m.start(2)] + want + text[m.end(2):]
    if changed and not check:
        path.write_text(text)
    return changed
