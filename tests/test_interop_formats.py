"""weightlab.interop: GPTQ, compressed-tensors pack-quantized and bitsandbytes NF4 checkpoints.

References: literal NumPy readings of AutoGPTQ's ``QuantLinear.pack`` and of its torch dequantization
(``qlinear_cuda_old`` forward with ``g_idx`` as in ``qlinear_cuda``), written here from the source;
compressed-tensors' own ``PackedQuantizationCompressor.decompress``; bitsandbytes' own
``quantize_4bit`` / ``dequantize_4bit``; transformers loading a compressed-tensors MiniLM.
"""

import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from weightlab import quant
from weightlab import tree as wtree
from weightlab.errors import CheckpointError, OutputExistsError, QuantizationError, UsageError
from weightlab.interop import detect_format, export_checkpoint, import_checkpoint
from weightlab.interop._common import codes_of, pack_stream, unpack_stream
from weightlab.io import open_checkpoint
from weightlab.quant.qarray import QArray

torch = pytest.importorskip("torch")


def rtn(w, fmt="uint", bits=4, g=32, **kw):
    return jax.device_get(quant.quantize_rtn(jnp.asarray(w), fmt, bits, g, axis=-1, **kw))


def weight(out=64, k=128, seed=0, dtype=np.float16):
    return np.random.default_rng(seed).normal(size=(out, k)).astype(dtype)


def tensors(d):
    with open_checkpoint(Path(d) / "model.safetensors") as c:
        return {k: c[k] for k in c.keys()}


def same_q(a: QArray, b: QArray):
    assert np.array_equal(codes_of(a), codes_of(b))
    np.testing.assert_array_equal(np.asarray(a.dequantize(jnp.float32)), np.asarray(b.dequantize(jnp.float32)))


# ------------------------------------------------------------------ references (AutoGPTQ, read literally)

