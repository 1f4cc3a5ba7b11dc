"""The per-parameter learned-optimizer update (small_fc-style MLP), in one definition.

Every parameter tensor is viewed as a matrix ``(R, C)`` (its last axis is ``C``; leading axes are
flattened into ``R``; a vector is ``(1, C)``, a scalar ``(1, 1)``). From the gradient ``g``, the
parameter ``p`` and the optimizer's accumulators (already updated for this step: momenta ``mom`` at
the decays of ``MOMENTUM_DECAYS``, the second moment ``v``, Adafactor's row/column second-moment
means ``row`` (R,) and ``col`` (C,)) the update builds ``N_FEATURES`` features per parameter:

====  =================================  ====  =================================
 0    g                                   7     m_0.9   / sqrt(v)
 1    p                                   8     m_0.99  / sqrt(v)
 2-5  m_k for k in MOMENTUM_DECAYS        9     m_0.999 / sqrt(v)
 6    m_0.5 / sqrt(v)                     10    g / sqrt(v)
 11   g / sqrt(vf)                        12    m_0.9 / sqrt(vf)
 13   sqrt(v)  (the RMS)
====  =================================  ====  =================================

with ``vf = row[r] col[c] / mean(row)`` the factored (Adafactor) second moment. Each feature is
divided by its root-mean-square over the tensor (``scales``, :func:`feature_scales`), so the MLP sees
unit-scale inputs whatever the tensor's gradient scale and bias correction is unnecessary. The MLP
(``F -> H -> H -> 2``, ReLU, plus a linear skip ``F -> 2``) gives a direction ``d`` and a
log-magnitude ``s``; the update is ``-lr * d * exp(exp_mult * clip(s, -4, 4))``. The first layer's
bias ``b1`` is per tensor (the caller folds the step embedding, and a hierarchical optimizer its
per-tensor modulation, into it), as is ``lr``.

:func:`lopt_update_reference` is the plain-jnp version; the fused Pallas kernel computes the same
thing without materialising the ``(F, R, C)`` feature tensor.

Follows small_fc_lopt / AdafacMLPLOpt of learned_optimization (Metz et al. 2022, "Practical tradeoffs
between memory, compute, and performance in learned optimizers", arXiv 2203.11860); deliberate
differences: the linear skip (initialised so a new optimizer starts as a per-tensor-normalised Adam,
see ``weightlab.lopt.perparam``), an ``exp_mult`` of 1 with a clipped magnitude, and ratio features
instead of bare ``1/sqrt(v)`` (which is unbounded on parameters that never get a gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MOMENTUM_DECAYS", "N_FEATURES", "EPS", "MAG_CLIP", "as_matrix", "features", "feature_scales",
           "mlp_out", "lopt_update_reference"]

MOMENTUM_DECAYS = (0.5, 0.9, 0.99, 0.999)
N_FEATURES = 14
EPS = 1e-12          # inside every square root: values and meta-gradients stay finite where v = 0 (dead units)
MAG_CLIP = 4.0


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(R, C)`` matrix view of a tensor of ``shape``."""
    if len(shape) == 0:
        return 1, 1
    c = int(shape[-1])
    r = 1
    for d in shape[:-1]:
        r *= int(d)
    return r, c


def features(g, p, mom, v, row, col):
    """The ``(F, R, C)`` raw features (before per-tensor normalisation); ``mom`` is ``(K, R, C)``."""
    rv = jax.lax.rsqrt(v + EPS)
    vf = row[:, None] * col[None, :] / jnp.maximum(jnp.mean(row), EPS)
    rf = jax.lax.rsqrt(vf + EPS)
    m5, m9, m99, m999 = mom[0], mom[1], mom[2], mom[3]
    return jnp.stack([g, p, m5, m9, m99, m999, m5 * rv, m9 * rv, m99 * rv, m999 * rv, g * rv, g * rf, m9 * rf,
                      jnp.sqrt(v + EPS)])


def feature_scales(g, p, mom, v, row, col):
    """``(F,)``: one over each feature's root-mean-square over the tensor."""
    f = features(g, p, mom, v, row, col)
    return jax.lax.rsqrt(jnp.mean(jnp.square(f), axis=(1, 2)) + EPS)


