"""Hardening: every bad merge input is a typed error before any work.

Generated YAML mutations of valid configs (dropped, duplicated, misspelled keys; values replaced by
wrong types or out-of-range numbers) either parse to a config that means what the mutated YAML says,
or raise a MergeError naming ``source:line``; never another exception, never a silently ignored key.
Then one end-to-end case (through ``weightlab merge``) per input that used to produce a wrong merge
silently, the Python API's checks, the alias bomb and float64 checkpoints.
"""

import copy
import math
import re
import time

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from weightlab import io, merge
from weightlab.cli import main
from weightlab.errors import MergeError, RegistryError
from weightlab.merge.config import parse_config
from weightlab.merge.plan import kwargs
from weightlab.merge.registry import METHODS

SRC = "fuzz.yml"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    "linear": {"merge_method": "linear",
               "models": [{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b", "parameters": {"weight": 0.7}}],
               "parameters": {"normalize": True}, "dtype": "float32"},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "base"},
                        {"model": "a", "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                        {"model": "b", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.5},
                                                                                  {"value": 0.3}]}}],
             "parameters": {"normalize": True, "lambda": 0.9}, "out_dtype": "bfloat16"},
    "slerp": {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}},
    "slices": {"merge_method": "passthrough",
               "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}]},
                          {"sources": [{"model": "b", "layer_range": [1, 4]}]}]},
}
# every key that is valid somewhere (a misspelling landing on one of these is not a misspelling)
KNOWN = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "model", "sources",
         "layer_range", "filter", "value", "lambda", "modules", "tokenizer", "tokenizer_source", "chat_template",
         "residual_weight"} | {p for m in METHODS for p in METHODS[m].parameters}
# the test's own expectations for numbers: which values a parameter must refuse
MUST_REFUSE = {"density": lambda x: not 0 < x <= 1, "t": lambda x: not 0 <= x <= 1,
               "weight": lambda x: False, "lambda": lambda x: False}


def dump(d) -> str:
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False)


def outcome(text):
    """(config, None) or (None, message); any other exception fails the test."""
    try:
        return parse_config(text, SRC), None
    except MergeError as e:
        msg = str(e)
        assert re.search(rf"{re.escape(SRC)}:\d+: ", msg), msg
        return None, msg


def paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,))


