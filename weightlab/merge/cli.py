"""``weightlab merge``: mergekit-compatible YAML, streamed tensor by tensor."""

from __future__ import annotations

import argparse
import re


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 500MB, 2GB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


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
    p.add_argument("--max-shard-size", type=_size, default=_size("2GB"), help="output shard size (default 2GB)")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA)")
    p.set_defaults(fn=run)
    e = sub.add_parser(
        "extract-lora", help="extract a PEFT LoRA adapter from a fine-tune (truncated SVD per weight)",
        description="Write a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) whose B @ A is "
                    "the best rank-r approximation of finetuned - base for every 2-D linear weight (embeddings, "
                    "LM head and norms excluded unless --select matches them). Tensor by tensor; validated first.")
    e.add_argument("base", help="base checkpoint (HF safetensors dir or file)")
    e.add_argument("finetuned", help="fine-tuned checkpoint with the same tensors")
    e.add_argument("output", help="adapter directory (refused if it exists, unless --overwrite)")
    e.add_argument("--rank", type=float, default=16,
                   help="rank (integer) or, below 1, the fraction of spectral energy to keep per matrix (default 16)")
    e.add_argument("--select", default=None, help="regex of tensor names to factor (default: linear layers)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=run_extract)
    m = sub.add_parser(
        "merge-lora", help="merge PEFT LoRA adapters into one adapter, in factor space",
        description="Merge LoRA adapters of one base model into one PEFT adapter without densifying: per module "
                    "sum_i w_i B_i A_i, either exactly (concat: ranks add up) or re-factored to --rank (svd: the "
                    "best rank-r approximation, via QR of the stacked factors and a small SVD).")
    m.add_argument("adapters", nargs="+", help="PEFT adapter directories (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output adapter directory (refused if it exists, unless --overwrite)")
    m.add_argument("--weights", default=None, help="comma-separated weights, one per adapter (default 1 each)")
    m.add_argument("--method", choices=["concat", "svd"], default="concat")
    m.add_argument("--rank", type=int, default=None, help="svd: output rank (default: the largest input rank)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=run_merge_lora)


def run_merge_lora(args) -> int:
    from .peft import merge_adapters

    weights = [float(x) for x in args.weights.split(",")] if args.weights else None
    merge_adapters(args.adapters, args.out, weights=weights, method=args.method, rank=args.rank,
                   overwrite=args.overwrite)
    return 0


def run_extract(args) -> int:
    from .peft import extract_lora_checkpoint

    rank = int(args.rank) if args.rank >= 1 else float(args.rank)
    extract_lora_checkpoint(args.base, args.finetuned, args.output, rank=rank, select=args.select,
                            overwrite=args.overwrite)
    return 0


def run(args) -> int:
    from .config import load_config
    from .stream import run_merge

    cfg = load_config(args.config)
    run_merge(cfg, args.output, dry_run=args.dry_run, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
              seed=args.seed)
    return 0