def ref_autogptq_pack(intweight, bits):
    """AutoGPTQ ``QuantLinear.pack``'s loop over rows of ``intweight`` (rows packed into int32 words)."""
    intweight = intweight.astype(np.uint32)
    q = np.zeros((intweight.shape[0] // 32 * bits,) + intweight.shape[1:], np.uint32)
    i = row = 0
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, 1 split code, 10 codes, 1 split code, 10 codes in 3 words
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i))
            i += 10
            q[row] |= intweight[i] << 30
            row += 1
            q[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= intweight[i] << 31
            row += 1
            q[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return q.view(np.int32)


def ref_autogptq_unpack_rows(q, bits):
    """The torch forward's unpacking of packed rows (shift by ``wf``, mask; the 3-bit fix-ups)."""
    q = q.view(np.uint32).astype(np.int64)
    if bits in (2, 4, 8):
        wf = np.arange(0, 32, bits)
        w = (q[:, None, :] >> wf[None, :, None]) & (2 ** bits - 1)
        return w.reshape(-1, q.shape[1])
    wf = np.array([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                   [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]])
    w = q.reshape(q.shape[0] // 3, 3, 1, q.shape[1])
    w = (w >> wf[None, :, :, None]) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = np.concatenate([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], axis=1)
    return w.reshape(-1, q.shape[1])


def ref_autogptq_dequant(t, x, bits, v1=True):
    """W (out, in) = scales[g_idx] * (codes - zeros[g_idx]), zeros read back + 1 in the v1 format."""
    w = ref_autogptq_unpack_rows(t[f"{x}.qweight"], bits)                        # (in, out)
    z = ref_autogptq_unpack_rows(np.ascontiguousarray(t[f"{x}.qzeros"].T), bits).T + (1 if v1 else 0)
    g = t[f"{x}.g_idx"].astype(np.int64)
    return (t[f"{x}.scales"].astype(np.float32)[g] * (w - z[g]).astype(np.float32)).T


# ------------------------------------------------------------------ the shared bit stream

@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 3), cols=st.integers(1, 4), seed=st.integers(0, 99))
def test_bit_stream_is_autogptqs_packing(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(rows * 32, cols))
    packed = pack_stream(codes, bits, axis=0)
    np.testing.assert_array_equal(packed, ref_autogptq_pack(codes, bits))
    np.testing.assert_array_equal(ref_autogptq_unpack_rows(packed, bits), codes)
    np.testing.assert_array_equal(unpack_stream(packed, bits, rows * 32, axis=0), codes)


def test_numpy_code_packing_is_weightlabs():
    from weightlab.interop._common import pack_qarray_codes, unpack_qarray_codes
    from weightlab.quant.packing import pack

    rng = np.random.default_rng(1)
    for bits in (3, 4):  # the uint32 stream and the uint8 layout
        c = rng.integers(0, 2 ** bits, size=(5, 45)).astype(np.uint8)
        for axis in (1,):
            ours = pack_qarray_codes(c, bits, axis)
            ref = np.asarray(pack(jnp.asarray(c), bits, axis))
            assert ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes()
            np.testing.assert_array_equal(unpack_qarray_codes(ref, bits, c.shape[axis], axis), c)


def test_bit_stream_is_compressed_tensors_dense_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        for n in (7, 32, 45):
            c = rng.integers(0, 2 ** bits, size=(3, n))
            ref = pack_to_int32(torch.tensor(c - 2 ** (bits - 1), dtype=torch.int8), bits).numpy()
            np.testing.assert_array_equal(pack_stream(c, bits, axis=1), ref)
            np.testing.assert_array_equal(unpack_stream(ref, bits, n, axis=1), c)


# ------------------------------------------------------------------ GPTQ

@pytest.mark.parametrize("bits,sym,g,out,seed", [(3, True, None, 64, 1), (4, False, 64, 32, 2)])
def test_gptq_round_trip_and_autogptq_reference(bits, sym, g, out, seed):
    q = rtn(weight(out, 128, seed), "int" if sym else "uint", bits, g)  # groups straddle 0: zero points >= 1
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint({"m.weight": q, "m.bias": np.ones(out, np.float16)}, f"{d}/a", "gptq")
        t = tensors(f"{d}/a")
        assert t["m.qweight"].shape == (128 * bits // 32, out) and t["m.qweight"].dtype == np.int32
        assert t["m.scales"].dtype == np.float16 and t["m.g_idx"].dtype == np.int32
        np.testing.assert_array_equal(ref_autogptq_dequant(t, "m", bits), np.asarray(q.dequantize(jnp.float32)))
        cfg = json.loads(Path(f"{d}/a/config.json").read_text())["quantization_config"]
        assert cfg == {**cfg, "quant_method": "gptq", "bits": bits, "sym": sym, "desc_act": False,
                       "group_size": -1 if g is None else g, "checkpoint_format": "gptq"}
        back, _ = import_checkpoint(f"{d}/a")
        same_q(back["m.weight"], q)
        np.testing.assert_array_equal(back["m.bias"], np.ones(out, np.float16))
        export_checkpoint(back, f"{d}/b", "gptq")
        assert Path(f"{d}/a/model.safetensors").read_bytes() == Path(f"{d}/b/model.safetensors").read_bytes()


def random_q(seed, bits, sym, out, k, g, act_order=False, zero_lo=1):
    """A QArray with random codes, float16 scales, zero points in [zero_lo, 2^b - 1] and (act-order)
    a random g_idx, built directly (no quantizer, no compilation)."""
    from weightlab.interop._common import pack_qarray_codes
    from weightlab.quant.formats import get_format

    rng = np.random.default_rng(seed)
    ng = k // g
    zero = None if sym else rng.integers(zero_lo, 2 ** bits, size=(out, ng, 1)).astype(np.float16)
    return QArray(pack_qarray_codes(rng.integers(0, 2 ** bits, size=(out, k)), bits, 1),
                  rng.uniform(0.01, 1.0, size=(out, ng, 1)).astype(np.float16), zero,
                  g_idx=rng.integers(0, ng, size=k).astype(np.int32) if act_order else None, shape=(out, k),
                  dtype=np.float16, fmt=get_format("int", bits, symmetric=sym), group_size=g, axis=1)


def np_dequant(q):
    """weightlab's QArray semantics in NumPy: (c - z) * s per position's group (float32)."""
    c = codes_of(q).astype(np.float32)
    gi = np.asarray(q.g_idx) if q.g_idx is not None else np.arange(q.shape[1]) // q.group_size
    s = np.asarray(q.scale, np.float32)[:, gi, 0]
    z = np.full_like(s, 2 ** (q.fmt.bits - 1)) if q.zero is None else np.asarray(q.zero, np.float32)[:, gi, 0]
    return (c - z) * s


def same_children(a: QArray, b: QArray):
    assert (a.fmt, a.shape, a.group_size, a.axis) == (b.fmt, b.shape, b.group_size, b.axis)
    assert np.array_equal(codes_of(a), codes_of(b))
    gi = lambda q: np.arange(q.shape[1]) // q.group_size if q.g_idx is None else np.asarray(q.g_idx)
    np.testing.assert_array_equal(gi(a), gi(b))  # an act-order g_idx equal to i // g reads back as None
    for n in ("scale", "zero"):
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), out=st.sampled_from([32, 64, 96]),
       k_words=st.integers(1, 4), groups=st.sampled_from([1, 2, 4]), act_order=st.booleans(), v2=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_gptq_random_qarrays_round_trip(bits, sym, out, k_words, groups, act_order, v2, seed):
    """Any representable QArray: export -> AutoGPTQ reference dequantizer agrees -> import gives the
    same children -> export again gives the same bytes (shapes, bits, groups, act-order, v1/v2)."""
    k = 32 * k_words * groups
    q = random_q(seed, bits, sym, out, k, k // groups, act_order, zero_lo=0 if v2 else 1)
    fmt = "gptq_v2" if v2 else "gptq"
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint({"m.weight": q}, f"{d}/a", "gptq", checkpoint_format=fmt)
        t = tensors(f"{d}/a")
        np.testing.assert_array_equal(ref_autogptq_dequant(t, "m", bits, v1=not v2), np_dequant(q))
        back, _ = import_checkpoint(f"{d}/a")
        same_children(back["m.weight"], q)
        export_checkpoint(back, f"{d}/b", "gptq", checkpoint_format=fmt)
        assert Path(f"{d}/a/model.safetensors").read_bytes() == Path(f"{d}/b/model.safetensors").read_bytes()


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), out=st.integers(1, 70), g=st.sampled_from([16, 24, 32]),
       groups=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2 ** 16))
