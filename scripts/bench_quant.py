"""Quantization quality on the real all-MiniLM-L6-v2 weights, plus RTN throughput vs memory bandwidth.

Quantizes all 36 encoder linear layers with each method at 4-bit and 3-bit (groups of 128 along the
input axis) and reports, per method:
* ``layer_err``: mean over layers of the relative output error ``||X(W - Ŵ)|| / ||XW||`` on the
  calibration sentences (computed exactly from each layer's calibration Gram matrix);
* ``cos``: mean / min cosine between the quantized and fp32 sentence embeddings of held-out sentences.
Prints one JSON line per configuration, then one for RTN throughput.

    python scripts/bench_quant.py            # ~3-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from weightlab import quant, tree
from weightlab.data.sentences import CALIBRATION, HELD_OUT
from weightlab.models import load_minilm

SELECT = r"encoder/.*kernel$"


def seconds_per_call(f, x, reps: int = 5) -> float:
    jax.block_until_ready(f(x))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main():
    m = load_minilm()
    mask = lambda b: b["attention_mask"]
    batches = [{k: jnp.asarray(v) for k, v in m.tokenize(CALIBRATION[i:i + 8]).items()} for i in range(0, 32, 8)]
    stats = quant.capture(m.apply_fn, m.params, batches, row_mask=mask,
                          select=lambda p: __import__("re").search(SELECT, p) is not None)
    flat = tree.to_flat_dict(m.params)
    ref = m.encode(HELD_OUT)
    key = jax.random.key(0)

    def layer_err(q):
        errs = []
        qf = tree.flatten_with_paths(q, is_leaf=quant.is_qarray)[0]
        for p, x in qf:
            if quant.is_qarray(x):
                d = np.asarray(flat[p], np.float64) - np.asarray(x.dequantize(), np.float64)
                r = np.asarray(stats[p].xtx, np.float64)
                w = np.asarray(flat[p], np.float64)
                errs.append(np.sqrt(np.sum((r @ d) * d) / np.sum((r @ w) * w)))
        return float(np.mean(errs))

    for bits in (4, 3):
        g = 128
        cal = dict(select=SELECT, apply_fn=m.apply_fn, batches=batches, row_mask=mask)
        configs = {
            "rtn_sym": lambda: quant.quantize(m.params, "rtn", select=SELECT, fmt="int", bits=bits, group_size=g),
            "rtn_asym": lambda: quant.quantize(m.params, "rtn", select=SELECT, fmt="uint", bits=bits, group_size=g),
            "hqq": lambda: quant.quantize(m.params, "hqq", select=SELECT, bits=bits, group_size=g),
            "awq": lambda: quant.quantize(m.params, "awq", sequential=False, bits=bits, group_size=g, **cal),
            "gptq": lambda: quant.quantize(m.params, "gptq", bits=bits, group_size=g, **cal),
            "gptq_act_order": lambda: quant.quantize(m.params, "gptq", bits=bits, group_size=g, act_order=True, **cal),
            "gptq_rotated": lambda: quant.quantize(m.params, quant.rotate(quant.gptq(bits=bits, group_size=g)), key=key,
                                                   **cal),
        }
        if bits == 4:
            configs["nf4"] = lambda: quant.quantize(m.params, "rtn", select=SELECT, fmt="nf4", group_size=g)
            configs["any4"] = lambda: quant.quantize(m.params, "any4", select=SELECT, group_size=g)
        for name, make in configs.items():
            t = time.time()
            q = make()
            secs = time.time() - t
            e = m.encode(HELD_OUT, params=quant.dequantize(q))
            cos = np.sum(e * ref, axis=1)
            print(json.dumps({"bench": "quant_minilm", "bits": bits, "group": g, "method": name,
                              "layer_err": round(layer_err(q), 4), "cos_mean": round(float(cos.mean()), 4),
                              "cos_min": round(float(cos.min()), 4), "seconds": round(secs, 1)}), flush=True)

    # RTN throughput vs this machine's memory bandwidth (copy of the same bytes)
    w = jax.random.normal(jax.random.key(1), (4096, 4096))
    t_rtn = seconds_per_call(jax.jit(lambda w: quant.quantize_rtn(w, "int", 4, 128)), w)
    t_copy = seconds_per_call(jax.jit(lambda w: w * 1.0001), w)
    print(json.dumps({"bench": "rtn_throughput", "shape": [4096, 4096], "rtn_GBps": round(w.nbytes / t_rtn / 1e9, 2),
                      "copy_GBps": round(2 * w.nbytes / t_copy / 1e9, 2),
                      "rtn_vs_copy": round(t_copy / t_rtn, 3)}))


if __name__ == "__main__":
    main()