def get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def assert_means(cfg, d):
    """The parsed config says what the YAML says (missing keys = their defaults)."""
    assert cfg.method == d["merge_method"]
    assert cfg.base_model == d.get("base_model")
    assert cfg.parameters == (d.get("parameters") or {})
    assert (cfg.dtype, cfg.out_dtype) == (d.get("dtype"), d.get("out_dtype"))
    assert [(m.model, m.parameters) for m in cfg.models] == \
        [(m["model"], m.get("parameters") or {}) for m in d.get("models", [])]
    want = [([(s["model"], tuple(s["layer_range"]), s.get("parameters") or {}) for s in sl["sources"]],
             sl.get("parameters") or {}) for sl in d.get("slices", [])]
    assert [([(m.model, m.layer_range, m.parameters) for m in sl.sources], sl.parameters)
            for sl in cfg.slices or []] == want


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_dropped_key_is_an_error_or_the_default(name, data):
    d = copy.deepcopy(VALID[name])
    keyed = [p for p in paths(d) if isinstance(p[-1], str)]
    path = data.draw(st.sampled_from(keyed))
    del get(d, path[:-1])[path[-1]]
    cfg, err = outcome(dump(d))
    if cfg is None:
        return
    assert_means(cfg, d)
    if len(path) >= 2 and path[-2] == "parameters" and cfg.slices is None:  # the engine falls back to the default
        arg = "lambda_" if path[-1] == "lambda" else path[-1]
        kw = kwargs(cfg, "model.layers.1.mlp.up_proj.weight", 0.5)
        default = METHODS[cfg.method].parameters[arg].default
        if path[0] == "models":
            used = [m.model for m in cfg.models] if METHODS[cfg.method].base == "unused" else cfg.merged_models()
            assert kw[arg][used.index(get(d, path[:2])["model"])] == default
        else:
            assert arg not in kw


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_misspelled_key_is_never_accepted(name, data):
    d = copy.deepcopy(VALID[name])
    keyed = [p for p in paths(d) if isinstance(p[-1], str)]
    path = data.draw(st.sampled_from(keyed))
    key = path[-1]
    i = data.draw(st.integers(0, len(key) - 1))
    op = data.draw(st.sampled_from(["swap", "drop", "double", "letter"]))
    new = {"swap": key[:i] + key[i + 1:i + 2] + key[i:i + 1] + key[i + 2:], "drop": key[:i] + key[i + 1:],
           "double": key[:i + 1] + key[i:], "letter": key[:i] + data.draw(st.sampled_from("aeioxz")) + key[i + 1:]}[op]
    assume(new and new not in KNOWN)
    parent = get(d, path[:-1])
    parent_items = list(parent.items())
    parent.clear()
    parent.update({(new if k == key else k): v for k, v in parent_items})
    text = dump(d)
    cfg, err = outcome(text)
    assert cfg is None, f"misspelled key {new!r} (for {key!r}) was accepted:\n{text}"
    lines = [n + 1 for n, ln in enumerate(text.splitlines()) if re.match(rf"\s*(- )?{re.escape(new)}:", ln)]
    assert any(f"{SRC}:{n}:" in err for n in lines), (err, lines)
    assert repr(new) in err


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_duplicated_key_is_an_error_naming_both_lines(name, data):
    text = dump(VALID[name])
    lines = text.splitlines()
    cands = [i for i, ln in enumerate(lines) if re.match(r"\s*(- )?[A-Za-z_]\w*:", ln)]
    i = data.draw(st.sampled_from(cands))
    copy_ = re.sub(r"^(\s*)- ", r"\1  ", lines[i])
    mutated = "\n".join(lines[:i + 1] + [copy_] + lines[i + 1:]) + "\n"
    cfg, err = outcome(mutated)
    assert cfg is None and "duplicate key" in err, mutated
    assert f"{SRC}:{i + 2}:" in err and f"first at line {i + 1}" in err, err


BAD_VALUES = ["abc", [1, "x"], {"a": 1}, -1, 1e300, float("nan"), float("inf"), 1.5, None, True, [], "maybe"]


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_replaced_value_is_refused_or_means_what_it_says(name, data):
    d = copy.deepcopy(VALID[name])
    path = data.draw(st.sampled_from(list(paths(d))))
    new = data.draw(st.sampled_from(BAD_VALUES))
    get(d, path[:-1])[path[-1]] = new
    cfg, err = outcome(dump(d))
    floaty = isinstance(new, float) and not math.isfinite(new)
    if floaty or isinstance(new, dict):  # NaN / Inf / a mapping fit nowhere in a config
        assert cfg is None, (path, new)
    key = next((p for p in reversed(path) if isinstance(p, str) and p not in ("value", "parameters")), None)
    if key in MUST_REFUSE and not isinstance(new, (bool, list, dict)) and new is not None:
        if isinstance(new, str) or MUST_REFUSE[key](new):
            assert cfg is None, (path, new)
    if key == "normalize" and not isinstance(new, bool):  # booleans must be YAML booleans (null: no value)
        assert cfg is None, (path, new)
    if cfg is not None:
        assert_means(cfg, d)


@FUZZ
@given(x=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)),
       where=st.sampled_from(["global", "model", "gradient", "condition"]), key=st.sampled_from(["density", "weight"]))
def test_numbers_anywhere_in_a_parameter_are_range_checked(x, where, key):
    d = copy.deepcopy(VALID["ties"])
    slot = {"global": lambda: d["parameters"].__setitem__(key, x),
            "model": lambda: d["models"][1]["parameters"].__setitem__(key, x),
            "gradient": lambda: d["models"][1]["parameters"].__setitem__(key, [0.5, x, 0.5]),
            "condition": lambda: d["models"][2]["parameters"].__setitem__(key, [{"filter": "mlp", "value": x},
                                                                                {"value": 0.5}])}
    slot[where]()
    cfg, err = outcome(dump(d))
    bad = (isinstance(x, float) and not math.isfinite(x)) or MUST_REFUSE[key](x)
    assert (cfg is None) == bad, (where, key, x, err)
    if cfg is not None:
        assert_means(cfg, d)


