"""Fused learned-optimizer update kernel (Pallas; interpret mode on CPU) against its jnp reference,
plus CUDA (Triton) and TPU (Mosaic) lowering via jax.export and the kernel/reference fallback rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab.kernels.lopt_update import (KERNEL_MIN_ELEMENTS, N_FEATURES, feature_scales, kernel_blocks,
                                           kernel_worthwhile, lopt_update, lopt_update_auto,
                                           lopt_update_reference, supports_platform)


@functools.lru_cache(maxsize=None)
def _pool():
    """One batch of jax.random normals, sliced per problem (a fresh jax.random call per shape would
    compile the generator for every shape, which dominates the runtime of these small tests)."""
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 19,)))


def _problem(r, c, h, dtype=jnp.float32, seed=0, lr=3e-3, exp_mult=1.0):
    """Random, never-zero inputs at realistic scales (small gradients, positive second moments)."""
    pool, pos = _pool(), [(seed * 7919) % (1 << 17)]

    def normal(*shape):
        n = int(np.prod(shape))
        out = np.take(pool, np.arange(pos[0], pos[0] + n), mode="wrap").reshape(shape)
        pos[0] += n
        return jnp.asarray(out)

    f = N_FEATURES
    g, p, mom = normal(r, c) * 1e-3, normal(r, c) * 0.05, normal(4, r, c) * 1e-3
    v = jnp.exp(normal(r, c)) * 1e-6
    row, col = jnp.exp(normal(r)) * 1e-6, jnp.exp(normal(c)) * 1e-6
    w1, b1 = normal(f, h) / np.sqrt(f), normal(h) * 0.1
    w2, b2 = normal(h, h) / np.sqrt(h), normal(h) * 0.1
    w3, b3 = normal(h, 2) / np.sqrt(h), normal(2) * 0.1
    skip = normal(f, 2) * 0.3
    scales = jax.jit(feature_scales)(g, p, mom, v, row, col)
    return [g.astype(dtype), p.astype(dtype), mom, v, row, col, scales, w1, b1, w2, b2, w3, b3, skip, lr, exp_mult]


def _kernel(**kw):
    return jax.jit(functools.partial(lopt_update, **kw))


_reference = jax.jit(lopt_update_reference)


def _close(got, ref, rtol):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(got)) and np.abs(ref).max() > 0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# (shape, H, platform whose block specs the interpreted kernel uses: "tpu" -> SMEM scalars)
CASES = [((1, 1), 8, "gpu"), ((1, 37), 8, "tpu"), ((64, 128), 8, "gpu"), ((100, 300), 8, "tpu"),
         ((3 * 5 * 7, 33), 8, "gpu"), ((100, 300), 32, "gpu")]


@pytest.mark.parametrize("shape,h,platform", CASES, ids=lambda v: str(v))
def test_kernel_matches_reference(shape, h, platform):
    a = _problem(*shape, h, seed=shape[0] * 7 + shape[1])
    got = _kernel(interpret=True, platform=platform)(*a)
    assert got.shape == shape and got.dtype == jnp.float32
    _close(got, _reference(*a), 1e-5)


def test_kernel_bf16_params_and_block_override():
    a = _problem(40, 200, 8, dtype=jnp.bfloat16, seed=3)
    ref = _reference(*a)
    got = _kernel(interpret=True, platform="tpu")(*a)
    assert got.dtype == jnp.bfloat16 and got.shape == (40, 200)
    _close(got, ref, 1e-2)  # one bf16 ulp of the output
    assert kernel_blocks(40, 200, "tpu", row_unit=16)[0] % 16 == 0
    _close(_kernel(interpret=True, block_rows=32, block_cols=256)(*a), ref, 1e-2)
    with pytest.raises(ValueError, match="block_rows"):
        lopt_update(*a, interpret=True, block_rows=24)
    with pytest.raises(ValueError, match="block_cols"):
        lopt_update(*a, interpret=True, block_cols=64)


def test_kernel_jit_traced_lr_and_exp_mult():
    a = _problem(24, 130, 8, seed=5)
    traces = []

    @jax.jit
    def step(lr, em):
        traces.append(1)
        return lopt_update(*a[:-2], lr, em, interpret=True)

    for lr, em in [(1e-3, 1.0), (5e-2, 0.5)]:
        _close(step(jnp.float32(lr), jnp.float32(em)), _reference(*a[:-2], lr, em), 1e-5)
    assert len(traces) == 1


@pytest.mark.parametrize("shape,h,dtype", [((256, 512), 32, jnp.float32), ((256, 512), 8, jnp.bfloat16),
                                           ((1, 1), 8, jnp.float32), ((105, 33), 8, jnp.bfloat16)],
                         ids=["256x512-h32-f32", "256x512-h8-bf16", "1x1", "105x33-bf16"])
@pytest.mark.parametrize("platform,call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_kernel_lowers_for_cuda_and_tpu(platform, call, shape, h, dtype):
    """Without an accelerator we can still lower the kernel (jax.export): Pallas -> Triton / Mosaic
    (its block-shape checks included; the final Triton/Mosaic compilation happens on the device)."""
    from jax import export
    (r, c), f = shape, N_FEATURES
    shapes = [(r, c), (r, c), (4, r, c), (r, c), (r,), (c,), (f,), (f, h), (h,), (h, h), (h,), (h, 2), (2,), (f, 2),
              (), ()]  # lr, exp_mult traced
    a = [jax.ShapeDtypeStruct(s_, dtype if i < 2 else jnp.float32) for i, s_ in enumerate(shapes)]
    fn = jax.jit(lambda *a: lopt_update(*a, interpret=False, platform=platform))
    exp = export.export(fn, platforms=[platform],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(call)])(*a)
    assert call.split("$")[-1] in exp.mlir_module()


def test_block_shapes_legal_for_triton_and_mosaic():
    pow2 = lambda n: n & (n - 1) == 0
    for plat in ("gpu", "tpu"):
        for unit in (8, 16):
            for r in (1, 2, 3, 7, 8, 9, 33, 100, 105, 256, 1000, 4097):
                for c in (1, 5, 37, 100, 128, 129, 300, 512, 1000, 5000):
                    br, bc, rp, cp = kernel_blocks(r, c, plat, row_unit=unit)
                    assert pow2(br) and pow2(bc) and rp >= r and cp >= c and rp % br == 0 and cp % bc == 0
                    assert br % unit == 0 or br == rp, (r, c, br, rp)
                    assert bc % 128 == 0 or bc == cp, (r, c, bc, cp)
                    assert rp - r < max(r, unit) and cp - c < max(c, 128)  # at most ~2x padding


def test_fallback_rule():
    assert supports_platform("cuda") and supports_platform("gpu") and supports_platform("tpu")
    assert not supports_platform("cpu")
    assert not kernel_worthwhile((512, 512), "cpu")
    assert kernel_worthwhile((512, 512), "cuda") and kernel_worthwhile((8, 16, 64), "tpu")
    assert not kernel_worthwhile((KERNEL_MIN_ELEMENTS - 1,), "gpu") and not kernel_worthwhile((), "tpu")
    assert kernel_worthwhile((KERNEL_MIN_ELEMENTS,), "gpu")
    # On CPU the dispatcher is the reference, bit for bit; compiled kernels refuse CPU.
    a = _problem(64, 128, 8, seed=1)
    np.testing.assert_array_equal(jax.jit(functools.partial(lopt_update_auto, platform="cpu"))(*a), _reference(*a))
    with pytest.raises(ValueError, match="cpu"):
        lopt_update(*a, interpret=False, platform="cpu")
    # For CUDA, a large tensor goes through the Triton kernel, a small one through the reference.
    from jax import export
    chk = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for shape, uses_kernel in [((64, 128), True), ((4, 100), False)]:
        b = _problem(*shape, 8, seed=2)
        f = jax.jit(lambda *b: lopt_update_auto(*b, platform="cuda"))
        mlir = export.export(f, platforms=["cuda"], disabled_checks=chk)(*b).mlir_module()
        assert ("xla.gpu.triton" in mlir) == uses_kernel, shape


def test_kernel_path_differentiates_through_the_reference():
    """Meta-gradients through the kernel path (pallas_call has no VJP) equal the reference's."""
    from weightlab.kernels.lopt_update import _with_reference_vjp
    a = _problem(16, 40, 8, seed=4)
    kern = _with_reference_vjp(functools.partial(lopt_update, interpret=True))
    loss = lambda fn: jax.jit(jax.grad(lambda w1, lr: jnp.sum(fn(*a[:7], w1, *a[8:14], lr, 1.0) ** 2), (0, 1)))
    got, ref = loss(kern)(a[7], jnp.float32(a[14])), loss(lopt_update_reference)(a[7], jnp.float32(a[14]))
    for x, y in zip(got, ref):  # the cotangent 2u comes from the kernel's u: equal to ~1e-6
        _close(x, y, 1e-4)
