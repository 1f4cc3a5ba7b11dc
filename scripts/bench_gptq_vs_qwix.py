"""GPTQ on one layer: weightlab vs qwix (Google's JAX quantization library), same W, same H.

qwix is not a weightlab dependency: if it cannot be imported, this script pip-installs
``qwix==0.1.8`` (no dependencies; its needs are ours) into ``.bench_deps/`` and imports it from
there. Both run int4, groups of 128 along the inputs, 1% dampening, block 128, symmetric absmax
scales (qwix's default calibration), jit-compiled, on the same random correlated-input layer.
Reported: wall time (first call incl. compile, then steady state) and the relative output error
``sqrt(tr(Dᵀ H D) / tr(Wᵀ H W))``.

    python scripts/bench_gptq_vs_qwix.py --sizes 512,1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def import_qwix():
    try:
        import qwix  # noqa: F401  (probe: is it importable?)
    except ImportError:
        deps = ROOT / ".bench_deps"
        if not (deps / "qwix").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps),
                            "qwix==0.1.8", "opt_einsum"], check=True)
        sys.path.insert(0, str(deps))
    from qwix._src.core import qarray as qq
    from qwix.contrib import gptq_core

    return qq, gptq_core


def timed(f, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    return out, first, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,1024")
    args = ap.parse_args()
    from weightlab.quant.second_order import gptq_quantize

    qq, gptq_core = import_qwix()
    for k in (int(s) for s in args.sizes.split(",")):
        n = k
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4 * k, k)).astype(np.float32) @ (rng.standard_normal((k, k)).astype(np.float32) * 0.1)
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)  # (in, out)
        h = jnp.asarray(2 * x.T @ x / len(x))

        def rel_err(wq):
            d = np.asarray(w, np.float64) - np.asarray(wq, np.float64)
            hh = np.asarray(h, np.float64)
            return float(np.sqrt(np.sum((hh @ d) * d) / np.sum((hh @ w) * w)))

        ours_fn = jax.jit(lambda w, h: gptq_quantize(w, h, fmt="int", bits=4, group_size=128,
                                                     scale_dtype=jnp.float32).dequantize())
        ours, ours_first, ours_t = timed(ours_fn, jnp.asarray(w), h)
        how = qq.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0], tiled_axes={1: 128})
        theirs_fn = jax.jit(lambda w_t, h: qq.dequantize(gptq_core.quantize_weight(w_t, h, how)[0]))
        theirs, th_first, th_t = timed(theirs_fn, jnp.asarray(w.T), h)
        print(json.dumps({"bench": "gptq_vs_qwix", "K": k, "N": n, "device": str(jax.devices()[0].device_kind),
                          "weightlab_first_s": round(ours_first, 2), "weightlab_s": round(ours_t, 3),
                          "qwix_first_s": round(th_first, 2), "qwix_s": round(th_t, 3),
                          "speedup_first_call": round(th_first / ours_first, 1),
                          "speedup_steady": round(th_t / ours_t, 2),
                          "weightlab_rel_err": round(rel_err(ours), 5),
                          "qwix_rel_err": round(rel_err(np.asarray(theirs).T), 5)}), flush=True)


if __name__ == "__main__":
    main()
