"""``weightlab quantize --method gptq|awq``: calibrated quantization of a Hugging Face checkpoint.

The checkpoint directory (``config.json``, ``tokenizer.json``, ``model.safetensors`` or a sharded
index) must be of an architecture weightlab runs in pure JAX (:data:`ARCHITECTURES`, chosen by
``config.json``'s ``model_type``). The calibration text (``--calibration FILE``, one text per line;
by default the bundled :data:`weightlab.data.sentences.CALIBRATION`) is tokenized with the
checkpoint's own tokenizer, each text one row truncated to ``--seq-len`` tokens, right-padded into
fixed-shape batches (:func:`calibration_batches`) whose padding is masked out of the statistics.
Then it is exactly the Python API: ``quant.quantize(params, method, apply_fn=, batches=,
row_mask=attention mask)`` (GPTQ's true-sequential order), wrapped in ``quant.rotate`` with
``--rotate`` (random Hadamard, ``key = jax.random.key(--seed)``). The result is written under the
checkpoint's own tensor names and (out, in) layouts (:func:`weightlab.models.bert.params_to_hf`).

Everything is validated before the weights are read: the output path, the architecture, the
tokenizer, config.json against the header's tensor shapes, every selected tensor against the
method's hyper-parameters (traced on abstract shapes), and the calibration text (present, and at
least one group of tokens).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError, DependencyMissingError, QuantizationError, UsageError

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "read_texts", "calibration_batches", "run_calibrated"]

BATCH_ROWS = 8
"""Texts per calibration batch (the last batch is filled with fully masked rows, so every batch
has one shape and the statistics are compiled once)."""
DEFAULT_SEQ_LEN = 256


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How the CLI runs one model family: its config, name checks, params and forward pass."""

    model_type: str
    config: Any
    check_shapes: Callable[[dict], None]               # header shapes (HF names) -> typed error or None
    to_params: Callable[[dict], Any]                    # HF-named arrays -> params
    to_hf: Callable[[Any], dict]                        # params (QArrays allowed) -> HF-named tree
    path_of: Callable[[str], str]                       # HF name -> params path
    apply_fn: Callable[[Any, dict], Any]                # (params, batch) -> outputs
    max_len: int


def _bert(cfg: dict, names) -> Architecture:
    from ..models import bert

    config = bert.BertConfig.from_hf(cfg)
    prefix = "bert." if names and all(n.startswith("bert.") for n in names) else ""

    def strip(shapes):
        return {n[len(prefix):]: s for n, s in shapes.items()}

    return Architecture(
        "bert", config, lambda shapes: bert.check_shapes(strip(shapes), config),
        lambda flat: bert.hf_to_params(flat, strip_prefix=prefix),
        lambda params: {prefix + n: v for n, v in bert.params_to_hf(params).items()},
        lambda name: bert.param_path(name[len(prefix):])[0],
        lambda p, b: bert.bert_apply(p, b, config), config.max_position)


def _llama(cfg: dict, names) -> Architecture:
    from ..models import llama

    config = llama.LlamaConfig.from_hf(cfg)
    return Architecture(
        "llama", config, lambda shapes: llama.check_shapes(shapes, config), llama.hf_to_params,
        llama.params_to_hf, lambda name: name,
        lambda p, b: llama.llama_apply(p, b["input_ids"], config, b["attention_mask"]), config.max_position)


ARCHITECTURES: dict[str, Callable[[dict, list], Architecture]] = {"bert": _bert, "llama": _llama}
"""``config.json`` ``model_type`` -> the bundled pure-JAX model that calibrates it."""


def architecture(cfg: dict | None, names, source: str) -> Architecture:
    """The :class:`Architecture` of a checkpoint from its config; a :class:`UsageError` naming the
    supported ones otherwise. Config values it cannot read are a :class:`CheckpointError`."""
    if cfg is None:
        raise UsageError(f"{source}: calibrated quantization runs the model, so it needs a Hugging Face checkpoint "
                         "directory with config.json and tokenizer.json (found none)")
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise UsageError(f"{source}: model_type {kind!r} is not an architecture weightlab can run for calibration "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}); use a data-free method (rtn, hqq, any4)")
    try:
        return ARCHITECTURES[kind](cfg, list(names))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}/config.json: cannot read the {kind} config "
                              f"({type(e).__name__}: {e})") from None


