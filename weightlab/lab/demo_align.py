"""Demo section: align the two demo MLPs (trained from different seeds) and interpolate again.

The permutation spec is inferred from the model's jaxpr, checked, and the second model's units are
matched to the first's by weight matching and by activation matching; the midpoint of the aligned
pair, with and without REPAIR, is compared with the naive midpoint of the section above, and the
three interpolation curves are plotted (``alignment.png``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def run(ctx) -> None:
    from .. import align

    f = ctx.apply_fn
    d = ctx.data
    a, b = ctx.models[0].params, ctx.models[1].params
    x = jnp.asarray(d["x"][:2048])
    spec = align.infer_spec(f, a, x[:8])
    align.check_spec(spec, f, a, x[:64])
    ctx.rows.append(("permutation groups inferred from the jaxpr", ", ".join(
        f"{g.name} ({g.size})" for g in spec.groups.values())))
    xt, yt = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])

    def metrics(p):
        logits = f(p, xt)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yt[:, None], axis=1))
        return {"test_acc": jnp.mean(jnp.argmax(logits, -1) == yt), "test_loss": ce}

    wm = align.weight_matching(spec, a, b, key=jax.random.key(0))
    am = align.activation_matching(spec, f, a, b, [x[i:i + 512] for i in range(0, 2048, 512)])
    curves = {"naive": align.loss_barrier(metrics, a, b, n=11)}
    out = {}
    for name, perms in (("weight matching", wm), ("activation matching", am)):
        b2 = align.permute(spec, perms, b)
        curves[name] = align.loss_barrier(metrics, a, b2, n=11)
        mid = align.repair(f, align.interpolate(a, b2, 0.5), (a, b2), [x])
        out[name] = (curves[name].midpoint["test_acc"], float(metrics(mid)["test_acc"]))
    naive = curves["naive"].midpoint["test_acc"]
    ends = float(np.mean([m.test_acc for m in ctx.models[:2]]))
    for name, (acc, rep) in out.items():
        ctx.rows.append((f"midpoint after {name}", f"test acc {acc:.3f}, + REPAIR {rep:.3f} "
                         f"(naive {naive:.3f}, endpoints {ends:.3f})"))
    ctx.rows.append(("accuracy barrier: naive -> weight matching",
                     f"{curves['naive'].barrier['test_acc']:.3f} -> {curves['weight matching'].barrier['test_acc']:.3f}"))
    ctx.summary["alignment"] = {
        "groups": {g.name: g.size for g in spec.groups.values()}, "endpoint_acc": ends, "naive_mid_acc": naive,
        **{name.replace(" ", "_"): {"mid_acc": acc, "repair_mid_acc": rep,
                                    "acc_barrier": curves[name].barrier["test_acc"]} for name, (acc, rep) in out.items()}}

    def draw(ax):
        for name, c in curves.items():
            ax.plot(c.alphas, c.values["test_acc"], "o-", label=name)
        ax.set(xlabel="alpha (0 = seed A, 1 = seed B)", ylabel="test accuracy", title="Interpolation, aligned vs naive")
        ax.legend()

    ctx.plot("alignment", draw)
