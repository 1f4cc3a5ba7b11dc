"""Benchmark: weightlab.io safetensors save/load vs the `safetensors` package, and vs this machine's
memory-copy bandwidth (the roofline for a load from the page cache).

Prints one JSON line. Usage: python scripts/bench_io.py [--mb 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy as st_np

from weightlab import io as wio


def best(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n_tensors = 16
    per = args.mb * 2**20 // n_tensors // 4
    rng = np.random.default_rng(0)
    tensors = {f"layer_{i}/kernel": rng.standard_normal(per, dtype=np.float32).reshape(-1, 1024) for i in range(n_tensors)}
    nbytes = sum(a.nbytes for a in tensors.values())
    buf = np.empty(nbytes // 4, np.float32)
    src = np.concatenate([a.reshape(-1) for a in tensors.values()])
    copy_s = best(lambda: np.copyto(buf, src), args.repeats)
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = Path(d) / "ours.safetensors", Path(d) / "theirs.safetensors"
        save_ours = best(lambda: wio.save(ours, tensors, overwrite=True), args.repeats)
        save_theirs = best(lambda: st_np.save_file(tensors, theirs), args.repeats)

        def load_ours():
            with wio.open_checkpoint(ours) as c:
                return {k: c[k] for k in c.keys()}

        load_ours_s = best(load_ours, args.repeats)
        load_theirs_s = best(lambda: st_np.load_file(theirs), args.repeats)

        def lazy_one():
            with wio.open_checkpoint(ours) as c:
                return c["layer_7/kernel"]

        lazy_s = best(lazy_one, args.repeats)
    gbps = lambda s: nbytes / s / 1e9
    print(json.dumps({
        "bench": "io_safetensors", "bytes": nbytes, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "memcpy_GBps": round(gbps(copy_s), 2),
        "save_GBps": round(gbps(save_ours), 2), "save_safetensors_pkg_GBps": round(gbps(save_theirs), 2),
        "load_GBps": round(gbps(load_ours_s), 2), "load_safetensors_pkg_GBps": round(gbps(load_theirs_s), 2),
        "load_vs_pkg": round(load_theirs_s / load_ours_s, 2), "save_vs_pkg": round(save_theirs / save_ours, 2),
        "load_vs_memcpy_roofline": round(copy_s / load_ours_s, 2),
        "lazy_one_tensor_ms": round(lazy_s * 1e3, 2), "one_tensor_fraction": 1 / n_tensors,
    }))


if __name__ == "__main__":
    main()
