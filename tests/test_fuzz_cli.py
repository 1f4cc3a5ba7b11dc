"""Hostile and mistaken command lines and Python API calls: every one is a usage error (exit 2) or a
typed ``WeightlabError`` naming what is wrong, before any work; never a traceback, never ignored.

The catalogue tables below are the cases a hurried user types; the hypothesis tests throw random
text at every value-taking option and assert the same outcome classes.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import weightlab as wl
from weightlab import cli, io, merge, quant, tree

WEIGHT = "model.layers.0.mlp.up.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    src = {WEIGHT: rng.standard_normal((64, 128)).astype(np.float32),
           "model.layers.0.attn.q.weight": rng.standard_normal((64, 128)).astype(np.float32),
           "model.layers.0.norm.weight": np.ones(128, np.float32)}
    return io.save(d / "in.safetensors", src)


def _run(argv, capsys):
    """(exit code, stderr) of ``weightlab argv``; argparse usage errors exit through SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# (argv after the input/output paths, substring the error must contain)
QUANTIZE_BAD = [
    (["--group-size", "abc"], "--group-size"),
    (["--group-size", "0"], "--group-size"),
    (["--group-size", "-1"], "--group-size"),
    (["--group-size", "1.5"], "--group-size"),
    (["--bits", "9"], "--bits"),
    (["--bits", "four"], "--bits"),
    (["--method", "any4", "--bits", "4"], "--bits does not apply to --method any4"),
    (["--format", "nf4", "--bits", "4"], "--bits applies to the int/uint formats only"),
    (["--format", "NF4", "--bits", "3"], "--bits applies to the int/uint formats only"),
    (["--method", "hqq", "--format", "int"], "--format does not apply to --method hqq"),
    (["--format", "mxfp4", "--group-size", "64"], "fixed block of 32"),
    (["--format", "int7x"], "unknown format"),
    (["--select", "(["], "--select"),
    (["--exclude", "a{2,1}"], "--exclude"),
    (["--method", "gptq"], "needs a Hugging Face checkpoint directory"),  # calibration needs config + tokenizer
    (["--method", "nope"], "--method"),
    (["--axis", "x"], "--axis"),
    (["--axis", "5"], "axis 5 out of range"),
    (["--select", "nothing-matches-this"], "no 2-D float tensor matches"),
]


@pytest.mark.parametrize("extra,message", QUANTIZE_BAD, ids=[" ".join(a) for a, _ in QUANTIZE_BAD])
def test_quantize_bad_options_are_usage_errors(ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "q.safetensors"
    code, err = _run(["quantize", ckpt, out, *extra], capsys)
    assert code == 2 and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_quantize_good_block_format_and_explicit_block(ckpt, tmp_path, capsys):
    code, _ = _run(["quantize", ckpt, tmp_path / "a.safetensors", "--format", "mxfp4", "--group-size", "32"], capsys)
    assert code == 0 and quant.load(tmp_path / "a.safetensors")[WEIGHT].fmt.name == "mxfp4"


OUTPUT_BAD = [
    ("missing-parent/sub/q.safetensors", "does not exist"),
    ("afile/q.safetensors", "not a directory"),
    ("exists.safetensors", "exists"),
]


@pytest.mark.parametrize("rel,message", OUTPUT_BAD)
@pytest.mark.parametrize("command", ["quantize", "merge", "extract-lora", "merge-lora"])
def test_unusable_output_paths_fail_before_any_work(ckpt, tmp_path, capsys, rel, message, command):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "exists.safetensors").write_text("keep me")
    out = tmp_path / rel
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {ckpt}\n  - model: {ckpt}\n")
    argv = {"quantize": ["quantize", ckpt, out], "merge": ["merge", cfg, out],
            "extract-lora": ["extract-lora", ckpt, ckpt, out], "merge-lora": ["merge-lora", tmp_path, "--out", out]}
    code, err = _run(argv[command], capsys)
    assert code == 2 and message in err, err
    assert (tmp_path / "exists.safetensors").read_text() == "keep me"


