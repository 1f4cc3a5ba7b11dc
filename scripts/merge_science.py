"""MNIST-1D merging table (input-transform task family): every merge method's mean test accuracy.

    python scripts/merge_science.py [--quick]

Prints the markdown table and one JSON line; see weightlab/merge/science.py for the protocol.
"""

import argparse
import json

from weightlab.merge.science import markdown, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    res = run(quick=a.quick, seed=a.seed)
    print(markdown(res))
    print(json.dumps({"bench": "merge_science_mnist1d", "seed": a.seed, "quick": a.quick,
                      "seconds": round(res["seconds"], 1), "individual_mean": round(res["individual_mean"], 3),
                      **{r["method"]: round(r["mean"], 3) for r in res["rows"]}}))
