"""LLaMA-family decoder in pure JAX, over a flat dict of Hugging Face tensor names.

Touvron et al., "LLaMA" (2023) and Llama 2/3: pre-norm decoder with RMSNorm (Zhang & Sennrich,
2019), rotary position embeddings (Su et al., RoFormer 2021) in Hugging Face's half-split
(``rotate_half``) convention, grouped-query attention (Ainslie et al., 2023; query head ``h`` reads
key/value head ``h // (heads / kv_heads)``, as ``repeat_kv``), SwiGLU MLP (Shazeer, 2020:
``down(silu(gate x) * up x)``) and a tied or untied LM head. RoPE frequencies: ``default``,
``linear`` and ``llama3`` (Llama 3.1's smoothed band scaling) as ``transformers`` computes them.

The params are the checkpoint's own tensors, ``{hf_name: array}`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
``lm_head.weight``; the optional ``.bias`` of attention/MLP projections), with every linear weight
kept in PyTorch's (out, in) layout: each matmul contracts the weight's last axis, so calibration
(:func:`weightlab.quant.capture`) sees the checkpoint's tensors directly and quantizes them along
their input axis (-1), and :func:`params_to_hf` is the identity on names.

Deliberate differences from ``transformers``: activations are computed in float32 whatever the
weights' dtype (``transformers`` computes in the weights' dtype); positions are ``0..T-1`` for every
row, as ``LlamaForCausalLM.forward`` without ``position_ids`` does, so pad on the right.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError, ShapeMismatchError

__all__ = ["LlamaConfig", "llama_apply", "hf_to_params", "params_to_hf", "expected_shapes", "check_shapes",
           "random_llama", "tiny_config"]

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()          # sorted (key, value) pairs of the non-default RoPE parameters
    max_position: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"llama config: {self.num_heads} attention heads cannot share "
                                  f"{self.num_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise CheckpointError(f"llama config: RoPE needs an even head_dim, found {self.head_dim}")
        kind = dict(self.rope_scaling).get("rope_type", "default")
        if kind not in _ROPE_TYPES:
            raise CheckpointError(f"llama config: RoPE type {kind!r} is not supported (supported: {list(_ROPE_TYPES)})")

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict (``model_type`` ``llama``, ``hidden_act`` ``silu``);
        reads both the transformers-5 ``rope_parameters`` and the older ``rope_theta``/``rope_scaling``."""
        if cfg.get("model_type", "llama") != "llama" or cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported config: model_type={cfg.get('model_type')}, "
                                  f"hidden_act={cfg.get('hidden_act')} (llama with silu expected)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise CheckpointError(f"llama config.json lacks {missing}")
        rope = dict(cfg.get("rope_parameters") or {})
        old = dict(cfg.get("rope_scaling") or {})
        if "type" in old and "rope_type" not in old:
            old["rope_type"] = old.pop("type")
        rope = {**old, **rope}
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        heads = int(cfg["num_attention_heads"])
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                   rope_scaling=tuple(sorted(rope.items())),
                   max_position=int(cfg.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dict for this config (``LlamaForCausalLM``)."""
        rope = {"rope_type": "default", **dict(self.rope_scaling), "rope_theta": self.rope_theta}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
                "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "rope_theta": self.rope_theta,
                "max_position_embeddings": self.max_position, "tie_word_embeddings": self.tie_word_embeddings,
                "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny LLaMA for tests and demos: vocab 256, hidden 64, 2 layers, 4 heads sharing 2 KV heads."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, rms_norm_eps=1e-6, max_position=256)
    base.update(overrides)
    if "head_dim" not in overrides and "hidden_size" in overrides:
        base["head_dim"] = base["hidden_size"] // base["num_heads"]
    return LlamaConfig(**base)


# ------------------------------------------------------------------------------------ names and shapes

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SKIP = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of ``config`` holds, with its shape (PyTorch layout)."""
    c = config
    hq, hkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        proj = {"self_attn.q_proj": (hq, c.hidden_size), "self_attn.k_proj": (hkv, c.hidden_size),
                "self_attn.v_proj": (hkv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, hq),
                "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
                "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
        for n, s in proj.items():
            out[p + n + ".weight"] = s
            if (c.attention_bias and n.startswith("self_attn")) or (c.mlp_bias and n.startswith("mlp")):
                out[p + n + ".bias"] = (s[0],)
        out[p + "input_layernorm.weight"] = (c.hidden_size,)
        out[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return out


def check_shapes(shapes: dict[str, tuple[int, ...]], config: LlamaConfig, source: str = "checkpoint") -> None:
    """Refuse tensors that contradict ``config`` (from the header's shapes alone, before any data is
    read): a missing or unknown tensor is a :class:`CheckpointError`, a wrong shape a
    :class:`ShapeMismatchError`, each naming the tensor. A tied model may still carry ``lm_head.weight``."""
    want = expected_shapes(config)
    names = {n for n in shapes if not _SKIP.search(n)}
    optional = {"lm_head.weight": (config.vocab_size, config.hidden_size)} if config.tie_word_embeddings else {}
    for n in sorted(names):
        s = want.get(n, optional.get(n))
        if s is None:
            raise CheckpointError(f"{source}: '{n}' is not a tensor of this llama config ({config.num_layers} layers, "
                                  f"attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias})")
        if tuple(shapes[n]) != tuple(s):
            raise ShapeMismatchError(n, s, tuple(shapes[n]))
    missing = [n for n in want if n not in names]
    if missing:
        raise CheckpointError(f"{source}: config.json describes '{missing[0]}', which the checkpoint lacks "
                              f"({len(missing)} tensors missing)")


def hf_to_params(flat: dict) -> dict:
    """Hugging Face LLaMA tensors ``{name: array}`` -> our params: the same names and arrays (the
    ``rotary_emb.inv_freq`` buffers some old checkpoints carry are dropped); an unknown name is a
    :class:`CheckpointError`."""
    out = {}
    for name, arr in flat.items():
        if _SKIP.search(name):
            continue
        m = _LAYER.fullmatch(name)
        rest = m.group(2) if m else name
        if not (name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight") or (m and re.fullmatch(
                r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)|"
                r"(input|post_attention)_layernorm\.weight", rest))):
            raise CheckpointError(f"'{name}': not a LLaMA tensor name we know")
        out[name] = arr
    return out


