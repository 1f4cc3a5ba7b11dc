"""Merge output is a Hugging Face model: transformers loads it, and it computes what the in-memory
merge computes. Also mergekit-yaml's flags and entry point, tokenizer sources and the checks that
refuse configs contradicting their tensors (before any tensor is merged, leaving nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from weightlab import merge  # noqa: E402
from weightlab.cli import main  # noqa: E402
from weightlab.errors import MergeError  # noqa: E402
from weightlab.models.bert import minilm_path  # noqa: E402

TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SENTENCES = ["A child is flying a red kite on the beach.", "Interest rates were left unchanged.",
             "The orchestra rehearsed the symphony for weeks."]


def _write_model(d: Path, tensors: dict, cfg: dict, tokenizer_from: Path | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOK_FILES if tokenizer_from else ():
        shutil.copy(tokenizer_from / f, d / f)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT (MiniLM's tokenizer and vocabulary) and two perturbed fine-tunes of it."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = {k: v.detach().numpy().copy() for k, v in transformers.BertModel(cfg).state_dict().items()}
    cfgd = {**cfg.to_dict(), "architectures": ["BertModel"]}
    dirs = {"base": _write_model(root / "base", base, cfgd, minilm_path())}
    for i, name in enumerate(("ft-a", "ft-b")):
        rng = np.random.default_rng(i + 1)
        ft = {k: v + (0.02 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
              for k, v in base.items()}
        dirs[name] = _write_model(root / name, ft, cfgd, minilm_path())
    return root, dirs


def _config(root: Path, text: dict, name="cfg.yml") -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(text, sort_keys=False))
    return p


def _embed_hf(out: Path, sentences=SENTENCES):
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    b = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy(), model


def _embed_torch_state(tensors: dict, cfg_dir: Path, sentences=SENTENCES):
    """The same embedding from an in-memory state dict (the independent path)."""
    cfg = transformers.AutoConfig.from_pretrained(str(cfg_dir))
    model = transformers.BertModel(cfg).eval()
    missing = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False)
    assert not missing.missing_keys
    tok = transformers.AutoTokenizer.from_pretrained(str(cfg_dir))
    b = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


# task_arithmetic: its in-memory reference is cheap (the streaming TIES/DARE/... are checked against
# the in-memory methods tensor by tensor in test_merge_stream.py).
TA = {"merge_method": "task_arithmetic", "base_model": "base",
      "models": [{"model": "ft-a", "parameters": {"weight": 1.0}}, {"model": "ft-b", "parameters": {"weight": 0.7}}],
      "parameters": {"normalize": False}, "dtype": "float32"}
TIES = {"merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft-a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "ft-b", "parameters": {"weight": 0.7, "density": 0.4}}],
        "parameters": {"normalize": True}, "dtype": "float32"}


def _abs(cfg: dict, root: Path) -> dict:
    """The config with model names turned into absolute paths."""
    txt = json.dumps(cfg)
    for n in ("ft-a", "ft-b", "base"):
        txt = txt.replace(f'"{n}"', json.dumps(str(root / n)))
    return json.loads(txt)


def test_merge_output_loads_in_transformers_and_matches_in_memory_merge(tiny):
    root, dirs = tiny
    out = root / "ta-out"
    assert main(["merge", str(_config(root, _abs(TA, root))), str(out), "--max-shard-size", "300KB"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "model.safetensors.index.json", "mergekit_config.yml", *TOK_FILES} <= files
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for s in shards:  # transformers' loader refuses shards without this
        with safe_open(str(s), "np") as f:
            assert f.metadata()["format"] == "pt"
    # the independent reference: the Python API on whole state dicts, run through torch
    ld = lambda n: load_file(str(dirs[n] / "model.safetensors"))
    b, a, c = ld("base"), ld("ft-a"), ld("ft-b")
    floats = [k for k in b if b[k].dtype.kind == "f"]
    ref = merge.task_arithmetic({k: b[k] for k in floats}, [{k: a[k] for k in floats}, {k: c[k] for k in floats}],
                                weight=[1.0, 0.7], normalize=False)
    ref = {k: np.asarray(v) for k, v in ref.items()} | {k: b[k] for k in b if k not in floats}
    got, model = _embed_hf(out)
    want = _embed_torch_state(ref, dirs["base"])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.max(np.abs(got - _embed_torch_state(b, dirs["base"]))) > 1e-3  # the merge changed something
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "task_arithmetic" in card and "mergekit" in card
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_frankenmerge_updates_layer_count_and_loads(tiny):
    root, dirs = tiny
    cfg = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [{"model": "ft-a", "layer_range": [0, 4]}]},
                      {"sources": [{"model": "ft-b", "layer_range": [2, 6]}]}]}
    out = root / "franken"
    assert main(["merge", str(_config(root, _abs(cfg, root), "franken.yml")), str(out)]) == 0
    c = json.loads((out / "config.json").read_text())
    assert c["num_hidden_layers"] == 8 and c["torch_dtype"] == "bfloat16"
    _, model = _embed_hf(out)
    assert len(model.encoder.layer) == 8
    sd = model.state_dict()
    ftb = load_file(str(dirs["ft-b"] / "model.safetensors"))
    w = ftb["encoder.layer.3.attention.self.query.weight"]  # source layer 3 of ft-b is output layer 5
    np.testing.assert_array_equal(sd["encoder.layer.5.attention.self.query.weight"].float().numpy(),
                                  torch.from_numpy(w).bfloat16().float().numpy())


def test_tokenizer_source_chat_template_and_flags(tiny, capsys):
    root, dirs = tiny
    other = root / "tok-src"
    shutil.copytree(dirs["ft-b"], other)
    tc = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**tc, "model_max_length": 77}))
    cfg = _abs({**TIES, "tokenizer": {"source": str(other)}, "chat_template": "{% for m in messages %}{{ m }}{% endfor %}"},
               root)
    out = root / "tok-out"
    argv = ["mergekit-yaml", str(_config(root, cfg, "tok.yml")), str(out), "--cuda", "--lazy-unpickle",
            "--low-cpu-memory", "--out-shard-size", "1B", "--allow-crimes", "--random-seed", "3", "--clone-tensors",
            "--trust-remote-code", "-v", "--no-write-model-card", "--transformers-cache", "/tmp/x", "--quiet"]
    assert main(argv) == 0
    notes = capsys.readouterr().out
    assert "--cuda has no effect" in notes and "--lazy-unpickle has no effect" in notes
    t = json.loads((out / "tokenizer_config.json").read_text())
    assert t["model_max_length"] == 77 and t["chat_template"].startswith("{% for m")
    assert not (out / "README.md").exists()
    assert len(list(out.glob("model-*.safetensors"))) == 1  # 1B bytes: one shard
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length == 77
    out2 = root / "no-tok"
    assert main(["merge", str(_config(root, _abs(TIES, root), "plain.yml")), str(out2), "--no-copy-tokenizer"]) == 0
    assert not any((out2 / f).exists() for f in TOK_FILES) and (out2 / "config.json").exists()


def test_console_entry_point_is_mergekit_yaml(tiny):
    from weightlab.merge.cli import mergekit_yaml

    root, _ = tiny
    out = root / "entry"
    assert mergekit_yaml([str(_config(root, _abs(TIES, root), "e.yml")), str(out), "--dry-run"]) == 0
    assert not out.exists()
    scripts = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'weightlab-mergekit-yaml = "weightlab.merge.cli:mergekit_yaml"' in scripts


@pytest.mark.parametrize("case", ["union", "no-tokenizer", "layers", "hidden", "vocab", "arch", "base-missing"])
def test_bad_configs_refused_before_work(tiny, case, capsys):
    root, dirs = tiny
    bad = root / f"bad-{case}"
    if bad.exists():
        shutil.rmtree(bad)
    shutil.copytree(dirs["ft-b"], bad)
    c = json.loads((bad / "config.json").read_text())
    cfg = _abs(TIES, root)
    cfg["models"][1]["model"] = str(bad)
    if case == "union":
        cfg["tokenizer_source"] = "union"
    elif case == "no-tokenizer":
        for f in TOK_FILES:
            (bad / f).unlink()
        cfg["tokenizer_source"] = str(bad)
    elif case == "base-missing":
        cfg.pop("base_model")
        cfg["merge_method"] = "linear"
        cfg["models"] = [{"model": m["model"], "parameters": {"weight": 1.0}} for m in cfg["models"]]
        cfg["parameters"] = {}
        cfg["tokenizer_source"] = "base"
    else:
        field = {"layers": ("num_hidden_layers", 5), "hidden": ("hidden_size", 48), "vocab": ("vocab_size", 100),
                 "arch": ("architectures", ["BertForMaskedLM"])}[case]
        c[field[0]] = field[1]
        (bad / "config.json").write_text(json.dumps(c))
    out = root / f"out-{case}"
    code = main(["merge", str(_config(root, cfg, f"{case}.yml")), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists(), err
    want = {"union": "union", "no-tokenizer": "no tokenizer files", "layers": "num_hidden_layers = 5",
            "hidden": "hidden_size = 48", "vocab": "vocab_size = 100", "arch": "--allow-crimes",
            "base-missing": "needs a base_model"}[case]
    assert want in err
    if case == "arch":  # the flag lets it through
        assert main(["merge", str(_config(root, cfg, f"{case}.yml")), str(out), "--allow-crimes"]) == 0


def test_tokenizer_larger_than_embedding_refused(tiny, capsys):
    root, dirs = tiny
    small = root / "small-vocab"
    if small.exists():
        shutil.rmtree(small)
    t = load_file(str(dirs["base"] / "model.safetensors"))
    t["embeddings.word_embeddings.weight"] = t["embeddings.word_embeddings.weight"][:1000].copy()
    c = json.loads((dirs["base"] / "config.json").read_text()) | {"vocab_size": 1000}
    _write_model(small, t, c, minilm_path())
    cfg = {"merge_method": "linear", "models": [{"model": str(small), "parameters": {"weight": 1.0}}] * 1 +
           [{"model": str(small), "parameters": {"weight": 1.0}}], "dtype": "float32"}
    cfg["models"] = cfg["models"][:1]
    out = root / "small-out"
    assert main(["merge", str(_config(root, cfg, "small.yml")), str(out)]) == 2
    assert "30522 tokens but the merged embedding has 1000 rows" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.real
@pytest.mark.slow
def test_minilm_merge_loads_with_automodel_and_embeds(tmp_path):
    """The real all-MiniLM-L6-v2: a task-arithmetic merge of two perturbed fine-tunes loads with
    AutoModel.from_pretrained and embeds like the in-memory merge run through weightlab's own BERT."""
    import jax.numpy as jnp

    from weightlab.models import bert

    src = minilm_path()
    base = load_file(str(src / "model.safetensors"))
    cfgd = json.loads((src / "config.json").read_text())
    fts = []
    for i, name in enumerate(("ft-a", "ft-b")):
        rng = np.random.default_rng(10 + i)
        ft = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
              for k, v in base.items()}
        _write_model(tmp_path / name, ft, cfgd, src)
        fts.append(ft)
    _write_model(tmp_path / "base", base, cfgd, src)
    out = tmp_path / "out"
    assert main(["merge", str(_config(tmp_path, _abs(TA, tmp_path))), str(out)]) == 0
    got, _ = _embed_hf(out)
    floats = [k for k in base if base[k].dtype.kind == "f"]
    ref = merge.task_arithmetic({k: base[k] for k in floats}, [{k: f[k] for k in floats} for f in fts],
                                weight=[1.0, 0.7], normalize=False)
    model = bert.load_minilm(out)  # weightlab's own loader on the merged directory
    params = bert.hf_to_params({k: np.asarray(v) for k, v in ref.items()})
    want = model.encode(SENTENCES, params=params)
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=5e-5)
    assert float(jnp.min(jnp.sum(got * want, -1))) > 0.9999


