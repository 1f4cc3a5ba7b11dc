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
    add_merge_arguments(p, default_shard="2GB")
    k = sub.add_parser(
        "mergekit-yaml", help="mergekit-yaml's command line: same config, same flags, same defaults",
        description="A drop-in for mergekit's `mergekit-yaml CONFIG OUT [options]`: the same YAML and flags "
                    "(--out-shard-size 5B, --copy-tokenizer, --allow-crimes, --random-seed, --write-model-card ...; "
                    "GPU and loader flags such as --cuda or --lazy-unpickle are accepted with a note). The output "
                    "directory loads with transformers' from_pretrained.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_merge_arguments(k, default_shard="5B")
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


# mergekit-yaml's options that only steer its own loader or device placement: accepted so existing
# scripts run unchanged, each with the note printed when it is given.
_NOTED = {
    "cuda": "weightlab computes on JAX's default device",
    "low_cpu_memory": "weightlab streams tensor by tensor; memory is one tensor per model plus one shard",
    "read_to_gpu": "weightlab computes on JAX's default device",
    "multi_gpu": "weightlab computes on JAX's default device",
    "gpu_rich": "weightlab computes on JAX's default device",
    "lazy_unpickle": "weightlab reads safetensors lazily and never unpickles",
    "clone_tensors": "every output tensor is written from its own buffer already",
    "trust_remote_code": "weightlab never runs model code",
    "transformers_cache": "weightlab merges local checkpoints only; nothing is downloaded",
    "lora_merge_cache": "LoRA adapters are applied in memory",
    "lora_merge_dtype": "LoRA adapters are applied in float32",
    "num_threads": "set XLA_FLAGS / the process affinity to bound threads",
}


def add_merge_arguments(p, default_shard: str) -> None:
    """The arguments of ``weightlab merge`` and ``weightlab mergekit-yaml``: weightlab's own plus every
    mergekit-yaml flag (those that matter on a CPU act; loader/GPU ones are accepted with a note)."""
    p.add_argument("config", help="mergekit YAML file")
    p.add_argument("output", help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--dry-run", action="store_true", help="validate config and checkpoints, report, write nothing")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size", type=size, default=size(default_shard),
                   help=f"output shard size in bytes, e.g. 2GB, 500MB or mergekit's 5B (default {default_shard})")
    p.add_argument("--seed", "--random-seed", dest="seed", type=seed, default=0,
                   help="seed for random methods (DARE, DELLA)")
    flag = lambda name, default, helptext: p.add_argument(
        f"--{name}", default=default, action=argparse.BooleanOptionalAction, help=helptext)
    flag("copy-tokenizer", True, "copy the tokenizer (tokenizer_source, else the base / first model's) (default: on)")
    flag("write-model-card", True, "write README.md recording the recipe (default: on)")
    flag("allow-crimes", False, "allow models whose config.json architectures differ")
    flag("safe-serialization", True, "weightlab always writes safetensors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="accepted for mergekit compatibility")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, why in _NOTED.items():
        opt = "--" + name.replace("_", "-")
        if name in ("transformers_cache", "lora_merge_cache", "lora_merge_dtype"):
            p.add_argument(opt, default=None, metavar="VALUE", help=f"accepted, no effect: {why}")
        elif name == "num_threads":
            p.add_argument(opt, type=integer(1), default=None, help=f"accepted, no effect: {why}")
        else:
            p.add_argument(opt, default=False, action=argparse.BooleanOptionalAction,
                           help=f"accepted, no effect: {why}")
    p.set_defaults(fn=run)


def run(args) -> int:
    from ..cliargs import output
    from .config import load_config
    from .stream import run_merge

    for name, why in _NOTED.items():
        if getattr(args, name, None) not in (None, False):
            print(f"note: --{name.replace('_', '-')} has no effect here ({why})")
    if not args.safe_serialization:
        print("note: --no-safe-serialization has no effect (weightlab writes safetensors only)")
    output(args.output, args.overwrite, args.dry_run)
    cfg = load_config(args.config)
    run_merge(cfg, args.output, dry_run=args.dry_run, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
              seed=args.seed, progress=not args.quiet, copy_tokenizer=args.copy_tokenizer,
              write_model_card=args.write_model_card, allow_crimes=args.allow_crimes)
    return 0


def mergekit_yaml(argv=None) -> int:
    """The ``weightlab-mergekit-yaml`` console script: ``mergekit-yaml CONFIG OUT [flags]`` with
    mergekit's defaults (5B-byte shards, tokenizer copied, model card written)."""
    import sys

    from ..cli import main

    return main(["mergekit-yaml", *(sys.argv[1:] if argv is None else argv)])
