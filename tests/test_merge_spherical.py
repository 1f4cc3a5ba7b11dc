"""weightlab.merge.spherical (nuslerp, multislerp) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError

from merge_helpers import close, f64, make




# ------------------------------------------------------------------ spherical

def ref_slerp_rows(t, a, b):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        ux, uy = x / max(np.linalg.norm(x), 1e-7), y / max(np.linalg.norm(y), 1e-7)
        th = np.arccos(np.clip(ux @ uy, -1, 1))
        out[i] = (1 - t) * x + t * y if abs(np.sin(th)) < 1e-8 else \
            (np.sin((1 - t) * th) * x + np.sin(t * th) * y) / np.sin(th)
    return out


@pytest.mark.parametrize("flatten,row_wise,with_base", [(True, False, False), (False, False, True), (False, True, False)])
def test_nuslerp_matches_reference(flatten, row_wise, with_base):
    base, ms = make(2)
    w = [0.3, 0.9]
    t = 0.9 / 1.2
    out = merge.nuslerp(base if with_base else None, ms, weight=w, nuslerp_flatten=flatten,
                        nuslerp_row_wise=row_wise)
    ref = {}
    for k in base:
        b = f64(base[k])
        a0, a1 = f64(ms[0][k]) - (b if with_base else 0), f64(ms[1][k]) - (b if with_base else 0)
        if flatten or a0.ndim == 1:
            r = ref_slerp_rows(t, a0.reshape(1, -1), a1.reshape(1, -1)).reshape(a0.shape)
        elif row_wise:
            r = ref_slerp_rows(t, a0.T, a1.T).T
        else:
            r = ref_slerp_rows(t, a0, a1)
        ref[k] = r + (b if with_base else 0)
    close(out, ref)
    with pytest.raises(MergeError, match="exactly 2"):
        merge.nuslerp(None, make(3)[1], weight=[1, 1, 1])


def test_multislerp_matches_reference_and_two_model_slerp():
    base, ms = make(3)
    w = np.array([1.0, 2.0, 0.5])
    out = merge.multislerp(base, ms, weight=w)
    ref = {}
    for k in base:
        b = f64(base[k])
        x = np.stack([f64(m[k]) - b for m in ms]).reshape(3, -1)
        wn = w / w.sum()
        norms = np.linalg.norm(x, axis=1)
        u = x / norms[:, None]
        mean = (wn[:, None] * u).sum(0)
        mean /= np.linalg.norm(mean)
        ref[k] = (mean * (wn * norms).sum()).reshape(b.shape) + b  # tangent mean vanishes
    close(out, ref)
    # equal norms, two models: the geodesic midpoint direction = slerp(0.5)'s
    a = {"x": np.array([1.0, 0.0], np.float32)}
    c = {"x": np.array([0.0, 1.0], np.float32)}
    np.testing.assert_allclose(merge.multislerp(None, [a, c])["x"], [np.sqrt(0.5)] * 2, atol=1e-5)