def test_trial_regressions_template_file_buffers_overwrite_and_sizes(tiny, capsys):
    """From a user's trial: a tokenizer's chat_template.jinja (read before tokenizer_config.json)
    gets the config's template; a model saved without the position_ids buffer still merges; the
    output may not replace an input even with --overwrite; '1b' is mergekit's 1e9 bytes."""
    from weightlab.cliargs import size

    root, dirs = tiny
    src = root / "jinja-src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(dirs["ft-b"], src)
    (src / "chat_template.jinja").write_text("OLD{% for m in messages %}{{ m.content }}{% endfor %}")
    base = root / "base-with-buffer"  # the hub's files carry position_ids; transformers 5 leaves it out
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(dirs["base"], base)
    t = load_file(str(base / "model.safetensors"))
    t["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = _abs({**TA, "tokenizer_source": str(src), "chat_template": "NEW{% for m in messages %}{{ m.content }}{% endfor %}"},
               root)
    cfg["base_model"], cfg["models"][1]["model"] = str(base), str(src)
    out = root / "jinja-out"
    assert main(["merge", str(_config(root, cfg, "jinja.yml")), str(out)]) == 0
    assert "lacks the non-float buffers" in capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "NEWhi"
    transformers.AutoModel.from_pretrained(str(out))  # loads without the buffer
    for target in (dirs["ft-a"], root):  # an input, or a directory holding the inputs
        assert main(["merge", str(_config(root, cfg, "jinja.yml")), str(target), "--overwrite"]) == 2
        assert "is or contains the input" in capsys.readouterr().err
    assert (dirs["ft-a"] / "model.safetensors").exists()
    assert size("1b") == size("1B") == 10**9 and size("1GB") == 2**30
