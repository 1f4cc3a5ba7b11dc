"""QArrays inside flax: nnx.State paths and checkpoints, linen/NNX modules run on quantized weights.

The reference is always the same module run on ``quant.dequantize(qparams)`` (plain float params),
and the jitted programs are checked to take the packed codes, not a float weight, as inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax.linen as nn
from weightlab import io as wio
from weightlab import quant, tree
from weightlab.errors import QuantizationError, UsageError
from weightlab.quant import flax as qf


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense_0 = nnx.Linear(16, 32, rngs=rngs)
        self.head = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.dense_0(x)))


class LinenNet(nn.Module):
    """Dense, Einsum and a 1-D Conv: every linen layer kind that reads a kernel with ``param``."""

    @nn.compact
    def __call__(self, x):                                   # x: (B, 16)
        h = nn.relu(nn.Dense(32)(x))
        h = nn.Einsum((32, 4, 8), "bd,dhk->bhk")(h)          # (B, 4, 8)
        h = nn.relu(nn.Conv(16, (3,))(h))                    # (B, 4, 16)
        return nn.Dense(8)(h.reshape(h.shape[0], -1))


X16 = jax.random.normal(jax.random.key(7), (5, 16))
RTN = dict(bits=4, group_size=8, axis=0)


def _codes(t):
    return [np.asarray(q.codes) for q in jax.tree.leaves(t, is_leaf=quant.is_qarray) if quant.is_qarray(q)]


def _float_inputs_shaped_like_weights(jaxpr, qtree):
    """Invars of a float dtype with the shape of some quantized weight (should be none)."""
    shapes = {q.shape for q in jax.tree.leaves(qtree, is_leaf=quant.is_qarray) if quant.is_qarray(q)}
    return [v for v in jaxpr.jaxpr.invars
            if jnp.issubdtype(v.aval.dtype, jnp.floating) and tuple(v.aval.shape) in shapes]


def _assert_takes_codes(fn, qtree, *args):
    """The jaxpr and the lowered HLO of ``fn`` take every QArray's packed codes as an input."""
    jaxpr = jax.make_jaxpr(fn)(qtree, *args)
    in_avals = [(str(v.aval.dtype), tuple(v.aval.shape)) for v in jaxpr.jaxpr.invars]
    for q in jax.tree.leaves(qtree, is_leaf=quant.is_qarray):
        if quant.is_qarray(q):
            assert (str(q.codes.dtype), tuple(q.codes.shape)) in in_avals
    assert not _float_inputs_shaped_like_weights(jaxpr, qtree)
    hlo = jax.jit(fn).lower(qtree, *args).as_text()
    main = hlo[hlo.index("@main("):]
    signature = main[:main.index("{")]  # the entry computation's parameters
    for q in jax.tree.leaves(qtree, is_leaf=quant.is_qarray):
        if quant.is_qarray(q):
            assert f"tensor<{'x'.join(map(str, q.codes.shape))}xui8>" in signature
            assert f"tensor<{'x'.join(map(str, q.shape))}xf32>" not in signature


# ---------------------------------------------------------------------------- 1. nnx.State paths

@pytest.fixture(scope="module")
def nnx_model():
    return NnxMLP(nnx.Rngs(0))


def test_nnx_state_with_qarrays_has_the_plain_paths(nnx_model):
    state = nnx.state(nnx_model)
    qstate = quant.quantize(state, "rtn", **RTN)
    assert tree.paths(state) == ["dense_0/bias", "dense_0/kernel", "head/bias", "head/kernel"]
    assert tree.paths(qstate) == ["dense_0/bias", "dense_0/kernel/codes", "dense_0/kernel/scale",
                                  "dense_0/kernel/zero", "head/bias", "head/kernel/codes", "head/kernel/scale",
                                  "head/kernel/zero"]
    # the same paths as the pure-dict params quantized the same way, and as a hand-built Param(QArray)
    assert tree.paths(qstate) == tree.paths(quant.quantize(state.to_pure_dict(), "rtn", **RTN))
    q = quant.quantize_array(jnp.ones((16, 8)), "rtn", **RTN)
    assert tree.paths({"w": nnx.Param(q)}) == ["w/codes", "w/scale", "w/zero"]
    assert tree.paths({"w": nnx.Param(q)}) == tree.paths({"w": q})
    # the Variable's own key is dropped whatever it holds; what lies below keeps its keys
    assert tree.paths({"v": nnx.Variable({"a": jnp.ones(2), "b": [jnp.ones(1)]})}) == ["v/a", "v/b/0"]
    flat = tree.to_flat_dict(qstate)
    back = tree.from_flat_dict(flat, like=qstate)
    assert jax.tree.structure(back) == jax.tree.structure(qstate)
    assert isinstance(back["head"]["kernel"], nnx.Param) and quant.is_qarray(back["head"]["kernel"].get_raw_value())
    assert tree.Selector.paths(tree.selector("kernel$"), qstate) == ["dense_0/kernel", "head/kernel"]


