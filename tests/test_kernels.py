"""Pallas dequant-matmul kernel (interpret mode on CPU) against its jnp reference, on random data."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weightlab import quant
from weightlab.kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference, pack_weights
from weightlab.quant.matmul import kernel_supports as supports, prepare

CASES = [
    ("int4 sym g128", lambda w: quant.quantize_rtn(w, "int", 4, 128)),
    ("int4 asym g64", lambda w: quant.quantize_rtn(w, "uint", 4, 64)),
    ("int4 hqq g32", lambda w: quant.quantize_hqq(w, 4, 32)),
    ("int8 channel", lambda w: quant.quantize_rtn(w, "int", 8, None)),
    ("int8 asym g128", lambda w: quant.quantize_rtn(w, "uint", 8, 128)),
    ("nf4 g64", lambda w: quant.quantize_rtn(w, "nf4", None, 64)),
    ("fp4 g32", lambda w: quant.quantize_rtn(w, "fp4_e2m1", None, 32)),
    ("any4 g128", lambda w: quant.quantize_any4(w, 128, iters=3)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (7, 256, 200), (33, 384, 96)])
def test_kernel_matches_reference(name, make, m, k, n):
    kw, kx = jax.random.split(jax.random.key(m * 1000 + n))
    w = jax.random.normal(kw, (k, n)) * 0.05
    x = jax.random.normal(kx, (m, k))
    q = make(w)
    p = prepare(q)
    got = dequant_matmul(x, p, interpret=True)
    ref = dequant_matmul_reference(x, p)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ref, x @ q.dequantize(), rtol=1e-5, atol=1e-5)  # layout round-trip is exact


def test_kernel_takes_plain_arrays():
    """The kernel knows no QArray: codes, scales and zeros as plain arrays give the same product."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (256, 64)).astype(np.uint8)
    scale = rng.random((2, 64)).astype(np.float32) * 0.1
    zero = rng.integers(0, 16, (2, 64)).astype(np.float32)
    w = pack_weights(codes, scale, zero, bits=4, group=128, mode="int")
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.float32)
    dense = (codes.astype(np.float64) - np.repeat(zero, 128, 0)) * np.repeat(scale, 128, 0)
    np.testing.assert_allclose(dequant_matmul(x, w, interpret=True), np.asarray(x, np.float64) @ dense, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="zero"):
        pack_weights(codes, scale, None, bits=4, group=128, mode="int")


def test_kernel_bf16_activations_and_torch_layout():
    w = jax.random.normal(jax.random.key(0), (128, 256)) * 0.05  # (out, in) PyTorch layout
    q = quant.quantize_rtn(w, "int", 4, 128, axis=-1)
    x = jax.random.normal(jax.random.key(1), (3, 256)).astype(jnp.bfloat16)
    p = prepare(q)
    got = dequant_matmul(x, p, interpret=True, block_n=64)
    assert got.dtype == jnp.bfloat16 and got.shape == (3, 128)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dequant_matmul_reference(x, p), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_quant_dot_dispatch_on_cpu():
    w = jax.random.normal(jax.random.key(0), (256, 64))
    q = quant.quantize_rtn(w, "int", 4, 128)
    x = jax.random.normal(jax.random.key(1), (2, 5, 256))
    y = quant.dot(x, q)
    np.testing.assert_allclose(y, x @ q.dequantize(), rtol=1e-5, atol=1e-5)
    y2 = quant.dot(x, q, use_kernel=True)  # forced kernel path (interpret mode on CPU)
    np.testing.assert_allclose(y2, y, rtol=2e-5, atol=2e-5)
    assert not supports(quant.quantize_rtn(w, "int", 3, 128))
    assert not supports(quant.quantize_rtn(w, "mxfp4"))
    np.testing.assert_allclose(quant.dot(x, quant.quantize_rtn(w, "int", 3, 128)),
                               x @ quant.quantize_rtn(w, "int", 3, 128).dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,make", [c for c in CASES if c[0] in ("int4 sym g128", "int4 asym g64", "int8 channel",
                                                                      "nf4 g64", "any4 g128")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_lowers_to_triton_for_cuda(name, make):
    """Without a GPU we can still lower the kernel for CUDA (jax.export): Pallas -> Triton IR."""
    from jax import export
    w = jax.random.normal(jax.random.key(0), (512, 256)) * 0.05
    p = prepare(make(w))
    x = jnp.ones((16, 512), jnp.bfloat16)
    f = jax.jit(lambda x, p: dequant_matmul(x, p, interpret=False, platform="cuda"))
    exp = export.export(f, platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, p)
    assert "xla.gpu.triton" in exp.mlir_module()


