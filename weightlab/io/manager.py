"""Step checkpoints for long jobs: a thin :class:`CheckpointManager` over orbax's.

``orbax.checkpoint.CheckpointManager`` does the work: one directory per step, written to a
temporary directory and renamed when complete (so a job killed mid-save leaves no step that looks
finished, and the next start removes the leftovers), background (async) writes, ``max_to_keep``
and ``save_interval_steps``. This adds weightlab's rules: a small JSON layout saved beside each
step (every leaf's weightlab path, shape and dtype, and the JSON spec of each atomic node such as
a QArray), against which a restore target is checked *before* anything is read, with typed errors
naming the path; restores without a target come back keyed by weightlab paths, not orbax's.

Atomic nodes (``QArray``) keep their static metadata (format, group size, original shape) in the
pytree structure, not in arrays, so they come back as QArrays when ``restore(like=...)`` gets a
tree with the same nodes — the trained params, or an abstract one from ``jax.eval_shape``. The
saved spec is compared with the target's, so codes are never restored under another format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .. import tree as wtree
from ..errors import (CheckpointError, CheckpointNotFoundError, DTypeMismatchError, LeafTypeError, ShapeMismatchError,
                      StructureMismatchError, UsageError)
from .orbax import _ocp, abstract_like

__all__ = ["CheckpointManager"]

_TREE, _LAYOUT = "tree", "layout"
_LAYOUT_VERSION = "weightlab.layout/1"
_FINAL = "_CHECKPOINT_METADATA"  # orbax writes it into a step before the step is renamed into place


def _layout(tree: Any) -> dict:
    """Paths, shapes and dtypes of the leaves, orbax's key of each leaf, and the atomic nodes' specs."""
    pairs, _ = wtree.flatten_with_paths(tree)
    bad = [p for p, x in pairs if not (wtree.is_array(x) or isinstance(x, (int, float, bool, np.number)))]
    if bad:
        leaf = dict(pairs)[bad[0]]
        raise LeafTypeError(f"'{bad[0]}': a checkpoint holds arrays and numbers, found {type(leaf).__name__}")
    keys = [p for p, x in pairs if str(getattr(x, "dtype", "")).startswith("key<")]
    if keys:
        raise LeafTypeError(f"'{keys[0]}': a PRNG key array; save jax.random.key_data(...) of it, or leave RNG "
                            "state out (e.g. nnx.state(model, nnx.Param))")
    raw = [wtree.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    atomic = {p: x.spec() for p, x in wtree.flatten_with_paths(tree, is_leaf=wtree.is_atomic)[0]
              if wtree.is_atomic(x) and callable(getattr(x, "spec", None))}
    return {"version": _LAYOUT_VERSION, "paths": [p for p, _ in pairs], "raw": raw,
            "shapes": [list(np.shape(x)) for _, x in pairs], "dtypes": [_dtype_name(x) for _, x in pairs],
            "atomic": atomic}


def _dtype_name(x) -> str:
    return str(np.dtype(x.dtype)) if wtree.is_array(x) else str(np.asarray(x).dtype)


def _check_like(layout: dict, like: Any, where: str) -> None:
    """``like`` must have the saved leaves (paths, shapes, dtypes) and atomic specs."""
    got = _layout(like)
    saved = dict(zip(layout["paths"], zip(layout["shapes"], layout["dtypes"])))
    for p in got["paths"]:
        if p not in saved:
            raise StructureMismatchError(p, f"no such leaf (none saved in {where})", "a leaf in like=")
    want = dict(zip(got["paths"], zip(got["shapes"], got["dtypes"])))
    for p, (shape, dtype) in saved.items():
        if p not in want:
            raise StructureMismatchError(p, f"a leaf (saved in {where})", "missing from like=")
        if list(want[p][0]) != list(shape):
            raise ShapeMismatchError(p, shape, want[p][0])
        if want[p][1] != dtype:
            raise DTypeMismatchError(p, dtype, want[p][1])
    for p, spec in layout.get("atomic", {}).items():
        mine = got["atomic"].get(p)
        if mine is not None and mine != spec:
            keys = [k for k in sorted(set(spec) | set(mine)) if spec.get(k) != mine.get(k)]
            raise StructureMismatchError(p, "the saved " + ", ".join(f"{k} {_brief(spec.get(k))}" for k in keys),
                                         ", ".join(f"{k} {_brief(mine.get(k))}" for k in keys) + " in like=")


def _brief(v) -> str:
    """A spec value for a message: a format by its name."""
    return str(v["name"]) if isinstance(v, dict) and "name" in v else json.dumps(v)[:80]


def _positive(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise UsageError(f"CheckpointManager: {name} must be an integer >= 1{' or None' if allow_none else ''}, "
                         f"got {v!r}")


class CheckpointManager:
    """Numbered checkpoints of any pytree (params, optimizer state, QArrays) in ``directory``.

    ``max_to_keep``: keep only the newest N steps (None keeps all); ``save_interval_steps``:
    :meth:`save` writes only steps that are a multiple of it (others return False) unless
    ``force=True``; ``async_``: writes continue in the background after :meth:`save` returns
    (the arrays are copied off the device first), :meth:`wait` blocks until they are done.
    Use as a context manager, or call :meth:`close`, so that pending writes finish.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
                 async_: bool = True):
        _positive("max_to_keep", max_to_keep, allow_none=True)
        _positive("save_interval_steps", save_interval_steps)
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"CheckpointManager: {self.directory} is a file, not a directory")
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=int(save_interval_steps),
                                               enable_async_checkpointing=bool(async_), create=True,
                                               cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=(_TREE, _LAYOUT))

    # --- steps
    def all_steps(self) -> list[int]:
        """The complete steps on disk, ascending. A step still being written is not among them, nor
        a step directory without orbax's step metadata (e.g. an interrupted copy of one)."""
        return sorted(int(s) for s in self._mgr.all_steps() if (self.directory / str(s) / _FINAL).is_file())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` would write ``step`` (the interval, and not already saved)."""
        return bool(self._mgr.should_save(int(step)))

    # --- save / restore
    def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
        """Save ``tree`` as ``step``; returns whether it was written (see ``save_interval_steps``).

        Every leaf must be an array or a number (:class:`LeafTypeError` naming the path otherwise),
        checked before anything is written; saving a step that exists is a :class:`UsageError`.
        """
        self._open("save")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise UsageError(f"CheckpointManager.save: step must be an integer >= 0, got {step!r}")
        step = int(step)
        layout = _layout(tree)
        if step in self.all_steps():
            raise UsageError(f"{self.directory}: step {step} is already saved")
        ocp = _ocp()
        args = ocp.args.Composite(**{_TREE: ocp.args.StandardSave(tree), _LAYOUT: ocp.args.JsonSave(layout)})
        return bool(self._mgr.save(step, args=args, force=force))

    def layout(self, step: int | None = None) -> dict:
        """The JSON layout saved with ``step`` (default: the latest): ``paths``, ``shapes``,
        ``dtypes`` and the ``atomic`` nodes' specs."""
        step = self._step(step)
        ocp = _ocp()
        out = self._mgr.restore(step, args=ocp.args.Composite(**{_LAYOUT: ocp.args.JsonRestore()}))[_LAYOUT]
        if not isinstance(out, dict) or out.get("version") != _LAYOUT_VERSION:
            raise CheckpointError(f"{self.directory}: step {step} has no weightlab layout (not written by "
                                  "weightlab.io.CheckpointManager)")
        return out

    def restore(self, step: int | None = None, *, like: Any = None) -> Any:
        """The tree saved as ``step`` (default: the latest complete step).

        With ``like`` (arrays or ``jax.ShapeDtypeStruct``, possibly sharded; QArrays, optimizer
        states, ``nnx.State``) the result has ``like``'s exact structure and shardings; ``like`` is
        checked against the saved layout first (paths, shapes, dtypes, QArray specs) with typed
        errors naming the path. Without ``like``: nested dicts keyed by the weightlab path
        components (a QArray comes back as its components ``codes``, ``scale`` ...).
        """
        step = self._step(step)
        layout = self.layout(step)
        ocp = _ocp()
        if like is not None:
            _check_like(layout, like, f"step {step}")
            target = ocp.args.StandardRestore(abstract_like(like))
            return self._mgr.restore(step, args=ocp.args.Composite(**{_TREE: target}))[_TREE]
        raw = self._mgr.restore(step, args=ocp.args.Composite(**{_TREE: ocp.args.StandardRestore()}))[_TREE]
        names = dict(zip(layout["raw"], layout["paths"]))
        flat = {names.get(wtree.keystr(kp), wtree.keystr(kp)): x
                for kp, x in jax.tree_util.tree_flatten_with_path(raw)[0]}
        return wtree.from_flat_dict(flat)

    def _open(self, what: str) -> None:
        if getattr(self, "_closed", False):
            raise UsageError(f"CheckpointManager({str(self.directory)!r}) is closed; {what} needs an open manager")

    def _step(self, step: int | None) -> int:
        self._open("restore")
        self._mgr.wait_until_finished()  # a step whose background write is pending becomes complete first
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(f"{self.directory}: no complete checkpoint step")
            return steps[-1]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in steps:
            raise CheckpointNotFoundError(f"{self.directory}: no complete step {step!r} (complete steps: {steps})")
        return int(step)

    # --- lifetime
    def wait(self) -> None:
        """Block until every background write has finished (and raise its error, if any)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release orbax's resources (a second call does nothing; save and
        restore afterwards are usage errors)."""
        if getattr(self, "_closed", False):
            return
        self._mgr.wait_until_finished()
        self._mgr.close()
        self._closed = True

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, steps={self.all_steps()})"
