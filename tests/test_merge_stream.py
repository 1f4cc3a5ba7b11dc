"""mergekit YAML configs and the streaming merge engine on small generated HF-layout checkpoints."""

import json

import jax

import ml_dtypes
import numpy as np
import pytest

from weightlab import cli, io, merge
from weightlab.errors import MergeError
from weightlab.merge.config import evaluate_setting, parse_config

L = 4


def make_ckpt(path, seed, vocab=50, lm_head=True, dtype=np.float32, shard=None):
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": base.standard_normal((vocab, 16)) + 0.1 * rng.standard_normal((vocab, 16))}
    for i in range(L):
        for n, s in [("self_attn.q_proj.weight", (16, 16)), ("mlp.up_proj.weight", (32, 16)),
                     ("input_layernorm.weight", (16,))]:
            t[f"model.layers.{i}.{n}"] = base.standard_normal(s) + 0.3 * rng.standard_normal(s)
    t["model.norm.weight"] = np.ones(16) + 0.01 * rng.standard_normal(16)
    if lm_head:
        t["lm_head.weight"] = base.standard_normal((vocab, 16)) + 0.1 * rng.standard_normal((vocab, 16))
    t = {k: v.astype(dtype) for k, v in t.items()}
    io.save_sharded(path, t, max_shard_bytes=shard or 10_000)
    return t


@pytest.fixture()
def ckpts(tmp_path):
    return {name: (tmp_path / name, make_ckpt(tmp_path / name, seed)) for seed, name in enumerate(["base", "a", "b"])}


def cfg_text(tmp_path, method="ties", extra=""):
    return f"""
merge_method: {method}
base_model: {tmp_path / 'base'}
models:
  - model: {tmp_path / 'a'}
    parameters:
      weight: 1.0
      density: [0.2, 0.8]
  - model: {tmp_path / 'b'}
    parameters:
      weight: 0.5
      density:
        - filter: mlp
          value: 0.5
        - value: 0.3
parameters:
  normalize: true
  lambda: 0.9
{extra}"""


def _run(text, out):
    """Parse a YAML text and stream-merge it into ``out`` quietly; returns the plan."""
    from weightlab.merge.stream import run_merge

    return run_merge(parse_config(text), out, progress=False, echo=lambda s: None)


def test_evaluate_setting_semantics():
    assert evaluate_setting("x", 0.5) == 0.5
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    cond = [{"filter": "mlp", "value": [0, 1]}, {"value": 7}]
    assert evaluate_setting("model.layers.1.mlp.up", cond, 1.0) == 1
    assert evaluate_setting("model.layers.1.attn", cond, 1.0) == 7
    assert evaluate_setting("x", [{"filter": "mlp", "value": 1}], 0) is None


def test_stream_merge_equals_in_memory_merge(tmp_path, ckpts):
    cfg = parse_config(cfg_text(tmp_path))
    out = tmp_path / "out"
    from weightlab.merge.stream import run_merge
    run_merge(cfg, out, max_shard_bytes=8_000, progress=False, echo=lambda s: None)
    got = io.open_checkpoint(out)
    index = json.loads((out / io.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (out / "mergekit_config.yml").read_text() == cfg.text
    assert got.metadata["weightlab.recipe_sha256"] == cfg.recipe_hash
    base, a, b = (ckpts[n][1] for n in ("base", "a", "b"))
    for name in base:
        m = __import__("re").search(r"layers\.(\d+)\.", name)
        t = int(m.group(1)) / (L - 1) if m else 0.0
        da = 0.2 + 0.6 * t
        db = 0.5 if "mlp" in name else 0.3
        want = merge.ties({name: base[name]}, {name: np.stack([a[name], b[name]])}, weight=[1.0, 0.5],
                          density=[da, db], lambda_=0.9, normalize=True)[name]
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method,params,fn", [
    ("nuslerp", "      weight: 0.3\n", lambda b, s: merge.nuslerp(b, s, weight=[0.3, 0.3])),
    ("multislerp", "      weight: 1.0\n", lambda b, s: merge.multislerp(b, s, weight=[1.0, 1.0])),
    ("ram", "", lambda b, s: merge.ram(b, s)),
    ("tsv_m", "", lambda b, s: merge.tsv_m(b, s)),
    ("wudi", "", lambda b, s: merge.wudi(b, s, input_axis=1)),
    ("arcee_fusion", "", lambda b, s: merge.arcee_fusion(b, s)),
])
def test_stream_more_methods_equal_in_memory(tmp_path, ckpts, method, params, fn):
    models = ["a"] if method == "arcee_fusion" else ["a", "b"]
    text = f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels:\n" + "".join(
        f"  - model: {tmp_path / m}\n" + (f"    parameters:\n{params}" if params else "") for m in models)
    _run(text, tmp_path / "o")
    got = io.open_checkpoint(tmp_path / "o")
    base = ckpts["base"][1]
    for name in ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]:
        stacked = {name: np.stack([ckpts[m][1][name] for m in models])}
        want = fn({name: base[name]}, stacked)[name]
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=f"{method} {name}")


