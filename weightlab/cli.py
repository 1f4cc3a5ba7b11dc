"""The ``weightlab`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import WeightlabError

DESCRIPTION = """\
weightlab: quantize, merge, align and learn to optimize neural-network weights (JAX).

commands:
  info PATH      what is in a checkpoint: tensors, shapes, dtypes, true bytes, parameter count
  quantize IN OUT  quantize a checkpoint's linear weights (rtn/hqq/any4, gptq/awq on calibration text;
                 int, nf4, fp8, mxfp4, nvfp4 ...); --export gptq|compressed-tensors|nf4-bnb
  merge CFG OUT  merge checkpoints from a mergekit YAML config, streamed; the output loads in transformers
  mergekit-yaml CFG OUT  the same with mergekit-yaml's flags and defaults
  eval MODEL     size, weight error and task metrics vs --reference (bert: embeddings, llama: KL/perplexity)
  extract-lora   PEFT LoRA adapter from base + fine-tune by truncated SVD
  merge-lora     merge PEFT LoRA adapters into one, in factor space (concat or SVD re-factoring)
  methods        every registered quantization and merge method, with a one-line summary
  demo           the main job: train two MNIST-1D models and show each pillar on them

examples:
  weightlab info model.safetensors          # one file
  weightlab info ./my-hf-model/             # HF directory (sharded index or one file)
  weightlab info model.safetensors --json   # machine-readable
  weightlab quantize ./hf-dir q.safetensors --method hqq --bits 4 --group-size 64
  weightlab info q.safetensors              # shows the quantized tensors' formats and true sizes
  weightlab merge ties.yml merged/ --dry-run  # validate a mergekit config against the checkpoints
  weightlab quantize ./hf-dir q/ --method gptq --export compressed-tensors   # loads in transformers
  weightlab eval q.safetensors --reference ./hf-dir
  weightlab demo --out demo_out             # a few minutes on 2 CPU cores
  weightlab demo --quick                    # shorter training, for a smoke test

multi-process (multi-host) runs, with any command (before or after it):
  --coordinator HOST:PORT --num-processes N --process-id I [--distributed-timeout S]
  (or WEIGHTLAB_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or JAX_COORDINATOR_ADDRESS ...):
  every process runs the same (unsharded) command; process 0 alone publishes the outputs.

