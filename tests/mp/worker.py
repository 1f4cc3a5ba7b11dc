"""One process of the 2-process x 2-device tests (tests/test_shard_multiprocess.py).

    python tests/mp/worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz

Runs, across all processes' devices (a ("data", "model") = (1, 4) mesh over 2 x 2 CPU devices): a
sharded TIES merge, sharded GPTQ of a tiny LLaMA's projections, and one small_fc step; process 0
writes the gathered results to OUT.npz. Every host builds the same inputs from fixed keys.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import weightlab as wl
from weightlab import lopt, merge, quant, shard as ws
from weightlab.shard import distributed


def inputs():
    from weightlab.models import llama

    cfg = llama.tiny_config(num_layers=1)
    p = llama.random_llama(jax.random.key(1), cfg)
    toks = jax.random.randint(jax.random.key(2), (4, 16), 0, cfg.vocab_size)
    stats = quant.capture(lambda q, t: llama.llama_apply(q, t, cfg), p, [toks])
    stats = {k: v for k, v in stats.items() if "proj" in k}
    models = jax.tree.map(lambda x: jnp.stack([x + 0.01 * (i + 1) * jnp.sin(x * (i + 2)) for i in range(3)]), p)
    grads = jax.tree.map(lambda x: jnp.cos(3 * x), p)
    return p, stats, models, grads


def jobs():
    gptq = wl.select(r"proj\.weight$", quant.transform("gptq", bits=4, group_size=16))
    return {"merge": (merge.transform("ties", density=0.5), lambda p, s, m, g: dict(models=m)),
            "gptq": (gptq, lambda p, s, m, g: dict(stats=s)),
            "lopt": (lopt.transform("small_fc"), lambda p, s, m, g: dict(grads=g))}


def flat(tree):
    return {k: np.asarray(v) for k, v in wl.tree.to_flat_dict(tree).items()}


def run(mesh):
    p, stats, models, grads = inputs()
    rules = ws.default_rules(p)
    out = {}
    for name, (t, extras) in jobs().items():
        res = wl.apply_once(ws.jit(t, mesh, rules), p, **extras(p, stats, models, grads))
        for k, v in flat(distributed.gather(res)).items():
            out[f"{name}::{k}"] = v
    return out


if __name__ == "__main__":
    coord, n, pid, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    distributed.initialize(coord, n, pid, timeout_s=60)
    assert jax.process_count() == n and len(jax.devices()) == 2 * n and len(jax.local_devices()) == 2
    res = run(ws.make_mesh((1, 2 * n)))
    if pid == 0:
        np.savez(dest, **res)
    distributed.shutdown()
    print("worker", pid, "done", flush=True)
