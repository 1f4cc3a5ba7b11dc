"""Where a script or notebook is running, so its sizes can follow the hardware.

Three tiers: ``"small"`` (``WEIGHTLAB_SMALL=1``: the test suite runs every notebook this way),
``"cpu"`` (a laptop or a CPU Colab runtime) and ``"accelerator"`` (a TPU or GPU backend). The
notebooks pick their model widths, step counts and meshes with :func:`pick`, so the same file is a
seconds-long test in CI, a minutes-long run on a laptop and a bigger run on a Colab TPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple, TypeVar

import jax

T = TypeVar("T")
TIERS = ("small", "cpu", "accelerator")


class Runtime(NamedTuple):
    """What :func:`runtime` found: the tier, JAX's backend and its device count and kind."""

    tier: str
    backend: str
    device_count: int
    device_kind: str

    def __str__(self) -> str:
        return f"{self.tier} run | backend {self.backend} | {self.device_count} x {self.device_kind}"


def tier() -> str:
    """``"small"`` when ``WEIGHTLAB_SMALL=1``, else ``"accelerator"`` on a TPU/GPU backend, else ``"cpu"``.

    An unknown ``WEIGHTLAB_SMALL`` value (anything but unset, ``""``, ``"0"`` or ``"1"``) is a
    ``ValueError``: a typo must not silently run the full-size job in CI."""
    small = os.environ.get("WEIGHTLAB_SMALL", "")
    if small not in ("", "0", "1"):
        raise ValueError(f"WEIGHTLAB_SMALL must be '1' (small run) or '0'/unset (sized by the backend), got {small!r}")
    if small == "1":
        return "small"
    return "accelerator" if jax.default_backend() in ("tpu", "gpu") else "cpu"


def runtime() -> Runtime:
    """The tier with the devices it was decided on (print it in a notebook's first cell)."""
    devs = jax.devices()
    return Runtime(tier(), jax.default_backend(), len(devs), devs[0].device_kind)


def pick(*, small: T, cpu: T, accelerator: T) -> T:
    """The value for the current :func:`tier`, e.g. ``steps = pick(small=50, cpu=1000, accelerator=5000)``.

    All three are required (keyword-only), so no notebook silently runs its CPU size on a TPU."""
    return {"small": small, "cpu": cpu, "accelerator": accelerator}[tier()]
