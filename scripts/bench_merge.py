"""weightlab vs mergekit on the same generated checkpoints and the same YAML.

Generates a LLaMA-shaped base model and two fine-tunes (fp32, ~--mb MiB each, HF sharded layout
with config.json), then for each config (linear, ties) runs ``weightlab merge`` and mergekit's
``mergekit-yaml`` as separate processes, measuring wall time and peak RSS, and compares their
outputs tensor by tensor (max abs difference). Also reports linear-merge throughput against this
machine's measured copy bandwidth, both in memory (numpy memcpy) and as a file copy (``cp`` of one
checkpoint with fsync, warm page cache), since an out-of-core merge is bounded by the latter.

mergekit is not a weightlab dependency: point --mergekit at a venv's ``mergekit-yaml`` (the script
creates ``/tmp/mkvenv`` with ``pip install torch==2.13.0 mergekit`` if it is missing).

    python scripts/bench_merge.py --mb 350      # ~1 GB of inputs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from weightlab import io

WRAP = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:], "
        "capture_output=True, text=True); dt = time.time() - t; print(r.stdout[-3000:]); "
        "print('RESULT', r.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.stderr.write(r.stderr[-3000:])")


def measure(cmd):
    """(wall seconds, peak RSS MiB, engine seconds or None) of one command run in a fresh process."""
    r = subprocess.run([sys.executable, "-c", WRAP] + cmd, capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1].split()
    if int(line[1]) != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{r.stderr}")
    m = re.search(r"wrote .* in ([0-9.]+)s", r.stdout)
    return float(line[2]), int(line[3]) / 1024, float(m.group(1)) if m else None


def make_models(root: Path, mb: int):
    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, int((mb * 2**20 / 4 - 2 * vocab * hidden) // per_layer))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
           "num_key_value_heads": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
           "torch_dtype": "float32", "tie_word_embeddings": False}
    rng0 = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    base = {k: (rng0.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    for name, seed in [("base", None), ("ft_a", 1), ("ft_b", 2)]:
        rng = np.random.default_rng(seed) if seed else None
        t = base if rng is None else {k: v + rng.standard_normal(v.shape, dtype=np.float32) * 0.002 for k, v in base.items()}
        io.save_sharded(root / name, t, max_shard_bytes=512 * 2**20, overwrite=True,
                        extra_files={"config.json": json.dumps(cfg)})
        del t
    return layers


def copy_bandwidth() -> float:
    a = np.ones(256 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    return 3 * 2 * a.nbytes / (time.perf_counter() - t) / 1e9


def file_copy_bandwidth(src: Path, dst: Path) -> float:
    """``cp`` of one checkpoint directory with fsync of every output file (what a merge's output also
    gets), best of 3 with a warm page cache; GB/s counting bytes read + written."""
    import shutil

    files = sorted(src.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    best = float("inf")
    for _ in range(3):
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        t = time.perf_counter()
        for f in files:
            shutil.copyfile(f, dst / f.name)
            fd = os.open(dst / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        best = min(best, time.perf_counter() - t)
    shutil.rmtree(dst)
    return 2 * nbytes / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=350)
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--methods", default="linear,ties")
    args = ap.parse_args()
    if not Path(args.mergekit).exists():
        subprocess.run([sys.executable, "-m", "venv", "/tmp/mkvenv"], check=True)
        subprocess.run(["/tmp/mkvenv/bin/pip", "install", "-q", "torch==2.13.0", "mergekit"], check=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        root = Path(d)
        layers = make_models(root, args.mb)
        os.sync()  # flush the generated files first: pending writeback would slow whichever tool runs first
        in_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        bw = copy_bandwidth()
        fcopy = file_copy_bandwidth(root / "ft_a", root / "copy")
        for method in args.methods.split(","):
            extra = "    parameters: {weight: 0.5, density: 0.5}\n" if method == "ties" else "    parameters: {weight: 0.5}\n"
            cfg = (f"merge_method: {method}\n" + (f"base_model: {root / 'base'}\n" if method != "linear" else "") +
                   "models:\n" + "".join(f"  - model: {root / m}\n{extra}" for m in ("ft_a", "ft_b")) +
                   "dtype: float32\n")
            (root / f"{method}.yml").write_text(cfg)
            ours, theirs = root / f"wl_{method}", root / f"mk_{method}"
            t_wl, rss_wl, engine_wl = measure([sys.executable, "-m", "weightlab.cli", "merge", str(root / f"{method}.yml"),
                                    str(ours)])
            t_mk, rss_mk, _ = measure([args.mergekit, str(root / f"{method}.yml"), str(theirs), "--lazy-unpickle",
                                    "--out-shard-size", "512M"])
            a, b = io.open_checkpoint(ours), io.open_checkpoint(theirs)
            diffs = [np.abs(a[n].astype(np.float64) - b[n].astype(np.float64)) for n in a.keys()]
            diff = max(float(x.max()) for x in diffs)
            frac = sum(int((x > 1e-6).sum()) for x in diffs) / sum(x.size for x in diffs)
            n_in = 2 if method == "linear" else 3
            moved = (n_in + 1) * in_bytes / 1e9
            print(json.dumps({
                "bench": "merge_vs_mergekit", "method": method, "layers": layers, "input_GB": round(n_in * in_bytes / 1e9, 2),
                "weightlab_s": round(t_wl, 1), "mergekit_s": round(t_mk, 1), "speedup": round(t_mk / t_wl, 2),
                "weightlab_peak_MiB": round(rss_wl), "mergekit_peak_MiB": round(rss_mk),
                "memory_ratio": round(rss_wl / rss_mk, 2), "max_abs_diff": diff, "frac_elements_differing": frac,
                "weightlab_engine_s": engine_wl,
                "throughput_GBps": round(moved / t_wl, 2), "engine_throughput_GBps": round(moved / engine_wl, 2),
                "memcpy_GBps": round(bw, 2), "engine_vs_memcpy": round(moved / engine_wl / bw, 3),
                "file_copy_GBps": round(fcopy, 2), "engine_vs_file_copy": round(moved / engine_wl / fcopy, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
