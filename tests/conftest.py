import os

# Must be set before jax is imported anywhere: 8 virtual CPU devices for the sharding tests.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseDC:
    kernel: jax.Array
    bias: jax.Array


def _flavours():
    """The same 2-layer model in every container flavour weightlab must support."""
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    k = jax.random.key(0)
    out = {}
    out["dict"] = {"dense_0": {"kernel": jax.random.normal(k, (4, 3)), "bias": jnp.arange(3.0)},
                   "dense_1": {"kernel": jax.random.normal(jax.random.key(1), (3, 2)), "bias": jnp.ones(2)}}

    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(3)(x)))

    out["linen"] = LinenMLP().init(k, jnp.ones((1, 4)))

    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            self.dense_0 = nnx.Linear(4, 3, rngs=rngs)
            self.dense_1 = nnx.Linear(3, 2, rngs=rngs)

    out["nnx"] = nnx.split(NnxMLP(nnx.Rngs(0)))[1]
    out["equinox"] = eqx.nn.MLP(4, 2, 3, 1, key=k)
    out["list"] = [(jax.random.normal(k, (4, 3)), jnp.zeros(3)), (jnp.ones((3, 2)), jnp.zeros(2))]
    out["dataclass"] = {"layers": [DenseDC(jax.random.normal(k, (4, 3)), jnp.zeros(3)),
                                   DenseDC(jnp.ones((3, 2)), jnp.zeros(2))]}
    return out


FLAVOURS = _flavours()


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request):
    return request.param, FLAVOURS[request.param]