OTHER_BAD = [
    (["merge", "c.yml", "o", "--seed", "2**70"], "--seed"),
    (["merge", "c.yml", "o", "--seed", str(2**70)], "--seed"),
    (["merge", "c.yml", "o", "--seed", "-1"], "--seed"),
    (["merge", "c.yml", "o", "--max-shard-size", "0"], "--max-shard-size"),
    (["merge", "c.yml", "o", "--max-shard-size", "lots"], "--max-shard-size"),
    (["merge-lora", "a", "b", "--out", "o", "--weights", "1,abc"], "--weights"),
    (["merge-lora", "a", "b", "--out", "o", "--weights", "1,nan"], "--weights"),
    (["merge-lora", "a", "b", "--out", "o", "--weights", "1"], "--weights has 1 values for 2 adapters"),
    (["merge-lora", "a", "b", "--out", "o", "--rank", "4"], "--rank applies to --method svd only"),
    (["merge-lora", "a", "b", "--out", "o", "--rank", "0", "--method", "svd"], "--rank"),
    (["extract-lora", "a", "b", "o", "--select", "(["], "--select"),
    (["extract-lora", "a", "b", "o", "--rank", "0"], "--rank"),
    (["extract-lora", "a", "b", "o", "--rank", "2.5"], "integer rank or an energy fraction"),
    (["info", "x", "--limit", "-1"], "--limit"),
]


@pytest.mark.parametrize("argv,message", OTHER_BAD, ids=[" ".join(a) for a, _ in OTHER_BAD])
def test_other_commands_bad_values(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_requantizing_a_partly_quantized_file_keeps_its_qarrays(ckpt, tmp_path, capsys):
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    assert _run(["quantize", ckpt, first, "--select", r"mlp\.up", "--format", "nf4"], capsys)[0] == 0
    assert _run(["quantize", first, second, "--select", r"attn\.q", "--bits", "8"], capsys)[0] == 0
    back = quant.load(second)
    assert quant.is_qarray(back[WEIGHT]) and back[WEIGHT].fmt.name == "nf4"
    assert quant.is_qarray(back["model.layers.0.attn.q.weight"]) and back["model.layers.0.attn.q.weight"].fmt.bits == 8
    np.testing.assert_array_equal(np.asarray(back[WEIGHT].codes), np.asarray(quant.load(first)[WEIGHT].codes))
    assert back["model.layers.0.norm.weight"].shape == (128,)


def test_info_json_into_a_closed_pipe_is_quiet(tmp_path):
    p = io.save(tmp_path / "many.safetensors", {f"t{i:04d}": np.zeros(2, np.float32) for i in range(3000)})
    r = subprocess.run(f"{sys.executable} -m weightlab.cli info {p} --json | head -c 100", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert len(r.stdout) == 100
    assert "BrokenPipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------ random option values

NUMERIC_OPTIONS = {
    "quantize": ["--group-size", "--bits", "--axis"],
    "merge": ["--seed", "--max-shard-size"],
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.text(max_size=12), st.integers(-2**80, 2**80).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr)),
       option=st.sampled_from([(c, o) for c, opts in NUMERIC_OPTIONS.items() for o in opts]))
def test_random_option_values_are_accepted_or_usage_errors(ckpt, tmp_path, capsys, value, option):
    command, flag = option
    if value.startswith("-"):
        value = " " + value  # argparse would read a leading '-' as another option
    target = [ckpt, tmp_path / "never.safetensors"] if command == "quantize" else [tmp_path / "none.yml", tmp_path / "o"]
    code, err = _run([command, *target, f"{flag}={value}", "--dry-run"], capsys)
    assert code in (0, 2)
    if code == 2:
        assert "error" in err
    assert not (tmp_path / "never.safetensors").exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- the Python API

P = {"a": {"kernel": jnp.ones((128, 32))}, "b": {"kernel": jnp.full((128, 32), 2.0)}}

API_BAD = [
    ("quantize unknown kwarg", lambda: quant.quantize(P, "rtn", bogus=1), wl.errors.QuantizationParameterError),
    ("quantize transform + kwargs", lambda: quant.quantize(P, quant.rtn(), bits=3), wl.errors.QuantizationParameterError),
    ("bits as a string", lambda: quant.rtn(bits="4"), wl.errors.QuantizationParameterError),
    ("symmetric as a string", lambda: quant.rtn(symmetric="yes"), wl.errors.QuantizationParameterError),
    ("a raw int key", lambda: quant.quantize(P, quant.rotate(quant.rtn()), key=0), wl.errors.UsageError),
    ("a raw int key to a merge", lambda: merge.dare_ties(P["a"], [P["b"], P["b"]], key=0, density=0.5),
     wl.errors.UsageError),
    ("a float array as key", lambda: tree.leaf_key(jnp.ones(2), "a"), wl.errors.UsageError),
    ("stack of nothing", lambda: tree.stack([]), wl.errors.UsageError),
    ("mixed int/str keys", lambda: tree.flatten_with_paths({0: jnp.ones(2), "0": jnp.ones(2)}),
     wl.errors.PathCollisionError),
    ("chain of a non-transform", lambda: wl.chain(wl.identity(), 3), wl.errors.UsageError),
    ("chain of an optax transform", lambda: wl.chain(__import__("optax").adam(1e-3)), wl.errors.UsageError),
    ("as_optax of a non-transform", lambda: wl.as_optax(3), wl.errors.UsageError),
    ("partition with a bad regex", lambda: wl.partition({"([": wl.identity()}), wl.errors.SelectorError),
    ("select with a bad regex", lambda: wl.select("([", wl.identity()), wl.errors.SelectorError),
    ("from_optax bad mode", lambda: wl.from_optax(__import__("optax").sgd(1.0), mode="steps"), wl.errors.UsageError),
    ("save a string leaf", lambda: io.save("/nonexistent-dir/x.safetensors", {"a": "text"}), wl.errors.LeafTypeError),
]


