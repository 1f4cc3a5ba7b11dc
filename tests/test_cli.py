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
    assert s["sections"]["quantization (weightlab.quant)"] == "ran"
    assert s["sections"]["merging (weightlab.merge)"] == "ran"
    assert s["sections"]["alignment (weightlab.align)"] == "ran"
    al = s["alignment"]
    assert al["weight_matching"]["mid_acc"] > al["naive_mid_acc"] + 0.1  # alignment removes most of the barrier
    assert (tmp_path / "d" / "alignment.png").stat().st_size > 1000
    merged = {r["method"]: r["mean"] for r in s["merging"]["rows"]}
    assert s["merging"]["tasks"] == ["identity", "reversed", "shifted", "warped"]
    assert merged["RegMean"] > merged["base (pretrained)"]  # merging recovers part of the fine-tunes' gain
    accs = {r["name"]: r["test_acc"] for r in s["quantization"]}
    assert accs["RTN int8 per-channel"] > accs["fp32"] - 0.02
    assert all(m["test_acc"] > 0.4 for m in s["models"])
    assert (tmp_path / "d" / "training.png").stat().st_size > 1000
    assert (tmp_path / "d" / "interpolation.png").stat().st_size > 1000


def test_quantize_cli_roundtrip(tmp_path, capsys):
    from weightlab import quant
    rng = np.random.default_rng(0)
    src = {"model.layers.0.mlp.up.weight": rng.standard_normal((96, 128)).astype(np.float32),
           "model.layers.0.norm.weight": np.ones(128, np.float32),
           "model.embed_tokens.weight": rng.standard_normal((50, 128)).astype(np.float32)}
    inp = io.save(tmp_path / "in.safetensors", src)
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(inp), str(out), "--method", "hqq", "--bits", "4", "--group-size", "64"]) == 0
    back = quant.load(out)
    q = back["model.layers.0.mlp.up.weight"]
    assert quant.is_qarray(q) and q.axis == 1 and q.group_size == 64
    direct = quant.quantize_hqq(src["model.layers.0.mlp.up.weight"], 4, 64, axis=-1)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(direct.dequantize()))
    assert not quant.is_qarray(back["model.embed_tokens.weight"])  # excluded by default
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    assert "quantized: 1 QArrays (int4_asym g64)" in capsys.readouterr().out
    assert cli.main(["quantize", str(inp), str(out)]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    assert cli.main(["quantize", str(inp), str(bad), "--group-size", "100"]) == 2
    assert "does not divide" in capsys.readouterr().err and not bad.exists()
    assert cli.main(["quantize", str(inp), str(bad), "--format", "nvfp4", "--dry-run"]) == 0
    assert not bad.exists()
