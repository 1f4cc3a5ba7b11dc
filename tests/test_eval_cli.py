"""``weightlab eval`` (weightlab/evaluate.py, weightlab/evalcli.py): every metric against an independent
float64 / scipy computation, the weight report against numpy, tiny BERT and LLaMA checkpoints end to
end, bad input refused before any tensor is read, and the real MiniLM against itself and RTN-4."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import cli, io
from weightlab import evaluate as ev
from weightlab.data import sts
from weightlab.data.sentences import HELD_OUT
from weightlab.errors import CheckpointError, StructureMismatchError
from weightlab.models import bert, llama

tokenizers = pytest.importorskip("tokenizers")
scipy_stats = pytest.importorskip("scipy.stats")


# ------------------------------------------------------------------------------------ metrics

@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(40)
    y = x + rng.standard_normal(40)
    if seed % 2:  # many ties, as in graded similarity scores
        y = np.round(y * 2) / 2
        x = np.round(x, 1)
    assert ev.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(ev.spearman(np.ones(5), np.arange(5.0)))


def test_cosine_rows_is_the_row_wise_cosine():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    want = [float(np.dot(u, v) / np.sqrt(np.dot(u, u) * np.dot(v, v))) for u, v in zip(a, b)]
    np.testing.assert_allclose(ev.cosine_rows(a, b), want, rtol=1e-12)
    np.testing.assert_allclose(ev.cosine_rows(a, 3 * a), 1.0, rtol=1e-12)
    assert ev.cosine_rows(np.zeros((1, 5)), b[:1])[0] == 0.0


def test_retrieval_recall_and_mrr_by_brute_force():
    rng = np.random.default_rng(1)
    q, p = rng.standard_normal((12, 6)), rng.standard_normal((20, 6))
    rel = rng.integers(0, 20, 12)
    ranks = []
    for i in range(12):
        s = [float(np.dot(q[i], pj) / np.linalg.norm(q[i]) / np.linalg.norm(pj)) for pj in p]
        ranks.append(1 + sorted(s, reverse=True).index(s[rel[i]]))
    got = ev.retrieval(q, p, rel)
    assert got["recall@1"] == pytest.approx(np.mean(np.array(ranks) == 1))
    assert got["mrr"] == pytest.approx(np.mean(1 / np.array(ranks)), rel=1e-12)
    # a passage tied with the relevant one ranks above it (pessimistic ties)
    assert ev.retrieval(q[:1], np.stack([q[0], q[0]]), [1]) == {"recall@1": 0.0, "mrr": 0.5, "queries": 1}
    assert ev.retrieval(q[:1], np.stack([q[0], -q[0]]), [0])["recall@1"] == 1.0


def test_kl_nll_top1_against_float64_and_scipy():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((9, 50)).astype(np.float32) * 3
    mod = ref + rng.standard_normal((9, 50)).astype(np.float32)
    p = np.exp(ref.astype(np.float64)) / np.exp(ref.astype(np.float64)).sum(-1, keepdims=True)
    q = np.exp(mod.astype(np.float64)) / np.exp(mod.astype(np.float64)).sum(-1, keepdims=True)
    np.testing.assert_allclose(ev.kl_divergence(ref, mod), scipy_stats.entropy(p, q, axis=-1), rtol=1e-9)
    assert np.all(ev.kl_divergence(ref, ref) == 0)
    t = rng.integers(0, 50, 9)
    np.testing.assert_allclose(ev.next_token_nll(mod, t), -np.log(q[np.arange(9), t]), rtol=1e-9)
    np.testing.assert_array_equal(ev.top1_agreement(ref, mod), p.argmax(-1) == q.argmax(-1))
    big = np.array([[1000.0, 0.0, -1000.0]])  # no overflow
    assert np.isfinite(ev.log_softmax(big)).all()


def test_family_replaces_layer_indices():
    assert ev.family("encoder.layer.11.attention.self.query.weight") == "encoder.layer.*.attention.self.query.weight"
    assert ev.family("encoder/layer_3/attn/query/kernel") == "encoder/layer_*/attn/query/kernel"
    assert ev.family("model.layers.0.mlp.fp8_e4m3") == "model.layers.*.mlp.fp8_e4m3"


def test_bundled_sets_are_well_formed():
    assert 50 <= len(sts.PAIRS) <= 100 and all(0 <= s <= 5 for *_, s in sts.PAIRS)
    queries, passages, rel = sts.retrieval_corpus()
    assert len(set(passages)) == len(passages) and len(queries) == len(rel) >= 25
    assert all(passages[r] == p for r, (_, p) in zip(rel, sts.RETRIEVAL))
    assert not set(HELD_OUT) & {t for a, b, _ in sts.PAIRS for t in (a, b)}


# ----------------------------------------------------------------------------- tiny checkpoints

def word_tokenizer(texts, path, *, template, specials):
    """A word-level tokenizer.json over every word of ``texts`` (lower-cased), specials first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({w: len(specials) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        (s, vocab[s]) for s in specials if s in template])
    tok.save(str(path))
    return len(vocab)


