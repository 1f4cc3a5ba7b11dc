"""Host-side magnitude statistics for the streaming engine.

* :func:`tensor_thresholds`: per model, the ``int(density * numel)``-th largest ``|x_i - base|`` of
  one tensor (:func:`kth_largest`: a sample-bracketed selection, exact, in a reused scratch buffer):
  the cut-off that TIES-style trimming keeps (``|delta| >= threshold``).
* :class:`GlobalMagnitude`: the same cut-off over the *whole model* (the TIES paper's / FusionBench's
  global trimming) without holding the model: a statistics pass feeds every tensor's ``|delta|`` to
  a 65,536-bin histogram of the top 16 bits of its float32 bit pattern (monotonic for non-negative
  floats), which locates the bin holding the k-th largest value; a second pass histograms the low 16
  bits inside that bin, which gives the exact value. Two reads of the inputs, memory O(65536 x N).

Entries exactly at the cut-off are all kept (the in-memory top-k keeps the lower index among equal
magnitudes); zeros at the cut never change a merge because sign election drops them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kth_largest", "tensor_thresholds", "GlobalMagnitude"]


def _abs_delta(x, base, out):
    np.subtract(x, base, out=out)
    return np.abs(out, out=out)


def kth_largest(a: np.ndarray, k: int) -> np.float32:
    """Exact k-th largest of a 1-D float32 array (1 <= k <= a.size), reordering ``a`` in place.

    A strided 1% sample brackets the answer (+-3 sigma of the sample quantile); one counting pass and
    one extraction pass then leave a small set to ``np.partition``. ~4x faster than partitioning the
    whole array; if the bracket misses (adversarial data) it falls back to the full partition, so the
    result is always exact. Deterministic (no random sampling)."""
    n = a.size
    step = 97
    if n > 64 * step:
        smp = np.sort(a[::step])
        m = smp.size
        pos = (1 - k / n) * m
        lo = smp[max(int(pos - 3 * np.sqrt(m)) - 1, 0)]
        hi = smp[min(int(pos + 3 * np.sqrt(m)) + 1, m - 1)]
        above = int(np.count_nonzero(a > hi))
        need = k - above
        if 0 < need:
            mid = a[(a > lo) & (a <= hi)]
            if need <= mid.size:
                return np.partition(mid, mid.size - need)[mid.size - need]
    a.partition(n - k)
    return a[n - k]


def tensor_thresholds(block: np.ndarray, densities, scratch: np.ndarray) -> np.ndarray:
    """``block``: (1 + N, numel) float32, base first; returns (N,) float32 cut-offs."""
    k_all = block.shape[1]
    out = np.empty(block.shape[0] - 1, np.float32)
    for i, d in enumerate(densities):
        k = int(d * k_all)
        if d >= 1 or k >= k_all:
            out[i] = 0.0
            continue
        if k <= 0:
            out[i] = np.inf
            continue
        out[i] = kth_largest(_abs_delta(block[i + 1], block[0], scratch[:k_all]), k)
    return out


class GlobalMagnitude:
    """Two-pass exact global k-th largest |delta| per model (see module docstring)."""

    def __init__(self, densities):
        self.dens = np.asarray(densities, np.float64)
        n = len(self.dens)
        self.hi = np.zeros((n, 65536), np.int64)
        self.lo = np.zeros((n, 65536), np.int64)
        self.total = 0
        self.bin = None

    def _bits(self, block, i, scratch):
        a = _abs_delta(block[i + 1], block[0], scratch[:block.shape[1]])
        return a.view(np.uint32)

    def add_first(self, block, scratch):
        """Pass 1: histogram of the high 16 bits."""
        self.total += block.shape[1]
        for i in range(len(self.dens)):
            self.hi[i] += np.bincount(self._bits(block, i, scratch) >> 16, minlength=65536)

    def _targets(self):
        return np.maximum((self.dens * self.total).astype(np.int64), 1)

    def finish_first(self):
        """Locate, per model, the high-16 bin holding the k-th largest and how many lie above it."""
        k = self._targets()
        above = np.cumsum(self.hi[:, ::-1], axis=1)[:, ::-1]  # count with hi-bits >= b
        self.bin = np.array([int(np.nonzero(above[i] >= k[i])[0].max()) for i in range(len(k))])
        self.above = np.array([above[i, b + 1] if b + 1 < 65536 else 0 for i, b in enumerate(self.bin)])

    def add_second(self, block, scratch):
        """Pass 2: histogram of the low 16 bits inside each model's bin."""
        for i, b in enumerate(self.bin):
            bits = self._bits(block, i, scratch)
            sel = bits[(bits >> 16) == b]
            self.lo[i] += np.bincount(sel & 0xFFFF, minlength=65536)

    def thresholds(self) -> np.ndarray:
        """(N,) float32 cut-offs: keep ``|delta| >= threshold`` (density 1 -> 0)."""
        k = self._targets()
        out = np.empty(len(k), np.float32)
        for i in range(len(k)):
            if self.dens[i] >= 1:
                out[i] = 0.0
                continue
            need = k[i] - self.above[i]
            cum = np.cumsum(self.lo[i, ::-1])[::-1]
            lo = int(np.nonzero(cum >= need)[0].max())
            out[i] = np.array([(int(self.bin[i]) << 16) | lo], np.uint32).view(np.float32)[0]
        return out
