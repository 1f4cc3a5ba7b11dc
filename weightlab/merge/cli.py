"""``weightlab merge``: mergekit-compatible YAML, streamed tensor by tensor."""

from __future__ import annotations

import argparse

from ..cliargs import float_list, integer, real, regex, seed, size


def _methods_help() -> str:
    """The YAML method list of ``--help``, from the registry (which loads without JAX)."""
    from .config import yaml_methods
    from .registry import METHODS

    mk = [n for n in yaml_methods() if METHODS[n].mergekit]
    ext = [n for n in yaml_methods() if not METHODS[n].mergekit]
    wrap = lambda names: "\n".join("  " + ", ".join(names[i:i + 8]) for i in range(0, len(names), 8))
    return f"merge_method (mergekit's names):\n{wrap(mk)}\nweightlab extensions:\n{wrap(ext)}\n\n"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge checkpoints from a mergekit YAML config (streamed, validated first)",
        description="Merge Hugging Face safetensors checkpoints as described by a mergekit YAML config "
                    "(merge_method, base_model, models with parameters, gradients and filters, dtype). "
                    "Everything is validated from the headers before any tensor is merged; memory holds one "
                    "tensor per model plus one output shard. The output directory appears atomically.",
        epilog=_methods_help() + "example config:\n  merge_method: ties\n  base_model: ./base\n  models:\n    - model: ./ft-a\n"
               "      parameters: {weight: 1.0, density: [0.2, 0.8]}   # gradient over layers\n"
               "    - model: ./ft-b\n      parameters:\n        density:\n          - {filter: mlp, value: 0.5}\n"
               "          - {value: 0.3}\n  parameters: {normalize: true, lambda: 0.9}\n  dtype: bfloat16\n\n"
               "  weightlab merge config.yml out/ --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mergekit YAML file")
    p.add_argument("output", help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--dry-run", action="store_true", help="validate config and checkpoints, report, write nothing")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-size", type=size, default=size("2GB"), help="output shard size (default 2GB)")
    p.add_argument("--seed", type=seed, default=0, help="seed for random methods (DARE, DELLA)")
    p.set_defaults(fn=run)
    e = sub.add_parser(
        "extract-lora", help="extract a PEFT LoRA adapter from a fine-tune (truncated SVD per weight)",
        description="Write a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) whose B @ A is "
                    "the best rank-r approximation of finetuned - base for every 2-D linear weight (embeddings, "
                    "LM head and norms excluded unless --select matches them). Tensor by tensor; validated first.")
    e.add_argument("base", help="base checkpoint (HF safetensors dir or file)")
    e.add_argument("finetuned", help="fine-tuned checkpoint with the same tensors")
    e.add_argument("output", help="adapter directory (refused if it exists, unless --overwrite)")
    e.add_argument("--rank", type=real(0, lo_open=True), default=16,
                   help="rank (integer) or, below 1, the fraction of spectral energy to keep per matrix (default 16)")
    e.add_argument("--select", type=regex, default=None, help="regex of tensor names to factor (default: linear layers)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=run_extract)
    m = sub.add_parser(
        "merge-lora", help="merge PEFT LoRA adapters into one adapter, in factor space",
        description="Merge LoRA adapters of one base model into one PEFT adapter without densifying: per module "
                    "sum_i w_i B_i A_i, either exactly (concat: ranks add up) or re-factored to --rank (svd: the "
                    "best rank-r approximation, via QR of the stacked factors and a small SVD).")
    m.add_argument("adapters", nargs="+", help="PEFT adapter directories (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output adapter directory (refused if it exists, unless --overwrite)")
    m.add_argument("--weights", type=float_list, default=None, help="comma-separated weights, one per adapter (default 1 each)")
    m.add_argument("--method", choices=["concat", "svd"], default="concat")
    m.add_argument("--rank", type=integer(1), default=None, help="svd: output rank (default: the largest input rank)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=run_merge_lora)


def run_merge_lora(args) -> int:
    from ..cliargs import UsageError, output
    from .peft import merge_adapters

    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise UsageError(f"--weights has {len(args.weights)} values for {len(args.adapters)} adapters")
    if args.rank is not None and args.method != "svd":
        raise UsageError("--rank applies to --method svd only (concat keeps every rank)")
    output(args.out, args.overwrite)
    merge_adapters(args.adapters, args.out, weights=args.weights, method=args.method, rank=args.rank,
                   overwrite=args.overwrite)
    return 0


def run_extract(args) -> int:
    from ..cliargs import UsageError, output
    from .peft import extract_lora_checkpoint

    if args.rank >= 1 and args.rank != int(args.rank):
        raise UsageError(f"--rank is an integer rank or an energy fraction below 1, got {args.rank}")
    output(args.output, args.overwrite)
    rank = int(args.rank) if args.rank >= 1 else float(args.rank)
    extract_lora_checkpoint(args.base, args.finetuned, args.output, rank=rank, select=args.select,
                            overwrite=args.overwrite)
    return 0


def run(args) -> int:
    from ..cliargs import output
    from .config import load_config
    from .stream import run_merge

    output(args.output, args.overwrite, args.dry_run)
    cfg = load_config(args.config)
    run_merge(cfg, args.output, dry_run=args.dry_run, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
              seed=args.seed)
    return 0