def test_compressed_tensors_random_qarrays_round_trip(bits, sym, out, g, groups, seed):
    """Any shape (odd sizes: the dense stream pads only the last word): import gives the same children
    and compressed-tensors' own unpacking reads our codes and zero points."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    k = g * groups
    q = random_q(seed, bits, sym, out, k, g, zero_lo=0)
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint({"m.weight": q}, f"{d}/a", "compressed-tensors")
        t = tensors(f"{d}/a")
        lib = unpack_from_int32(torch.from_numpy(t["m.weight_packed"]), bits, torch.Size((out, k))).numpy()
        np.testing.assert_array_equal(lib.astype(np.int64) + 2 ** (bits - 1), codes_of(q))
        if not sym:
            # packed along the output axis (packed_dim=0); read through the packed_dim=1 path on the
            # transpose, since the library's 4-bit packed_dim=0 view needs a contiguous tensor
            zp = unpack_from_int32(torch.from_numpy(t["m.weight_zero_point"].T.copy()), bits,
                                   torch.Size((groups, out))).numpy().T
            np.testing.assert_array_equal(zp.astype(np.float64) + 2 ** (bits - 1), np.asarray(q.zero)[:, :, 0])
        same_children(import_checkpoint(f"{d}/a")[0]["m.weight"], q)


def test_gptq_one_group_spanning_the_inputs_fits_any_larger_group_size(tmp_path):
    a, b = random_q(0, 4, False, 64, 128, 32), random_q(1, 4, False, 64, 32, 32)   # b: one group = channel
    export_checkpoint({"a.weight": a, "b.weight": b}, tmp_path / "x", "gptq")
    assert json.loads((tmp_path / "x/config.json").read_text())["quantization_config"]["group_size"] == 32
    back = import_checkpoint(tmp_path / "x")[0]
    same_children(back["a.weight"], a)
    same_children(back["b.weight"], b)


def test_gptq_v2_keeps_zero_points_of_zero():
    q = rtn(np.abs(weight()) + 0.1)  # all positive: every zero point is 0
    assert np.all(np.asarray(q.zero) == 0)
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(QuantizationError, match="m.weight.*gptq_v2"):
            export_checkpoint({"m.weight": q}, f"{d}/v1", "gptq")
        assert not os.path.exists(f"{d}/v1") and os.listdir(d) == []
        export_checkpoint({"m.weight": q}, f"{d}/v2", "gptq", checkpoint_format="gptq_v2")
        t = tensors(f"{d}/v2")
        np.testing.assert_array_equal(ref_autogptq_dequant(t, "m", 4, v1=False), np.asarray(q.dequantize(jnp.float32)))
        same_q(import_checkpoint(f"{d}/v2")[0]["m.weight"], q)


# ------------------------------------------------------------------ act-order

def _diag_problem(k=64, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, n)).astype(np.float32), np.diag(rng.permutation(k).astype(np.float32) + 1.0)


def test_act_order_without_static_groups_dequantizes_consistently():
    """Latent bug fixed: the groups of act-order without static groups are runs of rows in the sweep
    order; the scales were read back as if group j were rows j*g..(j+1)*g of the array. With a
    diagonal Hessian GPTQ has no error feedback, so the result must be RTN on the permuted groups."""
    w, h = _diag_problem()
    g, perm = 16, np.argsort(-np.diag(h), kind="stable")
    q = quant.gptq_quantize(w, h, bits=4, group_size=g, act_order=True, static_groups=False,
                            scale_dtype=jnp.float32)
    assert q.g_idx is not None
    np.testing.assert_array_equal(np.asarray(q.g_idx)[perm], np.arange(64) // g)
    ref = np.empty_like(w)
    for j in range(64 // g):  # float64 asymmetric min/max grid (GPTQ's), per permuted group
        rows = perm[j * g:(j + 1) * g]
        mn, mx = np.minimum(w[rows].min(0), 0).astype(np.float64), np.maximum(w[rows].max(0), 0).astype(np.float64)
        s = np.asarray(q.scale, np.float64)[j, 0]
        assert np.all(np.abs(s - (mx - mn) / 15) <= 2.0 ** -15 * (mx - mn) / 15)  # stored: 16 significant bits
        z = np.clip(np.round(-mn / s), 0, 15)
        ref[rows] = (np.clip(np.round(w[rows] / s) + z, 0, 15) - z) * s
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, atol=1e-6)
    static = quant.gptq_quantize(w, h, bits=4, group_size=g, act_order=True, scale_dtype=jnp.float32)
    assert static.g_idx is None


def test_act_order_survives_save_load_jit_and_pytree_paths(tmp_path):
    w, h = _diag_problem(seed=1)
    q = quant.gptq_quantize(w.T.copy(), h, bits=4, group_size=16, act_order=True, static_groups=False, axis=-1)
    paths = [p for p, _ in wtree.flatten_with_paths({"w": q})[0]]
    assert "w/g_idx" in paths
    quant.save(tmp_path / "q.safetensors", {"w": q})
    back = quant.load(tmp_path / "q.safetensors")["w"]
    np.testing.assert_array_equal(np.asarray(back.g_idx), np.asarray(q.g_idx))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x.dequantize())(q)), np.asarray(q.dequantize()))
    assert "act-order" in repr(q)
    export_checkpoint({"m.weight": q}, tmp_path / "g", "gptq")  # GPTQ's own desc_act layout, read by the reference
    np.testing.assert_array_equal(ref_autogptq_dequant(tensors(tmp_path / "g"), "m", 4), np.asarray(q.dequantize()))
    assert json.loads((tmp_path / "g/config.json").read_text())["quantization_config"]["desc_act"] is True
    same_q(import_checkpoint(tmp_path / "g")[0]["m.weight"], q)


def test_gptq_desc_act_file_with_arbitrary_g_idx_round_trips_bytes(tmp_path):
    """A GPTQ file with an arbitrary g_idx (uneven groups) imports exactly and exports back
    byte-identical; the reference dequantizer agrees with the QArray."""
    rng = np.random.default_rng(3)
    k, out, bits, ng = 128, 64, 4, 4
    t = {"m.qweight": ref_autogptq_pack(rng.integers(0, 16, size=(k, out)), bits),
         "m.qzeros": ref_autogptq_pack(rng.integers(0, 16, size=(out, ng)), bits).T.copy(),
         "m.scales": rng.uniform(0.01, 0.1, size=(ng, out)).astype(np.float16),
         "m.g_idx": rng.integers(0, ng, size=k).astype(np.int32)}
    from weightlab.io import save

    os.makedirs(tmp_path / "src")
    save(tmp_path / "src/model.safetensors", t, metadata={"format": "pt"})
    (tmp_path / "src/config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}}))
    q = import_checkpoint(tmp_path / "src")[0]["m.weight"]
    assert q.g_idx is not None
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), ref_autogptq_dequant(t, "m", 4))
    export_checkpoint({"m.weight": q}, tmp_path / "out", "gptq")
    again = tensors(tmp_path / "out")
    for name, arr in t.items():
        assert again[name].tobytes() == arr.tobytes(), name
    assert json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]["desc_act"] is True


# ------------------------------------------------------------------ compressed-tensors

def _ct_decompress(d, module):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads(Path(d, "config.json").read_text())["quantization_config"])
    scheme = next(s for s in qc.config_groups.values() if module in s.targets)
    sd = {k[len(module) + 1:]: torch.from_numpy(np.array(v)) for k, v in tensors(d).items()
          if k.startswith(module + ".")}
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("bits,sym,g,k,seed", [(3, False, None, 96, 0), (8, True, 32, 128, 2)])
def test_compressed_tensors_round_trip_and_library_decompress(bits, sym, g, k, seed):
    q = rtn(weight(48, k, seed), "int" if sym else "uint", bits, g)
    r = rtn(weight(32, 64, seed + 1), "int", 4, 64)
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint({"a.weight": q, "b.weight": r}, f"{d}/a", "compressed-tensors", config={"model_type": "x"})
        lib = _ct_decompress(f"{d}/a", "a").numpy()
        np.testing.assert_array_equal(lib, np.asarray(q.dequantize()))
        np.testing.assert_array_equal(_ct_decompress(f"{d}/a", "b").numpy(), np.asarray(r.dequantize()))
        back, cfg = import_checkpoint(f"{d}/a")
        assert cfg["model_type"] == "x" and detect_format(f"{d}/a") == "compressed-tensors"
        same_q(back["a.weight"], q)
        export_checkpoint(back, f"{d}/b", "compressed-tensors")
        assert Path(f"{d}/a/model.safetensors").read_bytes() == Path(f"{d}/b/model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.real
def test_transformers_loads_compressed_tensors_minilm(tmp_path):
    """transformers' compressed-tensors loader on our MiniLM directory gives the embeddings of the
    pure-JAX model on our dequantized weights (symmetric int4 g32; see the report for asymmetric)."""
    import re

    transformers = pytest.importorskip("transformers")
    from weightlab.io import open_checkpoint as oc
    from weightlab.models.bert import hf_to_params, load_minilm, minilm_path

    root = minilm_path()
    with oc(root / "model.safetensors") as c:
        flat = {k: c[k] for k in c.keys()}
    sel = re.compile(r"encoder\.layer\.\d+\..*(query|key|value|dense)\.weight$")
    tree = {k: rtn(v, "int", 4, 32, scale_dtype="float32") if sel.search(k) else v for k, v in flat.items()}
    config = json.loads((root / "config.json").read_text())
    export_checkpoint(tree, tmp_path / "ct", "compressed-tensors", config=config)
    model = transformers.AutoModel.from_pretrained(tmp_path / "ct")
    mini = load_minilm()
    params = jax.tree.map(jnp.asarray, hf_to_params({k: v.dequantize() if isinstance(v, QArray) else v
                                                      for k, v in tree.items()}))
    b = mini.tokenize(["weights that travel", "a quick brown fox", "hi"])
    ours = np.asarray(mini.apply_fn(params, {k: jnp.asarray(v) for k, v in b.items()}))
    with torch.no_grad():
        h = model(**{k: torch.tensor(v).long() for k, v in b.items()}).last_hidden_state
    m = torch.tensor(b["attention_mask"]).float()[..., None]
    theirs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-5)


# ------------------------------------------------------------------ bitsandbytes NF4

def _bnb_state(t, name):
    import bitsandbytes.functional as F

    sd = {k[len(name) + 1:]: torch.from_numpy(np.array(v)) for k, v in t.items() if k.startswith(name + ".")}
    return F.QuantState.from_dict(sd, device="cpu")


@pytest.mark.parametrize("dtype,g", [(np.float16, 64), (np.float32, 32), (np.float16, 256)])
def test_bnb_export_dequantizes_in_bitsandbytes_to_our_values(tmp_path, dtype, g):
    import bitsandbytes.functional as F

    q = rtn(weight(32, 256, dtype=dtype), "nf4", None, g)
    v = rtn(np.random.default_rng(1).normal(size=(512,)).astype(dtype), "nf4", None, 64)  # 1-D weights too
    export_checkpoint({"l.weight": q, "v.weight": v}, tmp_path / "b", "nf4-bnb")
    t = tensors(tmp_path / "b")
    assert t["l.weight"].shape == (32 * 256 // 2, 1) and t["l.weight"].dtype == np.uint8
    for name, x in (("l.weight", q), ("v.weight", v)):
        deq = F.dequantize_4bit(torch.from_numpy(np.array(t[name])), _bnb_state(t, name)).numpy()
        np.testing.assert_array_equal(deq.reshape(x.shape), np.asarray(x.dequantize()))  # bnb: 1-D -> (1, n)
    back = import_checkpoint(tmp_path / "b")[0]
    same_q(back["l.weight"], q)
    same_q(back["v.weight"], v)


@pytest.mark.parametrize("nested", [False, True])
def test_bnb_files_import_exactly_and_plain_ones_export_back_identical(tmp_path, nested):
    """A state dict bitsandbytes itself quantized (optionally with double quantization) imports to a
    QArray that dequantizes to bitsandbytes' values; a plain one exports back byte for byte."""
    import bitsandbytes.functional as F

    w = torch.from_numpy(weight(64, 128, 4, np.float32)).half()
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    sd = {"l.weight": packed, **{f"l.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    from weightlab.io import save

    os.makedirs(tmp_path / "src")
    save(tmp_path / "src/model.safetensors", {k: v.numpy() for k, v in sd.items()}, metadata={"format": "pt"})
    (tmp_path / "src/config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    q = import_checkpoint(tmp_path / "src")[0]["l.weight"]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), F.dequantize_4bit(packed, state).numpy())
    if not nested:
        export_checkpoint({"l.weight": q}, tmp_path / "out", "nf4-bnb")
        again = tensors(tmp_path / "out")
        assert sorted(again) == sorted(sd)
        for k, v in sd.items():
            assert again[k].tobytes() == v.numpy().tobytes(), k


def test_bnb_skip_modules_name_every_unquantized_linear(tmp_path):
    """transformers converts every nn.Linear not in llm_int8_skip_modules to a Linear4bit, so the
    config lists the float 2-D weights' modules (and lm_head, for tied output embeddings), and a
    float name that transformers would match against an NF4 module is refused."""
    q = rtn(weight(), "nf4", None, 64)
    tree = {"enc.0.q.weight": q, "enc.0.q.bias": np.zeros(64, np.float32), "pooler.dense.weight": weight(),
            "emb.weight": weight(), "norm.weight": np.ones(64, np.float32), "ids.weight": np.zeros((2, 2), np.int64)}
    export_checkpoint(tree, tmp_path / "b", "nf4-bnb")
    qc = json.loads((tmp_path / "b/config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["emb", "lm_head", "pooler.dense"]
    export_checkpoint({"lm_head.weight": q}, tmp_path / "c", "nf4-bnb")
    assert json.loads((tmp_path / "c/config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == []
    with pytest.raises(QuantizationError, match="unconverted"):   # "q" is a suffix of "enc.0.q"
        export_checkpoint({"enc.0.q.weight": q, "q.weight": weight()}, tmp_path / "d", "nf4-bnb")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
@pytest.mark.real
def test_transformers_loads_bnb_nf4_minilm(tmp_path):
    """`weightlab quantize --export nf4-bnb` of MiniLM loads in transformers + bitsandbytes on CPU:
    every Linear4bit dequantizes bit for bit to our QArray, and the mean-pooled embeddings match the
    pure-JAX BERT on our dequantized weights (float32 path: measured 2e-7; bitsandbytes' default CPU
    path on AVX512-BF16 machines repacks the weight and runs in bfloat16: measured 1.5e-3)."""
    pytest.importorskip("accelerate", reason="transformers loads bitsandbytes checkpoints only with accelerate "
                                             "(pip install accelerate)")
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    from weightlab import cli
    from weightlab.models.bert import hf_to_params, load_minilm, minilm_path

    out = tmp_path / "nf4"
    assert cli.main(["quantize", str(minilm_path()), str(out), "--method", "rtn", "--format", "nf4",
                     "--group-size", "64", "--export", "nf4-bnb"]) == 0
    tree, _ = import_checkpoint(out)
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    lin = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(f"{n}.weight" for n in lin) == sorted(k for k, v in tree.items() if isinstance(v, QArray))
    assert len(lin) == 36 and type(model.pooler.dense) is torch.nn.Linear
    for n, m in lin.items():   # before any forward: bitsandbytes' CPU path repacks the weight at the first
        deq = F.dequantize_4bit(m.weight.data, m.weight.quant_state).numpy()
        np.testing.assert_array_equal(deq, np.asarray(tree[f"{n}.weight"].dequantize()), err_msg=n)

    mini = load_minilm()
    params = jax.tree.map(jnp.asarray, hf_to_params({k: v.dequantize() if isinstance(v, QArray) else v
                                                      for k, v in tree.items()}))
    b = mini.tokenize(["weights that travel", "a quick brown fox jumps over the lazy dog", "hi"])
    ours = np.asarray(mini.apply_fn(params, {k: jnp.asarray(v) for k, v in b.items()}))

    def embed():
        with torch.no_grad():
            h = model(**{k: torch.tensor(v).long() for k, v in b.items()}).last_hidden_state
        m = torch.tensor(b["attention_mask"]).float()[..., None]
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    fast = {n: getattr(m, "support_avx512bf16_for_cpu", False) for n, m in lin.items()}
    for m in lin.values():     # bitsandbytes' switch for its bfloat16 CPU kernel
        m.support_avx512bf16_for_cpu = False
    np.testing.assert_allclose(embed(), ours, atol=2e-5)
    for n, m in lin.items():
        m.support_avx512bf16_for_cpu = fast[n]
    np.testing.assert_allclose(embed(), ours, atol=5e-3)


# ------------------------------------------------------------------ bad input

def fake_q(fmt="int4", shape=(64, 128), g=32, axis=1, scale=0.125, scale_dtype=np.float16, **children):
    """A QArray of the given layout (zero codes, constant scales) without running a quantizer."""
    from weightlab.interop._common import pack_qarray_codes
    from weightlab.quant.formats import FORMATS
    from weightlab.quant.qarray import grouped_shape

    f = FORMATS[fmt]
    sshape = grouped_shape(shape, axis, g) if g else (1,) * len(shape)
    sshape = sshape[:axis + 1] + (1,) + sshape[axis + 2:] if g else sshape
    return QArray(pack_qarray_codes(np.zeros(shape, np.uint8), f.bits, axis), np.full(sshape, scale, scale_dtype),
                  shape=shape, dtype=np.float16, fmt=f, group_size=g, axis=axis, **children)


@pytest.mark.parametrize("fmt,make,match", [
    ("gptq", lambda: fake_q("int5"), "2, 3, 4, 8"),
    ("gptq", lambda: fake_q("nf4"), "integer codes"),
    ("gptq", lambda: fake_q(shape=(36, 128)), "multiples of 8"),
    ("gptq", lambda: fake_q(scale=0.1, scale_dtype=np.float32), "float16"),
    ("gptq", lambda: fake_q(shape=(128, 64), axis=0), "axis"),
    ("gptq", lambda: fake_q(g=0), "per tensor"),
    ("gptq", lambda: fake_q(g=48), "does not divide"),
    ("compressed-tensors", lambda: fake_q(g=32).replace(scale=np.ones((64, 3, 1), np.float16)), "scale"),
    ("compressed-tensors", lambda: fake_q("fp4_e2m1"), "integer codes"),
    ("compressed-tensors", lambda: fake_q("int4_asym"), "must have a zero"),
    ("compressed-tensors", lambda: fake_q(pre=np.ones(128, np.float32)), "'pre'"),
    ("nf4-bnb", lambda: fake_q("int4", g=64), "nf4"),
    ("nf4-bnb", lambda: fake_q("nf4", shape=(64, 96), g=48), "block sizes"),
    ("nf4-bnb", lambda: fake_q("nf4", shape=(128, 64), axis=0), "last axis"),
])
def test_unrepresentable_qarrays_fail_before_anything_is_written(tmp_path, fmt, make, match):
    q = make()
    with pytest.raises(QuantizationError, match=match) as e:
        ok = fake_q("nf4", g=64) if fmt == "nf4-bnb" else fake_q()
        export_checkpoint({"ok.weight": ok, "bad.weight": q}, tmp_path / "o", fmt)
    assert "bad.weight" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_export_usage_errors(tmp_path):
    q = rtn(weight())
    with pytest.raises(UsageError, match="unknown interop format"):
        export_checkpoint({"a.weight": q}, tmp_path / "o", "awq")
    with pytest.raises(UsageError, match="JSON"):
        export_checkpoint({"a.weight": q}, tmp_path / "o", "gptq", config={"x": object()})
    with pytest.raises(UsageError, match="no option"):
        export_checkpoint({"a.weight": q}, tmp_path / "o", "nf4-bnb", checkpoint_format="gptq")
    with pytest.raises(QuantizationError, match="'a.kernel'.*<module>.weight"):
        export_checkpoint({"a.kernel": q}, tmp_path / "o", "gptq")
    with pytest.raises(QuantizationError, match="'b.weight': one GPTQ checkpoint has one group_size"):
        export_checkpoint({"a.weight": q, "b.weight": rtn(weight(), g=64)}, tmp_path / "o", "gptq")
    with pytest.raises(QuantizationError, match="'b.weight': one GPTQ checkpoint has one bits/sym"):
        export_checkpoint({"a.weight": q, "b.weight": rtn(weight(), "int")}, tmp_path / "o", "gptq")
    with pytest.raises(QuantizationError, match="'b.weight': per-channel scales over 128 inputs"):
        export_checkpoint({"a.weight": q, "b.weight": rtn(weight(), g=None)}, tmp_path / "o", "gptq")
    with pytest.raises(UsageError, match="'a.qweight'"):
        export_checkpoint({"a.weight": q, "a.qweight": np.zeros(3)}, tmp_path / "o", "gptq")
    export_checkpoint({"a.weight": q}, tmp_path / "o", "gptq")
    with pytest.raises(OutputExistsError):
        export_checkpoint({"a.weight": q}, tmp_path / "o", "gptq")
    export_checkpoint({"a.weight": q}, tmp_path / "o", "compressed-tensors", overwrite=True)
    assert detect_format(tmp_path / "o") == "compressed-tensors"


def _rewrite(src, dst, change):
    from weightlab.io import save

    t = tensors(src)
    cfg = json.loads(Path(src, "config.json").read_text())
    change(t, cfg["quantization_config"])
    os.makedirs(dst)
    save(Path(dst) / "model.safetensors", t, metadata={"format": "pt"})
    Path(dst, "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("fmt,change,match", [
    ("gptq", lambda t, c: c.update(bits=8), "has shape"),
    ("gptq", lambda t, c: t.update({"m.scales": t["m.scales"][:1]}), "m.scales"),
    ("gptq", lambda t, c: t.update({"m.g_idx": t["m.g_idx"] + 7}), "g_idx values"),
    ("gptq", lambda t, c: t.pop("m.qzeros"), "m.qzeros' is missing"),
    ("compressed-tensors", lambda t, c: t.update({"m.weight_shape": np.array([64, 96])}), "m.weight_packed"),
    ("compressed-tensors", lambda t, c: c.update(format="marlin-24") or c["config_groups"]["group_0"].update(
        format=None), "pack-quantized"),
    ("nf4-bnb", lambda t, c: t.update({"m.weight.absmax": t["m.weight.absmax"][:-1]}), "absmax"),
    ("nf4-bnb", lambda t, c: t.update({"m.weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{", np.uint8)}),
     "JSON"),
    ("nf4-bnb", lambda t, c: t.update({"m.weight": t["m.weight"][:10]}), "uint8 bytes"),
])
def test_corrupt_files_are_checkpoint_errors(tmp_path, fmt, change, match):
    q = rtn(weight(), "nf4", None, 64) if fmt == "nf4-bnb" else rtn(weight())
    export_checkpoint({"m.weight": q}, tmp_path / "a", fmt)
    _rewrite(tmp_path / "a", tmp_path / "b", change)
    with pytest.raises(CheckpointError, match=match):
        import_checkpoint(tmp_path / "b")


def test_unknown_quantization_config_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(CheckpointError, match="awq"):
        import_checkpoint(tmp_path)


# ------------------------------------------------------------------ QArray indexing and reprs

def test_qarray_getitem_and_reprs():
    q = rtn(weight(8, 64, dtype=np.float32), "int", 4, 32)
    np.testing.assert_array_equal(np.asarray(q[1:3, ::2]), np.asarray(q.dequantize())[1:3, ::2])
    np.testing.assert_array_equal(np.asarray(q[-1]), np.asarray(q.dequantize())[-1])
    with pytest.raises(TypeError):
        iter(q)  # __getitem__ must not make it an (endless, JAX clamps indices) sequence
    assert repr(q).startswith("QArray(int4 g32 axis=1, shape=(8, 64) float32, ")
    rich = pytest.importorskip("rich.pretty")
    text = rich.pretty_repr(q)
    assert "layout='int4 g32 axis=1'" in text and "codes='uint8(8, 32)'" in text and "zero" not in text
    treescope = pytest.importorskip("treescope")
    text = treescope.render_to_text(q)
    assert text.startswith("QArray(") and "codes=" in text and "group_size=32" in text


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "nf4-bnb"])
def test_quantized_embeddings_are_refused(tmp_path, fmt):
    """These formats quantize Linear layers only: transformers builds an Embedding for the table and
    fails at load time, so the export refuses it first."""
    from weightlab.errors import QuantizationError

    w = jax.random.normal(jax.random.key(0), (64, 64))
    q = quant.quantize_array(w, "rtn", fmt="nf4" if fmt == "nf4-bnb" else "int", bits=4, group_size=64, axis=-1)
    with pytest.raises(QuantizationError, match="embedding table"):
        export_checkpoint({"model.embed_tokens.weight": q}, tmp_path / "o", fmt)
    assert not (tmp_path / "o").exists()