def read_texts(path: str | None, samples: int | None) -> tuple[list[str], str]:
    """Calibration texts (one per non-blank line of ``path``, or the bundled sentences) and their
    source's name; the first ``samples`` of them when given."""
    if path is None:
        from ..data.sentences import CALIBRATION

        texts, source = list(CALIBRATION), "bundled sentences (weightlab.data.sentences.CALIBRATION)"
    else:
        p = Path(path)
        if not p.is_file():
            raise CheckpointNotFoundError(f"--calibration {path}: no such file")
        try:
            texts = [t.strip() for t in p.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--calibration {path}: cannot read it as UTF-8 text ({e})") from None
        texts, source = [t for t in texts if t], str(path)
        if not texts:
            raise UsageError(f"--calibration {path}: the file holds no text (one calibration text per line)")
    return (texts if samples is None else texts[:samples]), source


def load_tokenizer(root: Path, max_len: int):
    """The checkpoint's ``tokenizer.json`` (``tokenizers``), truncating to ``max_len``, no padding."""
    f = root / "tokenizer.json"
    if not f.is_file():
        raise CheckpointNotFoundError(f"{root}: no tokenizer.json; calibrated quantization tokenizes the "
                                      "calibration text with the checkpoint's own tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        raise DependencyMissingError("calibrated quantization needs `tokenizers` (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust library's own exception type
        raise CheckpointError(f"{f}: not a readable tokenizer ({str(e)[:200]})") from None
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def calibration_batches(tokenizer, texts: list[str], seq_len: int, rows: int = BATCH_ROWS) -> list[dict]:
    """Token batches ``{"input_ids", "attention_mask", "token_type_ids"}`` (int32, (rows, T)): one
    text per row with the tokenizer's special tokens, truncated to ``seq_len``, padded on the right
    with id 0 to T = the longest text rounded up to a multiple of 8 (at most ``seq_len``); the last
    batch is completed with fully masked rows."""
    ids = [e.ids[:seq_len] for e in tokenizer.encode_batch(list(texts))]
    t = min(seq_len, -(-max(len(i) for i in ids) // 8) * 8)
    out = []
    for s in range(0, len(ids), rows):
        x = np.zeros((rows, t), np.int32)
        m = np.zeros((rows, t), np.int32)
        for r, row in enumerate(ids[s:s + rows]):
            x[r, :len(row)], m[r, :len(row)] = row, 1
        out.append({"input_ids": x, "attention_mask": m, "token_type_ids": np.zeros_like(x)})
    return out


def _check_hyperparameters(entry, kw: dict, chosen: list[tuple[str, tuple, Any]], rotate: bool) -> tuple[int, dict]:
    """Trace the method on every selected tensor's abstract shape (HF (out, in) layout, input axis
    -1) with abstract statistics: the method's own typed errors, naming the tensor, and no work.
    Returns the largest group size (in weights) of any selected tensor and the abstract QArrays."""
    import jax
    import jax.numpy as jnp

    from .calibrate import Stats
    from .defaults import DEFAULTS
    from .formats import format_for
    from .rounding import resolve_layout

    fmt = format_for(kw.get("fmt", DEFAULTS["fmt"]), kw.get("bits", DEFAULTS["bits"]))
    largest, abstract = 1, {}
    for name, shape, dtype in chosen:
        k = shape[-1]

        def one(w, name=name, k=k):
            st = Stats(jnp.zeros((k, k), jnp.float32), jnp.ones((k,), jnp.float32), jnp.float32(1.0), 1)
            q = entry.fn(w, path=name, stats=st, **kw)
            return q.replace(pre=jnp.zeros((k, k), jnp.float32)) if rotate else q

        abstract[name] = jax.eval_shape(one, jax.ShapeDtypeStruct(tuple(shape), dtype))
        largest = max(largest, resolve_layout(tuple(shape), fmt, kw.get("group_size", DEFAULTS["group_size"]), -1,
                                              name)[1] or k)
    return largest, abstract


def _check_export(fmt: str | None, abstract: dict) -> None:
    """The export format's own checks (it cannot hold an input transform, a format, a layout ...) on
    the abstract QArrays, before calibrating: ``weightlab.interop``'s per-format ``check``."""
    if fmt is None:
        return
    from .. import interop
    from .cli import export_format

    name, options = export_format(fmt)
    interop.check_export(abstract, name, **options)


def run_calibrated(args, kw: dict) -> int:
    """The calibrated branch of ``weightlab quantize`` (see the module docstring)."""
    from .. import io as wio
    from ..cliargs import output
    from .checkpoint import qarray_specs
    from .cli import exporter, hf_config, write
    from .registry import METHODS

    entry = METHODS[args.method]
    if args.rotate and args.method == "awq":
        raise UsageError("--rotate does not apply to --method awq: AWQ needs mean |x| per input channel, which "
                         "rotated statistics lack (use --method gptq --rotate)")
    if args.seed is not None and not args.rotate:
        raise UsageError("--seed applies with --rotate only (it draws the random rotations)")
    output(args.output, args.overwrite, args.dry_run)
    export = exporter(args)
    root = Path(args.input)
    if not root.exists():
        raise CheckpointNotFoundError(f"{root}: no such checkpoint")
    cfg = hf_config(root)
    sel = re.compile(args.select)
    exc = re.compile(args.exclude) if args.exclude else None
    t0 = time.time()
    with wio.open_checkpoint(root) as c:
        names = list(c.keys())
        arch = architecture(cfg, names, str(root))
        seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, arch.max_len)
        if seq_len > arch.max_len:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's {arch.max_len} positions (config.json)")
        tok = load_tokenizer(root, seq_len)
        if qarray_specs(c.metadata, str(root), names=names):
            raise UsageError(f"{root} already holds quantized tensors; calibrated quantization needs a float "
                             "checkpoint")
        shapes = {n: tuple(c.shape(n)) for n in names}
        arch.check_shapes(shapes)
        from ..dtypes import is_floating

        chosen = [(n, shapes[n], c.dtype(n)) for n in names if len(shapes[n]) == 2 and is_floating(c.dtype(n))
                  and sel.search(n) and not (exc and exc.search(n))]
        if not chosen:
            raise QuantizationError(f"no 2-D float tensor matches --select {args.select!r} minus --exclude")
        group, abstract = _check_hyperparameters(entry, kw, chosen, args.rotate)
        _check_export(args.export, abstract)
        texts, source = read_texts(args.calibration, args.calibration_samples)
        batches = calibration_batches(tok, texts, seq_len)
        n_tokens = int(sum(b["attention_mask"].sum() for b in batches))
        if n_tokens < group:
            raise UsageError(f"calibration text {source} gives {n_tokens} tokens, fewer than one group of {group} "
                             "weights: give more text (--calibration FILE) or a smaller --group-size")
        print(f"{root}: {arch.model_type}, {len(names)} tensors, {len(chosen)} to quantize with {args.method}"
              f"{' + rotation' if args.rotate else ''} {kw}; calibration: {len(texts)} texts, {n_tokens} tokens "
              f"from {source}, {len(batches)} batches of {batches[0]['input_ids'].shape}")
        if args.dry_run:
            for n, s, _ in chosen:
                print(f"  quantize {n} {s}")
            return 0
        flat = {n: c[n] for n in names}
    q, dense, packed = _quantize(args, kw, arch, flat, [n for n, _, _ in chosen], batches)
    recipe = {"method": args.method, **kw, "rotate": bool(args.rotate), "seed": args.seed if args.rotate else None,
              "calibration": source, "texts": len(texts), "tokens": n_tokens, "seq_len": seq_len, "source": str(Path(root).resolve())}
    if args.rotate:
        print("note: --rotate keeps each weight's dense K x K rotation (float32) in its QArray, which can outweigh "
              "the packed codes of small models")
    write(args, q, {"weightlab.recipe": recipe}, cfg, export)
    print(f"wrote {args.output}: quantized tensors {dense / 2**20:.2f} MiB -> {packed / 2**20:.2f} MiB "
          f"({dense / max(packed, 1):.2f}x smaller) in {time.time() - t0:.1f}s")
    return 0


def _quantize(args, kw, arch: Architecture, flat: dict, chosen: list[str], batches: list[dict]):
    """Calibrate and quantize; returns the HF-named tree (QArrays on host) and dense/packed bytes."""
    import jax
    import jax.numpy as jnp

    from . import quantize
    from .qarray import is_qarray
    from .registry import transform
    from .rotation import rotate

    params = arch.to_params({n: jnp.asarray(v) for n, v in flat.items()})
    paths = {arch.path_of(n) for n in chosen}
    method = rotate(transform(args.method, **kw)) if args.rotate else args.method
    hp = {} if args.rotate else kw
    key = jax.random.key(args.seed or 0) if args.rotate else None
    q = quantize(params, method, select=lambda p: p in paths, apply_fn=arch.apply_fn,
                 batches=[{k: jnp.asarray(v) for k, v in b.items()} for b in batches],
                 row_mask=lambda b: b["attention_mask"], key=key, **hp)
    out = jax.device_get(arch.to_hf(q))
    dense = sum(int(np.prod(np.shape(flat[n]))) * np.dtype(flat[n].dtype).itemsize for n in chosen)
    packed = sum(x.nbytes for x in jax.tree.leaves(out, is_leaf=is_qarray) if is_qarray(x))
    return out, dense, packed
