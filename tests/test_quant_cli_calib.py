"""Calibrated quantization from the CLI (``weightlab quantize --method gptq|awq``) on Hugging Face
checkpoint directories of the bundled architectures, and QArrays crossing ``params_to_hf``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import cli, io as wio, quant
from weightlab.errors import QuantizationError
from weightlab.data.sentences import CALIBRATION, HELD_OUT
from weightlab.models import bert, llama
from weightlab.quant.calibrate import capture
from weightlab.quant.cli_calib import calibration_batches, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")


def word_tokenizer(path):
    """A small word-level tokenizer (200 words of the bundled sentences), written to tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CALIBRATION + HELD_OUT, trainers.WordLevelTrainer(vocab_size=200,
                                                                              special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(path / "tokenizer.json"))


def write_dir(path, flat, config):
    path.mkdir()
    wio.save(path / "model.safetensors", {k: np.asarray(v) for k, v in flat.items()})
    (path / "config.json").write_text(json.dumps(config))
    word_tokenizer(path)
    return path


LLAMA = llama.tiny_config()
BERT = bert.BertConfig(vocab_size=200, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                       max_position=64)
BERT_HF = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": 200, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2,
           "layer_norm_eps": 1e-12}


def random_bert_hf(key):
    out = {}
    for i, (n, s) in enumerate(sorted(bert.expected_shapes(BERT).items())):
        k = jax.random.fold_in(key, i)
        out[n] = np.asarray((1.0 if "LayerNorm.weight" in n else 0.0) + 0.05 * jax.random.normal(k, s), np.float32)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("ckpt") / "tiny-llama", llama.random_llama(jax.random.key(0), LLAMA),
                     LLAMA.to_hf())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    flat = random_bert_hf(jax.random.key(1))
    flat["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]  # a buffer some checkpoints carry
    return write_dir(tmp_path_factory.mktemp("ckpt") / "tiny-bert", flat, BERT_HF)


def run_cli(*argv):
    return cli.main(["quantize", *map(str, argv)])


def codes_of(tree):
    return {k: v for k, v in tree.items() if quant.is_qarray(v)}


# ------------------------------------------------------------------------------ QArray transpose

FAST = ("rtn_uint_g16", "gptq_act_order", "rotated")  # codes/scale/zero, g_idx, pre: the rest run with -m slow


def _quantized_kernels(names=None):
    """QArrays of an (in, out) kernel (group axis -2) from every quantizer family and child kind."""
    w = jax.random.normal(jax.random.key(0), (64, 48)) * jnp.linspace(0.5, 2.0, 48)
    x = jax.random.normal(jax.random.key(1), (256, 64)) * jnp.linspace(0.1, 3.0, 64)
    st = capture(lambda p, b: b @ p["w"], {"w": w}, [x])["w"]
    key = jax.random.key(2)
    make = {
        "rtn_uint_g16": lambda: quant.quantize_rtn(w, "uint", 4, 16),
        "rtn_tensor": lambda: quant.quantize_rtn(w, "int", 8, "tensor"),
        "nvfp4": lambda: quant.quantize_rtn(w, "nvfp4", None, "auto"),
        "any4": lambda: quant.quantize_any4(w, group_size=32),
        "gptq_act_order": lambda: quant.gptq_quantize(w, st.hessian, group_size=16, act_order=True,
                                                      static_groups=False),
        "awq": lambda: quant.awq_quantize(w, st.xtx / st.n, st.abs_mean, group_size=16),
        "rotated": lambda: quant.rotate_quantize(w, key, quant.quantize_rtn, fmt="uint", bits=4, group_size=16),
        "lorc": lambda: quant.add_lorc(quant.quantize_rtn(w, "uint", 2, 16), w, rank=4),
    }
    return w, {n: f() for n, f in make.items() if names is None or n in names}


@pytest.mark.parametrize("which", ["fast", pytest.param("all", marks=pytest.mark.slow)])
def test_transpose_qarray_is_exact_for_every_layout(which):
    w, qs = _quantized_kernels(FAST if which == "fast" else None)
    for name, q in qs.items():
        t = bert.transpose_qarray(q, path=name)
        assert t.shape == (48, 64) and t.axis == 1 - q.axis % 2, name
        np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(q.dequantize()).T, err_msg=name)
        back = bert.transpose_qarray(t)
        for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(q), jax.tree_util.tree_leaves_with_path(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} {pa}")
    # independent reference: quantizing W.T along its last axis gives the transposed QArray bit for bit
    for fmt, bits, g in [("int", 3, "channel"), ("nvfp4", None, "auto")][: 1 if which == "fast" else 2]:
        a = bert.transpose_qarray(quant.quantize_rtn(w, fmt, bits, g))
        b = quant.quantize_rtn(w.T, fmt, bits, g, axis=-1)
        for n in ("codes", "scale", "zero", "tensor_scale"):
            if getattr(b, n) is not None:
                np.testing.assert_array_equal(np.asarray(getattr(a, n)), np.asarray(getattr(b, n)),
                                              err_msg=f"{fmt} {n}")


