"""Merges that act on the singular structure of each weight matrix: TSV-M, Iso-C, Iso-CTS, WUDI.

Every 2-D array leaf that ``select`` picks (any :func:`weightlab.tree.selector`; default: all) is
treated as a matrix; other leaves (biases, norms, conv kernels) get the mean of the task vectors, as
the FusionBench reference implementations do. The result is
``base + lambda_ * merged``.

* :func:`tsv_m` (Gargiulo et al., CVPR 2025, "Task Singular Vectors"): each task keeps its top
  ``floor(r / N)`` singular triplets (r = min(m, n)); the concatenated U's and V's are
  orthogonalised by their polar factor (U = P Q^T from the SVD P S Q^T), and the merged matrix is
  ``U_perp diag(s) V_perp^T``. ``weight`` scales each task vector before the SVD.
* :func:`iso_c` (Marczak et al., ICML 2025, "No Task Left Behind"): SVD of the summed task vector
  with every singular value replaced by their mean (a flat, "isotropic" spectrum).
* :func:`iso_cts`: the same with a common subspace (top ``common_space_fraction`` of the sum's
  singular vectors) plus, per task, the top directions of its residual orthogonal to that subspace;
  bases orthogonalised as in TSV-M, spectrum set to the mean of the gathered singular values.
* :func:`wudi` (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It"):
  data-free; per matrix, minimise ``sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` over
  ``tau_m`` (Adam from ``sum_i tau_i``), where the product contracts the *input* axis: the task
  vectors' rows stand in for the inputs that layer sees. ``input_axis=0`` for Flax ``(in, out)``
  kernels (default), ``1`` for PyTorch/HF ``(out, in)`` weights. Note lr is in weight units, so the
  reference's 1e-5 suits large models whose task vectors are ~1e-3; scale it to yours.
"""

from __future__ import annotations

from .. import _lazy, tree as wtree
from ..errors import MergeError
from .registry import merge_method, per_model

jax = _lazy.module("jax")
jnp = _lazy.module("jax.numpy")
optax = _lazy.module("optax")

__all__ = ["tsv_m", "iso_c", "iso_cts", "wudi"]


def _svd(x):
    return jnp.linalg.svd(x, full_matrices=False)


def _polar(x):
    """Nearest matrix with orthonormal columns (Procrustes): U V^T of the thin SVD."""
    u, _, vt = _svd(x)
    return u @ vt


def _run(base, stacked, matrix_fn, *, weight=1.0, lambda_=1.0, select=None):
    n = wtree.num_models(stacked)
    w = jnp.asarray(per_model(weight, n, "weight"), jnp.float32)
    pick = wtree.selector(select)

    def one(path, b, s):
        if not wtree.is_array(b):
            return b
        b32 = b.astype(jnp.float32)
        tau = (s.astype(jnp.float32) - b32[None]) * w.reshape((n,) + (1,) * b.ndim)
        if b.ndim == 2 and pick(path, b):
            merged = matrix_fn(tau)
        else:
            merged = jnp.mean(tau, axis=0)
        return (b32 + lambda_ * merged).astype(b.dtype)

    return wtree.map_with_path(one, base, stacked)


@_lazy.jit
def _tsv_matrix(tau):
    n, r = tau.shape[0], min(tau.shape[1:])
    k = r // n
    u, s, vt = jax.vmap(_svd)(tau)  # (n, m, r), (n, r), (n, r, d)
    m, d = tau.shape[1], tau.shape[2]
    us = jnp.zeros((m, r), tau.dtype).at[:, :n * k].set(jnp.moveaxis(u[:, :, :k], 0, 1).reshape(m, n * k))
    ss = jnp.zeros((r,), tau.dtype).at[:n * k].set(s[:, :k].reshape(-1))
    vs = jnp.zeros((r, d), tau.dtype).at[:n * k].set(vt[:, :k].reshape(n * k, d))
    return (_polar(us) * ss) @ _polar(vs.T).T


