"""ZipIt-style merging: a permuted copy zips back exactly; a float64 numpy ZipIt of a one-hidden-layer
MLP; zipping approaches the two models' ensemble better than permutation + averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import align, models
from weightlab.errors import AlignError


def _noisy(p, seed, s=0.05):
    leaves, td = jax.tree.flatten(p)
    return td.unflatten([x + s * jax.random.normal(jax.random.key(seed + i), x.shape) for i, x in enumerate(leaves)])


@pytest.fixture(scope="module")
def setup():
    m = models.mlp(jax.random.key(0), in_dim=12, hidden=(10,), out_dim=3)
    a = _noisy(m.params, 0)
    xs = [jax.random.normal(jax.random.key(s), (64, 12)) for s in range(2)]
    return m, a, xs, align.infer_spec(m.apply_fn, a, xs[0])


def test_a_permuted_copy_zips_back_to_the_model(setup):
    m, a, xs, spec = setup
    b = align.permute(spec, align.random_perms(spec, jax.random.key(3)), a)
    for within in (True, False):
        z = align.zip_models(spec, m.apply_fn, a, b, xs, within=within)
        for x, y in zip(jax.tree.leaves(z), jax.tree.leaves(a)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def _numpy_zip(a, b, x):
    """ZipIt on dense_0 (the only hidden group) in float64, written out for a 1-layer MLP."""
    f = lambda p: {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in p.items()}  # noqa: E731
    a, b, x = f(a), f(b), np.asarray(x, np.float64)
    ha = np.maximum(x @ a["dense_0"]["kernel"] + a["dense_0"]["bias"], 0)
    hb = np.maximum(x @ b["dense_0"]["kernel"] + b["dense_0"]["bias"], 0)
    h = np.concatenate([ha, hb], 1)
    c = np.corrcoef(h.T)
    c = np.nan_to_num(c, nan=-1.0)
    n = ha.shape[1]
    np.fill_diagonal(c, -np.inf)
    pairs = []
    for _ in range(n):
        i, j = np.unravel_index(np.argmax(c), c.shape)
        pairs.append(sorted((int(i), int(j))))
        c[[i, j], :] = -np.inf
        c[:, [i, j]] = -np.inf
    pairs.sort()
    k0 = np.concatenate([a["dense_0"]["kernel"], b["dense_0"]["kernel"]], 1)
    b0 = np.concatenate([a["dense_0"]["bias"], b["dense_0"]["bias"]])
    k1 = np.concatenate([a["head"]["kernel"], b["head"]["kernel"]], 0)
    return {"dense_0": {"kernel": np.stack([(k0[:, i] + k0[:, j]) / 2 for i, j in pairs], 1),
                        "bias": np.array([(b0[i] + b0[j]) / 2 for i, j in pairs])},
            "head": {"kernel": np.stack([k1[i] + k1[j] for i, j in pairs]) / 2,   # U then the average
                     "bias": (a["head"]["bias"] + b["head"]["bias"]) / 2}}


def test_zip_equals_a_float64_numpy_zipit(setup):
    m, a, xs, spec = setup
    b = _noisy(models.mlp(jax.random.key(1), in_dim=12, hidden=(10,), out_dim=3).params, 50)
    # align B first the way zip_models does, so the numpy reference sees the same unit order
    b = align.permute(spec, align.weight_matching(spec, a, b), b)
    z = align.zip_models(spec, m.apply_fn, a, b, [jnp.concatenate(xs)])
    want = _numpy_zip(a, b, jnp.concatenate(xs))
    for p in ("dense_0/kernel", "dense_0/bias", "head/kernel", "head/bias"):
        g = z
        w = want
        for k in p.split("/"):
            g, w = g[k], w[k]
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, err_msg=p)


def test_zip_is_closer_to_the_ensemble_than_permutation_averaging():
    m = models.mlp(jax.random.key(0), hidden=(24, 16))
    a = _noisy(m.params, 0)
    c = _noisy(models.mlp(jax.random.key(1), hidden=(24, 16)).params, 9)
    xs = [jax.random.normal(jax.random.key(s), (64, 40)) for s in range(2)]
    spec = align.infer_spec(m.apply_fn, a, xs[0])
    y = lambda p: m.apply_fn(p, xs[0])  # noqa: E731
    ens = 0.5 * (y(a) + y(c))
    err = lambda p: float(jnp.linalg.norm(y(p) - ens) / jnp.linalg.norm(ens))  # noqa: E731
    wm = align.interpolate(a, align.permute(spec, align.weight_matching(spec, a, c), c), 0.5)
    z = align.zip_models(spec, m.apply_fn, a, c, xs)
    assert err(z) < err(wm)
    one = align.zip_models(spec, m.apply_fn, a, c, xs, groups=[spec.group_of("dense_0/kernel", 1)])
    assert jax.tree.structure(one) == jax.tree.structure(a)
    with pytest.raises(AlignError, match="cannot zip"):
        align.zip_models(spec, m.apply_fn, a, c, xs, groups=["nope"])
    with pytest.raises(AlignError, match="at least one batch"):
        align.zip_models(spec, m.apply_fn, a, c, [])
