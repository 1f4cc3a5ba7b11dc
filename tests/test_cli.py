import json
import subprocess
import sys

import numpy as np
import pytest

from weightlab import cli, io


def test_help_teaches(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "info PATH" in out and "demo" in out and "examples:" in out


def test_info_table_and_json(tmp_path, capsys):
    p = io.save(tmp_path / "m.safetensors", {"enc": {"kernel": np.ones((4, 8), np.float32),
                                                     "codes": np.ones((4, 4), np.uint8)}}, metadata={"recipe": "rtn"})
    assert cli.main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "enc/kernel" in out and "(4, 8)" in out and "48 parameters" in out and "recipe: rtn" in out
    assert cli.main(["info", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 48 and d["bytes"] == 4 * 8 * 4 + 16 and d["metadata"] == {"recipe": "rtn"}
    sharded = io.save_sharded(tmp_path / "hf", {"a": np.ones((64,), np.float32), "b": np.ones((64,), np.float32)},
                              max_shard_bytes=256)
    assert cli.main(["info", str(sharded), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["files"]) == 2 and d["tensors"] == 2


def test_info_bad_input_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    assert cli.main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "header length" in err and "Traceback" not in err
    assert cli.main(["info", str(tmp_path / "missing")]) == 2


def test_entry_point_installed():
    r = subprocess.run([sys.executable, "-m", "weightlab.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "weightlab" in r.stdout


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "weightlab.cli", "demo", "--quick", "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "naive average" in r.stdout and "skipped" in r.stdout
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert s["sections"]["models"] == "ran"
    assert all(m["test_acc"] > 0.4 for m in s["models"])
    assert (tmp_path / "d" / "training.png").stat().st_size > 1000
    assert (tmp_path / "d" / "interpolation.png").stat().st_size > 1000