@pytest.mark.parametrize("name,call,error", API_BAD, ids=[n for n, _, _ in API_BAD])
def test_api_mistakes_are_typed_errors(name, call, error):
    with pytest.raises(error) as e:
        call()
    assert isinstance(e.value, wl.WeightlabError)


def test_messages_quote_the_users_regex():
    with pytest.raises(wl.errors.NoMatchError, match=r"attn/qeury"):
        wl.apply_once(wl.select("attn/qeury", quant.rtn()), P)
    with pytest.raises(wl.errors.SelectorError, match=r"\(\["):
        quant.quantize(P, "rtn", select="([")


def test_reruns_are_byte_identical(ckpt, tmp_path, capsys):
    """Determinism end to end: the same command twice writes the same bytes (random rotations and
    DARE masks come from the seed, folded per tensor name)."""
    for i in (1, 2):
        assert _run(["quantize", ckpt, tmp_path / f"q{i}.safetensors", "--method", "hqq", "--bits", "3"], capsys)[0] == 0
    assert (tmp_path / "q1.safetensors").read_bytes() == (tmp_path / "q2.safetensors").read_bytes()
    cfg = tmp_path / "dare.yml"
    cfg.write_text(f"merge_method: dare_ties\nbase_model: {ckpt}\nmodels:\n  - model: {tmp_path / 'q1.safetensors'}\n"
                   f"    parameters: {{weight: 1.0, density: 0.5}}\n")
    for i in (1, 2):
        assert _run(["merge", cfg, tmp_path / f"m{i}", "--seed", "7"], capsys)[0] == 0
    files = sorted(p.name for p in (tmp_path / "m1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "m2").iterdir()) and files
    for f in files:
        assert (tmp_path / "m1" / f).read_bytes() == (tmp_path / "m2" / f).read_bytes(), f


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 1.3, 1.6, 2.0, 3.0])
def test_sigkill_mid_merge_leaves_no_checkpoint_and_the_rerun_sweeps(tmp_path, delay):
    """A `weightlab merge` killed at a random moment: the output either does not exist or is the
    complete merge; any temporary left behind is refused as a checkpoint and swept by the rerun."""
    import signal
    import time

    rng = np.random.default_rng(1)
    work = tmp_path / "work"
    work.mkdir()
    models = []
    for i in range(2):
        t = {f"model.layers.{k}.mlp.weight": rng.standard_normal((512, 1024)).astype(np.float32) for k in range(16)}
        models.append(io.save_sharded(tmp_path / f"m{i}", t, max_shard_bytes=4 << 20))
    cfg = tmp_path / "lin.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {models[0]}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {models[1]}\n    parameters: {{weight: 3.0}}\n")
    out = work / "merged"
    argv = [sys.executable, "-m", "weightlab.cli", "merge", str(cfg), str(out), "--max-shard-size", "3MB"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    leftovers = [p for p in work.iterdir() if p != out]
    for p in leftovers:  # nothing half-written may pass for a checkpoint
        with pytest.raises(wl.WeightlabError):
            with io.open_checkpoint(p) as c:
                for name in c.keys():
                    c[name]
        for f in (p.rglob("*") if p.is_dir() else []):
            if f.is_file():
                with pytest.raises(wl.WeightlabError):
                    io.SafetensorsFile(f)
    if out.exists():  # the kill came after publishing: then it must be whole (values checked below)
        with io.open_checkpoint(out) as c:
            assert len(c.keys()) == 16
    r = subprocess.run(argv + (["--overwrite"] if out.exists() else []), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["merged"]  # the rerun swept the dead run's temporaries
    with io.open_checkpoint(out) as c, io.open_checkpoint(models[0]) as a, io.open_checkpoint(models[1]) as b:
        for name in a.keys():
            np.testing.assert_allclose(c[name], 0.25 * a[name] + 0.75 * b[name], rtol=1e-6, atol=1e-6)
