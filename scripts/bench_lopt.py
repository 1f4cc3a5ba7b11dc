"""Step time of the learned optimizer (small_fc) against optax.adam, same params, same run.

    python scripts/bench_lopt.py [--sizes 1e6,1e7,1e8] [--repeats 5] [--kernel auto|reference]

For each size N the params are a few matrices totalling N floats (a transformer-like mix of square and
4x-wide layers). One "step" is ``jit(update)`` + ``apply_updates`` with donated state, timed after a
warm-up as the median of ``--repeats``. Prints one JSON line per size with the ratio to Adam, and the
memory-bandwidth view: bytes small_fc's step must touch (read g, p, 4 momenta, v; write them back and
the update) over Adam's (g, p, m, v read; m, v, update written).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_params(n: int, key=0) -> dict:
    d = int(np.sqrt(n / 9))  # 1 square + 2 four-wide matrices per block: 9 d^2 floats
    ks = jax.random.split(jax.random.key(key), 3)
    return {"attn": jax.random.normal(ks[0], (d, d)) * 0.02, "up": jax.random.normal(ks[1], (d, 4 * d)) * 0.02,
            "down": jax.random.normal(ks[2], (4 * d, d)) * 0.02, "bias": jnp.zeros((4 * d,))}


def time_step(opt, params, repeats: int) -> float:
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p * 100.0), params)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = step(params, state, grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p, s = step(p, s, grads)
        jax.block_until_ready((p, s))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    from weightlab import lopt

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e6,1e7,1e8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernel", default="auto", choices=["auto", "reference"])
    a = ap.parse_args()
    use = "auto" if a.kernel == "auto" else False
    for n in [int(float(s)) for s in a.sizes.split(",")]:
        params = make_params(n)
        count = sum(x.size for x in jax.tree.leaves(params))
        t_adam = time_step(optax.adam(1e-3), params, a.repeats)
        t_lo = time_step(lopt.small_fc(use_kernel=use), params, a.repeats)
        t_fac = time_step(lopt.small_fc(use_kernel=use, factored=True, state_dtype=jnp.bfloat16), params, a.repeats)
        print(json.dumps({"bench": "lopt_step", "params": count, "device": jax.devices()[0].device_kind,
                          "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "kernel": a.kernel,
                          "adam_s": round(t_adam, 5), "small_fc_s": round(t_lo, 5),
                          "small_fc_over_adam": round(t_lo / t_adam, 2),
                          "small_fc_lowmem_s": round(t_fac, 5), "lowmem_over_adam": round(t_fac / t_adam, 2),
                          "bytes_ratio_bound": round((7 + 6 + 1) / (4 + 3), 2)}), flush=True)


if __name__ == "__main__":
    main()