def test_transpose_qarray_refuses_stacks():
    q = quant.quantize_rtn(jnp.ones((4, 8, 8)), "uint", 4, 8)
    with pytest.raises(QuantizationError, match="2-D"):
        bert.transpose_qarray(q, path="stack")


def test_bert_params_to_hf_with_qarrays_roundtrips_through_a_file(tmp_path):
    params = bert.hf_to_params(random_bert_hf(jax.random.key(3)))
    q = quant.quantize(params, "rtn", select=r"encoder/layer_1/.*kernel$", group_size=32)
    hf = bert.params_to_hf(q)
    k = "encoder.layer.1.attention.self.query.weight"
    assert quant.is_qarray(hf[k]) and hf[k].shape == (64, 64) and hf[k].axis == 1
    quant.save(tmp_path / "q.safetensors", hf)
    back = bert.hf_to_params(quant.load(tmp_path / "q.safetensors"))
    a, b = quant.dequantize(q), quant.dequantize(back)
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


# ------------------------------------------------------------------------------ the CLI, tiny models

def _python_gptq(root, hf_to_params, apply_fn, select, **hp):
    with wio.open_checkpoint(root) as c:
        flat = {k: jnp.asarray(c[k]) for k in c.keys()}
    params = hf_to_params(flat)
    tok = load_tokenizer(root, 64)
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in calibration_batches(tok, CALIBRATION, 64)]
    return params, quant.quantize(params, "gptq", select=select, apply_fn=apply_fn, batches=batches,
                                  row_mask=lambda b: b["attention_mask"], **hp)


def test_cli_gptq_llama_equals_python_api(llama_dir, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert run_cli(llama_dir, out, "--method", "gptq", "--bits", "4", "--group-size", "32", "--seq-len", "64") == 0
    assert "wrote" in capsys.readouterr().out
    got = quant.load(out)
    params, ref = _python_gptq(llama_dir, llama.hf_to_params,
                               lambda p, b: llama.llama_apply(p, b["input_ids"], LLAMA, b["attention_mask"]),
                               r"(q|k|v|o|gate|up|down)_proj\.weight$", bits=4, group_size=32)
    qs = codes_of(got)
    assert len(qs) == 7 * LLAMA.num_layers and set(qs) == set(codes_of(ref))
    for n, q in qs.items():
        assert q.axis == 1 and q.shape == tuple(params[n].shape)
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref[n].codes), err_msg=n)
        np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref[n].scale), err_msg=n)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(np.asarray(got[n]), np.asarray(params[n]))
    ids = calibration_batches(load_tokenizer(llama_dir, 64), HELD_OUT[:4], 64)[0]
    f = lambda p: np.asarray(llama.llama_apply(p, ids["input_ids"], LLAMA, ids["attention_mask"]))
    a, b = f(params), f(quant.dequantize(llama.hf_to_params(got)))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    meta = json.loads(wio.read_metadata(out)["weightlab.recipe"])
    assert meta["method"] == "gptq" and meta["tokens"] > 32 and meta["texts"] == len(CALIBRATION)


@pytest.mark.slow
def test_cli_gptq_bert_equals_python_api(bert_dir, tmp_path):
    out = tmp_path / "q.safetensors"
    assert run_cli(bert_dir, out, "--method", "gptq", "--group-size", "32", "--seq-len", "64") == 0
    got = quant.load(out)
    params, ref = _python_gptq(bert_dir, bert.hf_to_params, lambda p, b: bert.bert_apply(p, b, BERT),
                               r"encoder/.*kernel$", group_size=32)
    ref_hf = bert.params_to_hf(ref)
    assert set(codes_of(got)) == set(codes_of(ref_hf)) and len(codes_of(got)) == 12
    for n, q in codes_of(got).items():
        assert q.axis == 1 and q.shape[1] == ref_hf[n].shape[1]
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref_hf[n].codes), err_msg=n)
    assert "embeddings.position_ids" not in got  # a buffer, not a parameter


