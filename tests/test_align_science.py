"""The alignment width-sweep harness (weightlab.lab.align_science) at a tiny size."""

from __future__ import annotations

import numpy as np

from weightlab.lab import align_science as science


def test_align_science_tiny_run_structure_and_matching_beats_naive():
    r = science.run(widths=(1,), pairs=1, quick=True, steps=150, n_path=3)
    assert r["arch"] == "mlp" and r["widths"] == [1] and r["steps"] == 150
    (res,) = r["results"]
    assert len(res["endpoints"]) == 2 and len(res["pairs"]) == 1
    pair = res["pairs"][0]
    assert set(pair["midpoint"]) == set(science.METHODS)
    for m in science.METHODS:
        v = pair["midpoint"][m]
        assert set(v) == {"test_acc", "train_loss", "test_loss"} and all(np.isfinite(list(v.values())))
        assert 0.0 <= v["test_acc"] <= 1.0
    assert set(pair["barrier"]) == set(science.PATH_METHODS)
    assert all(pair["barrier"][m]["test_acc"] >= 0.0 for m in science.PATH_METHODS)
    mid = pair["midpoint"]
    # alignment helps even after a short run; the temperature cannot change the argmax
    assert mid["weight matching"]["test_acc"] >= mid["naive"]["test_acc"] - 0.02
    assert mid["naive + temperature"]["test_acc"] == mid["naive"]["test_acc"]
    assert mid["naive + temperature"]["test_loss"] <= mid["naive"]["test_loss"] + 0.05  # T fitted on held-out data
    (row,) = r["summary"]
    assert row["target"] is None and set(row["methods"]) == set(science.METHODS)
    md = science.markdown(r)
    assert "| 1x |" in md and "WM + REPAIR" in md
