"""Demo section: quantize the demo's first MLP with each method and report accuracy vs size."""

from __future__ import annotations

import jax.numpy as jnp


def run(ctx) -> None:
    from ..eval import evaluate
    from ..quant import dequantize, quantize

    m = ctx.models[0]
    d = ctx.data
    x_te, y_te = d["x_test"], d["y_test"]
    calib = [jnp.asarray(d["x"][i:i + 256]) for i in range(0, 1024, 256)]
    g = 20  # divides the MLP's 40 inputs and 100 hidden units
    gptq = lambda bits: quantize(m.params, "gptq", apply_fn=m.model.apply_fn, batches=calib, bits=bits, group_size=g)
    variants = [
        ("fp32", None),
        ("RTN int8 per-channel", lambda: quantize(m.params, "rtn", fmt="int", bits=8, group_size=None)),
        ("RTN int4 g20", lambda: quantize(m.params, "rtn", fmt="uint", bits=4, group_size=g)),
        ("NF4 g20", lambda: quantize(m.params, "rtn", fmt="nf4", group_size=g)),
        ("HQQ int4 g20", lambda: quantize(m.params, "hqq", bits=4, group_size=g)),
        ("GPTQ int4 g20", lambda: gptq(4)),
        ("RTN int3 g20", lambda: quantize(m.params, "rtn", fmt="uint", bits=3, group_size=g)),
        ("HQQ int3 g20", lambda: quantize(m.params, "hqq", bits=3, group_size=g)),
        ("GPTQ int3 g20", lambda: gptq(3)),
        ("RTN int2 g20", lambda: quantize(m.params, "rtn", fmt="uint", bits=2, group_size=g)),
        ("GPTQ int2 g20", lambda: gptq(2)),
    ]
    from .. import tree

    results = []
    for name, make in variants:
        q = m.params if make is None else make()
        acc = evaluate(m.model.apply_fn, dequantize(q), x_te, y_te)[1]
        kib = tree.tree_nbytes(q) / 1024
        results.append({"name": name, "test_acc": acc, "KiB": kib})
        ctx.rows.append((name, f"test acc {acc:.3f}, {kib:.1f} KiB"))
    ctx.summary["quantization"] = results

    def draw(ax):
        for r in results:
            ax.scatter(r["KiB"], r["test_acc"])
            ax.annotate(r["name"], (r["KiB"], r["test_acc"]), fontsize=6)
        ax.set(xlabel="model size (KiB, true bytes)", ylabel="test accuracy", title="Quantizing the MNIST-1D MLP",
               xscale="log")

    ctx.plot("quantization", draw)
