"""``weightlab demo``: the main job.

Trains two MLPs on MNIST-1D from different seeds, then shows what each pillar does to them. Each
pillar contributes a section through ``weightlab.lab.demo_<pillar>.run(ctx)``;
a pillar that is not there yet is reported as skipped, never as a failure. Prints a compact table
and writes PNG plots plus ``summary.json`` to the output folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["DemoContext", "run_demo", "PILLARS"]

# (section title, module providing run(ctx)); order = order in the report.
PILLARS = [
    ("alignment (weightlab.align)", "weightlab.lab.demo_align"),
    ("merging (weightlab.merge)", "weightlab.lab.demo_merge"),
    ("quantization (weightlab.quant)", "weightlab.lab.demo_quant"),
    ("learned optimizers (weightlab.lopt)", "weightlab.lab.demo_lopt"),
]


@dataclasses.dataclass
class DemoContext:
    """What a pillar's demo section gets: the data, the two trained models, where to write plots."""

    data: dict
    models: list  # list[weightlab.models.TrainedModel]
    out: Path
    quick: bool
    rows: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)

    @property
    def apply_fn(self) -> Callable:
        return self.models[0].model.apply_fn

    def plot(self, name: str, draw: Callable[[Any], None]) -> Path:
        """Draw on a fresh matplotlib Axes and save ``out/name.png`` atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..io import atomic_file

        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        draw(ax)
        fig.tight_layout()
        path = self.out / f"{name}.png"
        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # off when not a TTY
    last = [0]

    def cb(step: int, loss: float):
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(loss=f"{loss:.3f}")
        if step >= total:
            bar.close()

    return cb


def _train_section(ctx: DemoContext, seeds) -> None:
    from ..models import MNIST1D_MLP, train_mnist1d

    steps = 1500 if ctx.quick else MNIST1D_MLP["steps"]
    for s in seeds:
        t = time.time()
        r = train_mnist1d(seed=s, steps=steps, data=ctx.data, progress=_progress(steps, f"train MLP seed {s}"))
        ctx.models.append(r)
        ctx.rows.append((f"MLP seed {s}: train / test acc", f"{r.train_acc:.3f} / {r.test_acc:.3f}  ({time.time() - t:.1f}s)"))
    ctx.summary["models"] = [{"seed": s, "train_acc": m.train_acc, "test_acc": m.test_acc} for s, m in zip(seeds, ctx.models)]

    def draw(ax):
        for s, m in zip(seeds, ctx.models):
            k = 50
            smooth = np.convolve(m.losses, np.ones(k) / k, mode="valid")
            ax.plot(smooth, label=f"seed {s}")
        ax.set(xlabel="step", ylabel="train loss (smoothed)", title="MNIST-1D MLP training", yscale="log")
        ax.legend()

    ctx.plot("training", draw)


def _checkpoint_section(ctx: DemoContext) -> None:
    from .. import io, tree

    path = ctx.out / "mlp_seed0.safetensors"
    io.save(path, ctx.models[0].params, metadata={"producer": "weightlab demo", "test_acc": ctx.models[0].test_acc},
            overwrite=True)
    back = io.load(path, like=ctx.models[0].params)
    same = all(np.array_equal(a, b) for a, b in zip(tree.to_flat_dict(ctx.models[0].params).values(),
                                                    tree.to_flat_dict(back).values()))
    ctx.rows.append(("checkpoint round-trip (safetensors)", f"{'exact' if same else 'MISMATCH'}, "
                     f"{tree.tree_nbytes(back) / 1024:.1f} KiB, {tree.param_count(back)} params"))


def _naive_merge_section(ctx: DemoContext) -> None:
    from ..eval import interpolation_curve

    a, b = ctx.models[0].params, ctx.models[1].params
    curve = interpolation_curve(ctx.apply_fn, a, b, ctx.data["x_test"], ctx.data["y_test"], 11)
    ctx.summary["naive_interpolation"] = {"alphas": curve.alphas.tolist(), "test_acc": curve.accs.tolist(),
                                          "loss_barrier": curve.loss_barrier}
    ctx.rows.append(("naive average of the two (no alignment)", f"test acc {curve.accs[5]:.3f}"))
    ctx.rows.append(("loss barrier along the straight line", f"{curve.loss_barrier:.3f} nats"))

    def draw(ax):
        ax.plot(curve.alphas, curve.accs, "o-", label="naive interpolation")
        ax.set(xlabel="alpha (0 = seed A, 1 = seed B)", ylabel="test accuracy", title="Interpolating two MLPs")
        ax.legend()

    ctx.plot("interpolation", draw)


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, seeds=(0, 1), echo=print) -> DemoContext:
    """Run the demo; returns the context (rows, summary, trained models)."""
    from ..data import load_mnist1d

    out = Path(out)
    if (out / "summary.json").exists():
        echo(f"note: replacing the previous demo output in {out}/ (use --out DIR to keep it)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ctx = DemoContext(data=load_mnist1d(), models=[], out=out, quick=quick)
    echo(f"weightlab demo: MNIST-1D ({len(ctx.data['y'])} train / {len(ctx.data['y_test'])} test), "
         f"two MLPs from seeds {tuple(seeds)}{' (quick mode)' if quick else ''}")
    sections = [("models", lambda: _train_section(ctx, seeds)), ("checkpoints", lambda: _checkpoint_section(ctx)),
                ("naive merge", lambda: _naive_merge_section(ctx))]
    ctx.summary["sections"] = {}
    for title, fn in sections:
        ctx.rows.append((f"== {title}", ""))
        fn()
        ctx.summary["sections"][title] = "ran"
    for title, modname in PILLARS:
        ctx.rows.append((f"== {title}", ""))
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if not (e.name and modname.startswith(e.name)):
                raise  # a real import error inside an existing pillar must not be hidden
            ctx.rows.append(("skipped", "pillar not in this version yet"))
            ctx.summary["sections"][title] = "skipped"
            continue
        mod.run(ctx)
        ctx.summary["sections"][title] = "ran"
    ctx.summary["seconds"] = time.time() - t0
    from ..io import atomic_file

    with atomic_file(out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(ctx.summary, indent=2))
    width = max(len(k) for k, _ in ctx.rows) + 2
    echo("")
    for k, v in ctx.rows:
        echo(k if k.startswith("==") else f"  {k.ljust(width)}{v}")
    echo(f"\nplots and summary.json in {out}/  ({ctx.summary['seconds']:.0f}s)")
    return ctx
