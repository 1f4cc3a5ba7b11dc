"""Benchmark the fused dequant-matmul kernel against bf16 ``jnp.dot`` and the bandwidth roofline.

For each M in --ms and (K, N) in --shapes: time the Pallas kernel on int4 g128 (fp16 scales) and
int8 per-channel weights, the jnp reference (dequantize + dot) and a bf16 ``jnp.dot``; report the
speed-up over bf16 next to the ideal ``16 / b_eff`` (weight-only matmuls at small M are
memory-bound). Prints one JSON line per configuration. Needs a GPU or TPU for meaningful numbers;
on CPU it runs the kernel in interpret mode at one small shape only, to check that the script works.

    python scripts/bench_quant_kernels.py --ms 1,16,64,256 --shapes 4096x4096,4096x14336
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from weightlab import quant
from weightlab.kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference
from weightlab.quant.matmul import prepare


def timeit(f, *args, iters=50):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def dequant_rows(ms, shapes, iters, interpret=None):
    """One dict per (shape, weight format, M): kernel vs bf16 dot vs reference, and the kernel's
    largest deviation from the reference (relative to the output's scale)."""
    backend = jax.default_backend()
    dev = str(jax.devices()[0].device_kind)
    for k, n in shapes:
        w = (jax.random.normal(jax.random.key(0), (k, n)) * 0.02).astype(jnp.bfloat16)
        variants = {"int4_g128": quant.quantize_rtn(w, "int", 4, 128), "int8_channel": quant.quantize_rtn(w, "int", 8, None)}
        for name, q in variants.items():
            p = prepare(q)
            b_eff = q.bits_per_weight
            kern = jax.jit(lambda x, p: dequant_matmul(x, p, interpret=interpret))
            ref = jax.jit(lambda x, p: dequant_matmul_reference(x, p))
            dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
            for m in ms:
                x = jax.random.normal(jax.random.key(1), (m, k)).astype(jnp.bfloat16)
                yk, yr = kern(x, p).astype(jnp.float32), ref(x, p).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(yk - yr)) / (jnp.max(jnp.abs(yr)) + 1e-12))
                t_bf16 = timeit(dense, x, w, iters=iters)
                t_kernel = timeit(kern, x, p, iters=iters)
                t_ref = timeit(ref, x, p, iters=iters)
                bytes_moved = q.nbytes + m * k * 2 + m * n * 2
                yield {"bench": "dequant_matmul", "device": dev, "backend": backend, "weights": name, "M": m, "K": k,
                       "N": n, "b_eff": round(b_eff, 3), "max_rel_err_vs_reference": err,
                       "kernel_us": round(t_kernel * 1e6, 1), "bf16_dot_us": round(t_bf16 * 1e6, 1),
                       "reference_us": round(t_ref * 1e6, 1), "speedup_vs_bf16": round(t_bf16 / t_kernel, 2),
                       "ideal_speedup": round(16 / b_eff, 2), "kernel_GBps": round(bytes_moved / t_kernel / 1e9, 1),
                       "interpret_mode": backend == "cpu"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--shapes", default="4096x4096,4096x11008,4096x14336")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    ms = [1] if on_cpu else [int(m) for m in args.ms.split(",")]
    shapes = [(256, 256)] if on_cpu else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for row in dequant_rows(ms, shapes, 2 if on_cpu else args.iters):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
