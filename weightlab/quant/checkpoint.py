"""A read-only view of a quantized safetensors checkpoint (written by :func:`weightlab.quant.save` or
``weightlab quantize``) that serves every QArray as its dequantized float tensor, one tensor at a
time, with the :class:`weightlab.io.Checkpoint` interface the streaming merge engine reads through.
So ``weightlab merge`` accepts quantized models as inputs without ever materialising them whole.
"""

from __future__ import annotations

import numpy as np

from ..io.safetensors import Checkpoint, CheckpointView, qarray_specs

__all__ = ["DequantizedCheckpoint"]


class DequantizedCheckpoint(CheckpointView):
    """Logical tensors of a quantized checkpoint: QArray components (``name/codes``, ``name/scale``
    ...) are hidden behind ``name``, whose shape and dtype are the original ones."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self._specs = qarray_specs(self.metadata)
        hidden = {f"{p}/{n}" for p, s in self._specs.items() for n in s["children"]}
        self._names = [n for n in ckpt.keys() if n not in hidden] + list(self._specs)
        self._plain = set(self._names) - set(self._specs)

    def keys(self):
        return list(self._names)

    def __contains__(self, name):
        return name in self._specs or name in self._plain

    def shape(self, name):
        return tuple(self._specs[name]["shape"]) if name in self._specs else self._base.shape(name)

    def dtype(self, name):
        if name in self._specs:
            from .qarray import _dtype

            return np.dtype(_dtype(self._specs[name]["dtype"]))
        return self._base.dtype(name)

    def _compute(self, name):
        if name not in self._specs:
            return None
        from .qarray import QArray

        spec = self._specs[name]
        q = QArray.from_spec(spec, {n: self._base.get(f"{name}/{n}") for n in spec["children"]})
        return np.asarray(q.dequantize())
