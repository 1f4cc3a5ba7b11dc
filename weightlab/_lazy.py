"""Deferred imports for modules that must load without JAX.

The method registries are read by the YAML validator, the CLI and a linear merge, none of which
should pay for importing JAX (~1.2 s and ~100 MiB here). Modules on that path write
``jax = module("jax")`` and decorate with :func:`jit` instead of ``jax.jit``: the real import happens
on the first attribute access or call. Everything else imports JAX directly.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

__all__ = ["module", "jit", "namespace"]


class _Module:
    """Stands for a module; imports it on the first attribute access."""

    __slots__ = ("_name", "_mod")

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_mod", None)

    def __getattr__(self, item: str) -> Any:
        mod = object.__getattribute__(self, "_mod")
        if mod is None:
            mod = importlib.import_module(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_mod", mod)
        return getattr(mod, item)

    def __repr__(self) -> str:
        return f"<deferred module {object.__getattribute__(self, '_name')!r}>"


def module(name: str) -> Any:
    """A stand-in for ``import name`` that imports on first use."""
    return _Module(name)


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """``jax.jit(fun, **jit_kwargs)``, created on the first call (usable as a decorator)."""
    if fun is None:
        return lambda f: jit(f, **jit_kwargs)
    compiled = None

    @functools.wraps(fun)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import jax

            compiled = jax.jit(fun, **jit_kwargs)
        return compiled(*args, **kwargs)

    return call


def namespace(package: str, namespace_globals: dict, where: dict[str, str], submodules=(),
              factories: tuple[set, Callable[[str], Any]] | None = None):
    """``(__getattr__, __dir__)`` for a pillar package whose public names load on first use (PEP 562):
    ``where`` maps a name to the submodule defining it, ``submodules`` are returned as modules, and
    ``factories`` (names, make) builds the remaining names (e.g. quantizer factories from a registry).
    Loaded names are cached in the package's globals."""
    extra_names, make = factories if factories else (set(), None)

    def __getattr__(name):
        if name in where:
            obj = getattr(importlib.import_module(f".{where[name]}", package), name)
        elif name in extra_names:
            obj = make(name)
        elif name in submodules:
            return importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace_globals[name] = obj
        return obj

    def __dir__():
        return sorted(set(namespace_globals) | set(where) | set(extra_names))

    return __getattr__, __dir__
