"""weightlab: pure functions over neural-network weights in JAX.

The protocol (:class:`WeightTransform` with :func:`chain`, :func:`select`, :func:`partition` and the
optax bridges) lives in :mod:`weightlab.core`; path-keyed pytree tools in :mod:`weightlab.tree`;
checkpoints in :mod:`weightlab.io`. Pillars (quant, merge, align, lopt) build on these.
"""

from . import errors, io, tree
from .core import (EmptyState, MaskedNode, WeightTransform, apply_once, as_optax, chain, from_optax, identity,
                   partition, per_leaf, select, stateless)
from .errors import WeightlabError

__version__ = "0.1.0"

__all__ = ["WeightTransform", "EmptyState", "MaskedNode", "identity", "stateless", "per_leaf", "chain", "select",
           "partition", "as_optax", "from_optax", "apply_once", "tree", "io", "errors", "WeightlabError",
           "__version__"]
