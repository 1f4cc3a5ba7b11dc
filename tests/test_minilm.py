"""The real all-MiniLM-L6-v2 weights in our pure-JAX BERT."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import tree as wt
from weightlab.models.bert import hf_to_params, load_minilm, minilm_path, params_to_hf

pytestmark = pytest.mark.real
REF = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_real_weights_shape(minilm):
    assert 22_500_000 < wt.param_count(minilm.params) < 23_000_000  # 22.7M
    assert minilm.params["encoder"]["layer_5"]["attn"]["query"]["kernel"].shape == (384, 384)
    assert minilm.params["encoder"]["layer_0"]["mlp"]["up"]["kernel"].shape == (384, 1536)


def test_tokenizer_matches_reference(minilm):
    b = minilm.tokenize(REF["sentences"][:1])
    n = int(b["attention_mask"][0].sum())
    assert b["input_ids"][0, :n].tolist() == REF["input_ids_0"]


def test_embeddings_match_huggingface_reference(minilm):
    """Independent reference: HF transformers (PyTorch) on the same files, numbers computed offline."""
    e = minilm.encode(REF["sentences"])
    np.testing.assert_allclose(e[:, :8], np.array(REF["first8"]), atol=2e-5)
    np.testing.assert_allclose(e @ e.T, np.array(REF["cos"]), atol=2e-5)


def test_paraphrases_closer_than_unrelated_and_deterministic(minilm):
    s = REF["sentences"]
    e = minilm.encode(s)
    cos = e @ e.T
    assert cos[0, 1] > 0.5 and cos[3, 4] > 0.5
    for i, j in [(0, 2), (0, 3), (1, 5), (3, 5), (2, 4)]:
        assert cos[0, 1] > cos[i, j] + 0.3 and cos[3, 4] > cos[i, j] + 0.3
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(e, minilm.encode(s))
    # batching and padding do not change a sentence's embedding
    np.testing.assert_allclose(minilm.encode(s[:1]), e[:1], atol=1e-5)


def test_hf_name_roundtrip(minilm):
    hf = params_to_hf(minilm.params)
    assert "encoder.layer.3.attention.self.value.weight" in hf
    back = hf_to_params(hf)
    wt.check_compatible(minilm.params, back)
    for a, b in zip(jax.tree.leaves(minilm.params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_apply_fn_is_pure_and_jittable(minilm):
    b = {k: jnp.asarray(v) for k, v in minilm.tokenize(["hello world"]).items()}
    e1 = jax.jit(minilm.apply_fn)(minilm.params, b)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), minilm.params)
    e2 = jax.jit(minilm.apply_fn)(half, b)
    assert float(jnp.sum(e1 * e2)) > 0.99
    assert minilm_path().joinpath("model.safetensors").exists()
