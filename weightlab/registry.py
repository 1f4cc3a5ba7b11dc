"""Method registries: one per pillar, filled by a decorator at each method's definition.

A pillar declares ``METHODS = Registry("merge", modules=(...))`` and decorates each method where it
is defined (through the pillar's own decorator, which adds its facts: a merge's model-count rule, a
quantizer's need for calibration statistics ...). Everything that lists methods — the pillar's
package namespace, its transform factory, YAML configs, the CLI's choices and ``--help``, the
tables in README and docs — reads the registry, so adding a method is one decorated function.

The modules are imported on the first lookup, so importing a pillar stays cheap. The ground layer
knows no pillar: entries carry their facts in ``info``, readable as attributes (``entry.calibrated``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import RegistryError

__all__ = ["Entry", "Registry"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered method: its name, function and pillar-specific facts."""

    name: str
    fn: Callable
    pillar: str
    info: Mapping[str, Any]

    def __getattr__(self, item):  # info fields read as attributes
        info = object.__getattribute__(self, "info")
        if item in info:
            return info[item]
        raise AttributeError(f"{self.pillar} method {self.name!r} has no field {item!r}")

    @property
    def summary(self) -> str:
        """The first sentence of the docstring (its first paragraph, on one line)."""
        doc = (inspect.getdoc(self.info.get("doc_of", self.fn)) or "").strip()
        para = " ".join(doc.split("\n\n")[0].split())
        m = re.search(r"(?<=[.!?])\s(?=[A-Z(])", para)
        return para[:m.start()] if m else para

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword hyper-parameters (keyword-only ones, or all with defaults), in signature order,
        minus the ones the pillar's call convention fills in (``info["implicit"]``)."""
        sig = inspect.signature(self.info.get("params_of", self.fn))
        implicit = set(self.info.get("implicit", ()))
        return {n: p for n, p in sig.parameters.items()
                if n not in implicit and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and (p.kind == p.KEYWORD_ONLY or p.default is not p.empty)}


class Registry:
    """Name -> :class:`Entry` for one pillar, populated lazily from ``modules``."""

    def __init__(self, pillar: str, modules: Sequence[str] = ()):
        self.pillar, self.modules = pillar, tuple(modules)
        self._entries: dict[str, Entry] = {}
        self._loaded, self._loading = not self.modules, False

    def register(self, name: str | None = None, **info) -> Callable[[Callable], Callable]:
        """Decorator recording ``fn`` under ``name`` (default ``fn.__name__``) with ``info``."""
        def deco(fn):
            key = name or fn.__name__
            if key in self._entries and self._entries[key].fn is not fn:
                raise RegistryError(f"{self.pillar} method {key!r} is registered twice")
            self._entries[key] = Entry(key, fn, self.pillar, dict(info))
            return fn

        return deco

    def _load(self) -> None:
        if self._loaded or self._loading:  # re-entered while a method module imports the registry
            return
        self._loading = True
        try:
            for m in self.modules:
                importlib.import_module(m)
            self._loaded = True  # only once every module imported: a failure is not a silently short list
        finally:
            self._loading = False

    def __getitem__(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise RegistryError(f"unknown {self.pillar} method {name!r}{hint}; known: {sorted(self._entries)}")
        return self._entries[name]

    def __contains__(self, name) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def _rank(self, e: Entry):
        """Order of the listing: the ``modules`` order, then source order (not import order, which
        depends on what the caller imported first)."""
        fn = inspect.unwrap(e.fn)
        mod = getattr(fn, "__module__", "")
        line = getattr(getattr(fn, "__code__", None), "co_firstlineno", 0)
        return (self.modules.index(mod) if mod in self.modules else len(self.modules), mod, line)

    def names(self, **where) -> list[str]:
        """Registered names in a stable order (module list, then source), optionally filtered on info."""
        self._load()
        es = sorted(self._entries.values(), key=self._rank)
        return [e.name for e in es if all(e.info.get(k) == v for k, v in where.items())]

    def entries(self, **where) -> list[Entry]:
        return [self._entries[n] for n in self.names(**where)]

    def table(self, columns: Sequence[tuple[str, Callable[[Entry], str]]], **where) -> str:
        """A Markdown table with one row per method (README/docs tables are generated by this, and a
        test checks that the committed tables equal it)."""
        head = "| " + " | ".join(c for c, _ in columns) + " |"
        rule = "|" + "|".join("---" for _ in columns) + "|"
        rows = ["| " + " | ".join(str(f(e)).replace("|", "\\|") for _, f in columns) + " |"
                for e in self.entries(**where)]
        return "\n".join([head, rule, *rows])
