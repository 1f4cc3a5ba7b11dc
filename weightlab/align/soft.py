"""Learned (soft) permutation matching: Sinkhorn re-basin and the straight-through estimator.

* :func:`sinkhorn` — log-domain Sinkhorn normalisation (Sinkhorn 1964; Mena et al. 2018,
  "Gumbel-Sinkhorn"): ``P = exp(X_T)`` with ``X_0 = S / tau`` and, per iteration, rows then
  columns normalised in log space, ``X <- X - logsumexp_row(X)``, ``X <- X - logsumexp_col(X)``.
  As ``T -> inf`` P is the doubly-stochastic matrix closest to ``exp(S / tau)`` (entropic OT), and
  as ``tau -> 0`` it tends to the maximising permutation.
* :func:`soft_permute` — a doubly-stochastic relaxation of :func:`~weightlab.align.spec.permute`.
* :func:`sinkhorn_matching` — Peña, Medina, Tuytelaars & Bernardino, "Re-basin via implicit
  Sinkhorn differentiation" (CVPR 2023): learn a score matrix per group, ``P = sinkhorn(S / tau)``,
  minimise ``||A - P(B)||^2`` (no data) or a task loss at the midpoint ``(A + P(B)) / 2``; project
  each ``P`` to a permutation with one linear assignment at the end.
* :func:`ste_matching` — Ainsworth, Hayase & Srinivasa, "Git Re-Basin" (ICLR 2023), Algorithm 3:
  straight-through estimation through weight matching.

Deliberate differences from Peña et al.: their published code back-propagates through Sinkhorn
*implicitly* (Eisenberger et al. 2022), solving the KKT linear system of the entropic transport
problem at the fixed point. The doubly-stochastic constraints are redundant by one (all row sums
and all column sums both add up to ``n``), so that KKT matrix is rank-deficient by one; a plain
solve is singular, and ill-conditioned in float32 near it, especially at small ``tau`` and for
scores with ties. Here the backward pass *unrolls* the ``n_iters`` log-domain iterations (a
``fori_loop``, i.e. a scan): every step is a logsumexp, whose derivative is a softmax, so gradients
stay finite for any ``tau > 0`` and any ties, at ``O(n_iters)`` memory. The scores are initialised
peaked at weight matching's permutations (not at random), and the L2 loss is divided by
``||A||^2 + ||B||^2`` (Adam is scale-invariant; the history is then comparable across models).
Nested groups (dimensions within attention heads) are not relaxed: their weight-matching
permutations are fixed in B's own head order (so they follow each head wherever the learned head
permutation sends it) and composed with the result.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import AlignError
from . import lap
from .matching import Perms, flat_params, objective, permute_flat, weight_matching
from .registry import align_method
from .spec import Spec, axis_index, check_perms, compose, identity_perms, invert

__all__ = ["sinkhorn", "soft_permute", "sinkhorn_matching", "ste_matching"]


def _int_at_least(v, lo: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise AlignError(f"{what} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _positive(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) or v <= 0:
        raise AlignError(f"{what} must be a finite number > 0, got {v!r}")
    return float(v)


def sinkhorn(log_scores, n_iters: int = 20, tau: float = 1.0) -> jax.Array:
    """``exp(X)`` after ``n_iters`` log-domain row/column normalisations of ``X = log_scores / tau``.

    ``log_scores``: (..., n, n), batched over leading dims. Each iteration normalises rows then
    columns (so columns sum to 1 exactly and rows to within the convergence error). Differentiable
    by unrolling the iterations (see the module docstring: no linear solve, hence no singular KKT
    system). ``tau`` may be a traced value; a concrete one must be > 0.
    """
    n_iters = _int_at_least(n_iters, 1, "sinkhorn: n_iters")
    if not isinstance(tau, jax.core.Tracer):
        _positive(tau, "sinkhorn: tau")
    x = jnp.asarray(log_scores)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise AlignError(f"sinkhorn: log_scores must be (..., n, n), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)

    def body(_, x):
        x = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
        return x - jax.nn.logsumexp(x, axis=-2, keepdims=True)

    return jnp.exp(jax.lax.fori_loop(0, n_iters, body, x / tau))


def _soft_flat(spec: Spec, soft: Mapping[str, jax.Array], flat: Mapping[str, jax.Array], hard=None) -> dict:
    """``flat`` leaves with every ``soft`` group's factor contracted (new_i = sum_j P[i, j] old_j),
    then the ``hard`` permutations gathered."""
    out = {}
    for p, x in flat.items():
        for a, fs in enumerate(spec.axes[p]):
            if any(f in soft for f in fs):
                sizes = [f if isinstance(f, int) else spec.groups[f].size for f in fs]
                y = x.reshape(x.shape[:a] + tuple(sizes) + x.shape[a + 1:])
                for k, f in enumerate(fs):
                    if f in soft:
                        y = jnp.moveaxis(jnp.moveaxis(y, a + k, -1) @ soft[f].T.astype(y.dtype), -1, a + k)
                x = y.reshape(x.shape)
            if hard:
                idx = axis_index(spec, fs, hard, x.shape[a])
                if idx is not None:
                    x = jnp.take(x, idx, axis=a)
        out[p] = x
    return out


def _check_soft(spec: Spec, soft, hard) -> None:
    if not isinstance(soft, Mapping):
        raise AlignError(f"soft_permute: soft is a dict {{group: (n, n) matrix}}, got {type(soft).__name__}")
    for g, m in soft.items():
        if g not in spec.groups:
            raise AlignError(f"soft_permute: unknown group '{g}'; the spec's groups: {sorted(spec.groups)}")
        if spec.groups[g].parent is not None:
            raise AlignError(f"soft_permute: group '{g}' is nested under '{spec.groups[g].parent}'; nested groups "
                             "take hard permutations (hard=)")
        n = spec.groups[g].size
        if tuple(np.shape(m)) != (n, n):
            raise AlignError(f"soft_permute: group '{g}' needs a ({n}, {n}) matrix, got {tuple(np.shape(m))}")
    check_perms(spec, hard or {})
    both = sorted(set(soft) & set(hard or {}))
    if both:
        raise AlignError(f"soft_permute: group(s) {both} given both a soft and a hard permutation")


def soft_permute(spec: Spec, soft: Mapping[str, Any], params: Any, *, hard: Mapping[str, Any] | None = None) -> Any:
    """``params`` with each axis factor labelled by a group in ``soft`` mixed by its matrix ``P``.

    ``soft``: ``{group: P (n, n)}`` for top-level groups; new unit ``i`` is ``sum_j P[i, j]`` old
    unit ``j`` (the axis is reshaped into its factors and the group's factor contracted), so the
    one-hot ``P[i, perm[i]] = 1`` reproduces :func:`permute` with ``perm``. ``hard``: ordinary
    permutations (spec convention) for any other groups, applied after the soft mixing; this is how
    nested groups (dims within heads, indexed by the parent's *new* position) are given — a nested
    group cannot be relaxed, since its per-head permutations only make sense once heads are hard.
    Leaves no group in ``soft``/``hard`` touches are returned as they are; touched leaves come
    back float32 (QArrays dequantized). Differentiable in ``soft``; works under ``jit``.
    """
    _check_soft(spec, soft, hard)
    pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
    flat = flat_params(spec, params, "params")
    moved = _soft_flat(spec, soft, {p: x for p, x in flat.items()
                                    if any(f in soft or f in (hard or {}) for f in spec.leaves_of(p))}, hard)
    return treedef.unflatten([moved.get(p, x) for p, x in pairs])


# --- shared input handling --------------------------------------------------------------------

def _pair(spec: Spec, params_a, params_b):
    """Both models' leaves (checked against the spec and each other): (treedef, leaves_a, leaves_b,
    flat_a, flat_b); leaves by path, QArrays dequantized."""
    fa, fb = flat_params(spec, params_a, "params_a"), flat_params(spec, params_b, "params_b")
    pa, ta = wtree.flatten_with_paths(params_a, is_leaf=wtree.is_atomic)
    pb, tb = wtree.flatten_with_paths(params_b, is_leaf=wtree.is_atomic)
    if ta != tb:
        raise AlignError(f"params_a and params_b differ in structure: {ta} vs {tb}")
    dense = lambda x: x.dequantize() if wtree.is_atomic(x) else jnp.asarray(x)  # noqa: E731
    la, lb = {}, {}
    for (p, a), (_, b) in zip(pa, pb):
        a, b = dense(a), dense(b)
        if a.shape != b.shape:
            raise AlignError(f"'{p}': params_a has shape {a.shape}, params_b {b.shape}")
        la[p], lb[p] = a, b
    return ta, la, lb, fa, fb


def _midpoint(treedef, leaves_a, leaves_b, moved_b: Mapping[str, jax.Array]):
    """The tree ``(A + B') / 2`` with ``B'`` = ``moved_b`` where given (non-float leaves: A's)."""
    out = []
    for p, a in leaves_a.items():
        b = moved_b.get(p, leaves_b[p])
        out.append(0.5 * (a + b.astype(a.dtype)) if jnp.issubdtype(a.dtype, jnp.floating) else a)
    return treedef.unflatten(out)


def _check_loss(loss_fn, batches, treedef, leaves_a, leaves_b, what: str):
    """Validate ``loss_fn``/``batches`` (callable, non-empty, scalar loss) and return an endless
    batch iterator (sequences and iterables both cycled)."""
    if not callable(loss_fn):
        raise AlignError(f"{what}: loss_fn must be callable (params, batch) -> scalar, got {type(loss_fn).__name__}")
    if batches is None or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise AlignError(f"{what}: batches must be a sequence or iterable of batches, got {type(batches).__name__}")
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise AlignError(f"{what}: batches is empty") from None
    try:
        out = jax.eval_shape(loss_fn, _midpoint(treedef, leaves_a, leaves_b, {}), first)
    except Exception as e:  # noqa: BLE001 — report the user's function failing, typed
        raise AlignError(f"{what}: loss_fn(params, batch) failed on the first batch: {type(e).__name__}: {e}") from e
    if getattr(out, "shape", None) != ():
        raise AlignError(f"{what}: loss_fn must return a scalar, got {getattr(out, 'shape', type(out).__name__)}")
    return itertools.cycle(itertools.chain([first], it))


def _check_common(solver, steps, lr, key, what: str):
    if solver not in lap.SOLVERS:
        raise AlignError(f"{what}: unknown solver {solver!r}; choose one of {lap.SOLVERS}")
    steps = _int_at_least(steps, 1, f"{what}: steps")
    lr = _positive(lr, f"{what}: lr")
    key = jax.random.key(0) if key is None else key
    wtree.check_key(key)
    return steps, lr, key


def _result(perms, spec, fa, fb, history) -> Perms:
    out = Perms({n: jnp.asarray(v, jnp.int32) for n, v in perms.items()})
    out.objective, out.history = objective(spec, out, fa, fb), tuple(history)
    return out


# --- Sinkhorn re-basin -----------------------------------------------------------------------

@align_method("sinkhorn_matching", data="optional-loss", paper="Pena et al. 2023 (Re-basin via implicit Sinkhorn differentiation)")
def sinkhorn_matching(spec: Spec, params_a: Any, params_b: Any, *, loss_fn: Callable | None = None,
                      batches: Iterable | None = None, key: jax.Array | None = None, steps: int = 200,
                      lr: float = 0.1, tau: float = 1.0, n_iters: int = 20, init: str = "weight_matching",
                      solver: str = "scipy") -> Perms:
    """Permutations of ``params_b`` learned through Sinkhorn relaxations (Peña et al., CVPR 2023).

    For each top-level group a score matrix ``S`` is learned; ``P = sinkhorn(S, n_iters, tau)``.
    Without ``loss_fn``: minimise ``sum_leaves ||A - P(B)||^2 / (||A||^2 + ||B||^2)`` over the
    leaves the spec moves (data-free). With ``loss_fn(params, batch) -> scalar`` and ``batches``
    (cycled over the steps): minimise the loss of the midpoint ``(A + P(B)) / 2`` (their
    "midpoint" objective). Optimiser: Adam (optax) with learning rate ``lr``, ``steps`` steps,
    one jitted step each. At the end each ``P`` is projected to the permutation maximising
    ``sum_i P[i, perm[i]]`` by ``lap.solve(P, solver)``.

    ``init="weight_matching"``: scores peaked at weight matching's permutations (``key`` drives
    it), ``S = c * onehot`` with ``c = tau * log(9 (n - 1))`` so each row of ``P`` starts with about
    0.9 of its mass on the matched unit; ``"identity"``: the same peak on the identity. Nested
    groups keep weight matching's permutations (fixed, see the module docstring), so a spec with
    nested groups runs weight matching even for ``init="identity"``. Returns :class:`Perms` with
    ``objective`` (the weight-matching objective ``sum <A, pi(B)>`` of the result) and ``history``
    (the loss at each step, before its update). The relaxed loss can fall below that of any
    permutation (a doubly-stochastic ``P`` averages units), so the projected result may be a little
    worse than weight matching's on the data loss (seen: up to ~4% on small MLPs).
    """
    import optax

    what = "sinkhorn_matching"
    steps, lr, key = _check_common(solver, steps, lr, key, what)
    tau = _positive(tau, f"{what}: tau")
    n_iters = _int_at_least(n_iters, 1, f"{what}: n_iters")
    if init not in ("weight_matching", "identity"):
        raise AlignError(f"{what}: init must be 'weight_matching' or 'identity', got {init!r}")
    if loss_fn is None and batches is not None:
        raise AlignError(f"{what}: batches given without loss_fn; pass loss_fn(params, batch) for the data "
                         "objective, or neither for the L2 objective")
    treedef, leaves_a, leaves_b, fa, fb = _pair(spec, params_a, params_b)
    data = None if loss_fn is None else _check_loss(loss_fn, batches, treedef, leaves_a, leaves_b, what)

    top = [n for n, g in spec.groups.items() if g.parent is None]
    nested = [n for n, g in spec.groups.items() if g.parent is not None]
    start = identity_perms(spec)
    if init == "weight_matching" or nested:
        wm = weight_matching(spec, params_a, params_b, key=key, solver=solver)
        if init == "weight_matching":
            start = wm
        # nested permutations re-indexed by B's own (old) parent position: inner_old[k] = pb[inv_pa[k]]
        inv = invert(spec, {g: wm[g] for g in top})
        first = {c: wm[c][inv[spec.groups[c].parent]] for c in nested}
    else:
        first = {}
    fb1 = permute_flat(spec, first, fb) if first else dict(fb)
    scores = {}
    for g in top:
        n = spec.groups[g].size
        c = tau * float(np.log(9.0 * (n - 1))) if n > 1 else 0.0
        scores[g] = c * jax.nn.one_hot(start[g], n, dtype=jnp.float32)
    norm = float(sum(jnp.vdot(x, x) + jnp.vdot(fb[p], fb[p]) for p, x in fa.items()))
    norm = norm if norm > 0 else 1.0

    def loss(s, rest, batch):
        fa_, fb1_, la_, lb_ = rest
        pb = _soft_flat(spec, {g: sinkhorn(s[g], n_iters, tau) for g in top}, fb1_)
        if loss_fn is None:
            return sum(jnp.sum((fa_[p] - pb[p]) ** 2) for p in fa_) / norm
        return loss_fn(_midpoint(treedef, la_, lb_, pb), batch)

    opt = optax.adam(lr)

    @jax.jit
    def step(s, state, rest, batch):
        val, g = jax.value_and_grad(loss)(s, rest, batch)
        upd, state = opt.update(g, state, s)
        return optax.apply_updates(s, upd), state, val

    state, history = opt.init(scores), []
    rest = (fa, fb1, leaves_a, leaves_b) if loss_fn is not None else (fa, fb1, {}, {})
    for _ in range(steps):
        scores, state, val = step(scores, state, rest, None if data is None else next(data))
        history.append(float(val))
    hard = {g: lap.solve(sinkhorn(scores[g], n_iters, tau), solver) for g in top}
    return _result(compose(spec, first, hard) if first else hard, spec, fa, fb, history)


# --- straight-through estimator --------------------------------------------------------------

@align_method("ste_matching", data="loss", paper="Ainsworth et al. 2023 (Git Re-Basin), Alg. 3")
def ste_matching(spec: Spec, params_a: Any, params_b: Any, loss_fn: Callable, batches: Iterable, *,
                 key: jax.Array | None = None, steps: int = 100, lr: float = 1e-3, solver: str = "scipy",
                 max_iter: int = 3) -> Perms:
    """Permutations of ``params_b`` by the straight-through estimator (Git Re-Basin, Algorithm 3).

    A continuous copy ``W~`` of the moved leaves starts at A. Each step: ``pi = weight_matching(W~,
    B)`` (warm-started from the previous ``pi``, ``max_iter`` passes, visiting order from ``key``
    folded with the step); ``proj = W~ + stop_gradient(pi(B) - W~)`` (its value is ``pi(B)``, its
    gradient the identity); the loss ``loss_fn((A + proj) / 2, batch)`` is differentiated w.r.t.
    ``W~`` and ``W~`` takes an Adam step. The permutation with the lowest midpoint loss seen (each
    on its step's batch) is returned; ``history`` holds every step's loss; ``objective`` is the
    weight-matching objective ``sum <A, pi(B)>`` of the result.

    Cost: the gradient step is one jitted function (compiled once); weight matching runs on the
    host every step — per pass, one score matrix and one linear assignment per group — so a step
    costs about ``max_iter`` weight-matching passes plus one forward/backward of ``loss_fn``. The
    reference runs it to convergence each step; the warm start makes a few passes enough.
    """
    import optax

    what = "ste_matching"
    steps, lr, key = _check_common(solver, steps, lr, key, what)
    max_iter = _int_at_least(max_iter, 1, f"{what}: max_iter")
    treedef, leaves_a, leaves_b, fa, fb = _pair(spec, params_a, params_b)
    data = _check_loss(loss_fn, batches, treedef, leaves_a, leaves_b, what)

    def loss(wt, pb, rest, batch):
        la_, lb_ = rest
        proj = {p: w + jax.lax.stop_gradient(pb[p] - w) for p, w in wt.items()}
        return loss_fn(_midpoint(treedef, la_, lb_, proj), batch)

    opt = optax.adam(lr)

    @jax.jit
    def step(wt, state, pb, rest, batch):
        val, g = jax.value_and_grad(loss)(wt, pb, rest, batch)
        upd, state = opt.update(g, state, wt)
        return optax.apply_updates(wt, upd), state, val

    wt, pi, history, best = dict(fa), None, [], None
    state = opt.init(wt)
    b_tree = treedef.unflatten(list(leaves_b.values()))
    for t in range(steps):
        w_tree = treedef.unflatten([wt.get(p, a) for p, a in leaves_a.items()])
        pi = weight_matching(spec, w_tree, b_tree, key=jax.random.fold_in(key, t), max_iter=max_iter,
                             solver=solver, init=pi)
        pi = {n: v for n, v in pi.items()}
        wt, state, val = step(wt, state, permute_flat(spec, pi, fb), (leaves_a, leaves_b), next(data))
        history.append(float(val))
        if best is None or history[-1] < best[0]:
            best = (history[-1], pi)
    return _result(best[1], spec, fa, fb, history)