BERT_TEXTS = list(HELD_OUT) + [t for a, b, _ in sts.PAIRS for t in (a, b)] + sts.retrieval_corpus()[0] + \
    sts.retrieval_corpus()[1]


def write_bert(d, flat, config, tok_src=None):
    io.save_sharded(d, flat, max_shard_bytes=60_000, extra_files={"config.json": json.dumps({
        "model_type": "bert", "hidden_act": "gelu", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position})})
    if tok_src is not None:
        shutil.copy(tok_src, d / "tokenizer.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(reference dir, perturbed dir, config, perturbed names): a 2-layer random BERT, sharded, with a
    word-level tokenizer, and a copy whose query weights carry noise."""
    root = tmp_path_factory.mktemp("bert")
    n = word_tokenizer(BERT_TEXTS, root / "tok.json", template="[CLS] $A [SEP]",
                       specials=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    config = bert.BertConfig(vocab_size=n, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_position=64)
    rng = np.random.default_rng(0)
    flat = {k: ((1 + 0.1 * rng.standard_normal(s)) if "LayerNorm.weight" in k else
                0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in bert.expected_shapes(config).items()}
    noisy = {k: v + (0.05 * rng.standard_normal(v.shape).astype(np.float32) if "query.weight" in k else 0)
             for k, v in flat.items()}
    write_bert(root / "ref", flat, config, root / "tok.json")
    write_bert(root / "noisy", noisy, config, root / "tok.json")
    return root / "ref", root / "noisy", config, sorted(k for k in flat if "query.weight" in k)


def test_weight_report_against_numpy(tiny_bert):
    ref, noisy, _, changed = tiny_bert
    rep = ev.evaluate(noisy, ref, weights_only=True)
    with io.open_checkpoint(ref) as a, io.open_checkpoint(noisy) as b:
        want = {k: float(np.linalg.norm(b[k].astype(np.float64) - a[k]) / np.linalg.norm(a[k].astype(np.float64)))
                for k in a.keys()}
        nbytes = sum(a[k].nbytes for k in a.keys())
        params = sum(a[k].size for k in a.keys())
    d = rep["diff"]
    assert sorted(d["differ"]) == changed and d["tensors_differ"] == len(changed)
    for k, v in want.items():
        assert d["tensor_rel_err"][k] == pytest.approx(v, rel=1e-9, abs=1e-15)
    fam = d["families"]["encoder.layer.*.attention.self.query.weight"]
    assert fam["max_rel_err"] == pytest.approx(max(want[k] for k in changed), rel=1e-9)
    assert fam["mean_rel_err"] == pytest.approx(np.mean([want[k] for k in changed]), rel=1e-9)
    assert fam["differ"] == fam["tensors"] == 2 and d["families"]["embeddings.word_embeddings.weight"]["differ"] == 0
    w = rep["weights"]
    assert (w["bytes"], w["dense_bytes"], w["params"], w["bits_per_weight"]) == (nbytes, nbytes, params, 32.0)
    assert w["files"] > 1 and w["file_bytes"] > nbytes and "quantized" not in w
    assert "encoder" not in rep and rep["task"] is None


def test_quantized_file_sizes_from_its_header(tiny_bert, tmp_path, capsys):
    ref, _, _, _ = tiny_bert
    q = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(ref), str(q), "--method", "rtn", "--bits", "4", "--group-size", "16",
                     "--select", "query"]) == 0
    rep = ev.evaluate(q, ref, weights_only=True)
    from weightlab.quant.checkpoint import qarray_specs

    with io.open_checkpoint(q) as c:
        specs = qarray_specs(c.metadata)
        packed = sum(c[f"{p}/{n}"].nbytes for p, s in specs.items() for n in s["children"])
        numel = sum(int(np.prod(s["shape"])) for s in specs.values())
    qr = rep["weights"]["quantized"]
    assert qr["tensors"] == len(specs) == 2 and qr["params"] == numel
    assert qr["bits_per_weight"] == pytest.approx(8 * packed / numel)  # int4 codes are packed two per byte
    assert 4 < qr["bits_per_weight"] < 8 and qr["formats"] == ["int4_asym g16"]
    assert rep["weights"]["dense_bytes"] == rep["reference_weights"]["bytes"]
    assert sorted(rep["diff"]["differ"]) == sorted(specs)


def embed_independently(d, sentences, config):
    """Independent embeddings: every sentence in one batch padded to the longest (the evaluator pads
    batches of 32 to a multiple of 8), pooled here in float64 from our BERT's hidden states."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    with io.open_checkpoint(d) as c:
        params = bert.hf_to_params({k: c[k] for k in c.keys()})
    enc = [tok.encode(s).ids for s in sentences]
    ids = np.zeros((len(enc), max(map(len, enc))), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    h = np.asarray(jax.jit(bert.bert_apply, static_argnums=2)(params, {"input_ids": ids, "attention_mask": mask},
                                                                config), np.float64)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_encoder_metrics_against_an_independent_pipeline(tiny_bert, capsys):
    ref, noisy, config, _ = tiny_bert
    assert cli.main(["eval", str(noisy), "--reference", str(ref), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["model_type"], rep["task"]) == ("bert", "encoder")
    queries, passages, rel = sts.retrieval_corpus()
    for name, d in (("model", noisy), ("reference", ref)):
        e = dict(zip(BERT_TEXTS, embed_independently(d, BERT_TEXTS, config)))
        pair = [float(np.dot(e[a], e[b]) / np.linalg.norm(e[a]) / np.linalg.norm(e[b])) for a, b, _ in sts.PAIRS]
        want = scipy_stats.spearmanr(pair, [s for *_, s in sts.PAIRS]).statistic
        assert rep["encoder"][name]["sts_spearman"] == pytest.approx(want, abs=2e-3)  # float32 ranks may swap
        r = ev.retrieval(np.array([e[t] for t in queries]), np.array([e[t] for t in passages]), rel)
        assert rep["encoder"][name]["mrr"] == pytest.approx(r["mrr"], abs=1e-3)
        if name == "model":
            em = np.array([e[t] for t in HELD_OUT])
        else:
            er = np.array([e[t] for t in HELD_OUT])
    cos = (em * er).sum(1) / np.linalg.norm(em, axis=1) / np.linalg.norm(er, axis=1)
    got = rep["encoder"]["cosine_to_reference"]
    assert got["mean"] == pytest.approx(cos.mean(), abs=1e-5) and got["min"] == pytest.approx(cos.min(), abs=1e-5)
    assert 0.5 < got["min"] < 0.99999  # noise on the queries moves the embeddings, but not to noise
    assert cli.main(["eval", str(ref), "--reference", str(ref)]) == 0
    table = capsys.readouterr().out
    assert "mean 1.000000, min 1.000000" in table and "0 of 39 tensors differ" in table


# -------------------------------------------------------------------------------------- decoders

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    n = word_tokenizer([sts.LM_TEXT], root / "tok.json", template="<s> $A", specials=["<pad>", "<unk>", "<s>"])
    config = llama.tiny_config(vocab_size=n, max_position=64)
    rng = np.random.default_rng(1)
    params = {k: ((1 + 0.1 * rng.standard_normal(s)) if "norm" in k else 0.02 * rng.standard_normal(s)).astype(
        np.float32) for k, s in llama.expected_shapes(config).items()}
    params["lm_head.weight"] *= 50  # peaked next-token distributions
    noisy = {k: v + (0.01 * rng.standard_normal(v.shape).astype(np.float32) if "mlp" in k else 0)
             for k, v in params.items()}
    for name, p in (("ref", params), ("noisy", noisy)):
        io.save_sharded(root / name, p, extra_files={"config.json": json.dumps(config.to_hf())})
        shutil.copy(root / "tok.json", root / name / "tokenizer.json")
    return root / "ref", root / "noisy", config


def independent_decoder_metrics(d_model, d_ref, config, seq_len):
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(d_model / "tokenizer.json")).encode(sts.LM_TEXT).ids
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]
    apply = jax.jit(llama.llama_apply, static_argnums=2)
    logits = {}
    for name, d in (("model", d_model), ("ref", d_ref)):
        with io.open_checkpoint(d) as c:
            params = {k: jnp.asarray(c[k]) for k in c.keys()}
        logits[name] = [np.asarray(apply(params, np.array([w]), config), np.float64)[0] for w in windows]
    nll, kl, agree = [], [], []
    for w, lm, lr in zip(windows, logits["model"], logits["ref"]):
        pm = np.exp(lm - lm.max(-1, keepdims=True))
        pm /= pm.sum(-1, keepdims=True)
        pr = np.exp(lr - lr.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        nll += list(-np.log(pm[np.arange(len(w) - 1), w[1:]]))
        kl += list(scipy_stats.entropy(pr, pm, axis=-1))
        agree += list(lm.argmax(-1) == lr.argmax(-1))
    return float(np.exp(np.mean(nll))), float(np.mean(kl)), float(np.mean(agree)), len(ids)


def test_decoder_metrics_against_float64(tiny_llama, capsys):
    ref, noisy, config = tiny_llama
    assert cli.main(["eval", str(noisy), "--reference", str(ref), "--json", "--seq-len", "48"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ppl, kl, agree, n = independent_decoder_metrics(noisy, ref, config, 48)
    dec = rep["decoder"]
    assert (rep["task"], dec["tokens"], dec["windows"]) == ("decoder", n, -(-n // 48))
    assert dec["model"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert dec["kl"] == pytest.approx(kl, rel=1e-3) and dec["kl"] > 1e-4
    assert dec["top1_agreement"] == pytest.approx(agree) and 0.5 < agree < 1.0
    same = ev.evaluate(ref, ref, seq_len=48)["decoder"]
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["model"]["perplexity"] == same["reference"]["perplexity"] == dec["reference"]["perplexity"]


def test_decoder_quantized_file_through_the_dequantizing_view(tiny_llama, tmp_path, capsys, monkeypatch):
    ref, _, config = tiny_llama
    q = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(ref), str(q), "--method", "rtn", "--bits", "4", "--group-size", "32",
                     "--select", "mlp"]) == 0
    rep = ev.evaluate(q, ref, seq_len=48)
    assert rep["config"] == str(ref / "config.json") and rep["weights"]["quantized"]["tensors"] == 6
    assert rep["decoder"]["kl"] > 0 and rep["decoder"]["reference"]["perplexity"] > 1
    monkeypatch.setitem(ev.TASKS, "llama", ("decoder", "weightlab.models.no_such_module"))
    rep = ev.evaluate(q, ref)
    assert "decoder" not in rep and any("no_such_module is not available" in n for n in rep["notes"])


# ------------------------------------------------------------------------------------ bad input

@pytest.fixture
def count_reads(monkeypatch):
    """Counts tensor reads, to prove an error came before any."""
    from weightlab.io.safetensors import Checkpoint

    calls = []
    orig = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, n, **k: calls.append(n) or orig(self, n, **k))
    monkeypatch.setattr(Checkpoint, "__getitem__", Checkpoint.get)
    return calls


def test_bad_input_is_refused_before_any_tensor_is_read(tiny_bert, tmp_path, capsys, count_reads):
    ref, noisy, config, _ = tiny_bert
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "empty")]) == 2
    assert "empty directory" in capsys.readouterr().err
    with io.open_checkpoint(ref) as c:
        flat = {k: c[k] for k in c.keys()}
    count_reads.clear()
    fewer = dict(flat)
    fewer.pop("encoder.layer.1.output.dense.bias")
    fewer.pop("encoder.layer.0.output.dense.bias")
    write_bert(tmp_path / "fewer", fewer, config)
    assert cli.main(["eval", str(tmp_path / "fewer"), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "encoder.layer.0.output.dense.bias" in err and "and 1 more: encoder.layer.1.output.dense.bias" in err
    with pytest.raises(StructureMismatchError, match="encoder.layer.0.output.dense.bias"):  # the reverse: extra
        ev.evaluate(ref, tmp_path / "fewer")
    shaped = dict(flat)
    shaped["embeddings.LayerNorm.bias"] = np.zeros(31, np.float32)
    write_bert(tmp_path / "shaped", shaped, config)
    assert cli.main(["eval", str(tmp_path / "shaped"), "--reference", str(ref), "--weights-only"]) == 2
    err = capsys.readouterr().err
    assert "'embeddings.LayerNorm.bias'" in err and "(32,)" in err and "(31,)" in err
    bare = tmp_path / "bare"  # weights without config.json or tokenizer.json, no reference
    bare.mkdir()
    shutil.copy(next(ref.glob("*00001*.safetensors")), bare / "model.safetensors")
    assert cli.main(["eval", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "--weights-only" in err
    notok = tmp_path / "notok"  # config but no tokenizer
    write_bert(notok, flat, config)
    assert cli.main(["eval", str(notok)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert count_reads == []
    # --weights-only needs neither config nor tokenizer
    assert cli.main(["eval", str(bare), "--weights-only"]) == 0
    assert "no reference" in capsys.readouterr().out


def test_unknown_model_type_reports_weights_with_a_note(tiny_bert, tmp_path, capsys):
    ref, _, _, _ = tiny_bert
    other = tmp_path / "other"
    shutil.copytree(ref, other)
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert cli.main(["eval", str(other), "--reference", str(ref), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["task"] is None and "encoder" not in rep and rep["diff"]["tensors_differ"] == 0
    assert any("no task evaluator for model_type 'gpt2'" in n for n in rep["notes"])
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5}))
    with pytest.raises(CheckpointError, match="config lacks 'hidden_size'"):
        ev.evaluate(other)


def test_eval_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert e.value.code == 0 and "--reference" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "x", "--seq-len", "1"])
    assert e.value.code == 2
    from weightlab.evalcli import _finite

    assert _finite({"a": float("nan"), "b": [float("inf"), 1.5, "x"]}) == {"a": None, "b": [None, 1.5, "x"]}


# ---------------------------------------------------------------------------------- the real MiniLM

@pytest.mark.real
@pytest.mark.slow
def test_real_minilm_against_itself_and_rtn4(tmp_path, capsys):
    path = bert.minilm_path()
    same = ev.evaluate(path, path)
    assert same["diff"]["tensors_differ"] == 0 and same["diff"]["rel_err"] == 0.0
    enc = same["encoder"]
    assert enc["cosine_to_reference"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert enc["model"] == enc["reference"] and enc["model"]["sts_spearman"] > 0.8
    q = tmp_path / "q4.safetensors"
    assert cli.main(["quantize", str(path), str(q), "--method", "rtn", "--bits", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(q), "--reference", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["config"] == str(path / "config.json")  # found through the recipe's source
    c = rep["encoder"]["cosine_to_reference"]
    assert 0.9 < c["min"] <= c["mean"] < 1.0
    assert rep["weights"]["quantized"]["bits_per_weight"] == pytest.approx(4.25)
    assert rep["diff"]["tensors_differ"] == 36 and rep["encoder"]["reference"] == enc["reference"]
    assert abs(rep["encoder"]["model"]["sts_spearman"] - enc["model"]["sts_spearman"]) < 0.05


def test_a_merged_directory_without_config_uses_the_references(tiny_bert, tmp_path, capsys):
    """`weightlab merge` writes shards and an index only: config.json and tokenizer.json come from the
    reference; a reference whose config disagrees (same shapes, other head count) is refused."""
    ref, noisy, config, _ = tiny_bert
    merged = tmp_path / "merged"
    merged.mkdir()
    for f in noisy.glob("*.safetensors*"):
        shutil.copy(f, merged / f.name)
    rep = ev.evaluate(merged, ref)
    assert rep["config"] == str(ref / "config.json") and rep["tokenizer"] == str(ref / "tokenizer.json")
    assert rep["encoder"]["model"] == ev.evaluate(noisy, ref)["encoder"]["model"]
    other = tmp_path / "heads"
    shutil.copytree(ref, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 8}))
    with pytest.raises(StructureMismatchError, match="config.json:num_heads"):
        ev.evaluate(noisy, other)
    assert cli.main(["eval", str(noisy), "--reference", str(other), "--weights-only"]) == 0  # weights need no config
    capsys.readouterr()


def test_a_non_float_buffer_only_one_side_has_is_not_a_mismatch(tiny_bert, tmp_path, capsys):
    """transformers' save_pretrained drops BERT's position_ids buffer, which hub files carry: the
    model and its reference still compare (the buffer is skipped), float tensors still must match."""
    ref, noisy, config, _ = tiny_bert
    with_buf = tmp_path / "with-buffer"
    flat = io.load(ref)
    flat["embeddings.position_ids"] = np.arange(config.max_position, dtype=np.int64)[None]
    write_bert(with_buf, flat, config, ref / "tokenizer.json")
    assert cli.main(["eval", str(noisy), "--reference", str(with_buf), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["diff"]["tensors_differ"] > 0 and rep["encoder"]["cosine_to_reference"]["mean"] < 1


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exported_directories_are_evaluated_through_their_import(tiny_bert, tmp_path, capsys, fmt):
    """`weightlab quantize --export` output (another library's layout) evaluates like a weightlab
    file: the tensors are imported (weightlab.interop) and dequantized on read."""
    from weightlab import interop, quant

    ref, _, _, names = tiny_bert
    flat = io.load(ref)
    for n in names:
        flat[n] = quant.quantize_array(flat[n], "rtn", fmt="int", bits=4, group_size=16, axis=-1)
    out = tmp_path / fmt
    interop.export_checkpoint(flat, out, fmt, config=json.loads((ref / "config.json").read_text()),
                              files={"tokenizer.json": (ref / "tokenizer.json").read_bytes()})
    assert cli.main(["eval", str(out), "--reference", str(ref), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["weights"]["quantized"]["tensors"] == len(names)
    assert rep["diff"]["tensors_differ"] == len(names)
    assert 0.5 < rep["encoder"]["cosine_to_reference"]["mean"] < 1
