"""Evaluation helpers shared by the pillars: loss/accuracy of a params pytree, linear
interpolation between two models and the loss barrier along it.

Barrier as in Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (2020)
and Entezari et al. (2022): ``max_a [L((1-a)·θ_A + a·θ_B) - ((1-a)·L(θ_A) + a·L(θ_B))]``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from . import tree as wtree
from .train import evaluate

__all__ = ["evaluate", "lerp", "InterpolationCurve", "interpolation_curve"]


def lerp(a, b, alpha: float):
    """``(1 - alpha) * a + alpha * b`` on every array leaf (structures must match)."""
    wtree.check_compatible(a, b, names=("model_a", "model_b"))
    return jax.tree.map(lambda u, v: (1 - alpha) * u + alpha * v if wtree.is_array(u) else u, a, b)


class InterpolationCurve(NamedTuple):
    alphas: np.ndarray
    losses: np.ndarray
    accs: np.ndarray

    @property
    def loss_barrier(self) -> float:
        """Max excess loss over the straight line between the endpoints' losses."""
        line = (1 - self.alphas) * self.losses[0] + self.alphas * self.losses[-1]
        return float(np.max(self.losses - line))

    @property
    def acc_barrier(self) -> float:
        """Max accuracy drop below the straight line between the endpoints' accuracies."""
        line = (1 - self.alphas) * self.accs[0] + self.alphas * self.accs[-1]
        return float(np.max(line - self.accs))


def interpolation_curve(apply_fn: Callable, a, b, x, y, alphas: Sequence[float] | int = 11) -> InterpolationCurve:
    """Loss and accuracy of ``lerp(a, b, alpha)`` for each alpha (default 11 points in [0, 1])."""
    alphas = np.linspace(0, 1, alphas) if isinstance(alphas, int) else np.asarray(alphas, float)
    res = [evaluate(apply_fn, lerp(a, b, float(al)), x, y) for al in alphas]
    return InterpolationCurve(alphas, np.array([r[0] for r in res]), np.array([r[1] for r in res]))
