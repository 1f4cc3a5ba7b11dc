"""The one accelerator check: every Pallas kernel against its jnp reference, timed against its peer and
the memory-bandwidth roofline. Run it whenever a GPU or TPU is lent.

    python scripts/bench_kernels.py [--write docs/benchmarks.md] [--smoke]

* ``dequant_matmul`` (weightlab.kernels.dequant_matmul): int4 g128 and int8 per-channel weights at
  M = 1..256 against bf16 ``jnp.dot`` (speed-up next to the ideal 16 / b_eff of a memory-bound
  weight-only matmul) and the dequantize-then-dot reference (``scripts/bench_quant_kernels.py``).
* ``lopt_update`` (weightlab.kernels.lopt_update, small_fc's fused update): one tensor of R x C
  against the jnp reference and against ``optax.adam``'s update of the same tensor; the roofline is
  the bytes the kernel must move (g, p, v, 4 momenta in, the update out) at the device's peak HBM
  bandwidth, where known.

Prints one JSON line per measurement (with the max deviation from the reference); ``--write`` puts a
table with device and date between the <!-- bench-kernels --> markers of the file. ``--smoke``
(used by the test suite on CPU): tiny shapes in interpret mode, checks only that everything runs and
agrees; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quant_kernels import dequant_rows, timeit  # noqa: E402

PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300, "TPU v5 lite": 819, "TPU v4": 1200, "TPU v5p": 2765}


def _peak(kind: str):
    return next((v for k, v in PEAK_GBPS.items() if k.lower() in kind.lower()), None)


def lopt_rows(shapes, iters, interpret=None, hidden=32):
    from weightlab.kernels import lopt_update as K
    from weightlab.lopt.perparam import init_meta

    dev = str(jax.devices()[0].device_kind)
    meta = init_meta(jax.random.key(0), hidden_size=hidden)
    meta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), meta)
    for r, c in shapes:
        ks = jax.random.split(jax.random.key(2), 4)
        g, p = jax.random.normal(ks[0], (r, c)), jax.random.normal(ks[1], (r, c))
        mom = 0.1 * jax.random.normal(ks[2], (4, r, c))
        v = jnp.abs(jax.random.normal(ks[3], (r, c))) * 0.01
        row, col = jnp.mean(v, 1), jnp.mean(v, 0)
        scales = K.feature_scales(g, p, mom, v, row, col)
        args = (g, p, mom, v, row, col, scales, meta["w1"], meta["b1"], meta["w2"], meta["b2"], meta["w3"], meta["b3"],
                meta["skip"], jnp.float32(1e-3), jnp.float32(1.0))
        kern = jax.jit(lambda *a: K.lopt_update(*a, interpret=interpret))
        ref = jax.jit(K.lopt_update_reference)
        err = float(jnp.max(jnp.abs(kern(*args) - ref(*args))) / (jnp.max(jnp.abs(ref(*args))) + 1e-12))
        adam = optax.adam(1e-3)
        st = adam.init(p)
        adam_step = jax.jit(lambda g, s, p: adam.update(g, s, p)[0])
        t_k, t_r, t_a = timeit(kern, *args, iters=iters), timeit(ref, *args, iters=iters), timeit(adam_step, g, st, p,
                                                                                                   iters=iters)
        moved = 4 * r * c * (3 + 4 + 1)  # g, p, v, 4 momenta in; the update out (float32)
        peak = _peak(dev)
        yield {"bench": "lopt_update", "device": dev, "backend": jax.default_backend(), "R": r, "C": c,
               "hidden": hidden, "max_rel_err_vs_reference": err, "kernel_us": round(t_k * 1e6, 1),
               "reference_us": round(t_r * 1e6, 1), "adam_update_us": round(t_a * 1e6, 1),
               "kernel_over_adam": round(t_k / t_a, 2), "kernel_GBps": round(moved / t_k / 1e9, 1),
               "roofline_us": None if peak is None else round(moved / (peak * 1e9) * 1e6, 1),
               "interpret_mode": jax.default_backend() == "cpu"}


def table(rows) -> str:
    dev = rows[0]["device"] if rows else "?"
    out = [f"Device: {dev}, {time.strftime('%Y-%m-%d')} (`python scripts/bench_kernels.py`).", "",
           "| kernel | shape | kernel | peer | reference | max rel. error | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "dequant_matmul":
            out.append(f"| dequant_matmul {r['weights']} | M={r['M']} K={r['K']} N={r['N']} | {r['kernel_us']} µs | "
                       f"bf16 dot {r['bf16_dot_us']} µs ({r['speedup_vs_bf16']}x; ideal {r['ideal_speedup']}x) | "
                       f"{r['reference_us']} µs | {r['max_rel_err_vs_reference']:.1e} | {r['kernel_GBps']} GB/s |")
        else:
            out.append(f"| lopt_update h{r['hidden']} | {r['R']} x {r['C']} | {r['kernel_us']} µs | adam "
                       f"{r['adam_update_us']} µs ({r['kernel_over_adam']}x Adam) | {r['reference_us']} µs | "
                       f"{r['max_rel_err_vs_reference']:.1e} | {r['kernel_GBps']} GB/s, roofline {r['roofline_us']} µs |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU (tests)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--write", default=None)
    a = ap.parse_args(argv)
    smoke = a.smoke or jax.default_backend() == "cpu"
    interpret = True if jax.default_backend() == "cpu" else None
    rows = list(dequant_rows([1] if smoke else [1, 16, 64, 256], [(256, 256)] if smoke else [(4096, 4096), (4096, 14336)],
                             1 if smoke else a.iters, interpret=interpret))
    rows += list(lopt_rows([(64, 128)] if smoke else [(1024, 1024), (4096, 4096), (4096, 14336)], 1 if smoke else a.iters,
                           interpret=interpret))
    for r in rows:
        print(json.dumps(r), flush=True)
    bad = [r for r in rows if not r["max_rel_err_vs_reference"] <= 2e-2]
    if a.write and not smoke:
        with open(a.write) as f:
            doc = f.read()
        doc = re.sub(r"(<!-- bench-kernels -->\n).*?(<!-- /bench-kernels -->)", lambda m: m.group(1) + table(rows) + m.group(2),
                     doc, flags=re.S)
        with open(a.write, "w") as f:
            f.write(doc)
    if bad:
        print(f"{len(bad)} kernel results deviate from their references", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