def test_nnx_state_roundtrips_through_safetensors_and_orbax(nnx_model, tmp_path):
    qstate = quant.quantize(nnx.state(nnx_model), "rtn", **RTN)
    quant.save(tmp_path / "q.safetensors", qstate)
    back = quant.load(tmp_path / "q.safetensors", like=qstate)
    assert jax.tree.structure(back) == jax.tree.structure(qstate)
    for a, b in zip(_codes(back), _codes(qstate)):
        np.testing.assert_array_equal(a, b)
    plain = quant.load(tmp_path / "q.safetensors")  # no template: the QArrays from the header layouts
    assert tree.paths(plain) == tree.paths(qstate) and isinstance(plain["head"]["kernel"], quant.QArray)
    wio.save_orbax(tmp_path / "orbax", qstate)
    ob = wio.load_orbax(tmp_path / "orbax", like=qstate)
    assert jax.tree.structure(ob) == jax.tree.structure(qstate)
    for a, b in zip(jax.tree.leaves(ob), jax.tree.leaves(qstate)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the restored state updates a module, which then runs like the dequantized reference
    m = NnxMLP(nnx.Rngs(0))
    qf.quantize_module(m, "rtn", **RTN)
    nnx.update(m, back)
    ref = NnxMLP(nnx.Rngs(0))
    nnx.update(ref, quant.dequantize(qstate))
    np.testing.assert_allclose(m(X16), ref(X16), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- 2. linen

@pytest.fixture(scope="module")
def linen_q():
    m = LinenNet()
    params = m.init(jax.random.key(0), X16)["params"]
    return m, quant.quantize(params, "rtn", bits=4, group_size="channel")  # conv (3, 8, 16): axis -2


def test_linen_cannot_read_qarrays_unboxed(linen_q):
    m, qp = linen_q
    with pytest.raises(Exception, match="ScopeParamShapeError|shape"):
        m.apply({"params": qp}, X16)


@pytest.mark.parametrize("dot", [False, True])
def test_linen_apply_on_qarrays_equals_the_dequantized_module(linen_q, dot):
    m, qp = linen_q
    assert sum(quant.is_qarray(x) for x in jax.tree.leaves(qp, is_leaf=quant.is_qarray)) == 4  # Dense, Einsum, Conv
    fn = jax.jit(lambda v, x: qf.apply(m, {"params": v}, x, dot=dot))
    ref = m.apply({"params": quant.dequantize(qp)}, X16)
    np.testing.assert_allclose(fn(qp, X16), ref, rtol=1e-5, atol=1e-5)
    _assert_takes_codes(lambda v, x: qf.apply(m, {"params": v}, x, dot=dot), qp, X16)


def test_linen_dot_path_replaces_the_dense_kernel_read(linen_q, monkeypatch):
    m, qp = linen_q
    calls = []
    from weightlab.quant import matmul

    real = matmul.dot
    monkeypatch.setattr(matmul, "dot", lambda x, q, **k: calls.append(q.shape) or real(x, q, **k))
    qf.apply(m, {"params": qp}, X16, dot=True)
    assert sorted(calls) == [(16, 32), (64, 8)]  # both Dense layers, not the Einsum/Conv


def test_linen_apply_refuses_bad_input(linen_q):
    m, qp = linen_q
    with pytest.raises(UsageError, match="linen Module"):
        qf.apply(NnxMLP(nnx.Rngs(0)), {"params": qp}, X16)
    with pytest.raises(UsageError, match="'params'"):
        qf.apply(m, qp, X16)
    with pytest.raises(UsageError, match="nn.scan"):
        qf.box(qp)["Dense_0"]["kernel"].add_axis(0, {})


# --------------------------------------------------------------------------------------- 3. nnx

def test_quantize_module_runs_like_the_dequantized_module_and_jits_on_codes():
    m = NnxMLP(nnx.Rngs(0))
    ref = NnxMLP(nnx.Rngs(0))
    expect_q = quant.quantize(nnx.state(ref, nnx.Param), "rtn", **RTN)
    assert qf.quantize_module(m, "rtn", **RTN) is m
    assert isinstance(m.head.kernel, quant.QParam) and isinstance(m.head.kernel.get_raw_value(), quant.QArray)
    assert not isinstance(m.head.bias, quant.QParam)
    for a, b in zip(_codes(nnx.state(m)), _codes(expect_q)):
        np.testing.assert_array_equal(a, b)
    nnx.update(ref, quant.dequantize(expect_q))
    np.testing.assert_allclose(m(X16), ref(X16), rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(m)
    run = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    np.testing.assert_allclose(jax.jit(run)(state, X16), ref(X16), rtol=1e-6, atol=1e-6)
    _assert_takes_codes(run, state, X16)
    np.testing.assert_allclose(nnx.jit(lambda mod, x: mod(x))(m, X16), ref(X16), rtol=1e-6, atol=1e-6)


def test_quantize_module_keeps_shared_weights_shared_and_validates_first():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 16, rngs=rngs)
            self.b = nnx.Linear(16, 16, rngs=rngs)
            self.b.kernel = self.a.kernel

        def __call__(self, x):
            return self.b(self.a(x))

    t = qf.quantize_module(Tied(nnx.Rngs(1)), "rtn", **RTN)
    assert t.a.kernel is t.b.kernel and isinstance(t.a.kernel, quant.QParam)
    m = NnxMLP(nnx.Rngs(0))
    before = np.asarray(m.head.kernel[...])
    with pytest.raises(QuantizationError, match="head/kernel"):
        qf.quantize_module(m, "rtn", bits=4, group_size=16, axis=1)  # fits dense_0 (16, 32), not head (32, 8)
    assert type(m.dense_0.kernel) is nnx.Param and type(m.head.kernel) is nnx.Param  # nothing changed
    np.testing.assert_array_equal(m.head.kernel[...], before)
    with pytest.raises(UsageError, match="nnx.Module"):
        qf.quantize_module({"w": jnp.ones((4, 4))})


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("transformer", marks=pytest.mark.slow)])
def test_weightlab_nnx_models_run_on_qarrays(name):
    from weightlab import models

    make = {"mlp": lambda k: models.mlp(k, hidden=(32, 32)),
            "cnn": lambda k: models.cnn(k, blocks=1, width=0.5),
            "transformer": lambda k: models.transformer(k, dim=16, depth=1, num_heads=2)}[name]
    model = make(jax.random.key(0))
    qp = quant.quantize(model.params, "rtn", bits=4, group_size="channel")
    n_q = sum(quant.is_qarray(x) for x in jax.tree.leaves(qp, is_leaf=quant.is_qarray))
    assert n_q >= 3
    x = jax.random.normal(jax.random.key(3), (3, 40))
    run = quant.nnx_apply_fn(model.apply_fn)
    y = jax.jit(run)(qp, x)
    ref = jax.jit(model.apply_fn)(quant.dequantize(qp), x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(run)(qp, x)
    assert not _float_inputs_shaped_like_weights(jaxpr, qp)
    assert sum(str(v.aval.dtype) == "uint8" for v in jaxpr.jaxpr.invars) == n_q


def test_trainable_filter_optimizes_the_float_params_of_a_quantized_module():
    """``nnx.Optimizer(..., wrt=nnx.Param)`` would differentiate the packed codes; TRAINABLE leaves
    them out, so a partly quantized model trains its remaining float parameters."""
    import optax

    from weightlab.quant import flax as qflax

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    qflax.quantize_module(model, "rtn", select="a/kernel", bits=4, group_size=16)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=qflax.TRAINABLE)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    before = np.asarray(model.b.kernel[...])
    codes = np.asarray(nnx.state(model)["a"]["kernel"].get_raw_value().codes) if hasattr(
        nnx.state(model)["a"]["kernel"], "get_raw_value") else None
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, qflax.TRAINABLE))(model)
    opt.update(model, grads)
    assert not np.array_equal(before, np.asarray(model.b.kernel[...]))
    if codes is not None:
        np.testing.assert_array_equal(codes, np.asarray(nnx.state(model)["a"]["kernel"].get_raw_value().codes))
