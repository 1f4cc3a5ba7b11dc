"""``weightlab eval``: size, weight error and task behaviour of a quantized or merged checkpoint, as a
table or one JSON object (the library face is :func:`weightlab.evaluate.evaluate`)."""

from __future__ import annotations

import argparse
import json

from .cliargs import integer

_MAX_ROWS = 8  # differing tensors listed in the table (--json lists all)


def add_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a quantized or merged checkpoint (bytes, weight error, task metrics)",
        description="Report what a quantized or merged checkpoint costs and how it behaves: true bytes, "
                    "dense-equivalent bytes and bits per weight; with --reference, which tensors differ and the "
                    "relative weight error per tensor family. For model_type bert (sentence encoders such as "
                    "all-MiniLM-L6-v2): embedding cosine to the reference on held-out sentences, Spearman "
                    "correlation with bundled similarity scores, retrieval recall@1 and MRR. For model_type llama: "
                    "perplexity on a bundled text, KL(reference || model) and top-1 agreement. Other model types: "
                    "bytes and weight errors only. MODEL and the reference are HF checkpoint directories or "
                    "weightlab quantized .safetensors files (config.json/tokenizer.json are looked for beside a "
                    "file, then in the directory it was quantized from, then beside the reference). Everything "
                    "is validated before any tensor is read.",
        epilog="examples:\n  weightlab quantize ./minilm q4.safetensors --method rtn --bits 4\n"
               "  weightlab eval q4.safetensors --reference ./minilm\n"
               "  weightlab eval merged/ --reference ./base --json\n"
               "  weightlab eval q4.safetensors --reference ./minilm --weights-only",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", help="HF checkpoint directory or .safetensors file (quantized or not)")
    e.add_argument("--reference", default=None, help="the checkpoint to compare with (same tensor names and shapes)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--weights-only", action="store_true",
                   help="bytes and weight errors only: no config.json or tokenizer needed, no forward pass")
    e.add_argument("--seq-len", type=integer(2), default=128, help="decoders: tokens per perplexity window (default 128)")
    e.set_defaults(fn=run)


def run(args) -> int:
    from .evaluate import evaluate

    report = evaluate(args.model, args.reference, weights_only=args.weights_only, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(_finite(report), indent=2, allow_nan=False))
    else:
        print(format_report(report))
    return 0


def _finite(x):
    """The report with NaN/Inf floats (an undefined correlation, an overflowing perplexity) as null,
    so ``--json`` prints strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def _num(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def _sizes(w: dict) -> list[str]:
    out = [f"  {w['tensors']} tensors, {w['params']:,} parameters: {_mib(w['bytes'])} true bytes "
           f"({w['bits_per_weight']:.2f} bits/weight), {_mib(w['dense_bytes'])} dense-equivalent, "
           f"{_mib(w['file_bytes'])} on disk in {w['files']} file{'s' if w['files'] != 1 else ''}"]
    q = w.get("quantized")
    if q:
        out.append(f"  quantized: {q['tensors']} tensors, {q['params']:,} weights in {_mib(q['bytes'])} = "
                   f"{q['bits_per_weight']:.3f} bits/weight ({', '.join(q['formats'])})")
    return out


def format_report(r: dict) -> str:
    """The table ``weightlab eval`` prints for a report of :func:`weightlab.evaluate.evaluate`."""
    lines = [f"model: {r['model']}" + (f"  ({r['model_type']}, {r['task']})" if r.get("model_type") else "")]
    lines += _sizes(r["weights"])
    if r.get("reference"):
        lines.append(f"reference: {r['reference']}")
        lines += _sizes(r["reference_weights"])
        d = r["diff"]
        lines.append(f"\nweights: {d['tensors_differ']} of {r['weights']['tensors']} tensors differ; relative error "
                     f"of all weights {_num(d['rel_err'], '.3e')}")
        fams = d["families"]
        if fams:
            w = max(len(f) for f in fams)
            lines.append(f"  {'family'.ljust(w)}  {'tensors':>7} {'differ':>6} {'max rel err':>12} {'mean rel err':>12}")
            for f, v in fams.items():
                lines.append(f"  {f.ljust(w)}  {v['tensors']:>7} {v['differ']:>6} {_num(v['max_rel_err'], '.3e'):>12} "
                             f"{_num(v['mean_rel_err'], '.3e'):>12}")
        shown = d["differ"][:_MAX_ROWS]
        if shown:
            lines.append(f"  differing tensors{' (first ' + str(len(shown)) + ', --json lists all)' if len(d['differ']) > len(shown) else ''}:")
            lines += [f"    {n}  rel err {_num(d['tensor_rel_err'][n], '.3e')}" for n in shown]
    enc, dec = r.get("encoder"), r.get("decoder")
    cols = ["model"] + (["reference"] if r.get("reference") else [])
    if enc:
        lines.append(f"\nencoder ({enc['pairs']} sentence pairs, {enc['queries']} queries over {enc['passages']} passages)")
        if "cosine_to_reference" in enc:
            c = enc["cosine_to_reference"]
            lines.append(f"  embedding cosine to reference ({c['sentences']} held-out sentences): mean {c['mean']:.6f}, "
                         f"min {c['min']:.6f}")
        lines.append(f"  {'':<14}" + "".join(f"{k:>12}" for k in cols))
        for key, label in (("sts_spearman", "STS spearman"), ("recall@1", "recall@1"), ("mrr", "MRR")):
            lines.append(f"  {label:<14}" + "".join(f"{_num(enc[k][key]):>12}" for k in cols))
    if dec:
        lines.append(f"\ndecoder ({dec['tokens']} tokens, {dec['windows']} windows of <= {dec['seq_len']})")
        lines.append("  perplexity    " + "".join(f"{k}: {_num(dec[k]['perplexity'], '.6g')}  " for k in cols).rstrip())
        if "kl" in dec:
            lines.append(f"  KL(reference || model) {dec['kl']:.6f} nats/token; top-1 agreement {dec['top1_agreement']:.4f}")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
