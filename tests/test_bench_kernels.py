"""scripts/bench_kernels.py, the accelerator check, runs end to end here (interpret mode, tiny shapes):
every kernel agrees with its reference, and each row carries what the docs table needs."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.mark.slow
def test_bench_kernels_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {r["bench"] for r in rows} == {"dequant_matmul", "lopt_update"}
    assert all(r["max_rel_err_vs_reference"] < 1e-4 for r in rows)
    assert "| lopt_update h32 |" in mod.table(rows) and "bf16 dot" in mod.table(rows)