def test_stream_global_ties_statistics_pass_equals_in_memory(tmp_path, ckpts):
    """scope: global runs a statistics pass (two histogram sweeps) so trimming uses one cut-off per
    model over the whole checkpoint, equal to the in-memory global TIES."""
    text = (f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n"
            f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
            f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
            "parameters:\n  scope: global\n")
    _run(text, tmp_path / "g")
    got = io.open_checkpoint(tmp_path / "g")
    base, a, b = (ckpts[n][1] for n in ("base", "a", "b"))
    want = merge.ties(base, [a, b], weight=[1.0, 0.5], density=[0.3, 0.6], scope="global")
    for name in base:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    per_tensor = merge.ties(base, [a, b], weight=[1.0, 0.5], density=[0.3, 0.6])
    assert any(not np.allclose(got[n], per_tensor[n]) for n in base)
    bad = text.replace("density: 0.3", "density: [0.3, 0.5]")
    with pytest.raises(MergeError, match="one density per model"):
        _run(bad, tmp_path / "g2")


def test_slices_passthrough_frankenmerge_and_sliced_slerp(tmp_path, ckpts):
    """mergekit ``slices``: passthrough stacks layer ranges from different models (renumbered); a
    merge method inside slices merges corresponding layers, gradients run over each slice."""
    a, b, base = ckpts["a"][1], ckpts["b"][1], ckpts["base"][1]
    text = (f"merge_method: passthrough\nslices:\n"
            f"  - sources:\n      - model: {tmp_path / 'a'}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {tmp_path / 'b'}\n        layer_range: [1, 4]\n")
    p = _run(text, tmp_path / "fr")
    got = io.open_checkpoint(tmp_path / "fr")
    assert p.num_layers == 6 and "model.layers.5.mlp.up_proj.weight" in got.keys()
    np.testing.assert_array_equal(got["model.layers.2.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(got["model.layers.3.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(got["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    np.testing.assert_array_equal(got["lm_head.weight"], b["lm_head.weight"])  # last slice
    # slerp inside one slice, t as a gradient over the slice's two layers
    text2 = (f"merge_method: slerp\nbase_model: {tmp_path / 'base'}\nslices:\n  - sources:\n"
             f"      - model: {tmp_path / 'base'}\n        layer_range: [2, 4]\n"
             f"      - model: {tmp_path / 'a'}\n        layer_range: [0, 2]\n"
             "parameters:\n  t: [0.0, 1.0]\n")
    _run(text2, tmp_path / "sl")
    got2 = io.open_checkpoint(tmp_path / "sl")
    assert sorted({n.split(".")[2] for n in got2.keys() if ".layers." in n}) == ["0", "1"]
    q = "self_attn.q_proj.weight"
    np.testing.assert_allclose(got2[f"model.layers.0.{q}"], base[f"model.layers.2.{q}"], atol=1e-6)  # t = 0
    np.testing.assert_allclose(got2[f"model.layers.1.{q}"], a[f"model.layers.1.{q}"], atol=1e-5)  # t = 1
    bad = text.replace("[1, 4]", "[2, 6]")
    with pytest.raises(MergeError, match="layer_range"):
        _run(bad, tmp_path / "x")


def test_cli_merge_dry_run_and_refusals(tmp_path, ckpts, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(cfg_text(tmp_path, "dare_ties", "dtype: bfloat16\n"))
    assert cli.main(["merge", str(cfg), str(tmp_path / "o"), "--dry-run"]) == 0
    assert "plan: dare_ties" in capsys.readouterr().out and not (tmp_path / "o").exists()
    assert cli.main(["merge", str(cfg), str(tmp_path / "o"), "--max-shard-size", "5KB"]) == 0
    c = io.open_checkpoint(tmp_path / "o")
    assert c.dtype("model.layers.0.mlp.up_proj.weight") == np.dtype(ml_dtypes.bfloat16)
    assert cli.main(["merge", str(cfg), str(tmp_path / "o")]) == 2  # exists
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("bad,match", [
    ("merge_method: tiess", r":2: unknown merge_method"),
    ("parameters: {desnity: 0.5}", r"has no parameter 'desnity'"),
    ("models: []", "non-empty"),
    ("slices: []", "slices"),
    ("layer_range", "layer_range"),
    ("{{{", "unreadable YAML"),
])
def test_config_errors_name_the_line(tmp_path, bad, match):
    text = {"merge_method: tiess": "\nmerge_method: tiess\nmodels:\n  - model: x\n",
            "parameters: {desnity: 0.5}": "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\nparameters: {desnity: 0.5}\n",
            "models: []": "merge_method: ties\nbase_model: b\nmodels: []\n",
            "slices: []": "merge_method: passthrough\nslices: []\n",
            "layer_range": "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 1]\n",
            "{{{": "{{{"}[bad]
    with pytest.raises(MergeError, match=match):
        parse_config(text)


def test_model_level_errors_before_any_work(tmp_path, ckpts):
    bad_density = cfg_text(tmp_path).replace("density: [0.2, 0.8]", "density: 1.5")
    with pytest.raises(MergeError, match=r":\d+: ties parameter .density. must be a finite number in \(0, 1\]"):
        parse_config(bad_density)
    from weightlab.merge.stream import run_merge
    missing = parse_config(cfg_text(tmp_path).replace(f"{tmp_path / 'b'}\n", f"{tmp_path / 'nope'}\n"))
    with pytest.raises(MergeError, match="does not exist"):
        run_merge(missing, tmp_path / "o", echo=lambda s: None)
    make_ckpt(tmp_path / "nohead", 5, lm_head=False)
    tied = parse_config(cfg_text(tmp_path).replace(f"{tmp_path / 'b'}\n", f"{tmp_path / 'nohead'}\n"))
    with pytest.raises(MergeError, match="lm_head"):
        run_merge(tied, tmp_path / "o", dry_run=True, echo=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_vocab_mismatch_is_handled_explicitly(tmp_path, ckpts):
    make_ckpt(tmp_path / "bigvocab", 7, vocab=53)
    text = cfg_text(tmp_path).replace(f"{tmp_path / 'b'}\n", f"{tmp_path / 'bigvocab'}\n")
    msgs = []
    from weightlab.merge.stream import run_merge
    run_merge(parse_config(text), tmp_path / "o", echo=msgs.append, progress=False)
    assert any("vocab size 53" in m for m in msgs)
    out = io.open_checkpoint(tmp_path / "o")
    assert out.shape("model.embed_tokens.weight") == (50, 16)


def test_interrupted_merge_leaves_no_output(tmp_path, ckpts):
    t = dict(ckpts["b"][1])
    t["model.layers.3.mlp.up_proj.weight"] = t["model.layers.3.mlp.up_proj.weight"].copy()
    t["model.layers.3.mlp.up_proj.weight"][0, 0] = np.nan
    io.save_sharded(tmp_path / "nan", t)
    text = cfg_text(tmp_path).replace(f"{tmp_path / 'b'}\n", f"{tmp_path / 'nan'}\n")
    from weightlab.merge.stream import run_merge
    with pytest.raises(MergeError, match="layers.3.mlp.up_proj.weight.*NaN"):
        run_merge(parse_config(text), tmp_path / "o", echo=lambda s: None, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # temp dir cleaned up


def test_linear_and_slerp_configs(tmp_path, ckpts):
    from weightlab.merge.stream import run_merge
    lin = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.25}}\n" \
          f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.75}}\n"
    run_merge(parse_config(lin), tmp_path / "lin", echo=lambda s: None, progress=False)
    a, b = ckpts["a"][1], ckpts["b"][1]
    n = "model.layers.2.self_attn.q_proj.weight"
    np.testing.assert_allclose(io.open_checkpoint(tmp_path / "lin")[n], 0.25 * a[n] + 0.75 * b[n], rtol=1e-5, atol=1e-6)
    sl = f"merge_method: slerp\nbase_model: {tmp_path / 'a'}\nmodels:\n  - model: {tmp_path / 'a'}\n" \
         f"  - model: {tmp_path / 'b'}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.5\n"
    run_merge(parse_config(sl), tmp_path / "sl", echo=lambda s: None, progress=False)
    out = io.open_checkpoint(tmp_path / "sl")
    np.testing.assert_allclose(out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"],
                               rtol=1e-5, atol=1e-6)  # t = 0 at the first layer
    np.testing.assert_allclose(out["model.layers.3.self_attn.q_proj.weight"], b["model.layers.3.self_attn.q_proj.weight"],
                               rtol=1e-5, atol=1e-6)  # t = 1 at the last


def test_linear_cli_never_imports_jax_and_the_engine_names_no_method(tmp_path, ckpts):
    """The registry loads without JAX (YAML validation, --help); a linear merge runs its numpy fast path
    without importing JAX; and the streaming engine's source names no merge method."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = tmp_path / "lin.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n  - model: {tmp_path / 'b'}\n")
    code = ("import sys; from weightlab import cli; "
            f"rc = cli.main(['merge', {str(cfg)!r}, {str(tmp_path / 'lin')!r}]); "
            "from weightlab.merge.registry import METHODS; n = len(METHODS); "
            "print('RC', rc, 'JAX', 'jax' in sys.modules, 'N', n)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 0 JAX False" in r.stdout, r.stdout + r.stderr
    src = Path(merge.__file__).parent
    engine = (src / "stream.py").read_text() + (src / "plan.py").read_text()
    for name in merge.METHODS:
        assert f'"{name}"' not in engine and f"'{name}'" not in engine, name


def test_stream_merge_reads_quantized_checkpoints(tmp_path, ckpts):
    """A checkpoint written by `weightlab quantize` is a valid merge input: each QArray is dequantized
    when its tensor is read, and the result equals merging the dequantized model in memory."""
    from weightlab import quant
    q = tmp_path / "a_q.safetensors"
    assert cli.main(["quantize", str(tmp_path / "a"), str(q), "--bits", "8", "--group-size", "16"]) == 0
    text = (f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
            f"  - model: {q}\n    parameters: {{weight: 0.7}}\n  - model: {tmp_path / 'b'}\n")
    _run(text, tmp_path / "qm")
    got = io.open_checkpoint(tmp_path / "qm")
    deq = quant.dequantize(quant.load(q))
    base, b = ckpts["base"][1], ckpts["b"][1]
    name = "model.layers.2.mlp.up_proj.weight"
    a_deq = np.asarray(deq[name])
    assert not np.array_equal(a_deq, ckpts["a"][1][name])  # really quantized
    want = base[name] + 0.7 * (a_deq - base[name]) + (b[name] - base[name])
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)


def test_base_plus_lora_adapter_syntax(tmp_path, ckpts):
    """mergekit's `model: base+adapter`: a PEFT adapter (here extracted at full rank by
    `weightlab extract-lora`) applied to the base tensor by tensor reproduces the fine-tune's
    adapted weights; untouched tensors come from the base."""
    ad = tmp_path / "adapter"
    assert cli.main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "a"), str(ad), "--rank", "16"]) == 0
    text = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'base'}+{ad}\n"
    _run(text, tmp_path / "applied")
    got = io.open_checkpoint(tmp_path / "applied")
    base, a = ckpts["base"][1], ckpts["a"][1]
    np.testing.assert_allclose(got["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"],
                               atol=1e-4)
    np.testing.assert_array_equal(got["model.norm.weight"], base["model.norm.weight"])
    bad = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'base'}+{tmp_path / 'b'}\n"
    with pytest.raises(MergeError, match="not a PEFT adapter"):
        _run(bad, tmp_path / "x")