@FUZZ
@given(x=st.floats(-2, 3), method=st.sampled_from(["slerp", "nearswap"]))
def test_t_is_required_and_range_checked(x, method):
    d = {"merge_method": method, "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": x}}
    cfg, err = outcome(dump(d))
    assert (cfg is None) == (x < 0 or (method == "slerp" and x > 1)), (x, err)
    del d["parameters"]
    cfg, err = outcome(dump(d))
    assert cfg is None and "needs the parameter 't'" in err


# ---------------------------------------------------------------- end to end, through `weightlab merge`

L = 3


def ckpt(path, seed, dtype=np.float32, extra=None):
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(L):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((4, 4))
        t[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((6, 4))
    t["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(4)
    t = {k: v.astype(dtype) for k, v in t.items()}
    t.update(extra or {})
    io.save_sharded(path, t)
    return t


@pytest.fixture()
def ck(tmp_path):
    return {n: ckpt(tmp_path / n, i) for i, n in enumerate(["base", "a", "b"])}


def cli(tmp_path, text, capsys, dry=True):
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    rc = main(["merge", str(cfg), str(tmp_path / "out")] + (["--dry-run"] if dry else []))
    out = capsys.readouterr()
    return rc, out.err, out.out, str(cfg)


def models(tmp_path, *names, params=None):
    return "models:\n" + "".join(f"  - model: {tmp_path / n}\n" + (f"    parameters: {params[i]}\n" if params else "")
                                 for i, n in enumerate(names))


@pytest.mark.parametrize("extra,line,needle", [
    ("paramters: {normalize: false}\n", 5, "did you mean 'parameters'"),
    ("dtpye: float16\n", 5, "did you mean 'dtype'"),
    ("tokenizer_source: union\n", 5, "tokenizer source 'union' is not supported yet"),
    ("chat_template: chatml\n", 5, "named templates such as 'chatml' are not supported yet"),
    ("tokenizer: {source: base, tokens: {}}\n", 5, "'tokens' in 'tokenizer' is not supported yet"),
    ("tokenizer_source: base\n", 5, "tokenizer source 'base' needs a base_model"),
    ("tokenizer_source: base\ntokenizer: {source: base}\n", 6, "either 'tokenizer_source' or 'tokenizer'"),
    ("parameters:\n  normalize: true\n  normalize: false\n", 7, "duplicate key 'normalize' (first at line 6"),
    ("parameters: {normalize: maybe}\n", 5, "'normalize' must be true or false, got 'maybe'"),
])
def test_cli_refuses_top_level_mistakes(tmp_path, ck, capsys, extra, line, needle):
    text = "merge_method: linear\n" + models(tmp_path, "a", "b") + extra
    rc, err, _, cfg = cli(tmp_path, text, capsys)
    assert rc == 2 and f"{cfg}:{line}:" in err and needle in err, err


def test_cli_refuses_unknown_keys_in_entries(tmp_path, ck, capsys):
    text = "merge_method: linear\n" + models(tmp_path, "a", "b").replace("  - model: " + str(tmp_path / "b") + "\n",
                                                                         f"  - model: {tmp_path / 'b'}\n    parameter: "
                                                                         "{weight: 3}\n")
    rc, err, _, cfg = cli(tmp_path, text, capsys)
    assert rc == 2 and f"{cfg}:5: unknown key 'parameter'" in err and "did you mean 'parameters'" in err, err
    sl = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tmp_path / 'a'}\n"
          f"        layer_rnage: [0, 2]\n")
    rc, err, _, cfg = cli(tmp_path, sl, capsys)
    assert rc == 2 and f"{cfg}:5: unknown key 'layer_rnage'" in err and "did you mean 'layer_range'" in err, err
    sl2 = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tmp_path / 'a'}\n"
           f"        layer_range: [0, 2]\n    residual_weight: 0.5\n")
    rc, err, _, cfg = cli(tmp_path, sl2, capsys)
    assert rc == 2 and f"{cfg}:6: 'residual_weight' in a slice is not supported yet" in err, err


