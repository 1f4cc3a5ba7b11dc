"""The pure-JAX LLaMA against transformers' LlamaForCausalLM (PyTorch CPU, test-only), and its names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab.errors import CheckpointError, ShapeMismatchError
from weightlab.models import llama as L

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_logits(config: L.LlamaConfig, params: dict, ids, mask=None):
    """The reference: transformers' model built from ``config.to_hf()``, weights via state_dict."""
    cfg = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in params.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                    attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask, np.int64)))
    return out.logits.numpy()


CONFIGS = {
    "gqa_untied": L.tiny_config(),
    "mha_tied": L.tiny_config(num_kv_heads=4, tie_word_embeddings=True),
    "bias_theta_headdim": L.tiny_config(attention_bias=True, mlp_bias=True, rope_theta=500.0, head_dim=8,
                                        num_heads=8, num_kv_heads=2),
    "llama3_rope": L.tiny_config(rope_theta=500000.0, max_position=64, rope_scaling=tuple(sorted({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}.items()))),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name):
    config = CONFIGS[name]
    params = L.random_llama(jax.random.key(1), config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    ours = np.asarray(jax.jit(lambda p, i: L.llama_apply(p, i, config))(params, ids))
    assert ours.dtype == np.float32 and ours.shape == (2, 11, config.vocab_size)
    np.testing.assert_allclose(ours, hf_logits(config, params, ids), atol=1e-4, rtol=1e-4)


def test_padding_mask_on_the_right_matches_transformers():
    config = CONFIGS["gqa_untied"]
    params = L.random_llama(jax.random.key(2), config)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0
    ours = np.asarray(L.llama_apply(params, ids, config, attention_mask=mask))
    ref = hf_logits(config, params, ids, mask)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours[1, :5], ref[1, :5], atol=1e-4, rtol=1e-4)
    # a padded row's real tokens see the same logits as the unpadded sequence alone
    alone = np.asarray(L.llama_apply(params, ids[1:, :5], config))
    np.testing.assert_allclose(ours[1, :5], alone[0], atol=1e-5)


def test_config_from_hf_roundtrip_and_bench_merge_shape():
    c = CONFIGS["llama3_rope"]
    assert L.LlamaConfig.from_hf(c.to_hf()) == c
    # the config scripts/bench_merge.py writes (old-style top-level rope_theta, no head_dim)
    bench = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
             "intermediate_size": 176, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
             "vocab_size": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "torch_dtype": "float32",
             "tie_word_embeddings": False}
    bc = L.LlamaConfig.from_hf(bench)
    assert (bc.head_dim, bc.rope_theta, bc.rope_scaling) == (16, 10000.0, ())
    params = L.random_llama(jax.random.key(0), bc)
    assert set(params) == set(L.expected_shapes(bc)) and "lm_head.weight" in params
    ids = np.arange(6)[None] % 128
    np.testing.assert_allclose(np.asarray(L.llama_apply(params, ids, bc)), hf_logits(bc, params, ids), atol=1e-4)
    # old-style rope_scaling with "type"
    old = dict(bench, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    assert dict(L.LlamaConfig.from_hf(old).rope_scaling) == {"rope_type": "linear", "factor": 2.0}


def test_names_shapes_and_errors():
    config = L.tiny_config()
    params = L.random_llama(jax.random.key(0), config)
    assert L.params_to_hf(L.hf_to_params(params)) == params
    with_buf = dict(params, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)})
    assert set(L.hf_to_params(with_buf)) == set(params)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.fc1.weight"):
        L.hf_to_params(dict(params, **{"model.layers.0.mlp.fc1.weight": np.ones((2, 2))}))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    L.check_shapes(shapes, config)
    bad = dict(shapes, **{"model.layers.1.mlp.up_proj.weight": (128, 32)})
    with pytest.raises(ShapeMismatchError, match=r"model.layers.1.mlp.up_proj.weight.*\(128, 64\).*\(128, 32\)"):
        L.check_shapes(bad, config)
    with pytest.raises(CheckpointError, match="describes 'lm_head.weight', which the checkpoint lacks"):
        L.check_shapes({k: v for k, v in shapes.items() if k != "lm_head.weight"}, config)
    with pytest.raises(CheckpointError, match="model.layers.2"):
        L.check_shapes(dict(shapes, **{"model.layers.2.input_layernorm.weight": (64,)}), config)
    with pytest.raises(CheckpointError, match="RoPE type 'yarn'"):
        L.LlamaConfig.from_hf(dict(config.to_hf(), rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match="cannot share"):
        L.tiny_config(num_heads=4, num_kv_heads=3)


def test_bf16_weights_and_jit_deterministic():
    config = L.tiny_config()
    params = L.random_llama(jax.random.key(3), config)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids = np.arange(8)[None]
    a = np.asarray(L.llama_apply(params, ids, config))
    b = np.asarray(L.llama_apply(half, ids, config))
    assert b.dtype == np.float32 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    np.testing.assert_array_equal(a, np.asarray(L.llama_apply(params, ids, config)))