@pytest.mark.slow
def test_cli_awq_bert_and_gptq_rotate_act_order_llama(bert_dir, llama_dir, tmp_path):
    out = tmp_path / "awq.safetensors"
    assert run_cli(bert_dir, out, "--method", "awq", "--bits", "3", "--group-size", "32",
                   "--calibration-samples", "8") == 0
    q = codes_of(quant.load(out))
    assert len(q) == 12 and all(x.pre is not None and x.pre.shape == (x.shape[1],) for x in q.values())
    assert json.loads(wio.read_metadata(out)["weightlab.recipe"])["texts"] == 8
    out = tmp_path / "rot.safetensors"
    assert run_cli(llama_dir, out, "--method", "gptq", "--group-size", "32", "--act-order", "--rotate",
                   "--seed", "3", "--calibration-samples", "8") == 0
    got = quant.load(out)
    q = codes_of(got)
    assert len(q) == 14 and all(x.pre is not None and x.pre.shape == (x.shape[1],) * 2 for x in q.values())
    params = llama.random_llama(jax.random.key(0), LLAMA)
    ids = calibration_batches(load_tokenizer(llama_dir, 64), HELD_OUT[:4], 64)[0]
    f = lambda p: np.asarray(llama.llama_apply(p, ids["input_ids"], LLAMA, ids["attention_mask"]))
    assert np.corrcoef(f(params).ravel(), f(quant.dequantize(got)).ravel())[0, 1] > 0.99


BAD = [  # (setup(root) -> argv, expected message); every case fails before any weight is read
    ("unknown_model_type", lambda d: ({"config.json": {"model_type": "gpt2"}}, []), "model_type 'gpt2'.*bert, llama"),
    ("missing_tokenizer", lambda d: ({"tokenizer.json": None}, []), "no tokenizer.json"),
    ("config_contradicts_tensors", lambda d: ({"config.json": dict(LLAMA.to_hf(), intermediate_size=96)}, []),
     r"mlp\..*_proj.weight.*expected \(\d+, \d+\), found"),
    ("config_more_layers", lambda d: ({"config.json": dict(LLAMA.to_hf(), num_hidden_layers=3)}, []),
     "model.layers.2.* lacks"),
    ("empty_calibration", lambda d: ({"cal.txt": "\n  \n"}, ["--calibration", d / "cal.txt"]), "holds no text"),
    ("too_few_tokens", lambda d: ({"cal.txt": "hello world\n"}, ["--calibration", d / "cal.txt"]),
     "gives 2 tokens, fewer than one group of 32"),
    ("no_calibration_file", lambda d: ({}, ["--calibration", d / "nope.txt"]), "no such file"),
    ("seq_len_too_long", lambda d: ({}, ["--seq-len", "1000"]), "exceeds the model's 256 positions"),
    ("group_not_dividing", lambda d: ({}, ["--group-size", "48"]),
     r"'model.layers.0.\S+.weight': group size 48 does not divide"),
    ("act_order_awq", lambda d: ({}, ["--method", "awq", "--act-order"]), "--act-order does not apply to --method awq"),
    ("rotate_awq", lambda d: ({}, ["--method", "awq", "--rotate"]), "--rotate does not apply to --method awq"),
    ("seed_without_rotate", lambda d: ({}, ["--seed", "1"]), "--seed applies with --rotate only"),
    ("axis_calibrated", lambda d: ({}, ["--axis", "0"]), "--axis does not apply"),
    ("nf4_bits", lambda d: ({}, ["--format", "nf4", "--bits", "3"]), "--bits applies to the int/uint formats only"),
    ("calibration_with_rtn", lambda d: ({}, ["--method", "rtn", "--calibration", "x.txt"]),
     "--calibration applies to the calibrated methods only"),
    ("rotate_with_hqq", lambda d: ({}, ["--method", "hqq", "--rotate"]), "--rotate applies to the calibrated"),
]


