"""``weightlab align A B OUT`` on real checkpoints: MiniLM (BERT) and a tiny LLaMA written as HF directories."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import align, cli
from weightlab import io as wio
from weightlab.models import bert, llama

TEXTS = ["Permuted units compute the same function.", "A cat sat on the mat."]


def _write_hf(directory, flat, src):
    """An HF directory holding ``flat`` with ``src``'s config and tokenizer files."""
    extra = {n: (src / n).read_text() for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                "special_tokens_map.json") if (src / n).is_file()}
    wio.save_sharded(directory, {k: np.asarray(v) for k, v in flat.items()}, metadata={"format": "pt"},
                     extra_files=extra)


@pytest.mark.slow
def test_minilm_planted_permutation_is_undone_and_transformers_loads_the_output(tmp_path):
    m = bert.load_minilm()
    src = bert.minilm_path()
    batch = m.tokenize(TEXTS)
    spec = align.infer_spec(m.apply_fn, m.params, batch)
    b_params = align.permute(spec, align.random_perms(spec, jax.random.key(1)), m.params)
    _write_hf(tmp_path / "b", bert.params_to_hf(b_params), src)
    out = tmp_path / "out"
    assert cli.main(["align", str(src), str(tmp_path / "b"), str(out)]) == 0
    with wio.open_checkpoint(out) as c:
        flat = {n: c[n] for n in c.keys()}
    want = bert.params_to_hf(m.params)
    assert set(flat) >= {n for n in want if not n.startswith("pooler")}
    for n, v in want.items():
        if not n.startswith("pooler"):  # the pooler is unused by sentence embeddings: no symmetry known there
            np.testing.assert_array_equal(flat[n], np.asarray(v), err_msg=n)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.AutoModel.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**enc).last_hidden_state.numpy()
    ref = np.asarray(bert.bert_apply(b_params, {k: jnp.asarray(v.numpy()) for k, v in enc.items()}, m.config))
    np.testing.assert_allclose(h, ref, atol=2e-4)


def test_llama_align_cli_dry_run_checks_and_errors(tmp_path, capsys):
    cfg = llama.tiny_config()
    a = llama.random_llama(jax.random.key(0), cfg)
    src = tmp_path / "a"
    hf_cfg = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
              "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
              "max_position_embeddings": cfg.max_position, "tie_word_embeddings": False}
    tok_src = bert.minilm_path()  # any fast tokenizer whose ids fit the tiny vocabulary after clipping is enough
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_cfg))
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_src / n, src / n)
    pytest.importorskip("tokenizers")
    f = lambda p, ids: llama.llama_apply(p, ids, cfg)  # noqa: E731
    spec = align.infer_spec(f, a, jnp.zeros((1, 8), jnp.int32))
    b = align.permute(spec, align.random_perms(spec, jax.random.key(2)), a)
    wio.save_sharded(tmp_path / "a_model", {k: np.asarray(v) for k, v in llama.params_to_hf(a).items()},
                     metadata={"format": "pt"})
    for p in (tmp_path / "a_model").iterdir():
        shutil.move(str(p), src / p.name)
    bdir = tmp_path / "b"
    shutil.copytree(src, bdir, ignore=shutil.ignore_patterns("model*"))
    wio.save_sharded(tmp_path / "b_model", {k: np.asarray(v) for k, v in llama.params_to_hf(b).items()},
                     metadata={"format": "pt"})
    for p in (tmp_path / "b_model").iterdir():
        shutil.move(str(p), bdir / p.name)
    assert cli.main(["align", str(src), str(bdir), str(tmp_path / "o"), "--dry-run"]) == 0
    assert "permutation groups inferred" in capsys.readouterr().out and not (tmp_path / "o").exists()
    assert cli.main(["align", str(src), str(src), str(tmp_path / "o")]) == 2
    assert "same checkpoint" in capsys.readouterr().err
    assert cli.main(["align", str(src), str(bdir), str(bdir)]) == 2
    assert cli.main(["align", str(src), str(bdir), str(tmp_path), "--overwrite"]) == 2  # contains both inputs
    assert "destroy the input" in capsys.readouterr().err and (src / "config.json").is_file()
    assert cli.main(["align", str(src), str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert cli.main(["align", str(src), str(bdir), str(tmp_path / "o"), "--pin-residual"]) == 0
    with wio.open_checkpoint(tmp_path / "o") as c:
        got = {n: c[n] for n in c.keys()}
    ids = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    y = f(llama.hf_to_params({k: jnp.asarray(v) for k, v in got.items()}), ids)
    np.testing.assert_allclose(np.asarray(y), np.asarray(f(b, ids)), rtol=1e-4, atol=1e-4)
