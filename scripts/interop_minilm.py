"""The issue-10 evidence run: GPTQ 4-bit g128 of the real all-MiniLM-L6-v2 from the CLI, then the
same QArrays exported to other libraries' layouts and imported back.

For each stage prints one JSON line: held-out embedding cosine to fp32 (mean / min over
``weightlab.data.sentences.HELD_OUT``), wall time, bytes on disk, and whether the imported codes are
identical to the CLI's. Stages: ``cli`` (``weightlab quantize --method gptq``), then
``gptq`` / ``compressed-tensors`` export -> import, and ``nf4-bnb`` for an RTN NF4 g64 copy (the
layout bitsandbytes holds). Everything runs on the CPU from the pip-installed model.

    python scripts/interop_minilm.py        # ~2-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    from weightlab import interop, quant
    from weightlab.cli import main as cli
    from weightlab.data.sentences import HELD_OUT
    from weightlab.models import bert

    m = bert.load_minilm()
    ref = m.encode(HELD_OUT)

    def cosine(flat) -> tuple[float, float]:
        e = m.encode(HELD_OUT, params=quant.dequantize(bert.hf_to_params(flat)))
        c = np.sum(e * ref, axis=1)
        return round(float(c.mean()), 4), round(float(c.min()), 4)

    def same_codes(a, b) -> bool:
        qs = [k for k, v in a.items() if quant.is_qarray(v)]
        return all(np.array_equal(np.asarray(a[k].dequantize(np.float32)), np.asarray(b[k].dequantize(np.float32)))
                   for k in qs) and len(qs) == sum(quant.is_qarray(v) for v in b.values())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = bert.minilm_path()
        rows = []
        for stage, method, extra in (("cli", "gptq", ["--bits", "4", "--group-size", "128"]),
                                     ("cli-nf4", "rtn", ["--format", "nf4", "--group-size", "64"])):
            out = tmp / f"{stage}.safetensors"
            t0 = time.perf_counter()
            assert cli(["quantize", str(src), str(out), "--method", method, *extra]) == 0
            secs = time.perf_counter() - t0
            flat = quant.load(out)
            rows.append({"stage": stage, "method": method, "cos_mean_min": cosine(flat), "seconds": round(secs, 1),
                         "bytes": _bytes(out), "dense_bytes": _bytes(src / "model.safetensors")})
            formats = ("gptq", "compressed-tensors") if method == "gptq" else ("nf4-bnb",)
            for fmt in formats:
                d = tmp / f"{stage}-{fmt}"
                t0 = time.perf_counter()
                opts = {"checkpoint_format": "gptq_v2"} if fmt == "gptq" else {}  # asymmetric zeros of 0 need v2
                interop.export_checkpoint(flat, d, fmt, config=json.loads((src / "config.json").read_text()), **opts)
                back, _ = interop.import_checkpoint(d)
                rows.append({"stage": f"{stage} -> {fmt} -> import", "cos_mean_min": cosine(back),
                             "seconds": round(time.perf_counter() - t0, 1), "bytes": _bytes(d / "model.safetensors"),
                             "identical_dequantized": same_codes(flat, back)})
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