# the export format's own checks run on abstract QArrays, before calibration
BAD += [("export_awq_to_gptq", lambda d: ({}, ["--method", "awq", "--export", "gptq"]), "'pre'"),
            ("export_gptq_to_bnb", lambda d: ({}, ["--export", "nf4-bnb"]), "nf4")]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_before_any_work(llama_dir, tmp_path, capsys, monkeypatch, case):
    import shutil

    _, setup, message = case
    d = tmp_path / "ckpt"
    shutil.copytree(llama_dir, d)
    files, argv = setup(d)
    for name, content in files.items():
        if content is None:
            (d / name).unlink()
        else:
            (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    from weightlab.quant import cli_calib

    monkeypatch.setattr(cli_calib, "_quantize", lambda *a: pytest.fail("work started"))
    out = tmp_path / "q.safetensors"
    argv = argv if "--method" in argv else ["--method", "gptq", *argv]
    assert run_cli(d, out, "--group-size", "32", *argv) == 2
    import re

    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_single_file_input_and_existing_output_are_refused(llama_dir, tmp_path, capsys):
    assert run_cli(llama_dir / "model.safetensors", tmp_path / "q.safetensors", "--method", "gptq") == 2
    assert "needs a Hugging Face checkpoint directory" in capsys.readouterr().err
    (tmp_path / "q.safetensors").write_text("x")
    assert run_cli(llama_dir, tmp_path / "q.safetensors", "--method", "gptq") == 2
    assert "exists" in capsys.readouterr().err


def test_dry_run_writes_nothing(llama_dir, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert run_cli(llama_dir, out, "--method", "awq", "--group-size", "32", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "quantize model.layers.1.mlp.down_proj.weight (64, 128)" in text and not out.exists()


def test_export_gptq_directory(llama_dir, tmp_path):
    from weightlab.interop import import_checkpoint

    out = tmp_path / "out"
    assert run_cli(llama_dir, out, "--method", "gptq", "--group-size", "32", "--export", "gptq",
                   "--calibration-samples", "8") == 0
    tensors, config = import_checkpoint(out)
    assert config["quantization_config"]["quant_method"] == "gptq" and config["model_type"] == "llama"
    assert len(codes_of(tensors)) == 14 and "model.layers.1.mlp.up_proj.weight" in tensors
    assert (out / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()


def test_export_gptq_falls_back_to_v2_when_a_zero_point_is_0(tmp_path, capsys):
    """AutoGPTQ's v1 layout stores zero - 1, so a zero point of 0 cannot be written; after an
    expensive calibration the CLI writes gptq_v2 (with a note) instead of failing."""
    import argparse

    from weightlab.interop import import_checkpoint
    from weightlab.quant import cli as qcli

    w = jax.random.uniform(jax.random.key(0), (64, 64)) + 0.1   # all positive: the asymmetric grid's zero is 0
    q = quant.quantize_array(w, "rtn", fmt="uint", bits=4, group_size=32, axis=-1)
    assert int(np.min(np.asarray(q.zero))) == 0
    flat = {"model.layers.0.mlp.up_proj.weight": q}
    for choice, want in (("gptq", "gptq_v2"), ("gptq-v2", "gptq_v2")):
        args = argparse.Namespace(output=tmp_path / choice, overwrite=False, export=choice, input=tmp_path)
        qcli.write(args, flat, {}, {"model_type": "llama"}, qcli.exporter(args))
        back, config = import_checkpoint(tmp_path / choice)
        assert config["quantization_config"]["checkpoint_format"] == want
        np.testing.assert_array_equal(np.asarray(back["model.layers.0.mlp.up_proj.weight"].dequantize(np.float32)),
                                      np.asarray(q.dequantize(np.float32)))
    assert "zero points of 0" in capsys.readouterr().out


def test_act_order_qarrays_do_not_take_the_fused_kernel():
    from weightlab.quant.matmul import kernel_supports

    w = jax.random.normal(jax.random.key(0), (64, 32))
    h = np.cov(np.asarray(jax.random.normal(jax.random.key(1), (256, 64))).T) + np.diag(np.arange(64.0))
    q = quant.gptq_quantize(w, h, fmt="int", bits=4, group_size=32, act_order=True, static_groups=False)
    assert q.g_idx is not None and not kernel_supports(q)
    assert kernel_supports(quant.gptq_quantize(w, h, fmt="int", bits=4, group_size=32))


# ------------------------------------------------------------------------------ the real MiniLM

@pytest.mark.real
@pytest.mark.slow
def test_minilm_gptq_from_python_saved_under_hf_names(tmp_path):
    m = bert.load_minilm()
    batches = [{k: jnp.asarray(v) for k, v in m.tokenize(CALIBRATION[i:i + 8]).items()} for i in range(0, 32, 8)]
    q = quant.quantize(m.params, "gptq", select=r"encoder/.*kernel$", apply_fn=m.apply_fn, batches=batches,
                       row_mask=lambda b: b["attention_mask"], group_size=128)
    hf = bert.params_to_hf(q)
    assert hf["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)
    quant.save(tmp_path / "q.safetensors", hf)
    back = bert.hf_to_params(quant.load(tmp_path / "q.safetensors"))
    e1 = m.encode(HELD_OUT, params=quant.dequantize(q))
    e2 = m.encode(HELD_OUT, params=quant.dequantize(back))
    np.testing.assert_array_equal(e1, e2)
    assert np.mean(np.sum(e1 * m.encode(HELD_OUT), axis=1)) > 0.97


@pytest.mark.real
@pytest.mark.slow
def test_minilm_cli_gptq_4bit_g128(tmp_path, capsys):
    m = bert.load_minilm()
    out = tmp_path / "minilm-gptq.safetensors"
    assert run_cli(bert.minilm_path(), out, "--method", "gptq", "--bits", "4", "--group-size", "128") == 0
    q = quant.load(out)
    assert len(codes_of(q)) == 36
    e = m.encode(HELD_OUT, params=quant.dequantize(bert.hf_to_params(q)))
    cos = np.sum(e * m.encode(HELD_OUT), axis=1)
    assert cos.mean() > 0.97 and cos.min() > 0.95, cos
