"""Embedded data: MNIST-1D (generated locally) and scikit-learn digits (optional)."""

from .digits import load_digits
from .mnist1d import load_mnist1d

__all__ = ["load_mnist1d", "load_digits"]