def test_cli_slerp_needs_t_in_range_and_passthrough_takes_one_model(tmp_path, ck, capsys):
    head = f"merge_method: slerp\nbase_model: {tmp_path / 'base'}\n" + models(tmp_path, "base", "a")
    rc, err, _, _ = cli(tmp_path, head, capsys)
    assert rc == 2 and "slerp needs the parameter 't'" in err, err
    rc, err, _, cfg = cli(tmp_path, head + "parameters: {t: 1.5}\n", capsys)
    assert rc == 2 and f"{cfg}:6: slerp parameter 't' must be a finite number in [0, 1], got 1.5" in err, err
    rc, err, _, _ = cli(tmp_path, "merge_method: passthrough\n" + models(tmp_path, "a", "b"), capsys)
    assert rc == 2 and "passthrough merges exactly 1 model, got 2" in err, err
    sl = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tmp_path / 'a'}\n"
          f"        layer_range: [0, 2]\n      - model: {tmp_path / 'b'}\n        layer_range: [0, 2]\n")
    rc, err, _, cfg = cli(tmp_path, sl, capsys)
    assert rc == 2 and f"{cfg}:3: passthrough merges exactly 1 model, got 2" in err, err


def test_cli_non_float_tensors_must_agree(tmp_path, ck, capsys):
    ckpt(tmp_path / "ib", 0, extra={"model.pos": np.arange(4, dtype=np.int64)})
    for n in ("fa", "fb"):
        ckpt(tmp_path / n, 1, extra={"model.pos": np.arange(4, dtype=np.float32)})
    text = f"merge_method: ties\nbase_model: {tmp_path / 'ib'}\n" + models(tmp_path, "fa", "fb")
    rc, err, _, _ = cli(tmp_path, text, capsys)
    assert rc == 2 and "tensor 'model.pos'" in err and "int64" in err and "float32" in err, err
    ckpt(tmp_path / "i1", 2, extra={"model.pos": np.arange(4, dtype=np.int64)})
    ckpt(tmp_path / "i2", 3, extra={"model.pos": np.arange(4, dtype=np.int64)[::-1].copy()})
    ckpt(tmp_path / "i3", 4, extra={"model.pos": np.arange(4, dtype=np.int64)})
    rc, err, _, _ = cli(tmp_path, "merge_method: linear\n" + models(tmp_path, "i1", "i2"), capsys)
    assert rc == 2 and "tensor 'model.pos' (int64) differs between" in err, err
    rc, err, _, _ = cli(tmp_path, "merge_method: linear\n" + models(tmp_path, "i1", "i3"), capsys, dry=False)
    assert rc == 0, err
    np.testing.assert_array_equal(io.open_checkpoint(tmp_path / "out")["model.pos"], np.arange(4))


@pytest.mark.parametrize("params,tensor", [
    (["{weight: 1.0}", "{weight: -1.0}"], "model.layers.0."),
    (["{weight: [1.0, 1.0, 1.0]}", "{weight: [0.0, -1.0, 0.0]}"], "model.layers.1."),  # zero only mid-stack
    (["{weight: 1.0}", "{weight: [{filter: mlp, value: -1.0}, {value: 1.0}]}"], ".mlp.up_proj"),
])
def test_cli_zero_sum_weights_are_refused_at_plan_time(tmp_path, ck, capsys, params, tensor):
    rc, err, _, cfg = cli(tmp_path, "merge_method: linear\n" + models(tmp_path, "a", "b", params=params), capsys)
    assert rc == 2 and f"{cfg}:2: tensor '" in err and tensor in err and "sum to zero" in err, err


def test_cli_della_window_is_checked_at_plan_time(tmp_path, ck, capsys):
    text = (f"merge_method: della\nbase_model: {tmp_path / 'base'}\n" +
            models(tmp_path, "a", "b", params=["{density: [0.5, 0.1]}", "{density: 0.5}"]))
    rc, err, _, cfg = cli(tmp_path, text, capsys)
    assert rc == 2 and f"{cfg}:3: tensor 'model.layers.2." in err and "density +- epsilon" in err, err


