"""A read-only checkpoint over a directory in another library's quantized layout, so tools that read
weightlab checkpoints tensor by tensor (``weightlab eval``) read exported models too.

:class:`ImportedCheckpoint` imports the directory once (:func:`weightlab.interop.import_checkpoint`)
and serves two faces with the :class:`weightlab.io.Checkpoint` interface (``keys``, ``shape``,
``dtype``, ``get``, ``shard_of``, ``metadata``, ``close``):

* the object itself: the *stored* view, each QArray as its children ``<name>/codes``,
  ``<name>/scale`` ... (weightlab's representation of the same codes, for byte accounting);
* :attr:`logical`: each QArray dequantized on read under its HF name, plain tensors as they are.

Memory: the imported codes and scales (about the file's size); one dequantized tensor at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ImportedCheckpoint", "is_exported"]


def is_exported(path) -> bool:
    """Whether ``path`` is a directory whose config.json carries another library's
    ``quantization_config`` (gptq, compressed-tensors, bitsandbytes)."""
    from . import detect_format
    from ..errors import WeightlabError

    p = Path(path)
    if not (p.is_dir() and ((p / "config.json").is_file() or (p / "quantize_config.json").is_file())):
        return False
    try:
        detect_format(p)
    except WeightlabError:
        return False
    return True


class _Logical:
    def __init__(self, owner: "ImportedCheckpoint"):
        self._o = owner

    def keys(self):
        return list(self._o.flat)

    def __contains__(self, name):
        return name in self._o.flat

    def shape(self, name):
        return tuple(np.shape(self._o.flat[name]))

    def dtype(self, name):
        return np.dtype(self._o.flat[name].dtype)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        from ..quant.qarray import is_qarray

        x = self._o.flat[name]
        return np.asarray(x.dequantize()) if is_qarray(x) else (np.array(x) if copy else np.asarray(x))

    def close(self) -> None:
        pass


class ImportedCheckpoint:
    """See the module docstring. ``specs``: ``{name: QArray.spec()}`` of the imported QArrays."""

    def __init__(self, path):
        from . import detect_format, import_checkpoint
        from ..quant.qarray import is_qarray

        self.path = Path(path)
        self.format = detect_format(self.path)
        self.flat, self.config = import_checkpoint(self.path)
        self.metadata: dict[str, str] = {}
        self.specs = {n: q.spec() for n, q in self.flat.items() if is_qarray(q)}
        self._stored = {}
        for n, x in self.flat.items():
            if is_qarray(x):
                self._stored.update({f"{n}/{c}": getattr(x, c) for c in self.specs[n]["children"]})
            else:
                self._stored[n] = x
        self.logical = _Logical(self)

    def keys(self):
        return list(self._stored)

    def __contains__(self, name):
        return name in self._stored

    def shape(self, name):
        return tuple(np.shape(self._stored[name]))

    def dtype(self, name):
        return np.dtype(self._stored[name].dtype)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        return np.array(self._stored[name]) if copy else np.asarray(self._stored[name])

    def shard_of(self, name: str) -> str:
        return "model.safetensors"

    def close(self) -> None:
        pass
