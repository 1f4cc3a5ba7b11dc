"""Per-device memory of every pillar's job for a >= 1B LLaMA on 8 / 64 / 256 devices, from shapes alone.

    python scripts/plan_scale.py [--write docs/scale.md]

The model is Llama-3.2-1B's shapes (1.24B parameters, bfloat16, tied embeddings) described with
``jax.ShapeDtypeStruct`` (nothing is allocated); the meshes are ("data", "model") = (1, 8) tensor
parallel, (8, 8) and (32, 8) with FSDP over "data" (weightlab.shard.default_rules). Prints the table
(GiB per device) and, with --write, puts it between the <!-- scale-plan --> markers of the file.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp

from weightlab.models import llama
from weightlab.shard import default_rules, plan

CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
              head_dim=64, tie_word_embeddings=True)
MESHES = {"8 devices (TP 8)": ({"data": 1, "model": 8}, False), "64 (FSDP 8 x TP 8)": ({"data": 8, "model": 8}, True),
          "256 (FSDP 32 x TP 8)": ({"data": 32, "model": 8}, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.bfloat16) for k, v in llama.expected_shapes(llama.LlamaConfig(**CONFIG)).items()}
    n = sum(x.size for x in shapes.values())
    plans = {name: plan.plan_memory(shapes, axes, default_rules(shapes, fsdp=fsdp)) for name, (axes, fsdp) in MESHES.items()}
    table = (f"Llama-3.2-1B shapes: {n / 1e9:.3f}B parameters, bfloat16; GiB per device; 4-bit groups of 128 "
             f"(planned in {time.perf_counter() - t0:.1f} s on a 2-core CPU, `python scripts/plan_scale.py`).\n\n"
             + plan.markdown(plans))
    print(table)
    if a.write:
        with open(a.write) as f:
            doc = f.read()
        new = re.sub(r"(<!-- scale-plan -->\n).*?(<!-- /scale-plan -->)", lambda m: m.group(1) + table + m.group(2), doc,
                     flags=re.S)
        with open(a.write, "w") as f:
            f.write(new)


if __name__ == "__main__":
    main()
