"""The files that make a merged directory a Hugging Face model: ``config.json``, the tokenizer, a
model card, and the checks that keep them true to the merged tensors.

:func:`prepare` runs before any tensor is merged and returns every extra file as bytes, so the
output directory (published atomically by :mod:`weightlab.io.shards`) is complete or absent:

* ``config.json`` — the template model's (the base model, else the first model), with the fields
  the merge changed rewritten: the layer count (``num_hidden_layers`` / ``n_layer`` /
  ``num_layers``) from the merged layer stack (slices), ``vocab_size`` from the merged embedding,
  and ``torch_dtype`` (and ``dtype``, transformers >= 4.56's spelling, where present) from the
  output dtype. Before that, every input model's own ``config.json`` is checked against its
  tensors (layer count, hidden size, vocabulary): a config that contradicts its tensors is a
  :class:`MergeError` naming the file and field. Models whose ``architectures`` differ are refused
  unless ``allow_crimes`` (mergekit's flag of the same name).
* tokenizer files — copied from ``tokenizer_source`` (``base`` or a model path) or, by default,
  from the template model (mergekit's ``--copy-tokenizer``); an explicit source without tokenizer
  files, or whose vocabulary does not fit the merged embedding, is an error; a default copy that
  finds none is a warning. ``chat_template`` (a literal Jinja template) is written into
  ``tokenizer_config.json``. ``generation_config.json`` is copied from the template model.
* ``README.md`` — a model card: YAML front matter (``base_model``, ``library_name``, ``tags``) and
  the recipe (method, models, the config text and its SHA-256), written by weightlab.

The tensors themselves carry ``{"format": "pt"}`` in their safetensors metadata (set by the
streaming engine), which transformers' loader requires.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import MergeError
from .config import MergeConfig
from .plan import _LAYER

__all__ = ["TOKENIZER_FILES", "model_dir", "side_files", "check_architectures", "prepare", "model_card"]

#: Files a Hugging Face tokenizer may consist of (whichever exist are copied together).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_EMBED = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in)\.weight$")
_TORCH_DTYPE = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def model_dir(ref: str) -> Path | None:
    """The directory holding a model reference's side files (a ``model+lora`` ref: the model's); a
    reference to a single ``.safetensors`` file has none (its folder may hold other models)."""
    p = Path(ref.split("+")[0])
    return p if p.is_dir() else None


def _side(ref: str, name: str) -> Path | None:
    d = model_dir(ref)
    return d / name if d is not None and (d / name).is_file() else None


def _read_config(ref: str) -> dict | None:
    from ..io.header import read_json_object

    f = _side(ref, "config.json")
    return None if f is None else read_json_object(f)


def _embedding(names) -> str | None:
    return next((n for n in names if _EMBED.search(n)), None)


def _check_against_tensors(ref: str, cfg: dict, ckpt) -> None:
    """A model's config.json must agree with its own tensors: layer count, hidden size, vocabulary."""
    f = model_dir(ref) / "config.json"
    names = list(ckpt.keys())
    layers = {int(m.group(1)) for n in names for m in [_LAYER.search(n)] if m}
    for k in _LAYER_KEYS:
        if isinstance(cfg.get(k), int) and layers and cfg[k] != max(layers) + 1:
            raise MergeError(f"{f}: {k} = {cfg[k]} but the checkpoint's tensors have {max(layers) + 1} layers")
    emb = _embedding(names)
    if emb is None:
        return
    rows, width = ckpt.shape(emb)[:2] if len(ckpt.shape(emb)) == 2 else (None, None)
    for k in _HIDDEN_KEYS:
        if isinstance(cfg.get(k), int) and width is not None and cfg[k] != width:
            raise MergeError(f"{f}: {k} = {cfg[k]} but '{emb}' is {rows} x {width}")
    if isinstance(cfg.get("vocab_size"), int) and rows is not None and cfg["vocab_size"] != rows:
        raise MergeError(f"{f}: vocab_size = {cfg['vocab_size']} but '{emb}' has {rows} rows")


def _template(config: MergeConfig) -> str:
    if config.base_model:
        return config.base_model
    if config.slices:
        return config.slices[0].sources[0].model
    return config.models[0].model


def side_files(ref: str, names=TOKENIZER_FILES) -> dict[str, bytes]:
    """The bytes of those of ``names`` that lie beside a model (default: its tokenizer files)."""
    return {n: f.read_bytes() for n in names for f in [_side(ref, n)] if f is not None}


def _vocab_size(files: dict[str, bytes]) -> int | None:
    """Token count of a tokenizer (tokenizer.json's vocab + added tokens, else vocab.txt lines)."""
    if "tokenizer.json" in files:
        try:
            tj = json.loads(files["tokenizer.json"])
            vocab = tj.get("model", {}).get("vocab")
            ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
            ids |= {t.get("id") for t in tj.get("added_tokens", []) if isinstance(t, dict)}
            return max(i for i in ids if isinstance(i, int)) + 1 if ids else None
        except (ValueError, AttributeError, TypeError):
            return None
    if "vocab.txt" in files:
        return len(files["vocab.txt"].decode("utf-8", "replace").splitlines())
    return None