Run `weightlab COMMAND --help` for a command's options.
"""


def _add_quantize_parser(sub, full: bool) -> None:
    """``full``: list the registered methods (imports the quantizers, so only when this command runs)."""
    from .cliargs import group_size, integer, regex, seed
    from .quant.defaults import DEFAULTS

    methods = None
    if full:
        from .quant.registry import METHODS

        methods = METHODS.names()
    q = sub.add_parser(
        "quantize", help="quantize a checkpoint (data-free methods, or GPTQ/AWQ calibrated on text)",
        description="Quantize every 2-D float tensor whose name matches --select (and not --exclude) and write a "
                    "safetensors file whose header records each QArray's layout (`weightlab info` shows true "
                    "sizes; weightlab.quant.load rebuilds the QArrays), or with --export a directory in another "
                    "library's format. Data-free methods (rtn, hqq, any4) take any checkpoint. Calibrated methods "
                    "(gptq, awq) run the model on calibration text, so they take a Hugging Face directory "
                    "(config.json, tokenizer.json) of an architecture weightlab runs (model_type bert or llama); "
                    "the output keeps the checkpoint's tensor names and (out, in) layouts. "
                    "`weightlab methods` lists every method.",
        epilog="examples:\n  weightlab quantize model.safetensors q.safetensors --method rtn --bits 4 --group-size 128\n"
               "  weightlab quantize ./hf-dir q.safetensors --method hqq --bits 3 --group-size 64\n"
               "  weightlab quantize ./hf-dir q.safetensors --method rtn --format nf4 --group-size 64\n"
               "  weightlab quantize ./hf-dir q.safetensors --method gptq --bits 4 --group-size 128 --act-order\n"
               "  weightlab quantize ./hf-dir q.safetensors --method gptq --rotate --seed 0 --calibration text.txt\n"
               "  weightlab quantize ./hf-dir q.safetensors --method awq --calibration-samples 128 --seq-len 512\n"
               "  weightlab quantize ./hf-dir q-gptq/ --method gptq --export gptq\n"
               "  weightlab quantize ./hf-dir q.safetensors --method any4 --dry-run",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    q.add_argument("input", help="a .safetensors file or a Hugging Face checkpoint directory (gptq/awq: a directory)")
    q.add_argument("output", help="output .safetensors file, or directory with --export (refused if it exists, "
                                  "unless --overwrite)")
    q.add_argument("--method", default="rtn", choices=methods, help="a quantizer (default rtn); gptq and awq are "
                                                                     "calibrated")
    q.add_argument("--format", default=None, help=f"rtn: int (symmetric), uint (asymmetric), nf4, fp4_e2m1, fp8_e4m3, "
                                                  f"fp8_e5m2, mxfp4, nvfp4; gptq: int, uint, nf4, fp4_e2m1; awq: "
                                                  f"int, uint (default {DEFAULTS['fmt']})")
    q.add_argument("--bits", type=integer(2, 8), default=None, help=f"bits of int formats (rtn, hqq, gptq, awq; default "
                                                                    f"{DEFAULTS['bits']})")
    q.add_argument("--group-size", type=group_size, default=None, help="weights per scale along the input axis: a number, 'auto' "
                                                      "(128, or the format's block), 'channel' or 'tensor' "
                                                      "(default auto)")
    q.add_argument("--axis", type=integer(), default=None, help="input axis (data-free methods); default -1 for names "
                                                          "ending in '.weight' (PyTorch (out, in)) and -2 otherwise")
    q.add_argument("--select", type=regex, default=DEFAULTS["select"],
                   help=f"regex of tensors to quantize (default {DEFAULTS['select']!r})")
    q.add_argument("--exclude", type=regex, default=DEFAULTS["exclude"],
                   help=f"regex of tensors to keep (default {DEFAULTS['exclude']!r})")
    c = q.add_argument_group("calibration (gptq, awq)")
    c.add_argument("--calibration", metavar="FILE", default=None,
                   help="calibration text, one text per line (default: the bundled English sentences)")
    c.add_argument("--calibration-samples", metavar="N", type=integer(1), default=None,
                   help="use the first N texts (default all)")
    c.add_argument("--seq-len", type=integer(1), default=None,
                   help="tokens per text at most (default 256, or the model's positions if fewer)")
    c.add_argument("--act-order", action="store_true", help="gptq: quantize inputs in order of decreasing Hessian "
                                                            "diagonal (static groups)")
    c.add_argument("--rotate", action="store_true", help="gptq: random Hadamard rotation of each weight's inputs, "
                                                         "kept in the QArray (QuaRot/QuIP incoherence)")
    c.add_argument("--seed", type=seed, default=None, help="seed of --rotate's rotations (default 0)")
    q.add_argument("--export", choices=("gptq", "gptq-v2", "compressed-tensors", "nf4-bnb"), default=None,
                   help="write OUTPUT as a checkpoint directory in this format (weightlab.interop), with the input's "
                        "tokenizer files, instead of one weightlab .safetensors file (gptq: AutoGPTQ's v1 layout, "
                        "v2 when a zero point is 0; gptq-v2: GPTQModel's). Not for awq, rotate or embeddings: these formats "
                        "have no input scaling or rotation and quantize Linear layers only")
    q.add_argument("--dry-run", action="store_true", help="validate and report the plan; write nothing")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=_run_quantize)


def _run_quantize(args) -> int:
    from .quant.cli import run

    return run(args)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def cmd_info(args) -> int:
    import numpy as np

    from .dtypes import true_bytes
    from .io import open_checkpoint
    from .quant.checkpoint import METADATA_KEY, qarray_specs

    path = Path(args.path)
    with open_checkpoint(path) as c:
        rows = []
        for name in c.keys():
            shape, dtype = c.shape(name), c.dtype(name)
            rows.append((name, shape, str(dtype), true_bytes(shape, dtype)))
        meta = dict(c.metadata)
        files = sorted({c.shard_of(n) for n in c.keys()})
    total_params = sum(int(np.prod(s)) for _, s, _, _ in rows)
    total_bytes = sum(b for *_, b in rows)
    by_dtype: dict[str, list[int]] = {}
    for _, s, d, b in rows:
        e = by_dtype.setdefault(d, [0, 0, 0])
        e[0] += 1
        e[1] += int(np.prod(s))
        e[2] += b
    if args.json:
        print(json.dumps({"path": str(path), "files": files, "tensors": len(rows), "params": total_params,
                          "bytes": total_bytes, "metadata": meta,
                          "by_dtype": {d: {"tensors": t, "params": p, "bytes": b} for d, (t, p, b) in by_dtype.items()},
                          "entries": [{"name": n, "shape": list(s), "dtype": d, "bytes": b} for n, s, d, b in rows]},
                         indent=2))
        return 0
    shown = rows if args.limit is None or args.limit <= 0 else rows[: args.limit]
    w = max([len(n) for n, *_ in shown] + [6])
    print(f"{path}  ({len(files)} file{'s' if len(files) != 1 else ''})")
    print(f"{'tensor'.ljust(w)}  {'shape':<18} {'dtype':<14} {'bytes':>12}")
    for n, s, d, b in shown:
        print(f"{n.ljust(w)}  {str(tuple(s)):<18} {d:<14} {_fmt_bytes(b):>12}")
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more (use --limit 0 to show all)")
    print(f"\n{len(rows)} tensors, {total_params:,} parameters, {_fmt_bytes(total_bytes)} (true bytes)")
    for d, (t, p, b) in sorted(by_dtype.items()):
        print(f"  {d:<14} {t:>5} tensors {p:>14,} params {_fmt_bytes(b):>12}")
    qspecs = qarray_specs(meta, str(path))
    meta.pop(METADATA_KEY, None)
    if qspecs:
        dense = sum(int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize for v in qspecs.values())
        packed = sum(b for n, _, _, b in rows if any(n.startswith(p + "/") for p in qspecs))
        fmts = sorted({f"{v['format']['name']} g{v['group_size']}" for v in qspecs.values()})
        print(f"quantized: {len(qspecs)} QArrays ({', '.join(fmts)}): {_fmt_bytes(dense)} dense -> "
              f"{_fmt_bytes(packed)} packed ({dense / max(packed, 1):.2f}x)")
    if meta:
        print("metadata:")
        for k, v in meta.items():
            print(f"  {k}: {v if len(v) < 200 else v[:200] + '...'}")
    return 0


def cmd_demo(args) -> int:
    from .lab.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_methods(args) -> int:
    """Every registered method of every pillar, from the registries."""
    pillars = {"merge": "weightlab.merge.registry", "quant": "weightlab.quant.registry",
               "align": "weightlab.align.registry", "lopt": "weightlab.lopt.registry"}
    import importlib

    for pillar, mod in pillars.items():
        if args.pillar not in (None, pillar):
            continue
        reg = importlib.import_module(mod).METHODS
        print(f"{pillar} methods:")
        for e in reg.entries():
            print(f"  {e.name:<18} {e.summary}")
    return 0


def build_parser(argv=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightlab", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    from .cliargs import integer

    p.add_argument("--version", action="version", version=f"weightlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    i = sub.add_parser("info", help="list tensors, shapes, dtypes and true sizes of a checkpoint",
                       description="Show what a safetensors file or Hugging Face checkpoint directory holds. "
                                   "Only the header is read: nothing is loaded into memory.")
    i.add_argument("path", help="a .safetensors file, or a directory with model.safetensors[.index.json]")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--limit", type=integer(0), default=50, help="rows to show (0 = all; default 50)")
    i.set_defaults(fn=cmd_info)
    from .merge import cli as merge_cli

    _add_quantize_parser(sub, full=argv is None or argv[:1] == ["quantize"])
    merge_cli.add_parser(sub)
    from . import evalcli

    evalcli.add_parser(sub)
    from .align import cli as align_cli

    align_cli.add_parser(sub, full=argv is None or argv[:1] == ["align"])
    from .lopt import cli as lopt_cli

    lopt_cli.add_parser(sub)
    ms = sub.add_parser("methods", help="list every registered method (quantization, merging, alignment, "
                                        "optimizers)",
                        description="The methods each pillar's registry knows, with a one-line summary.")
    ms.add_argument("--pillar", choices=["merge", "quant", "align", "lopt"], default=None)
    ms.set_defaults(fn=cmd_methods)
    d = sub.add_parser("demo", help="train two MNIST-1D models and show every pillar on them",
                       description="The main job: trains two MLPs on MNIST-1D from different seeds and shows "
                                   "what weightlab does to them; writes PNG plots and summary.json.")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="shorter training (smoke test)")
    d.set_defaults(fn=cmd_demo)
    return p


_DIST_FLAGS = ("--coordinator", "--num-processes", "--process-id", "--distributed-timeout")
# Kept in step with weightlab.shard.distributed._ENV (not imported here: that would import JAX).
_DIST_ENV = ("WEIGHTLAB_COORDINATOR", "WEIGHTLAB_NUM_PROCESSES", "WEIGHTLAB_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
             "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _pop_distributed(argv: list) -> tuple[list, dict]:
    """The multi-process flags, accepted before or after the command (``--flag V`` or ``--flag=V``)."""
    rest, found, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        name = next((f for f in _DIST_FLAGS if a == f or a.startswith(f + "=")), None)
        if name is None:
            rest.append(a)
        elif "=" in a:
            found[name] = a.split("=", 1)[1]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):  # a flag is not a value
            found[name] = argv[i + 1]
            i += 1
        else:
            found[name] = None
        i += 1
    return rest, found


def _start_distributed(flags: dict, command: str) -> None:
    """Join a multi-process run when the flags or the environment ask for one (JAX imported only
    then); processes other than 0 compute but do not publish outputs."""
    from .errors import DistributedError

    if any(v is None for v in flags.values()):
        raise DistributedError(f"{[k for k, v in flags.items() if v is None][0]} needs a value")
    from .shard import distributed

    try:
        timeout = int(flags.get("--distributed-timeout", 60))
    except ValueError:
        raise DistributedError(f"--distributed-timeout must be an integer, got {flags['--distributed-timeout']!r}") from None
    s = distributed.settings(flags.get("--coordinator"), flags.get("--num-processes"), flags.get("--process-id"))
    if s is None:
        if "--distributed-timeout" in flags:
            raise DistributedError("--distributed-timeout without --coordinator/--num-processes/--process-id")
        return
    distributed.initialize(**s, timeout_s=timeout)
    if s["process_id"] != 0:
        from .io import atomic

        atomic.set_publisher(False)
    print(f"weightlab {command}: process {s['process_id']} of {s['num_processes']} "
          f"({len(__import__('jax').devices())} devices in all)", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, dist = _pop_distributed(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    started = False
    try:
        if dist or any(os.environ.get(v) for v in _DIST_ENV):
            _start_distributed(dist, args.command)
            started = True
        return args.fn(args)
    except WeightlabError as e:
        print(f"weightlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every writer publishes atomically, so nothing partial is left
        print(f"weightlab {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `weightlab info --json | head`: the reader left; not an error of ours
        _quiet_stdout()
        return 0
    except OSError as e:  # the machine's, not the input's: disk full, permission denied mid-run
        print(f"weightlab {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if started:  # main() called in-process (tests, notebooks): later jobs of this process publish again
            from .io import atomic

            atomic.set_publisher(True)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor (pytest capture)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
