"""Linear interpolation between two models and the loss barrier along the segment joining them.

The barrier is the definition of Frankle et al., "Linear Mode Connectivity and the Lottery Ticket
Hypothesis" (ICML 2020) as used by Ainsworth et al., "Git Re-Basin: Merging Models modulo
Permutation Symmetries" (ICLR 2023): for ``θ(α) = (1-α) θ_A + α θ_B``,

    barrier = max_α  L(θ(α)) - [(1-α) L(θ_A) + α L(θ_B)]

(the height of the loss above the straight line joining the endpoint losses), and, for a metric
where higher is better (accuracy), ``max_α [(1-α) acc_A + α acc_B] - acc(θ(α))``. It is measured on
the ``n`` evenly spaced α of ``[0, 1]`` (a lower bound of the continuous maximum), so it is ≥ 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import AlignError

__all__ = ["interpolate", "loss_barrier", "Barrier"]


def _dequantized(x):
    return x.dequantize() if wtree.is_atomic(x) else x


def _is_int(x) -> bool:
    return wtree.is_array(x) and not jnp.issubdtype(x.dtype, jnp.inexact)


def _prepare(params_a, params_b):
    """Dequantize QArray leaves, check the structures (first differing path named) and that integer
    leaves agree. Returns the two flat leaf lists, the treedef and the paths."""
    a = jax.tree.map(_dequantized, params_a, is_leaf=wtree.is_atomic)
    b = jax.tree.map(_dequantized, params_b, is_leaf=wtree.is_atomic)
    wtree.check_compatible(a, b, dtypes=False, names=("params_a", "params_b"))
    pa, treedef = wtree.flatten_with_paths(a)
    pb, _ = wtree.flatten_with_paths(b)
    for (p, x), (_, y) in zip(pa, pb):
        if not wtree.is_array(x):
            raise AlignError(f"leaf '{p}' is a {type(x).__name__}, not an array: cannot interpolate it")
        if _is_int(x) or _is_int(y):
            if np.dtype(x.dtype) != np.dtype(y.dtype):
                raise AlignError(f"integer leaf '{p}' has dtype {x.dtype} in params_a but {y.dtype} in params_b")
            if not isinstance(x, jax.core.Tracer) and not isinstance(y, jax.core.Tracer) \
                    and not np.array_equal(np.asarray(x), np.asarray(y)):
                raise AlignError(f"integer leaf '{p}' differs between params_a and params_b: integer leaves "
                                 "are not interpolated and must be equal")
    return [x for _, x in pa], [y for _, y in pb], treedef, [p for p, _ in pa]


def _mix(la, lb, alpha):
    out = []
    for x, y in zip(la, lb):
        if _is_int(x):
            out.append(x)
            continue
        dt = jnp.promote_types(x.dtype, y.dtype)
        xf, yf = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        out.append(((1.0 - alpha) * xf + alpha * yf).astype(dt))
    return out


_mix_jit = jax.jit(_mix)


def _check_alpha(alpha) -> None:
    if isinstance(alpha, jax.core.Tracer):
        return
    try:
        ok = math.isfinite(float(alpha))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AlignError(f"alpha must be a finite number, got {alpha!r}")


def interpolate(params_a, params_b, alpha):
    """``(1-alpha)·params_a + alpha·params_b`` leaf by leaf (computed in float32, returned in the
    promoted float dtype of the two leaves). QArray leaves are dequantized first; integer leaves
    (step counters, token ids) are not interpolated and must be equal in both trees, or an
    :class:`~weightlab.errors.AlignError` names the path. The structures are checked before any
    work (a :class:`~weightlab.errors.StructureMismatchError` names the first differing path).
    ``alpha`` outside ``[0, 1]`` extrapolates."""
    _check_alpha(alpha)
    la, lb, treedef, _ = _prepare(params_a, params_b)
    return treedef.unflatten(_mix_jit(la, lb, jnp.float32(alpha)))


def _higher(name: str, higher_is_better) -> bool:
    subs = (higher_is_better,) if isinstance(higher_is_better, str) else tuple(higher_is_better or ())
    return any(s.lower() in name.lower() for s in subs)


class Barrier(NamedTuple):
    """Result of :func:`loss_barrier`: ``values[name]`` at each of ``alphas``; ``barrier[name]`` the
    largest deviation (in the bad direction) from the straight line between the endpoint values;
    ``midpoint[name]`` the value at α = 0.5; ``higher`` the metrics read as higher-is-better."""

    alphas: np.ndarray
    values: dict
    barrier: dict
    midpoint: dict
    higher: tuple = ()

    def plot(self, path=None, title: str | None = None):
        """One subplot per metric kind (the name's last ``_`` token: ``train_loss`` and ``test_loss``
        share the ``loss`` panel), each curve with its endpoint line dashed. Saves a PNG to ``path``
        when given; returns the matplotlib ``Figure`` (Agg canvas, no pyplot, never shown)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        kinds: dict[str, list[str]] = {}
        for name in self.values:
            kinds.setdefault(name.rsplit("_", 1)[-1], []).append(name)
        fig = Figure(figsize=(4.2 * len(kinds), 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        a = self.alphas
        for ax, (kind, names) in zip(axes, kinds.items()):
            for name in names:
                v = self.values[name]
                line, = ax.plot(a, v, marker="o", ms=3, label=f"{name} (barrier {self.barrier[name]:.4g})")
                ax.plot(a, (1 - a) * v[0] + a * v[-1], ls="--", lw=0.8, color=line.get_color())
            ax.set_xlabel("α  (0 = A, 1 = B)")
            ax.set_ylabel(kind)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path, format="png", dpi=110)
        return fig

    def table(self) -> str:
        """A Markdown table: each metric at A (α=0), the midpoint, B (α=1), and its barrier."""
        rows = ["| metric | α=0 (A) | α=0.5 | α=1 (B) | barrier |", "|---|---:|---:|---:|---:|"]
        for name, v in self.values.items():
            arrow = " ↑" if name in self.higher else ""
            rows.append(f"| {name}{arrow} | {v[0]:.4g} | {self.midpoint[name]:.4g} | {v[-1]:.4g} | "
                        f"{self.barrier[name]:.4g} |")
        return "\n".join(rows) + "\n"


def _as_metrics(out) -> dict[str, Any]:
    if isinstance(out, dict):
        if not out:
            raise AlignError("loss_fn returned an empty dict")
        metrics = {str(k): v for k, v in out.items()}
    else:
        metrics = {"loss": out}
    for k, v in metrics.items():
        if np.ndim(v) != 0:
            raise AlignError(f"loss_fn's metric '{k}' has shape {np.shape(v)}; every metric must be a scalar")
    return metrics


def loss_barrier(loss_fn: Callable[[Any], Any], params_a, params_b, n: int = 11, *,
                 higher_is_better: Sequence[str] | str = ("acc",),
                 fix: Callable[[Any, float], Any] | None = None) -> Barrier:
    """Evaluate ``loss_fn(θ(α))`` (a scalar, named ``"loss"``, or a dict of scalars) at ``n`` evenly
    spaced ``α ∈ [0, 1]`` of the linear path ``θ(α) = (1-α)·params_a + α·params_b`` (see
    :func:`interpolate`; Frankle et al. 2020, Ainsworth et al. 2023) and return a :class:`Barrier`.

    A metric is higher-is-better when its name contains (case-insensitively) one of the
    ``higher_is_better`` substrings; its barrier is then the largest drop below the endpoint line.
    ``loss_fn`` and the interpolation are jit-compiled together once (α is a traced scalar); if
    ``loss_fn`` cannot be traced it is called eagerly. When 0.5 is not among the ``n`` alphas (even
    ``n``) the midpoint is one extra evaluation. ``fix(params, alpha) -> params`` is applied to each
    interpolated model before ``loss_fn`` (eagerly), e.g. REPAIR at every point of the path:
    ``fix=lambda p, t: align.repair(apply_fn, p, (a, b), batches, alpha=t)``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise AlignError(f"n must be an integer >= 2 (the two endpoints at least), got {n!r}")
    if not callable(loss_fn):
        raise AlignError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    la, lb, treedef, _ = _prepare(params_a, params_b)

    if fix is not None and not callable(fix):
        raise AlignError(f"fix must be callable (params, alpha) -> params, got {type(fix).__name__}")

    def at(alpha):
        p = treedef.unflatten(_mix(la, lb, alpha))
        return loss_fn(p if fix is None else fix(p, float(alpha)))

    jitted = jax.jit(at) if fix is None else None

    def evaluate(alpha):
        nonlocal jitted
        if jitted is not None:
            try:
                return _as_metrics(jitted(jnp.float32(alpha)))
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                    jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
                jitted = None
        return _as_metrics(at(float(alpha)))

    alphas = np.linspace(0.0, 1.0, int(n))
    rows = [evaluate(a) for a in alphas]
    names = list(rows[0])
    for r in rows[1:]:
        if list(r) != names:
            raise AlignError(f"loss_fn returned metrics {sorted(r)} at one alpha but {sorted(names)} at another")
    values = {k: np.array([float(r[k]) for r in rows], dtype=np.float64) for k in names}
    mid_i = np.flatnonzero(np.isclose(alphas, 0.5))
    mid_row = rows[int(mid_i[0])] if mid_i.size else evaluate(0.5)
    higher = tuple(k for k in names if _higher(k, higher_is_better))
    barrier, midpoint = {}, {}
    for k, v in values.items():
        line = (1.0 - alphas) * v[0] + alphas * v[-1]
        gap = (line - v) if k in higher else (v - line)
        barrier[k] = float(np.max(gap))
        midpoint[k] = float(mid_row[k])
    return Barrier(alphas, values, barrier, midpoint, higher)
