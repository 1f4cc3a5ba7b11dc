"""weightlab.merge.continual (OPCM) against a float64 numpy reference, as a function and as a
stateful transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge
from weightlab.errors import MergeError

from merge_helpers import close, f64, make




# ------------------------------------------------------------------ OPCM

def ref_opcm(base, models, alpha):
    """Independent float64 OPCM (reference loop written out)."""
    tv = lambda m: {k: f64(m[k]) - f64(base[k]) for k in base}
    gnorm = lambda d: np.sqrt(sum((v ** 2).sum() for v in d.values()))
    merged = tv(models[0])
    norms, lam = [gnorm(merged)], 1.0
    for m in models[1:]:
        t = tv(m)
        norms.append(gnorm(t))
        acc = {}
        for k in base:
            if merged[k].ndim == 2:
                u, s, vt = np.linalg.svd(merged[k], full_matrices=True)
                split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
                p = u.T @ t[k] @ vt.T
                np.fill_diagonal(p, 0)
                p[:split, :split] = 0
                acc[k] = lam * merged[k] + u @ p @ vt
            else:
                acc[k] = lam * merged[k] + t[k]
        an = gnorm(acc)
        merged = {k: v * np.mean(norms) / an for k, v in acc.items()}
        lam = an / np.mean(norms)
    return {k: f64(base[k]) + merged[k] for k in base}


def test_opcm_matches_reference_and_keeps_mean_norm():
    base, ms = make(4, seed=9, shapes=((7, 5), (5,)))
    out = merge.opcm(base, ms, alpha=0.5)
    close(out, ref_opcm(base, ms, 0.5))
    gn = lambda m: np.sqrt(sum(((np.asarray(m[k], np.float64) - base[k]) ** 2).sum() for k in base))
    np.testing.assert_allclose(gn(out), np.mean([gn(m) for m in ms]), rtol=1e-4)




def test_opcm_as_a_stateful_transform_folds_models_in_one_at_a_time():
    """OPCM as a transform: the state carries the base and the running scale; feeding the models one
    call at a time (under jit) gives the same merge as the whole sequence at once."""
    import weightlab as wl

    base, ms = make(4, seed=9, shapes=((7, 5), (5,)))
    t = merge.transform("opcm", alpha=0.5)
    state = t.init(base)
    assert isinstance(state, merge.OPCMState)
    step = jax.jit(lambda p, s, m: t.apply(p, s, models=[m]))
    params = base
    for m in ms:
        params, state = step(params, state, m)
    close(params, ref_opcm(base, ms, 0.5))
    assert int(state.count) == 4
    two_at_once, _ = t.apply(*t.apply(base, t.init(base), models=ms[:2]), models=ms[2:])
    close(two_at_once, ref_opcm(base, ms, 0.5))
    with pytest.raises(MergeError, match="alpha"):
        merge.opcm(base, ms, alpha=1.5)
    with pytest.raises(wl.errors.MissingExtraError, match="models="):
        t.apply(base, t.init(base))
