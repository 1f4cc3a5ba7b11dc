"""permute_qarray: permuting one axis of a QArray in packed form equals gathering its dequantized
array, bit for bit, for every quantizer/format/layout (eager and under jit with a traced index)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import quant
from weightlab.errors import QuantizationError
from weightlab.quant.act_aware import awq_quantize
from weightlab.quant.lowrank import add_lorc, add_qera
from weightlab.quant.lut import quantize_any4
from weightlab.quant.halfquad import quantize_hqq
from weightlab.quant.matmul import kernel_supports
from weightlab.quant.permute import permute_qarray
from weightlab.quant.rotation import rotate_quantize
from weightlab.quant.rounding import quantize_rtn
from weightlab.quant.second_order import gptq_quantize

K, N = 64, 48


@functools.lru_cache(None)
def data(shape=(K, N), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) > 0.99] *= 6  # a few outliers
    return w


@functools.lru_cache(None)
def calib(k=K, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((256, k)) @ rng.standard_normal((k, k)) * 0.3).astype(np.float32)
    return x, (x.T @ x / len(x)).astype(np.float32), np.abs(x).mean(0)


def rtn(**kw):
    return lambda: quantize_rtn(data(), **kw)


def gptq(**kw):
    return lambda: gptq_quantize(data(), 2 * calib()[1], **kw)


def awq(**kw):
    return lambda: awq_quantize(data(), calib()[1], calib()[2], n_grid=2, **kw)


def nd_lowrank():
    """A 3-D weight grouped along axis 1, with a hand-made low-rank correction (K-first frame)."""
    w = data((6, 32, 10), 2)
    q = quantize_rtn(w, bits=4, group_size=8, axis=1)
    rng = np.random.default_rng(3)
    return q.replace(lr_a=jnp.asarray(rng.standard_normal((32, 3)), jnp.float16),
                     lr_b=jnp.asarray(rng.standard_normal((3, 60)), jnp.float16),
                     pre=jnp.asarray(rng.uniform(0.5, 2, 32), jnp.float32))


CASES = {
    "int4-g32": rtn(bits=4, group_size=32),
    "int4-asym-g32": rtn(bits=4, group_size=32, symmetric=False),
    "int8-channel": rtn(bits=8, group_size=None),
    "int4-tensor": rtn(bits=4, group_size=0),
    "int3-g16-axis1": rtn(bits=3, group_size=16, axis=-1),          # uint32 bit-stream packing
    "int2-asym-g8-axis1": rtn(bits=2, group_size=8, axis=-1, symmetric=False),
    "nf4-g32": rtn(fmt="nf4", group_size=32),
    "fp4-g16-axis1": rtn(fmt="fp4_e2m1", group_size=16, axis=-1),
    "mxfp4": rtn(fmt="mxfp4"),
    "nvfp4": rtn(fmt="nvfp4"),                                      # FP8 block scales x tensor scale
    "fp8-e4m3-g32": rtn(fmt="fp8_e4m3", group_size=32),
    "hqq-g16": lambda: quantize_hqq(data(), bits=4, group_size=16, iters=3),
    "any4-g16-axis1": lambda: quantize_any4(data(), group_size=16, axis=-1, iters=3),  # per-row learned tables
    "gptq-actorder-g16": gptq(bits=4, group_size=16, act_order=True, static_groups=False),  # has g_idx
    "actorder-int3-g16-axis1": lambda: permute_qarray(quantize_rtn(data().T.copy(), bits=3, group_size=16, axis=-1),
                                                      1, perm(K, 99)),  # act-order made by a permutation
    "awq-asym-g16-axis1": lambda: awq_quantize(data().T.copy(), calib()[1], calib()[2], n_grid=2, bits=4,
                                               group_size=16, fmt="uint", axis=-1),  # 1-D pre
    "rotated-g16": lambda: rotate_quantize(data(), jax.random.key(0), quantize_rtn, bits=4, group_size=16),  # 2-D pre
    "lorc-int3-g32": lambda: add_lorc(quantize_rtn(data(), bits=3, group_size=32), data(), rank=4),
    "qera-awq-g16": lambda: add_qera(awq(bits=3, group_size=16)(), data(), calib()[1], rank=4),  # pre + low rank
    "rotated-lorc-axis1": lambda: add_lorc(rotate_quantize(data().T.copy(), jax.random.key(1), quantize_rtn, bits=4,
                                                           group_size=16, axis=-1), data().T.copy(), rank=3),
    "3d-pre-lowrank": nd_lowrank,
}


@functools.lru_cache(None)
def qarray(name):
    return jax.jit(CASES[name])()  # one compile instead of many eager ops


def perm(n, seed):
    return np.random.default_rng(seed).permutation(n).astype(np.int32)


deq = jax.jit(lambda q: q.dequantize())  # one compile per layout instead of many eager ops (the
# eager dequantize is compared in test_composition_and_inverse)


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_permute_every_axis_is_exact(name):
    q = qarray(name)
    dense = np.asarray(deq(q))
    for ax in range(q.ndim):
        idx = perm(q.shape[ax], 10 + ax)
        p = permute_qarray(q, ax, idx)  # eager, concrete index
        assert (p.shape, p.dtype, p.fmt, p.group_size, p.axis) == (q.shape, q.dtype, q.fmt, q.group_size, q.axis)
        assert same(deq(p), np.take(dense, idx, axis=ax)), (name, ax)
        for c in ("codes", "scale", "zero", "lut", "tensor_scale", "pre", "lr_a", "lr_b"):  # dtypes/shapes kept
            x, y = getattr(q, c), getattr(p, c)
            assert (x is None) == (y is None) and (x is None or (x.shape == y.shape and x.dtype == y.dtype)), c
    # under jit with traced indices (every axis in one trace; two index sets through the same compile),
    # compared with the jitted reference: XLA may contract pre * D + A B into FMAs under jit, so
    # q.dequantize() itself can differ by an ulp between jit and eager
    f = jax.jit(lambda q, idxs: [(permute_qarray(q, ax, i).dequantize(), jnp.take(q.dequantize(), i, axis=ax))
                                 for ax, i in enumerate(idxs)])
    for seed in (20, 21):
        for ax, (got, want) in enumerate(f(q, [jnp.asarray(perm(n, seed + 7 * ax)) for ax, n in enumerate(q.shape)])):
            assert same(got, want), (name, ax, "jit")


def test_grouped_input_axis_becomes_act_order():
    q = qarray("int4-g32")
    assert q.g_idx is None and q.axis == 0
    idx = perm(K, 5)
    p = permute_qarray(q, 0, idx)
    assert p.g_idx is not None and p.g_idx.dtype == jnp.int32
    np.testing.assert_array_equal(p.g_idx, idx // 32)
    assert p.scale is q.scale                        # scales stay; g_idx says which one each row uses
    out = permute_qarray(q, 1, perm(N, 6))           # the output axis keeps contiguous groups
    assert out.g_idx is None
    assert not kernel_supports(p)                    # act-order takes the dequantizing path
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, K)), jnp.float32)
    assert same(quant.dot(x, p, use_kernel=True), jnp.dot(x, p.dequantize(jnp.float32)))
    # an existing g_idx is gathered
    g = qarray("gptq-actorder-g16")
    pg = permute_qarray(g, 0, idx)
    np.testing.assert_array_equal(pg.g_idx, np.asarray(g.g_idx)[idx])
    # per-channel / per-tensor: nothing but the codes moves along the group axis
    for name in ("int8-channel", "int4-tensor"):
        c = qarray(name)
        pc = permute_qarray(c, 0, idx)
        assert pc.g_idx is None and pc.scale is c.scale


def test_rotation_moves_only_pre_rows():
    q = qarray("rotated-g16")
    idx = perm(K, 8)
    p = permute_qarray(q, 0, idx)
    assert p.codes is q.codes and p.g_idx is None
    np.testing.assert_array_equal(p.pre, np.asarray(q.pre)[idx])


def test_composition_and_inverse():
    for name in ("gptq-actorder-g16", "qera-awq-g16", "any4-g16-axis1"):
        q = qarray(name)
        for ax in range(q.ndim):
            n = q.shape[ax]
            i1, i2 = perm(n, 30), perm(n, 31)
            twice = permute_qarray(permute_qarray(q, ax, i1), ax, i2)
            once = permute_qarray(q, ax, i1[i2])
            assert same(twice.dequantize(), once.dequantize()), (name, ax)
            back = permute_qarray(permute_qarray(q, ax, i1), ax, np.argsort(i1))
            assert same(back.dequantize(), q.dequantize()), (name, ax)


def test_stacked_and_negative_axis_and_jit_of_whole_qarray():
    a, b = qarray("int4-asym-g32"), qarray("int4-g32").replace(zero=qarray("int4-asym-g32").zero)
    stack = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    idx = perm(K, 9)
    p = permute_qarray(stack, -2, idx)                  # a stack of QArrays: every slice, same index
    assert same(deq(p), np.take(np.asarray(deq(stack)), idx, axis=1))
    dense = np.asarray(deq(a))
    q = jax.jit(lambda q, i: permute_qarray(q, -1, i))(a, jnp.asarray(perm(N, 3)))  # a QArray out of jit
    assert same(deq(q), np.take(dense, perm(N, 3), axis=1))
    neg = permute_qarray(a, 1, idx[:N] % N - N)        # negative entries count from the end (not a perm: fine)
    assert same(deq(neg), np.take(dense, idx[:N] % N, axis=1))


def test_index_and_layout_errors():
    q = qarray("int4-g32")
    with pytest.raises(QuantizationError, match="must have length 64, found length 63"):
        permute_qarray(q, 0, np.arange(63))
    with pytest.raises(QuantizationError, match="length 48, found length 64"):
        jax.jit(lambda i: permute_qarray(q, 1, i))(jnp.arange(64))   # traced: the length is still static
    with pytest.raises(QuantizationError, match="1-D"):
        permute_qarray(q, 0, np.arange(64).reshape(8, 8))
    with pytest.raises(QuantizationError, match="integers"):
        permute_qarray(q, 0, np.arange(64.0))
    with pytest.raises(QuantizationError, match=r"\[-64, 64\)"):
        permute_qarray(q, 0, np.arange(64) + 1)
    with pytest.raises(QuantizationError, match="axis 2 out of range"):
        permute_qarray(q, 2, np.arange(64))
    with pytest.raises(QuantizationError, match="needs a QArray"):
        permute_qarray(np.zeros((4, 4)), 0, np.arange(4))
    with pytest.raises(QuantizationError, match="pre has shape"):
        permute_qarray(q.replace(pre=jnp.ones((3,))), 1, np.arange(48))
    with pytest.raises(QuantizationError, match="only one of the low-rank"):
        permute_qarray(q.replace(lr_a=jnp.ones((64, 2))), 1, np.arange(48))
    with pytest.raises(QuantizationError, match="grouped layout of 2 groups"):
        permute_qarray(q.replace(scale=jnp.ones((4, 1, 48), q.scale.dtype)), 0, np.arange(64))
    with pytest.raises(QuantizationError, match="length 5 on the permuted axis"):
        permute_qarray(q.replace(scale=jnp.ones((2, 1, 5), q.scale.dtype)), 1, np.arange(48))