def params_to_hf(params: dict) -> dict:
    """Inverse of :func:`hf_to_params`: the same flat dict (weights are already in (out, in) layout,
    so a QArray quantized along the input axis -1 is written as it is)."""
    return hf_to_params(dict(params))


def random_llama(key: jax.Array, config: LlamaConfig, dtype=jnp.float32) -> dict:
    """Random params for ``config``: weights ~ N(0, 0.02²) (``initializer_range``), norms 1 + N(0, 0.1²)
    (not exactly 1, so tests see the norm weights), biases N(0, 0.02²)."""
    out = {}
    for name, shape in expected_shapes(config).items():
        k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        if "layernorm" in name or name == "model.norm.weight":
            out[name] = (1.0 + 0.1 * jax.random.normal(k, shape)).astype(dtype)
        else:
            out[name] = (0.02 * jax.random.normal(k, shape)).astype(dtype)
    return out


# ----------------------------------------------------------------------------------------------- forward

def _linear(x, params, name):
    """``x @ Wᵀ (+ b)`` with W in (out, in) layout, contracting W's last axis (no transpose op, so
    calibration sees the stored tensor)."""
    w = params[name + ".weight"]
    y = jax.lax.dot_general(x, jnp.asarray(w).astype(jnp.float32), (((x.ndim - 1,), (1,)), ((), ())))
    b = params.get(name + ".bias")
    return y if b is None else y + jnp.asarray(b).astype(jnp.float32)


def _rms_norm(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * jnp.asarray(w).astype(jnp.float32)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (head_dim / 2,) of the config's RoPE type, as ``transformers`` computes them."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    p = dict(config.rope_scaling)
    kind = p.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(p["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.astype(np.float32)


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def llama_apply(params: dict, input_ids, config: LlamaConfig, attention_mask=None):
    """Logits (batch, seq, vocab), float32, of ``LlamaForCausalLM`` for ``input_ids`` (B, T) int.
    ``attention_mask`` (B, T) 0/1 hides padding keys (pad on the right); attention is causal."""
    ids = jnp.asarray(input_ids)
    b, t = ids.shape
    c = config
    x = jnp.asarray(params["model.embed_tokens.weight"])[ids].astype(jnp.float32)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(rope_frequencies(c))[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
        allowed = allowed & jnp.asarray(attention_mask).astype(bool)[:, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # (B, 1, 1, T, S)
    g, r, d = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, params[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = _rope(_linear(h, params, p + "self_attn.q_proj").reshape(b, t, c.num_heads, d), cos, sin)
        k = _rope(_linear(h, params, p + "self_attn.k_proj").reshape(b, t, g, d), cos, sin)
        v = _linear(h, params, p + "self_attn.v_proj").reshape(b, t, g, d)
        s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(b, t, g, r, d), k) / math.sqrt(d) + bias
        a = jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, c.num_heads * d)
        x = x + _linear(a, params, p + "self_attn.o_proj")
        h = _rms_norm(x, params[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        m = jax.nn.silu(_linear(h, params, p + "mlp.gate_proj")) * _linear(h, params, p + "mlp.up_proj")
        x = x + _linear(m, params, p + "mlp.down_proj")
    x = _rms_norm(x, params["model.norm.weight"], c.rms_norm_eps)
    head = "lm_head" if "lm_head.weight" in params and not c.tie_word_embeddings else "model.embed_tokens"
    return _linear(x, params, head)
