"""Reordering an axis split over devices: weightlab's ring exchange vs XLA's gather, same run.

For each layout (the permuted axis split over 4 or 8 devices, with or without a second split
axis), times ``shard.permute.take`` and ``jnp.take`` under ``jax.jit`` with the same in/out
shardings, checks they give the same array, and reads each compiled program's per-device scratch
(``memory_analysis().temp_size_in_bytes``) and collectives. Prints one JSON line per layout; the
ratio ``time_ratio`` is ring / XLA (< 1: the ring is faster) and ``temp_ratio`` ring / XLA.

On a CPU the devices are virtual (``--xla_force_host_platform_device_count=8``, set here), so the
times measure XLA's host implementation of the collectives, not an interconnect; the scratch sizes
are what each device would hold on an accelerator.

    python scripts/bench_shard_permute.py [--rows 8192 --cols 2048 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from weightlab import shard as ws  # noqa: E402
from weightlab.shard import hlo  # noqa: E402
from weightlab.shard.permute import take  # noqa: E402


def best_time(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    mesh = ws.make_mesh((2, 4), ("data", "model"))
    x = jax.random.normal(jax.random.key(0), (a.rows, a.cols), jnp.float32)
    idx = jax.random.permutation(jax.random.key(1), a.rows)
    for spec in (P("model", None), P(("data", "model"), None), P("model", "data")):
        sh = NamedSharding(mesh, spec)
        xs = jax.device_put(x, sh)
        ring = jax.jit(lambda v, i, spec=spec: take(v, i, 0, mesh, spec), out_shardings=sh)
        xla = jax.jit(lambda v, i: jnp.take(v, i, axis=0), out_shardings=sh)
        same = bool(np.array_equal(np.asarray(ring(xs, idx)), np.asarray(xla(xs, idx))))
        mem = {n: f.lower(xs, idx).compile().memory_analysis().temp_size_in_bytes for n, f in (("ring", ring), ("xla", xla))}
        coll = {n: sorted(hlo.collectives(hlo.compiled_text(f, xs, idx))) for n, f in (("ring", ring), ("xla", xla))}
        t = {n: best_time(f, xs, idx, repeats=a.repeats) for n, f in (("ring", ring), ("xla", xla))}
        print(json.dumps({"bench": "shard_permute", "backend": jax.default_backend(), "shape": [a.rows, a.cols],
                          "spec": str(spec), "weight_MiB": round(x.nbytes / 2**20, 1), "equal": same,
                          "ring_ms": round(1e3 * t["ring"], 2), "xla_ms": round(1e3 * t["xla"], 2),
                          "time_ratio": round(t["ring"] / t["xla"], 2),
                          "ring_temp_MiB": round(mem["ring"] / 2**20, 1), "xla_temp_MiB": round(mem["xla"] / 2**20, 1),
                          "temp_ratio": round(mem["ring"] / max(mem["xla"], 1), 3),
                          "ring_collectives": coll["ring"], "xla_collectives": coll["xla"]}), flush=True)


if __name__ == "__main__":
    main()