@merge_method("tsv_m", per_model_params=("weight",), paper="Gargiulo et al. 2025 (Task Singular Vectors)")
def tsv_m(base, models, *, weight=1.0, lambda_: float = 1.0, select=None):
    """TSV-M: per-task low-rank SVD pieces, decorrelated and summed (see module docstring)."""
    return _run(base, models, _tsv_matrix, weight=weight, lambda_=lambda_, select=select)


@_lazy.jit
def _iso_matrix(tau):
    u, s, vt = _svd(jnp.sum(tau, axis=0))
    return (u * jnp.mean(s)) @ vt


@merge_method("iso_c", per_model_params=("weight",), paper="Marczak et al. 2025 (No Task Left Behind)")
def iso_c(base, models, *, weight=1.0, lambda_: float = 1.0, select=None):
    """Iso-C: the summed task vector with a flat singular spectrum (mean singular value)."""
    return _run(base, models, _iso_matrix, weight=weight, lambda_=lambda_, select=select)


@_lazy.jit(static_argnums=1)
def _iso_cts_matrix(tau, common_space_fraction):
    n, r = tau.shape[0], min(tau.shape[1:])
    common = int(r * common_space_fraction)
    per_task = round((r - common) / n)
    common = r - per_task * n
    if common < 0 or per_task < 0:
        raise MergeError(f"iso_cts: cannot split rank {r} among {n} tasks")
    u, s, vt = _svd(jnp.sum(tau, axis=0))
    uc, sc, vc = u[:, :common], s[:common], vt[:common]
    resid = tau - jnp.einsum("ij,kj,nkl->nil", uc, uc, tau)
    ut, st, vtt = jax.vmap(_svd)(resid)
    m, d = tau.shape[1:]
    uu = jnp.concatenate([jnp.moveaxis(ut[:, :, :per_task], 0, 1).reshape(m, n * per_task), uc], axis=1)
    ss = jnp.concatenate([st[:, :per_task].reshape(-1), sc])
    vv = jnp.concatenate([vtt[:, :per_task].reshape(n * per_task, d), vc], axis=0)
    return (_polar(uu) * jnp.mean(ss)) @ _polar(vv.T).T


@merge_method("iso_cts", per_model_params=("weight",), paper="Marczak et al. 2025 (No Task Left Behind)")
def iso_cts(base, models, *, common_space_fraction: float = 0.8, weight=1.0, lambda_: float = 1.0, select=None):
    """Iso-CTS: isotropic merge of a common subspace plus task-specific residual directions."""
    return _run(base, models, lambda t: _iso_cts_matrix(t, float(common_space_fraction)), weight=weight,
                lambda_=lambda_, select=select)


@_lazy.jit(static_argnums=(1, 2, 3))
def _wudi_matrix(tau, input_axis, steps, lr):
    t = tau if input_axis == 1 else jnp.swapaxes(tau, 1, 2)  # (n, out, in)
    norms = jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1)
    norms = jnp.where(norms == 0, 1.0, norms)

    def loss(m):
        prod = jnp.einsum("noi,npi->nop", m[None] - t, t)
        return jnp.sum(jnp.sum(prod ** 2, axis=(1, 2)) / norms)

    opt = optax.adam(lr)
    m0 = jnp.sum(t, axis=0)

    def step(carry, _):
        m, st = carry
        g = jax.grad(loss)(m)
        upd, st = opt.update(g, st, m)
        return (optax.apply_updates(m, upd), st), None

    (m, _), _ = jax.lax.scan(step, (m0, opt.init(m0)), None, length=steps)
    return m if input_axis == 1 else m.T


@merge_method("wudi", per_model_params=("weight",), stream_kwargs=(("input_axis", 1),),
              paper="Cheng et al. 2025 (WUDI-merging)")
def wudi(base, models, *, steps: int = 300, lr: float = 1e-5, input_axis: int = 0, weight=1.0,
         lambda_: float = 1.0, select=None):
    """WUDI: per matrix, the task vector that least disturbs every task's input subspace (data-free)."""
    return _run(base, models, lambda t: _wudi_matrix(t, input_axis, int(steps), float(lr)), weight=weight,
                lambda_=lambda_, select=select)