def _tokenizer(config: MergeConfig, template: str, rows: int | None, copy: bool, warn) -> dict[str, bytes]:
    src = config.tokenizer_source
    if src is None and not copy:
        if config.chat_template is not None:
            warn("chat_template is not written: no tokenizer is copied (--no-copy-tokenizer without tokenizer_source)")
        return {}
    ref = template if src is None else (config.base_model if src == "base" else src)
    if src is not None and ref not in config.model_paths() and not Path(ref).exists():
        raise MergeError(f"{config.source}: tokenizer source {ref!r} does not exist")
    files = side_files(ref)
    if not files:
        msg = f"no tokenizer files beside {ref} (looked for {', '.join(TOKENIZER_FILES[:5])} ...)"
        if src is not None:
            raise MergeError(f"{config.source}: tokenizer source {ref!r}: {msg}")
        warn(f"{msg}; the output has no tokenizer (give tokenizer_source or --no-copy-tokenizer)")
        return {}
    n = _vocab_size(files)
    if n is not None and rows is not None and n > rows:
        raise MergeError(f"{config.source}: the tokenizer of {ref!r} has {n} tokens but the merged embedding has "
                         f"{rows} rows; remapping vocabularies is not supported yet")
    if config.chat_template is not None:
        tc = json.loads(files.get("tokenizer_config.json", b"{}") or b"{}")
        tc["chat_template"] = config.chat_template
        files["tokenizer_config.json"] = (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode()
        if "chat_template.jinja" in files:  # transformers >= 4.x reads this file before tokenizer_config.json
            files["chat_template.jinja"] = config.chat_template.encode()
    return files


def _output_config(cfg: dict, plan, layout) -> dict:
    out = dict(cfg)
    names = [n for n, _, _ in layout]
    if any(_LAYER.search(n) for n in names):
        for k in _LAYER_KEYS:
            if isinstance(out.get(k), int):
                out[k] = plan.num_layers
    emb = _embedding(names)
    if emb is not None and "vocab_size" in out:
        out["vocab_size"] = int(next(s for n, s, _ in layout if n == emb)[0])
    dts = [np.dtype(d).name for n, _, d in layout if np.dtype(d).kind == "f" or np.dtype(d).name == "bfloat16"]
    if dts:
        main = max(set(dts), key=dts.count)
        if main in _TORCH_DTYPE:
            out["torch_dtype"] = _TORCH_DTYPE[main]  # read by every transformers version
            if "dtype" in out:                          # transformers >= 4.56's spelling
                out["dtype"] = _TORCH_DTYPE[main]
    return out


def model_card(config: MergeConfig) -> str:
    """A README.md fragment that records the merge: front matter the Hub reads, then the recipe (the
    same bytes wherever the output goes, so reruns are byte-identical)."""
    refs = config.model_paths()
    lines = ["---", "base_model:"] + [f"- {json.dumps(r)}" for r in refs] + [
        "library_name: transformers", "tags:", "- merge", "- mergekit", "- weightlab", "---", "",
        f"# {config.method} merge of {len(refs)} models", "",
        f"Merged by weightlab with `{config.method}`"
        + (f" on the base model `{config.base_model}`" if config.base_model else "") + ".", "",
        "## Inputs", ""] + [f"- `{r}`" + (" (base)" if r == config.base_model else "") for r in refs] + [
        "", "## Recipe", "", f"Recipe SHA-256: `{config.recipe_hash}`", "", "```yaml", config.text.rstrip("\n"), "```",
        ""]
    return "\n".join(lines)


def check_architectures(config: MergeConfig, allow_crimes: bool = False) -> dict[str, dict]:
    """Every input's ``config.json`` (ref -> dict); models whose ``architectures`` differ are a
    :class:`MergeError` unless ``allow_crimes``. Cheap (no tensor is read), so it runs before the
    tensor plan, whose errors would otherwise name a missing tensor instead of the real cause."""
    configs = {ref: cfg for ref in config.model_paths() for cfg in [_read_config(ref)] if cfg is not None}
    archs = {ref: tuple(c.get("architectures") or ()) for ref, c in configs.items() if c.get("architectures")}
    if len(set(archs.values())) > 1 and not allow_crimes:
        shown = "; ".join(f"{r}: {', '.join(a)}" for r, a in archs.items())
        raise MergeError(f"{config.source}: the models have different architectures ({shown}); "
                         "pass --allow-crimes to merge them anyway")
    return configs


def prepare(config: MergeConfig, plan, ckpts: dict, layout, *, copy_tokenizer: bool = True,
            write_model_card: bool = True, allow_crimes: bool = False, warn=print) -> dict[str, bytes]:
    """Every side file of the output directory, validated before any tensor is merged.

    ``layout`` is the output's ``[(name, shape, dtype)]``; ``ckpts`` maps each model reference to its
    open checkpoint. Returns ``{file name: bytes}`` (empty of config.json when no input has one).
    """
    configs = check_architectures(config, allow_crimes)
    for ref, cfg in configs.items():
        _check_against_tensors(ref, cfg, ckpts[ref])
    template = _template(config)
    files: dict[str, bytes] = {}
    cfg = configs.get(template) or next(iter(configs.values()), None)
    if cfg is None:
        warn("no config.json in any input model; the output has tensors only (transformers cannot load it)")
    else:
        files["config.json"] = (json.dumps(_output_config(cfg, plan, layout), indent=2) + "\n").encode()
    files.update(side_files(template, ("generation_config.json",)))
    emb = _embedding([n for n, _, _ in layout])
    rows = int(next(s for n, s, _ in layout if n == emb)[0]) if emb is not None else None
    files.update(_tokenizer(config, template, rows, copy_tokenizer, warn))
    if write_model_card:
        files["README.md"] = model_card(config).encode()
    return files