@pytest.mark.parametrize("name,make", [c for c in CASES if c[0] in ("int4 sym g128", "int8 channel", "int8 asym g128",
                                                                      "any4 g128")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_lowers_to_mosaic_for_tpu(name, make):
    """jax.export(platforms=["tpu"]) lowers the kernel through Mosaic on this CPU-only machine (its
    block-shape rules included). Integer division by a constant is written ``lax.div``: ``//`` lowers
    through ``sign``, which Mosaic lowers by asking the TPU generation, so export without a TPU failed."""
    from jax import export
    w = jax.random.normal(jax.random.key(0), (512, 256)) * 0.05
    p = prepare(make(w))
    x = jnp.ones((16, 512), jnp.bfloat16)
    f = jax.jit(lambda x, p: dequant_matmul(x, p, interpret=False, platform="tpu"))
    exp = export.export(f, platforms=["tpu"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(x, p)
    assert "tpu_custom_call" in exp.mlir_module()


def test_kernel_fallback_where_a_platform_cannot_take_the_blocks(monkeypatch):
    """Groups of 64 (and 32) give K blocks Mosaic cannot tile (128 lanes): on TPU quant.dot takes the
    dequantizing path instead of failing; Triton takes them."""
    from weightlab.kernels import dequant_matmul as dm
    w = jax.random.normal(jax.random.key(0), (256, 64))
    q = quant.quantize_rtn(w, "nf4", None, 64)
    assert not dm.supports_platform(prepare(q), "tpu") and dm.supports_platform(prepare(q), "cuda")
    assert dm.supports_platform(prepare(quant.quantize_rtn(w, "int", 4, 128)), "tpu")
    with pytest.raises(ValueError, match="not supported by the tpu kernel"):
        dequant_matmul(jnp.ones((8, 256)), prepare(q), interpret=False, platform="tpu")
    monkeypatch.setattr(dm, "supports_platform", lambda p, platform=None: p.block_k % 128 == 0)  # TPU's answer
    x = jax.random.normal(jax.random.key(1), (3, 256))
    np.testing.assert_allclose(quant.dot(x, q, use_kernel=True), x @ q.dequantize(), rtol=1e-5, atol=1e-5)


# --- the folder's bare name -------------------------------------------------------------------
# kernels/ is installed as weightlab.kernels, but a Python started in the repository root sees it
# as a top-level `kernels`, the name of Hugging Face's package that transformers >= 5 imports at
# start-up (CI broke on exactly this with transformers 5.25).

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _run_in_root(code, *flags):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_bare_kernels_name_in_the_repository_root_is_the_installed_package():
    import importlib.util

    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("Hugging Face kernels/transformers not installed")
    code = ("import sys, os; assert sys.path[0] == '';"
            "import kernels, weightlab.kernels as wk, transformers;"
            "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__;"
            "assert not kernels.__file__.startswith(os.getcwd() + '/kernels'), kernels.__file__;"
            "assert wk.__file__.startswith(os.getcwd() + '/kernels'), wk.__file__;"
            "from weightlab.kernels.dequant_matmul import dequant_matmul;"
            "transformers.BertModel; print('ok')")
    r = _run_in_root(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_bare_kernels_name_without_the_installed_package_stays_empty():
    # -S: no site-packages, so no Hugging Face `kernels`; the folder then imports as an empty,
    # version-less package (what transformers' check reads as "not usable"), without error.
    r = _run_in_root("import sys; sys.path.insert(0, ''); import kernels;"
                     "print(getattr(kernels, '__version__', 'N/A'), hasattr(kernels, 'CUDAProperties'))", "-S")
    assert r.returncode == 0 and r.stdout.split() == ["N/A", "False"], r.stderr[-3000:]


def test_bare_kernels_name_with_the_root_on_the_path_twice_does_not_recurse(tmp_path):
    """The root under two spellings (a symlink and the real path), or a second checkout on the path:
    each copy of the folder must skip the others, not hand over to them (RecursionError)."""
    import importlib.util

    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("Hugging Face kernels/transformers not installed")
    root = Path(ROOT).resolve()
    (tmp_path / "link").symlink_to(root)
    code = (f"import sys; sys.path[:0] = [{str(tmp_path / 'link')!r}, {str(root)!r}];"
            "import kernels, transformers; assert hasattr(kernels, 'CUDAProperties'), kernels.__file__;"
            "transformers.BertModel; print('ok')")
    r = _run_in_root(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