def test_cli_never_writes_inf_and_normalises_before_summing(tmp_path, ck, capsys):
    big = ["{weight: 3.0e+38}", "{weight: 3.0e+38}"]  # (PyYAML reads 3.0e38 as a string)
    rc, err, _, _ = cli(tmp_path, "merge_method: linear\n" + models(tmp_path, "a", "b", params=big) +
                        "parameters: {normalize: false}\n", capsys, dry=False)
    assert rc == 2 and "NaN/Inf" in err and "tensor 'model." in err, err
    assert not (tmp_path / "out").exists()
    rc, err, _, _ = cli(tmp_path, "merge_method: linear\n" + models(tmp_path, "a", "b", params=big), capsys, dry=False)
    assert rc == 0, err
    got = io.open_checkpoint(tmp_path / "out")
    for n in ck["a"]:
        np.testing.assert_allclose(got[n], (ck["a"][n] + ck["b"][n]) / 2, rtol=1e-6, atol=1e-6)
    out = merge.linear(None, [ck["a"], ck["b"]], weight=[3e38, 3e38])  # the JAX path too
    np.testing.assert_allclose(out["model.norm.weight"], (ck["a"]["model.norm.weight"] + ck["b"]["model.norm.weight"]) / 2,
                               rtol=1e-6)


def test_cli_nearswap_t_required_before_the_merge_starts(tmp_path, ck, capsys):
    head = f"merge_method: nearswap\nbase_model: {tmp_path / 'base'}\n" + models(tmp_path, "a")
    rc, err, _, _ = cli(tmp_path, head, capsys)
    assert rc == 2 and "nearswap needs the parameter 't'" in err, err
    rc, err, _, _ = cli(tmp_path, head + "parameters:\n  t:\n    - {filter: mlp, value: 0.1}\n", capsys)
    assert rc == 2 and "nearswap needs 't' (no filter covers tensor 'model." in err, err


