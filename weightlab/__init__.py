"""weightlab: pure functions over neural-network weights in JAX.

The protocol (:class:`WeightTransform` with :func:`chain`, :func:`select`, :func:`partition` and the
optax bridges) lives in :mod:`weightlab.core`; path-keyed pytree tools in :mod:`weightlab.tree`;
checkpoints in :mod:`weightlab.io`. Pillars (quant, merge, align, lopt) build on these.
"""

import importlib as _importlib

from . import errors
from .errors import WeightlabError

__version__ = "0.1.0"

__all__ = ["WeightTransform", "EmptyState", "MaskedNode", "identity", "stateless", "per_leaf", "chain", "select",
           "partition", "as_optax", "from_optax", "apply_once", "tree", "io", "errors", "WeightlabError",
           "__version__"]

_CORE = {"WeightTransform", "EmptyState", "MaskedNode", "identity", "stateless", "per_leaf", "chain", "select",
         "partition", "as_optax", "from_optax", "apply_once"}


def __getattr__(name):
    """Submodules and the protocol are imported on first use, so ``weightlab`` itself (and CLI paths
    that never touch JAX, e.g. a linear merge or ``info``) starts without importing JAX."""
    if name in _CORE:
        return getattr(_importlib.import_module(".core", __name__), name)
    if name in ("io", "tree", "core", "shard", "train", "eval", "merge", "quant", "models", "data", "kernels"):
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'weightlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