def mlp_out(x, w1, b1, w2, b2, w3, b3, skip):
    """``x``: ``(..., F)`` normalised features -> ``(..., 2)`` (direction, log-magnitude)."""
    h = jax.nn.relu(x @ w1 + b1)
    h = jax.nn.relu(h @ w2 + b2)
    return h @ w3 + b3 + x @ skip


def lopt_update_reference(g, p, mom, v, row, col, scales, w1, b1, w2, b2, w3, b3, skip, lr, exp_mult):
    """The update ``(R, C)`` for one tensor (float32 math; the result in ``p``'s dtype).

    ``g, p, v``: (R, C); ``mom``: (K, R, C); ``row``: (R,); ``col``: (C,); ``scales``: (F,);
    MLP weights ``w1`` (F, H), ``b1`` (H,), ``w2`` (H, H), ``b2`` (H,), ``w3`` (H, 2), ``b3`` (2,),
    ``skip`` (F, 2); ``lr``, ``exp_mult``: scalars (traced is fine).
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    f = features(f32(g), f32(p), f32(mom), f32(v), f32(row), f32(col)) * f32(scales)[:, None, None]
    out = mlp_out(jnp.moveaxis(f, 0, -1), w1, b1, w2, b2, w3, b3, skip)
    d, s = out[..., 0], out[..., 1]
    return (-lr * d * jnp.exp(exp_mult * jnp.clip(s, -MAG_CLIP, MAG_CLIP))).astype(p.dtype)


# --------------------------------------------------------------------------------------------------
# Fused Pallas kernel
# --------------------------------------------------------------------------------------------------

import functools  # noqa: E402

from jax.experimental import pallas as pl  # noqa: E402

__all__ += ["lopt_update", "lopt_update_auto", "kernel_blocks", "kernel_worthwhile", "supports_platform",
            "KERNEL_MIN_ELEMENTS"]

KERNEL_MIN_ELEMENTS = 4096   # lopt_update_auto: smaller tensors (biases, norms, scalars) use the reference
_BLOCK_ELEMS = {"tpu": 8 * 512, "gpu": 8 * 128}   # default elements per block (rows * cols)
_N_MOM = len(MOMENTUM_DECAYS)


def _platform(platform):
    p = platform or jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(p, p)


def supports_platform(platform: str | None = None) -> bool:
    """Whether :func:`lopt_update` can run compiled (``interpret=False``) on ``platform``: GPU (Triton
    lowering) and TPU (Mosaic). On CPU only interpret mode (or the reference) is available."""
    return _platform(platform) in ("gpu", "tpu")


def kernel_worthwhile(shape, platform: str | None = None) -> bool:
    """The fallback rule of :func:`lopt_update_auto`: the kernel is used iff the platform supports it
    and the tensor's matrix view has at least ``KERNEL_MIN_ELEMENTS`` elements. Below that, a launch
    (plus padding to legal blocks, up to 8 rows x 128 lanes) costs more than XLA's fused reference."""
    r, c = as_matrix(tuple(shape))
    return supports_platform(platform) and r * c >= KERNEL_MIN_ELEMENTS


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _pick(n: int, unit: int, max_block: int) -> tuple[int, int]:
    """(block, padded n) along one axis: a power of two that is either a multiple of ``unit`` or,
    for ``n < unit``, the whole (padded) axis; the largest such block wasting at most n/8 padding."""
    if n <= unit:
        b = _pow2(n)
        return b, b
    b = max(unit, 1 << (int(max_block).bit_length() - 1))
    while b > unit and (-(-n // b) * b - n) > n // 8:
        b //= 2
    return b, -(-n // b) * b


def kernel_blocks(r: int, c: int, platform: str | None = None, *, block_rows: int | None = None,
                  block_cols: int | None = None, row_unit: int = 8) -> tuple[int, int, int, int]:
    """``(block_rows, block_cols, padded R, padded C)`` for an (R, C) update.

    Blocks legal for both lowerings: every block dim is a power of two (Triton), and the last two are
    multiples of (row_unit, 128) or equal to the whole padded axis (Mosaic's (8, 128) rule; row_unit
    is 16 for 16-bit inputs, whose sublanes are packed in pairs).
    """
    budget = _BLOCK_ELEMS.get(_platform(platform), _BLOCK_ELEMS["gpu"])
    if block_cols is not None:
        bc, cp = _exact(c, int(block_cols), 128, "block_cols")
    else:
        bc, cp = _pick(c, 128, min(512, budget // row_unit))
    if block_rows is not None:
        br, rp = _exact(r, int(block_rows), row_unit, "block_rows")
    else:
        br, rp = _pick(r, row_unit, max(row_unit, budget // bc))
    return br, bc, rp, cp


def _exact(n: int, b: int, unit: int, name: str) -> tuple[int, int]:
    if b < 1 or b & (b - 1) or (b % unit and b < n):
        raise ValueError(f"{name}={b} must be a power of two and a multiple of {unit} unless it covers "
                         f"the whole axis ({n})")
    return b, -(-n // b) * b


def _param_layout(f: int, h: int):
    """Offsets of the packed scalar vector: w1*scales (F,H), b1, w2 (H,H), b2, w3 (H,2), b3, skip*scales
    (F,2), then -lr, exp_mult, 1/mean(row); and the total length."""
    sizes = [("w1", f * h), ("b1", h), ("w2", h * h), ("b2", h), ("w3", h * 2), ("b3", 2), ("skip", f * 2),
             ("neglr", 1), ("em", 1), ("inv_mean", 1)]
    off, o = {}, 0
    for name, n in sizes:
        off[name] = o
        o += n
    return off, o


def _kernel(prm_ref, g_ref, p_ref, m_ref, v_ref, row_ref, col_ref, o_ref, *, f, h, off):
    f32 = jnp.float32
    w = lambda name, i: prm_ref[off[name] + i]     # one scalar (SMEM on TPU, a scalar load on GPU)
    g, p, v = g_ref[...].astype(f32), p_ref[...].astype(f32), v_ref[...].astype(f32)
    m = [m_ref[k].astype(f32) for k in range(_N_MOM)]
    rv = jax.lax.rsqrt(v + EPS)
    rf = jax.lax.rsqrt(row_ref[...] * col_ref[...] * w("inv_mean", 0) + EPS)
    x = [g, p, *m, m[0] * rv, m[1] * rv, m[2] * rv, m[3] * rv, g * rv, g * rf, m[1] * rf, jnp.sqrt(v + EPS)]
    assert len(x) == f
    # Output accumulators start from the linear skip; each hidden unit is an unrolled chain of
    # scalar-times-tile FMAs, so only H hidden tiles (plus the features) are ever live.
    d = x[0] * w("skip", 0) + w("b3", 0)
    s = x[0] * w("skip", 1) + w("b3", 1)
    for i in range(1, f):
        d, s = d + x[i] * w("skip", 2 * i), s + x[i] * w("skip", 2 * i + 1)
    h1 = []
    for j in range(h):
        a = x[0] * w("w1", j) + w("b1", j)
        for i in range(1, f):
            a = a + x[i] * w("w1", i * h + j)
        h1.append(jnp.maximum(a, 0.0))

    def unit2(k, ds):  # second hidden layer, one unit at a time (a loop: 1/H of the code, same math)
        a = h1[0] * w("w2", k) + w("b2", k)
        for j in range(1, h):
            a = a + h1[j] * w("w2", j * h + k)
        a = jnp.maximum(a, 0.0)
        return ds[0] + a * w("w3", 2 * k), ds[1] + a * w("w3", 2 * k + 1)

    d, s = jax.lax.fori_loop(0, h, unit2, (d, s))
    mag = jnp.exp(w("em", 0) * jnp.clip(s, -MAG_CLIP, MAG_CLIP))
    o_ref[...] = (w("neglr", 0) * d * mag).astype(o_ref.dtype)


def lopt_update(g, p, mom, v, row, col, scales, w1, b1, w2, b2, w3, b3, skip, lr, exp_mult, *,
                block_rows: int | None = None, block_cols: int | None = None, interpret: bool | None = None,
                platform: str | None = None):
    """Fused Pallas version of :func:`lopt_update_reference` (same arguments, same result).

    Motivation: PyLO's fused CUDA kernels for small_fc (Janson et al. 2025, "PyLO: Towards Accessible
    Learned Optimizers in PyTorch", arXiv 2506.10315) -- the reference materialises the ``(F, R, C)``
    feature tensor (and the MLP's hidden activations) in HBM, 14+ times the parameter's size.

    Computes, for every element of the (R, C) matrix and in one pass over 2-D blocks of it: the 14
    features, their per-tensor scaling (``scales`` is folded into ``w1`` and ``skip`` in the wrapper),
    the MLP (``F -> H -> H -> 2`` with ReLU and linear skip) and ``-lr * d * exp(exp_mult * clip(s))``.
    Features and hidden units live only in registers/VMEM of the current block, so HBM traffic is
    the 7 input tiles (g, p, v, 4 momenta) plus row/col slices in and one tile out.

    Layout: grid ``(R/block_rows, C/block_cols)``, both axes independent ("parallel"). Inputs keep
    their dtypes (math in float32); ``mom`` is read as a (4, block_rows, block_cols) block, ``row`` as
    (block_rows, 1), ``col`` as (1, block_cols). ``mean(row)`` needs the whole tensor, so the wrapper
    computes ``1/max(mean(row), EPS)`` and passes it with ``-lr``, ``exp_mult`` and the MLP weights as
    one packed float32 vector of scalars (``(F + H + 4) * H + 2 * F + 5`` floats, 6.5 KiB for H=32, so
    H should stay small): SMEM on TPU, a plain (power-of-two) ref read with scalar loads under Triton. The MLP is scalar-times-tile FMAs (about F*H + H*H per element): the first
    layer unrolled (H live hidden tiles), the second a ``fori_loop`` over its units, each unrolled over
    the H inputs and folded straight into the two outputs (a fully unrolled second layer is H times
    more code to lower and compile for the same math). Not ``jnp.dot``: with F=14 and small H the
    products are tiny and unaligned (K=14, N=H < 16) for Triton's ``tl.dot`` and the MXU, and an
    (elements, F) tile would need lane relayouts on TPU; elementwise FMAs lower on both unchanged.

    Blocking (:func:`kernel_blocks`): power-of-two blocks that are multiples of (8, 128) -- (16, 128)
    for 16-bit inputs on TPU -- or equal to the whole padded axis for tiny tensors ((1, 1), (1, C) vectors);
    defaults about 8x512 elements on TPU, 8x128 on GPU. R and C are zero-padded up to whole blocks
    (padded elements stay finite: the EPS guards) and the result sliced back.

    ``interpret=None`` means interpret mode on CPU (tests), compiled elsewhere; ``platform`` ("gpu"/
    "cuda" -> Triton, "tpu" -> Mosaic) defaults to the default backend and only needs setting to lower
    for another platform (``jax.export``). :func:`lopt_update_auto` picks kernel or reference.
    """
    plat = _platform(platform)
    if interpret is None:
        interpret = plat == "cpu"
    if not interpret and not supports_platform(plat):
        raise ValueError(f"the lopt_update kernel does not compile for {plat!r}; use interpret=True or "
                         "lopt_update_reference")
    r, c = g.shape
    f, h = w1.shape
    if f != N_FEATURES or mom.shape[0] != _N_MOM:
        raise ValueError(f"expected {N_FEATURES} features and {_N_MOM} momenta, got {f} and {mom.shape[0]}")
    f32 = jnp.float32
    narrow = any(jnp.dtype(a.dtype).itemsize < 4 for a in (g, p, mom, v))
    br, bc, rp, cp = kernel_blocks(r, c, plat, block_rows=block_rows, block_cols=block_cols,
                                   row_unit=16 if narrow and plat == "tpu" else 8)
    sc = jnp.asarray(scales, f32)
    inv_mean = 1.0 / jnp.maximum(jnp.mean(jnp.asarray(row, f32)), EPS)
    off, n_prm = _param_layout(f, h)
    if plat != "tpu":
        n_prm = _pow2(n_prm)  # Triton blocks are powers of two (SMEM on TPU needs no padding)
    prm = jnp.concatenate([
        (sc[:, None] * jnp.asarray(w1, f32)).ravel(), jnp.asarray(b1, f32).ravel(), jnp.asarray(w2, f32).ravel(),
        jnp.asarray(b2, f32).ravel(), jnp.asarray(w3, f32).ravel(), jnp.asarray(b3, f32).ravel(),
        (sc[:, None] * jnp.asarray(skip, f32)).ravel(),
        jnp.stack([-jnp.reshape(jnp.asarray(lr, f32), ()), jnp.reshape(jnp.asarray(exp_mult, f32), ()), inv_mean])])
    prm = jnp.pad(prm, (0, n_prm - prm.shape[0]))

    def pad(a, rows=True, cols=True):
        widths = [(0, 0)] * (a.ndim - 2) + [(0, rp - r if rows else 0), (0, cp - c if cols else 0)]
        return a if all(w_ == (0, 0) for w_ in widths) else jnp.pad(a, widths)

    args = [prm, pad(g), pad(p), pad(mom), pad(v), pad(jnp.reshape(row, (r, 1)).astype(f32), cols=False),
            pad(jnp.reshape(col, (1, c)).astype(f32), rows=False)]
    tile = lambda i, j: (i, j)
    tpu = plat == "tpu"   # also in interpret mode: the SMEM spec is then exercised on CPU
    if tpu:
        from jax.experimental.pallas import tpu as pltpu

        prm_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        params = {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))}
    else:
        prm_spec = pl.BlockSpec((n_prm,), lambda i, j: (0,))
        params = {}
        if plat == "gpu" and not interpret:
            from jax.experimental.pallas import triton as pltriton

            params["compiler_params"] = pltriton.CompilerParams(num_warps=4 if br * bc <= 512 else 8,
                                                                num_stages=1)
    in_specs = [prm_spec, pl.BlockSpec((br, bc), tile), pl.BlockSpec((br, bc), tile),
                pl.BlockSpec((_N_MOM, br, bc), lambda i, j: (0, i, j)), pl.BlockSpec((br, bc), tile),
                pl.BlockSpec((br, 1), lambda i, j: (i, 0)), pl.BlockSpec((1, bc), lambda i, j: (0, j))]
    out = pl.pallas_call(
        functools.partial(_kernel, f=f, h=h, off=off),
        out_shape=jax.ShapeDtypeStruct((rp, cp), p.dtype),
        grid=(rp // br, cp // bc), in_specs=in_specs, out_specs=pl.BlockSpec((br, bc), tile),
        interpret=interpret, **params,
    )(*args)
    return out if (rp, cp) == (r, c) else out[:r, :c]


def _with_reference_vjp(fn):
    """``fn`` (the kernel) forward, the reference's VJP backward: ``pallas_call`` has no reverse-mode
    rule, and meta-training differentiates through the update (w.r.t. the MLP weights, ``lr``, ...)."""
    @jax.custom_vjp
    def f(*a):
        return fn(*a)

    def fwd(*a):
        return fn(*a), a

    def bwd(a, ct):
        return jax.vjp(lopt_update_reference, *a)[1](ct)

    f.defvjp(fwd, bwd)
    return f


def lopt_update_auto(g, p, mom, v, row, col, scales, w1, b1, w2, b2, w3, b3, skip, lr, exp_mult, *,
                     platform: str | None = None, **kernel_options):
    """The kernel (compiled) where :func:`kernel_worthwhile` says so -- GPU/TPU and at least
    ``KERNEL_MIN_ELEMENTS`` elements -- else :func:`lopt_update_reference` (always on CPU). Either
    way differentiable: the kernel path takes its gradients from the reference (recomputed)."""
    a = (g, p, mom, v, row, col, scales, w1, b1, w2, b2, w3, b3, skip, lr, exp_mult)
    if kernel_worthwhile(g.shape, platform):
        run = functools.partial(lopt_update, interpret=False, platform=platform, **kernel_options)
        return _with_reference_vjp(run)(*a)
    return lopt_update_reference(*a)