def test_alias_bomb_is_refused_quickly(tmp_path, ck, capsys):
    levels = ["    - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "merge_method: linear\n" + models(tmp_path, "a", "b") + "parameters:\n  weight:\n" + "\n".join(levels) + "\n"
    assert len(text) < 1500
    t0 = time.perf_counter()
    rc, err, _, cfg = cli(tmp_path, text, capsys)
    assert time.perf_counter() - t0 < 1.0
    assert rc == 2 and "expands to more than 100000 YAML nodes" in err and f"{cfg}:" in err, err
    with pytest.raises(MergeError, match=rf"{SRC}:1: recursive YAML alias"):
        parse_config("&x [*x]\n", SRC)


@pytest.mark.parametrize("snippet,line,needle", [
    ("density: abc", 6, "'density' must be a finite number in (0, 1], got 'abc'"),
    ("weight: [0.1, x]", 6, "'weight' must be a finite number, got 'x'"),
    ("density: {a: 1}", 6, "'density' must be a value, a gradient"),
    ("density:\n        - {filter: mlp, value: 0.5}\n        - {value: 1.5}", 8, "got 1.5"),
    ("density: [0.2, 1.7]", 6, "got 1.7"),
    ("lambda: .nan", 6, "'lambda' is not a per-model parameter"),
    ("normalize: 1", 6, "'normalize' is not a per-model parameter"),
])
def test_parameter_values_checked_with_their_line(snippet, line, needle):
    text = f"merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n    parameters:\n      {snippet}\n"
    with pytest.raises(MergeError) as e:
        parse_config(text, SRC)
    assert f"{SRC}:{line}:" in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("snippet,needle", [
    ("normalize: maybe", "must be true or false"), ("normalize: [true, false]", "only works for numbers"),
    ("lambda: .nan", "got nan"), ("consensus: majority", "one of 'sum', 'count', null"), ("k: 2", "no parameter 'k'"),
])
def test_global_parameter_values(snippet, needle):
    text = f"merge_method: ties\nbase_model: b\nmodels:\n  - model: x\nparameters:\n  {snippet}\n"
    with pytest.raises(MergeError, match=rf"^{SRC}:6: ") as e:
        parse_config(text, SRC)
    assert needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- the Python API

def test_every_registered_parameter_has_a_schema_entry():
    from weightlab.merge.params import spec
    from weightlab.merge.registry import merge_method

    missing = [(m, p) for m in METHODS for p in METHODS[m].parameters if spec(m, p) is None]
    assert not missing
    with pytest.raises(RegistryError, match="undeclared_knob"):
        @merge_method("test_only_unschema")
        def _m(base, models, *, undeclared_knob=1.0):
            return base
    assert "test_only_unschema" not in METHODS


@pytest.mark.parametrize("call,needle", [
    (lambda b, ms: merge.ties(b, ms, density=1.5), "ties: parameter 'density' must be a finite number in (0, 1]"),
    (lambda b, ms: merge.ties(b, ms, density=[0.5, "x"]), "ties: parameter 'density' (model 1)"),
    (lambda b, ms: merge.slerp(b, ms[:1], t=1.5), "slerp: parameter 't'"),
    (lambda b, ms: merge.linear(None, ms, normalize="maybe"), "linear: parameter 'normalize' must be true or false"),
    (lambda b, ms: merge.linear(None, ms, weight=[1.0, -1.0]), "linear: the weights [1.0, -1.0] sum to zero"),
    (lambda b, ms: merge.karcher(None, ms, weight=[2.0, -2.0]), "karcher: the weights"),
    (lambda b, ms: merge.consensus(b, ms, k=1.5), "consensus: parameter 'k' must be an integer"),
    (lambda b, ms: merge.nearswap(b, ms[:1]), "nearswap needs the parameter 't'"),
    (lambda b, ms: merge.transform("ties", consensus="majority"), "ties: parameter 'consensus'"),
])
def test_python_api_rejects_bad_values_before_any_work(call, needle):
    base = {"w": np.ones((3, 2), np.float32)}
    mismatched = [{"w": np.ones((3, 2), np.float32)}, {"v": np.ones(2, np.float32)}]  # inputs() would fail first
    with pytest.raises(MergeError) as e:
        call(base, mismatched)
    assert needle in str(e.value), str(e.value)


def test_float64_checkpoints_stay_float64(tmp_path, capsys):
    a, b = (ckpt(tmp_path / n, i, dtype=np.float64) for i, n in enumerate(["a64", "b64"]))
    text = "merge_method: linear\n" + models(tmp_path, "a64", "b64", params=["{weight: 0.25}", "{weight: 0.75}"])
    rc, err, out, _ = cli(tmp_path, text, capsys, dry=False)
    assert rc == 0 and "float32" not in out, err + out
    got = io.open_checkpoint(tmp_path / "out")
    for n in a:
        assert got.dtype(n) == np.float64
        np.testing.assert_allclose(got[n], 0.25 * a[n] + 0.75 * b[n], rtol=1e-14, atol=1e-15)  # computed in f64
    ts = (f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'a64'}\n" + models(tmp_path, "b64") +
          "parameters: {normalize: true}\n")
    (tmp_path / "out").rename(tmp_path / "lin")
    rc, err, out, _ = cli(tmp_path, ts, capsys, dry=False)
    assert rc == 0 and "float64 tensors" in out and "merged in float32" in out, err + out
    got = io.open_checkpoint(tmp_path / "out")
    assert all(got.dtype(n) == np.float64 for n in a)
    with pytest.warns(UserWarning, match="float64 inputs are merged and returned as float32"):
        merge.linear(None, [a, b])


def test_a_model_listed_twice_is_refused():
    """Parameters are looked up by model path: a second entry's weight would silently be the first's."""
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: a\n" \
           "    parameters: {weight: 3}\n"
    with pytest.raises(MergeError, match=rf"^{SRC}:5: model 'a' is listed twice in 'models' \(first at line 3\)"):
        parse_config(text, SRC)
