"""Known-good training recipes on MNIST-1D (used by the demo, tests and notebooks)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from ..data import load_mnist1d
from ..train import accuracy, fit
from .base import Model
from .mlp import mlp

__all__ = ["MNIST1D_MLP", "TrainedModel", "train_mnist1d"]

# Greydanus & Steinbach's MLP setting: two hidden layers of 100, Adam lr 1e-2, batch 100, 6000 steps
# (~2 s on 2 CPU cores). Test accuracy is 64-69% depending on the seed (paper: ~68%).
MNIST1D_MLP = dict(hidden=(100, 100), lr=1e-2, steps=6000, batch_size=100)


class TrainedModel(NamedTuple):
    model: Model
    params: Any
    train_acc: float
    test_acc: float
    losses: Any


def train_mnist1d(seed: int = 0, *, width: float = 1.0, hidden=MNIST1D_MLP["hidden"], lr: float = MNIST1D_MLP["lr"],
                  steps: int = MNIST1D_MLP["steps"], batch_size: int = MNIST1D_MLP["batch_size"],
                  make_model: Callable[[jax.Array], Model] | None = None, data: dict | None = None,
                  progress=None) -> TrainedModel:
    """Train an MLP (or ``make_model(key)``) on MNIST-1D from ``seed``; init and data order both
    derive from the seed."""
    data = data or load_mnist1d()
    key = jax.random.key(seed)
    model = make_model(key) if make_model else mlp(key, hidden=hidden, width=width)
    r = fit(model.apply_fn, model.params, data["x"], data["y"], key=jax.random.fold_in(key, 1), steps=steps,
            batch_size=batch_size, optimizer=optax.adam(lr), progress=progress)
    return TrainedModel(model, r.params, accuracy(model.apply_fn, r.params, data["x"], data["y"]),
                        accuracy(model.apply_fn, r.params, data["x_test"], data["y_test"]), r.losses)
