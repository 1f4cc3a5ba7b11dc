"""LoRA extraction / factor-space merging against dense float64 SVDs, and merges from QArray inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import merge, quant
from weightlab.errors import MergeError


def lowrank_pair(seed=0, shape=(24, 16), rank=3, noise=0.0):
    rng = np.random.default_rng(seed)
    base = {"dense": {"kernel": rng.standard_normal(shape).astype(np.float32),
                      "bias": rng.standard_normal(shape[1]).astype(np.float32)}}
    d = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    d = d + noise * rng.standard_normal(shape)
    ft = {"dense": {"kernel": (base["dense"]["kernel"] + d).astype(np.float32),
                    "bias": (base["dense"]["bias"] + 0.1).astype(np.float32)}}
    return base, ft, d


def test_extract_lora_is_the_truncated_svd():
    base, ft, d = lowrank_pair(noise=0.05)
    lo, err = merge.extract_lora(base, ft, rank=3)
    leaf = lo["dense"]["kernel"]
    assert merge.is_lora(leaf) and leaf.rank == 3
    dd = np.asarray(ft["dense"]["kernel"], np.float64) - base["dense"]["kernel"]
    u, s, vt = np.linalg.svd(dd)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(merge.lora_delta(leaf), best, atol=1e-4)
    np.testing.assert_allclose(err["dense/kernel"], np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()), rtol=1e-3)
    np.testing.assert_allclose(lo["dense"]["bias"], 0.1, atol=1e-6)  # non-matrix leaves stay dense
    # energy-fraction rank: an exactly rank-3 delta needs rank 3 for 99.99%
    lo2, err2 = merge.extract_lora(*lowrank_pair()[:2], rank=0.9999)
    assert lo2["dense"]["kernel"].rank == 3 and err2["dense/kernel"] < 1e-3
    out = merge.apply_lora(base, lo2)
    np.testing.assert_allclose(out["dense"]["kernel"], lowrank_pair()[1]["dense"]["kernel"], atol=1e-4)
    with pytest.raises(MergeError, match="rank"):
        merge.extract_lora(base, ft, rank=0)


def test_merge_loras_concat_exact_and_svd_optimal():
    rng = np.random.default_rng(1)
    mk = lambda r: merge.LoRA(jnp.asarray(rng.standard_normal((20, r)), jnp.float32),
                              jnp.asarray(rng.standard_normal((r, 12)), jnp.float32))
    trees = [{"w": mk(4), "b": jnp.ones(12) * i} for i in range(3)]
    w = [0.5, 1.0, -0.25]
    dense = sum(wi * np.asarray(merge.lora_delta(t["w"]), np.float64) for wi, t in zip(w, trees))
    cat = merge.merge_loras(trees, w)
    assert cat["w"].rank == 12
    np.testing.assert_allclose(merge.lora_delta(cat["w"]), dense, atol=1e-4)
    np.testing.assert_allclose(cat["b"], sum(wi * i for wi, i in zip(w, range(3))) * np.ones(12), atol=1e-6)
    svd = merge.merge_loras(trees, w, method="svd", rank=5)
    u, s, vt = np.linalg.svd(dense)
    np.testing.assert_allclose(merge.lora_delta(svd["w"]), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-3)
    assert svd["w"].a.shape == (20, 5) and svd["w"].b.shape == (5, 12)


def test_lora_from_peft_layout():
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((4, 10)), rng.standard_normal((6, 4))  # PEFT: (r, in), (out, r)
    lo = merge.LoRA.from_peft(A, B, alpha=8)
    np.testing.assert_allclose(merge.lora_delta(lo), (B @ A * 2.0).T, atol=1e-5)


def test_lora_errors():
    with pytest.raises(MergeError):
        merge.merge_loras([])
    a = {"w": merge.LoRA(jnp.ones((4, 2)), jnp.ones((2, 3)))}
    b = {"w": merge.LoRA(jnp.ones((5, 2)), jnp.ones((2, 3)))}
    with pytest.raises(MergeError, match="'w'"):
        merge.merge_loras([a, b])
    with pytest.raises(MergeError, match="method"):
        merge.merge_loras([a, a], method="ties")


def test_merges_accept_quantized_inputs():
    """QArray leaves are merged as their dequantized values (the same as dequantizing first), through
    the one shared input path: ``merge.ties`` is the registered function itself."""
    from weightlab.merge import methods

    assert merge.ties is methods.ties and merge.METHODS["ties"].fn is merge.ties
    rng = np.random.default_rng(3)
    base = {"l": {"kernel": rng.standard_normal((64, 32)).astype(np.float32), "bias": np.zeros(32, np.float32)}}
    ms = [jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(2)]
    qms = [quant.quantize(m, "rtn", bits=8, group_size=32) for m in ms]
    assert quant.is_qarray(qms[0]["l"]["kernel"])
    deq = [quant.dequantize(q) for q in qms]
    for fn in (lambda b, m: merge.ties(b, m, density=0.5), lambda b, m: merge.tsv_m(b, m),
               lambda b, m: merge.task_arithmetic(b, m, lambda_=0.5)):
        got, want = fn(base, qms), fn(base, deq)
        np.testing.assert_allclose(got["l"]["kernel"], want["l"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(merge.linear(None, qms)["l"]["kernel"], merge.linear(None, deq)["l"]["kernel"], atol=1e-6)
    # the 8-bit inputs stay close to the float merge
    np.testing.assert_allclose(merge.linear(None, qms)["l"]["kernel"], merge.linear(None, ms)["l"]["kernel"], atol=0.05)


def test_extract_lora_checkpoint_cli_writes_a_peft_adapter(tmp_path, capsys):
    import json

    from weightlab import cli, io

    rng = np.random.default_rng(4)
    base = {"model.embed_tokens.weight": rng.standard_normal((30, 8)).astype(np.float32),
            "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "model.norm.weight": np.ones(8, np.float32)}
    deltas = {n: (rng.standard_normal((v.shape[0], 2)) @ rng.standard_normal((2, v.shape[1]))).astype(np.float32)
              for n, v in base.items() if "proj" in n}
    ft = {n: v + deltas.get(n, 0.01) for n, v in base.items()}
    io.save_sharded(tmp_path / "base", base)
    io.save_sharded(tmp_path / "ft", ft)
    out = tmp_path / "adapter"
    assert cli.main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "ft"), str(out), "--rank", "2"]) == 0
    assert "2 LoRA modules" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["q_proj", "up_proj"]
    ad = io.open_checkpoint(out / "adapter_model.safetensors")
    for n, d in deltas.items():
        m = "base_model.model." + n[: -len(".weight")]
        B, A = ad[m + ".lora_B.weight"], ad[m + ".lora_A.weight"]  # PEFT: (out, r), (r, in)
        assert B.shape == (d.shape[0], 2) and A.shape == (2, d.shape[1])
        np.testing.assert_allclose(B @ A, d, atol=1e-4)
    assert not any("embed" in k or "norm" in k for k in ad.keys())
    assert cli.main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "ft"), str(out)]) == 2  # exists
    assert cli.main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "x"),
                     "--select", "nothing"]) == 2
    assert not (tmp_path / "x").exists()


def test_merge_lora_cli_merges_adapters_in_factor_space(tmp_path, capsys):
    """`weightlab merge-lora`: the concat adapter's B @ A is exactly sum_i w_i scale_i B_i A_i (scales
    from each adapter's alpha/r, rank_pattern honoured); svd gives its best rank-r approximation; a
    module present in one adapter only keeps its own term; disagreeing shapes are refused first."""
    import json

    from weightlab import cli, io
    from weightlab.merge.peft import read_adapter, write_adapter

    rng = np.random.default_rng(5)
    mk = lambda o, i, r: (rng.standard_normal((o, r)).astype(np.float32), rng.standard_normal((r, i)).astype(np.float32))
    a1 = {"layers.0.q_proj": mk(8, 6, 2), "layers.0.v_proj": mk(8, 6, 2)}
    a2 = {"layers.0.q_proj": mk(8, 6, 3)}
    write_adapter(tmp_path / "a1", a1, base_path="base")
    write_adapter(tmp_path / "a2", a2, base_path="base")
    cfg = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())  # a PEFT-style scale: alpha/r = 2
    cfg.update(lora_alpha=6, r=3, rank_pattern={}, alpha_pattern={})
    (tmp_path / "a2" / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli.main(["merge-lora", str(tmp_path / "a1"), str(tmp_path / "a2"), "--out", str(tmp_path / "m"),
                     "--weights", "0.5,1.5"]) == 0
    _, got = read_adapter(tmp_path / "m")
    want_q = 0.5 * a1["layers.0.q_proj"][0] @ a1["layers.0.q_proj"][1] + 1.5 * 2.0 * a2["layers.0.q_proj"][0] @ a2["layers.0.q_proj"][1]
    b, a, s = got["layers.0.q_proj"]
    assert s == 1.0 and b.shape == (8, 5) and a.shape == (5, 6)
    np.testing.assert_allclose(b @ a, want_q, atol=1e-4)
    b, a, _ = got["layers.0.v_proj"]
    np.testing.assert_allclose(b @ a, 0.5 * a1["layers.0.v_proj"][0] @ a1["layers.0.v_proj"][1], atol=1e-4)
    assert cli.main(["merge-lora", str(tmp_path / "a1"), str(tmp_path / "a2"), "--out", str(tmp_path / "s"),
                     "--weights", "0.5,1.5", "--method", "svd", "--rank", "2"]) == 0
    b, a, _ = read_adapter(tmp_path / "s")[1]["layers.0.q_proj"]
    u, sv, vt = np.linalg.svd(want_q.astype(np.float64))
    np.testing.assert_allclose(b @ a, (u[:, :2] * sv[:2]) @ vt[:2], atol=1e-3)
    write_adapter(tmp_path / "bad", {"layers.0.q_proj": mk(9, 6, 2)}, base_path="base")
    assert cli.main(["merge-lora", str(tmp_path / "a1"), str(tmp_path / "bad"), "--out", str(tmp_path / "x")]) == 2
    assert "disagree" in capsys.readouterr().err and not (tmp_path / "x").exists()
