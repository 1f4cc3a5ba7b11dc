"""``weightlab align A B OUT``: permute checkpoint B's units to match checkpoint A, write the result.

A and B are Hugging Face checkpoint directories of an architecture weightlab runs in pure JAX
(``config.json`` ``model_type`` bert or llama: the bundled BERT/MiniLM and LLaMA-family models),
with the same shapes. The permutation spec is inferred from the traced model (no names), checked
on a tokenized sentence (the outputs of B must not change), then the chosen matcher runs and the
permuted B is written as a loadable HF directory (B's config and tokenizer files, safetensors with
``{"format": "pt"}``): it computes the same function as B, with its units in A's order — ready to
be merged with A (``weightlab merge``) or compared with it. Everything is checked before the
weights are read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import AlignError, CheckpointNotFoundError, UsageError

__all__ = ["add_parser", "run"]

_TEXT = ["A permutation of the hidden units leaves the network's function unchanged.",
         "Weights from different seeds can be compared once their units are aligned."]


def add_parser(sub, full: bool = True) -> None:
    """``full``: list the registered matchers (imports them and JAX, so only when this command runs)."""
    weightless = None
    if full:
        from .registry import METHODS

        weightless = [n for n in METHODS.names() if METHODS[n].data in (None, "activations", "optional-loss")]
    p = sub.add_parser("align", help="permute checkpoint B's units to match A (Git Re-Basin), write B aligned",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("reference", metavar="A", help="the reference HF checkpoint directory")
    p.add_argument("input", metavar="B", help="the checkpoint to permute (same architecture and shapes)")
    p.add_argument("output", metavar="OUT", help="output directory (the permuted B)")
    p.add_argument("--method", choices=weightless, default="weight_matching",
                   help="matcher (activation_matching runs both models on the --calibration text)")
    p.add_argument("--calibration", default=None, help="text file, one text per line (activation matching)")
    p.add_argument("--pin-residual", action="store_true",
                   help="keep the residual stream (the group moving the most tensors) in place; align only the "
                        "units inside blocks (attention heads, MLP hidden units)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the visiting order and restarts")
    p.add_argument("--restarts", type=int, default=1, help="weight matching restarts (best kept)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check and print the spec, write nothing")
    p.set_defaults(fn=run)


def _load(root: Path):
    from .. import io as wio
    from ..quant.cli import hf_config
    from ..quant.cli_calib import architecture

    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root}: not a checkpoint directory")
    cfg = hf_config(root)
    if cfg is None:
        raise UsageError(f"{root}: no config.json; weightlab align runs the model, so it needs a Hugging Face "
                         "checkpoint directory (config.json, tokenizer.json, safetensors) of model_type bert or llama")
    c = wio.open_checkpoint(root)
    names = list(c.keys())
    arch = architecture(cfg, names, str(root))
    shapes = {n: tuple(c.shape(n)) for n in names}
    arch.check_shapes(shapes)
    return cfg, c, arch, shapes


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from ..cliargs import output
    from ..io.shards import save_sharded
    from ..merge.hfout import TOKENIZER_FILES, side_files
    from ..quant.cli_calib import calibration_batches, load_tokenizer, read_texts
    from .check import check_spec
    from .infer import infer_spec
    from .registry import run_method
    from .spec import permute

    output(args.output, args.overwrite, args.dry_run)
    ra, rb = Path(args.reference), Path(args.input)
    if ra.resolve() == rb.resolve():
        raise UsageError("A and B are the same checkpoint")
    out = Path(args.output).resolve()
    for r in (ra.resolve(), rb.resolve()):
        if out == r or out in r.parents:
            raise UsageError(f"the output {args.output} is, or contains, the input {r}: writing it would destroy the "
                             "input (even with --overwrite)")
    if args.restarts < 1:
        raise UsageError(f"--restarts must be >= 1, got {args.restarts}")
    if args.calibration and args.method != "activation_matching":
        raise UsageError("--calibration is read by --method activation_matching only")
    t0 = time.time()
    cfg_a, ca, arch, shapes_a = _load(ra)
    cfg_b, cb, arch_b, shapes_b = _load(rb)
    if arch_b.model_type != arch.model_type:
        raise AlignError(f"A is {arch.model_type}, B is {arch_b.model_type}: only models of one architecture align")
    from ..dtypes import is_floating

    diff = sorted(n for n in set(shapes_a) ^ set(shapes_b)
                  if is_floating((ca if n in shapes_a else cb).dtype(n)))  # buffers (position_ids) may differ
    if diff:
        raise AlignError(f"A and B hold different tensors (e.g. '{diff[0]}' is only in "
                         f"{'A' if diff[0] in shapes_a else 'B'})")
    bad = [n for n in shapes_a if n in shapes_b and shapes_a[n] != shapes_b[n]]
    if bad:
        raise AlignError(f"'{bad[0]}': shape {shapes_a[bad[0]]} in A, {shapes_b[bad[0]]} in B")
    tok = load_tokenizer(ra, 64)
    texts, source = read_texts(args.calibration, None) if args.calibration else (_TEXT, "two built-in sentences")
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in calibration_batches(tok, texts, 64)]
    pa = arch.to_params({n: jnp.asarray(ca[n], jnp.float32) for n in shapes_a if is_floating(ca.dtype(n))})
    spec = infer_spec(arch.apply_fn, pa, batches[0])
    note = ""
    if args.pin_residual:
        emb = [p for p in spec.axes if "embed" in p and "position" not in p and "token_type" not in p
               and len(spec.axes[p]) == 2]
        res = spec.group_of(emb[0], 1) if emb else None
        if res is None:
            note = "; --pin-residual: the residual stream is already fixed (the model's outputs are its features)"
        else:
            spec, note = spec.pin(res), f"; residual stream ({res}) pinned"
    print(f"{ra} <- {rb}: {arch.model_type}, {len(spec.groups)} permutation groups inferred "
          f"({sum(g.size for g in spec.groups.values())} units){note}")
    if args.dry_run:
        print(spec.summary())
        return 0
    pb = arch.to_params({n: jnp.asarray(cb[n], jnp.float32) for n in shapes_b if is_floating(cb.dtype(n))})
    err = check_spec(spec, arch.apply_fn, pb, batches[0], key=jax.random.key(args.seed), trials=1)
    hp = {"restarts": args.restarts} if args.method == "weight_matching" else {}
    perms = run_method(args.method, spec, pa, pb, key=jax.random.key(args.seed), apply_fn=arch.apply_fn,
                       batches=batches, **hp)
    out = permute(spec, perms, pb)
    hf = jax.device_get(arch.to_hf(out))
    dtypes = {n: cb.dtype(n) for n in shapes_b}
    flat = {n: jnp.asarray(v).astype(jnp.dtype(dtypes[n])) if n in dtypes else v for n, v in hf.items()}
    flat.update({n: cb[n] for n in shapes_b if n not in flat})  # B's buffers (position_ids ...), unchanged
    extra = {"config.json": json.dumps(cfg_b, indent=2) + "\n"}
    extra.update({n: b.decode("utf-8") for n, b in side_files(str(rb), TOKENIZER_FILES).items()})
    save_sharded(args.output, flat, metadata={"format": "pt"}, overwrite=args.overwrite, extra_files=extra)
    print(f"wrote {args.output}: B permuted by {args.method} (objective {getattr(perms, 'objective', float('nan')):.6g}"
          f", symmetry check {err:.1e}, data: {source}) in {time.time() - t0:.1f}s")
    return 0
