"""``weightlab lopt meta-train OUT.safetensors``: meta-train a learned optimizer on a task family,
with a progress bar, checkpoints every N meta-steps (an interrupted run resumes from them, losing
nothing), and a final evaluation table against Adam with a tuned learning rate on held-out tasks.
``weightlab lopt list``: the registered optimizers and the shipped meta-weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import UsageError

__all__ = ["add_parser"]

_FAMILIES = ("mnist1d_mlp", "digits_mlp", "digits_cnn", "sequence_transformer")
_ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def add_parser(sub) -> None:
    from ..cliargs import integer, real

    p = sub.add_parser("lopt", help="learned optimizers: meta-train one, list the shipped ones",
                       description=__doc__.split("\n\n")[0].replace("\n", " "))
    lsub = p.add_subparsers(dest="lopt_command", metavar="SUBCOMMAND")
    t = lsub.add_parser("meta-train", help="meta-train a learned optimizer, write its meta-weights")
    t.add_argument("output", metavar="OUT", help="meta-weights file to write (.safetensors)")
    t.add_argument("--lopt", choices=["small_fc", "hyper"], default="small_fc")
    t.add_argument("--tasks", choices=_FAMILIES, default="mnist1d_mlp", help="task family to meta-train on")
    t.add_argument("--reparam", action="store_true", help="task augmentation: random per-tensor weight scales")
    t.add_argument("--estimator", choices=["pes", "es", "tbptt"], default="pes")
    t.add_argument("--meta-steps", type=integer(1), default=1000)
    t.add_argument("--particles", type=integer(1), default=8, help="inner runs (ES/PES: antithetic pairs) per step")
    t.add_argument("--trunc-length", type=integer(1), default=50, help="inner steps per truncation")
    t.add_argument("--horizon", type=integer(1), default=1000, help="inner steps before a run restarts")
    t.add_argument("--sigma", type=real(0, None, lo_open=True), default=0.01, help="ES/PES perturbation scale")
    t.add_argument("--meta-lr", type=real(0, None, lo_open=True), default=3e-3)
    t.add_argument("--hidden", type=integer(2), default=32, help="hidden width of the per-parameter MLP")
    t.add_argument("--seed", type=integer(0), default=0)
    t.add_argument("--checkpoint-dir", default=None, help="default: OUT with .ckpt instead of .safetensors")
    t.add_argument("--checkpoint-every", type=integer(1), default=50)
    t.add_argument("--eval-steps", type=integer(0), default=500, help="steps per evaluation run (0: no table)")
    t.add_argument("--eval-seeds", type=integer(1), default=3)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=run_meta_train)
    ls = lsub.add_parser("list", help="registered optimizers and shipped meta-weights")
    ls.set_defaults(fn=run_list)
    p.set_defaults(fn=lambda a: (p.print_help(), 0)[1])


def _table(rows) -> str:
    head = "| task | optimizer | steps | test loss | test accuracy |\n|---|---|---|---|---|"
    body = [f"| {r['task']} | {r['optimizer']} | {r['steps']} | {r['test_loss']:.3f} ± {r['test_loss_std']:.3f} | "
            f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f} |" for r in rows]
    return "\n".join([head, *body])


def held_out(family_name: str):
    """Evaluation tasks not in the family's configs: the first config at 4x its width (and, for MLPs,
    one more layer)."""
    from . import tasks

    fam = tasks.family(family_name)
    cfg = dict(fam.configs[0])
    if "width" in cfg:
        wide = dict(cfg, width=4 * max(c["width"] for c in fam.configs))
        deep = dict(cfg, depth=max(c["depth"] for c in fam.configs) + 1)
        return [fam.make(**wide), fam.make(**deep)]
    return [fam.make(**dict(cfg, dim=2 * cfg["dim"]))]


def evaluation(opt, family_name: str, *, steps: int, seeds: int, key):
    """Rows: the learned optimizer, Adam at its tuned learning rate (a sweep of 7 values per task, by
    the final loss on the meta-validation split), Adam at 1e-3, on :func:`held_out` tasks."""
    import jax
    import optax

    from . import meta

    rows = []
    for task in held_out(family_name):
        best, _ = meta.tune_lr(optax.adam, task, _ADAM_LRS, steps=steps, key=jax.random.fold_in(key, 99),
                               on="valid" if task.valid_batch is not None else "train")
        opts = {"learned": opt, f"adam (tuned lr={best:g})": optax.adam(best), "adam (lr=1e-3)": optax.adam(1e-3)}
        rows += meta.compare(opts, [task], steps=steps, seeds=seeds, key=key)
    return rows


def run_meta_train(args) -> int:
    import jax
    import optax

    from ..io import check_output
    from . import meta, tasks
    from .shipped import save_meta

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise UsageError(f"OUT must end in .safetensors, got {out.name}")
    check_output(out, overwrite=args.overwrite)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".ckpt")
    if args.horizon % args.trunc_length:
        raise UsageError(f"--horizon ({args.horizon}) must be a multiple of --trunc-length ({args.trunc_length})")
    fam = tasks.family(args.tasks, reparam=args.reparam)
    lo = meta.learned(args.lopt, hidden_size=args.hidden)
    make_est = {"pes": meta.pes, "es": meta.es, "tbptt": meta.tbptt}[args.estimator]
    kw = dict(num_particles=args.particles, trunc_length=args.trunc_length, horizon=args.horizon)
    est = make_est(**kw) if args.estimator == "tbptt" else make_est(sigma=args.sigma, **kw)
    key = jax.random.key(args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    mopt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.meta_lr))
    res = meta.train(lo, fam, est, meta_steps=args.meta_steps, key=key, meta_optimizer=mopt, checkpoint=ckpt,
                     checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    recipe = {"command": "weightlab lopt meta-train", "tasks": args.tasks, "reparam": args.reparam,
              "estimator": dict(est.config, name=est.name), "meta_steps": args.meta_steps, "meta_lr": args.meta_lr,
              "seed": args.seed, "cpu_hours": round((time.process_time() - c0) / 3600, 4),
              "resumed_from": res.resumed_from, "skipped_meta_steps": res.skipped,
              "final_meta_loss": float(res.history["meta_loss"][-1])}
    hp = {"hidden_size": args.hidden} if args.lopt == "small_fc" else {"network": "lstm"}
    save_meta(out, res.meta_params, lopt=args.lopt, hp=hp, recipe=recipe,
              overwrite=args.overwrite)
    print(f"wrote {out} ({args.meta_steps} meta-steps, {res.skipped} skipped, "
          f"{time.perf_counter() - t0:.0f} s; checkpoints in {ckpt})")
    if args.eval_steps:
        rows = evaluation(lo.make(res.meta_params), args.tasks, steps=args.eval_steps, seeds=args.eval_seeds,
                          key=jax.random.key(args.seed + 1))
        print(_table(rows))
        print(json.dumps({"evaluation": rows}))
    return 0


def run_list(args) -> int:
    from .registry import METHODS
    from .shipped import available

    print("optimizers:")
    for e in METHODS.entries():
        print(f"  {e.name:<22} {e.kind:<8} {e.summary}")
    print("shipped meta-weights (weightlab.lopt.pretrained(name)):")
    for name, md in available().items():
        r = md.get("recipe", {})
        print(f"  {name:<22} {md['lopt']} v{md['version']}: {r.get('tasks')}, {r.get('estimator', {}).get('name')}, "
              f"{r.get('meta_steps')} meta-steps, seed {r.get('seed')}, {r.get('cpu_hours')} CPU-hours")
    return 0
