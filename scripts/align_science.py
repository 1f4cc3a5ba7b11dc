"""MNIST-1D width sweep for permutation alignment: midpoint accuracy of naive averaging, weight /
activation matching, + REPAIR, and the softmax-temperature baseline, per width multiplier.

    python scripts/align_science.py --quick --widths 1,4,16 --pairs 3     # ~8 min on 2 CPU cores
    python scripts/align_science.py --widths 1,2,4,8,16 --pairs 3         # full size
    python scripts/align_science.py --quick --arch cnn --widths 1,2,4

Prints markdown tables and one JSON line; the protocol (and the regularised training recipe) is in
weightlab/lab/align_science.py.
"""

import argparse
import json

from weightlab.lab import align_science as science

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1,2,4,8,16", help="comma-separated width multipliers")
    ap.add_argument("--pairs", type=int, default=3, help="seed pairs per width (seeds 2p, 2p+1)")
    ap.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--quick", action="store_true", help=f"{science.RECIPE['quick_steps']} training steps, 5 path points")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps")
    ap.add_argument("--save", default=None, help="write the full result (every pair) to this JSON file")
    a = ap.parse_args()
    widths = [float(w) if "." in w else int(w) for w in a.widths.split(",")]

    def progress(w, p, r):
        m = r["midpoint"]
        print(f"# width {w} pair {p}: endpoints {r['endpoint_test_acc']}, naive {m['naive']['test_acc']:.3f}, "
              f"WM {m['weight matching']['test_acc']:.3f}, WM+REPAIR {m['WM + REPAIR']['test_acc']:.3f}, "
              f"secs {json.dumps({k: round(v, 1) for k, v in r['seconds'].items()})}", flush=True)

    res = science.run(widths=widths, pairs=a.pairs, quick=a.quick, arch=a.arch, steps=a.steps, progress=progress)
    rc = res["recipe"]
    print(f"\n{a.arch.upper()} on MNIST-1D, widths {a.widths}, {a.pairs} seed pairs, {res['steps']} steps of AdamW "
          f"(lr {rc['lr']} cosine, weight decay {rc['weight_decay']}, label smoothing {rc['label_smoothing']}, "
          f"batch {rc['batch_size']}); {res['seconds']:.0f} s\n")
    print(science.markdown(res))
    if a.save:
        with open(a.save, "w") as f:
            json.dump(res, f, indent=1, default=float)
    line = {"bench": "align_science_mnist1d", "arch": a.arch, "quick": a.quick, "pairs": a.pairs, "steps": res["steps"],
            "seconds": round(res["seconds"], 1)}
    for row in res["summary"]:
        w = f"w{row['width']:g}"
        line[f"{w}_endpoints"] = round(row["endpoint_test_acc"], 4)
        for m, v in row["methods"].items():
            key = m.replace(" + ", "+").replace(" ", "_")
            line[f"{w}_{key}"] = round(v["test_acc"], 4)
            if m != "naive":
                line[f"{w}_{key}_gap_closed"] = round(v["gap_closed"], 3)
        line[f"{w}_naive+temperature_test_loss"] = round(row["methods"]["naive + temperature"]["test_loss"], 4)
        line[f"{w}_naive_test_loss"] = round(row["methods"]["naive"]["test_loss"], 4)
        if row["target"]:
            line[f"{w}_target_met"] = row["target"]["met_distance"] and row["target"]["met_gap_closed"]
    print(json.dumps(line))
