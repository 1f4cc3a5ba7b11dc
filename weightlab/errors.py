"""Typed errors. Every error that concerns a leaf names its pytree path.

All inherit from :class:`WeightlabError`, so ``except weightlab.WeightlabError`` catches any bad
input we detect. Most also inherit from the matching builtin (``ValueError``, ``TypeError``,
``FileNotFoundError`` ...) so callers that already catch those keep working.
"""

from __future__ import annotations


class WeightlabError(Exception):
    """Base class of every error weightlab raises on purpose."""


class StructureMismatchError(WeightlabError, ValueError):
    """Two pytrees that must share a structure do not (different keys, containers or leaf counts)."""

    def __init__(self, path: str, expected: str, found: str, what: str = "structure"):
        self.path, self.expected, self.found = path, expected, found
        super().__init__(f"{what} mismatch at '{path or '<root>'}': expected {expected}, found {found}")


class ShapeMismatchError(StructureMismatchError):
    """A leaf has the wrong shape."""

    def __init__(self, path: str, expected, found):
        super().__init__(path, str(tuple(expected)), str(tuple(found)), what="shape")


class DTypeMismatchError(StructureMismatchError, TypeError):
    """A leaf has the wrong dtype."""

    def __init__(self, path: str, expected, found):
        super().__init__(path, str(expected), str(found), what="dtype")


class PathCollisionError(WeightlabError, ValueError):
    """Two different leaves format to the same string path (e.g. dict keys ``0`` and ``"0"``)."""


class SelectorError(WeightlabError, ValueError):
    """A ``select=`` value is not a selector (bad regex, unsupported type)."""


class NoMatchError(SelectorError):
    """A selection pattern matched no array leaf (almost always a typo in the pattern)."""


class PartitionError(WeightlabError, ValueError):
    """A leaf is claimed by no group, or by several groups, of a :func:`weightlab.partition`."""


class MissingExtraError(WeightlabError, TypeError):
    """A transform needs a keyword extra (``key=``, ``grads=`` ...) that ``apply`` did not receive,
    or an extra lacks an entry for a leaf the transform selected (``stats=`` without that path)."""


class RegistryError(WeightlabError, ValueError):
    """A method name is unknown to a pillar's registry, or registered twice."""


class CheckpointError(WeightlabError, ValueError):
    """A checkpoint file is unreadable: truncated, corrupted or hostile header, bad offsets."""


class UnknownDTypeError(CheckpointError, TypeError):
    """A dtype with no safetensors name (or a safetensors dtype we cannot represent)."""


class CheckpointNotFoundError(WeightlabError, FileNotFoundError):
    """The checkpoint path (or a shard named by an index) does not exist."""


class OutputExistsError(WeightlabError, FileExistsError):
    """The output path exists and ``overwrite=True`` was not given."""


class DependencyMissingError(WeightlabError, ImportError):
    """An optional package (e.g. the real MiniLM weights) is not installed."""


class QuantizationError(WeightlabError, ValueError):
    """A leaf cannot be quantized as asked (bad bits/format, group size, non-float, NaN/Inf, ...)."""


class QuantizationParameterError(QuantizationError, TypeError):
    """A quantizer was given a hyper-parameter it does not have."""


class AlreadyQuantizedError(QuantizationError):
    """A quantizer was applied to a leaf that is already a QArray."""


class MergeError(WeightlabError, ValueError):
    """A merge cannot run as configured (unknown method/parameter, bad density, too few models ...)."""


class UsageError(WeightlabError, ValueError):
    """A command-line option or API argument that is meaningless (``--group-size 0``), of the wrong
    type (``--weights 1,abc``, ``key=0``) or that does not apply to the chosen method/format."""


class OutputPathError(WeightlabError, OSError):
    """The output location is unusable: its parent is missing or is a file, or it is not writable.
    Raised before any work is done."""


class LeafTypeError(WeightlabError, TypeError):
    """A leaf is not what the operation can hold (e.g. a Python object where an array must be
    stored); the message names the leaf's path."""


class SpecError(WeightlabError, ValueError):
    """A permutation spec does not fit the params (unknown or missing leaves, wrong axis sizes,
    inconsistent group sizes, a nested group without its parent)."""


class SymmetryError(SpecError):
    """Permuting the params by a spec changed the function's outputs: the spec claims a symmetry
    the model does not have. Names the leaf and axis found to break it."""

    def __init__(self, message: str, path: str | None = None, axis: int | None = None):
        self.path, self.axis = path, axis
        super().__init__(message)


class AlignError(WeightlabError, ValueError):
    """Bad input to an alignment method (models of different structure, bad permutations, options)."""


class ShardingError(ShapeMismatchError):
    """A sharding rule does not fit a leaf: a mesh axis that does not divide the dimension, an
    unknown mesh axis, a spec longer than the leaf's rank, or quantization groups (or packed code
    blocks) that straddle shard boundaries. Names the leaf's path and the mesh axis; raised before
    any array moves."""

    def __init__(self, path: str, message: str, *, axis=None, shape=None):
        self.path, self.axis, self.shape = path, axis, shape
        self.expected, self.found = message, str(shape)
        ValueError.__init__(self, f"'{path or '<root>'}': {message}")


class DistributedError(WeightlabError, RuntimeError):
    """A multi-process run is misconfigured (missing or malformed coordinator, process id outside
    [0, n), a process count the runtime does not confirm) or a coordinator did not answer in time."""


class LoptError(WeightlabError, ValueError):
    """Bad input to a learned optimizer or to meta-training (meta-weights of another architecture or
    version, a task family option, non-finite gradients under ``nonfinite="error"``)."""
