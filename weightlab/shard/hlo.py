"""Reading compiled HLO: which collectives a sharded program runs, and which run inside loops.

Used to prove a sharded algorithm communicates only where it should (GPTQ sharded along the
outputs runs its column sweep with no collective at all; alignment applies permutations without
gathering). Works on the text of ``jax.jit(f).lower(...).compile().as_text()`` (post-SPMD
partitioning, so the collectives are the ones the devices really run).
"""

from __future__ import annotations

import re

__all__ = ["COLLECTIVES", "collectives", "collectives_in_loops", "compiled_text"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_OP = re.compile(r"=\s*[^=]*?\b(" + "|".join(re.escape(c) for c in COLLECTIVES) + r")(?:-start|-done)?\(")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation|branch_computations)"
                    r"=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")


def compiled_text(fn, *args, **kwargs) -> str:
    """The optimised, partitioned HLO of ``jax.jit(fn)`` for ``args`` (``fn`` may already be jitted)."""
    import jax

    f = fn if hasattr(fn, "lower") else jax.jit(fn)
    return f.lower(*args, **kwargs).compile().as_text()


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        # Comments such as ``/*index=5*/`` (every fifth element of a long tuple type) carry "=" and
        # must not make a computation header look like an instruction.
        s = _COMMENT.sub("", line).strip()
        head = s.split("(", 1)[0]
        m = _COMP.match(s) if s.endswith("{") and "=" not in head and not s.startswith("ROOT") else None
        if m:
            name = m.group(1)
            comps[name] = []
        elif s == "}":
            name = None
        elif name is not None:
            comps[name].append(s)
    return comps


def collectives(text: str) -> dict[str, int]:
    """Count of each collective op in the program."""
    out: dict[str, int] = {}
    for lines in _computations(text).values():
        for s in lines:
            m = _OP.search(s)
            if m and not s.split("=", 1)[1].lstrip().startswith(("get-tuple-element",)):
                if "-done(" in s:
                    continue  # an async pair counts once (its -start)
                out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def collectives_in_loops(text: str) -> list[tuple[str, str]]:
    """(loop body computation, op line) for every collective reachable from a ``while`` body or
    condition: communication on every iteration."""
    comps = _computations(text)
    roots = []
    for lines in comps.values():
        for s in lines:
            if re.search(r"\bwhile\(", s):
                for m in re.finditer(r"\b(?:body|condition)=%?([\w.\-]+)", s):
                    roots.append(m.group(1))
    found, seen = [], set()
    stack = list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for s in comps[c]:
            if _OP.search(s) and "-done(" not in s:
                found.append((c, s[:200]))
            for m in _CALLS.finditer(s):
                stack.extend(x.strip().lstrip("%") for x in m.group(1).split(","))
    return found
