"""What a user checks after quantizing or merging: size, weight error and task behaviour of a
checkpoint, against a reference checkpoint when one is given (``weightlab eval``).

:func:`evaluate` returns one JSON-ready dict with

* ``weights``: true bytes of the stored tensors (sub-byte codes counted by their bits), the
  dense-equivalent bytes (every QArray counted at its original dtype), bits per weight of the
  quantized tensors and overall, tensor and parameter counts; the same for the reference;
* ``diff`` (with a reference): which tensors differ, and per tensor family (the name with every layer
  index replaced by ``*``) the max and mean relative error ``||W - W_ref||_F / ||W_ref||_F``;
* ``encoder`` (config ``model_type`` ``bert``): cosine of each sentence embedding to the reference's
  on :data:`weightlab.data.sentences.HELD_OUT`, Spearman correlation of pair cosines with the graded
  scores of :data:`weightlab.data.sts.PAIRS`, recall@1 and MRR on :data:`weightlab.data.sts.RETRIEVAL`,
  for the model and the reference;
* ``decoder`` (``llama``): perplexity on :data:`weightlab.data.sts.LM_TEXT`, mean KL(reference ||
  model) of the next-token distributions and top-1 agreement with the reference;
* ``notes``: what was not evaluated and why.

Checkpoints are HF directories (config.json + safetensors, sharded or not) or weightlab quantized
safetensors files (read through :class:`weightlab.quant.checkpoint.DequantizedCheckpoint`, one tensor
dequantized at a time). A file's config.json and tokenizer.json are looked for beside it, then in the
directory its ``weightlab.recipe`` metadata names as ``source`` (what ``weightlab quantize`` records),
then beside the reference. Everything is validated from the headers and configs before any tensor is
read. Memory: the weight comparison holds one tensor per model (compared in float64 chunks); the
task metrics load one model's parameters at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .dtypes import is_floating
from .errors import CheckpointError, CheckpointNotFoundError, ShapeMismatchError, StructureMismatchError, UsageError

__all__ = ["evaluate", "open_source", "weight_sizes", "weight_diff", "encoder_metrics", "decoder_metrics",
           "cosine_rows", "spearman", "retrieval", "log_softmax", "kl_divergence", "next_token_nll",
           "top1_agreement", "family", "TASKS"]

TASKS = {"bert": ("encoder", "weightlab.models.bert"), "llama": ("decoder", "weightlab.models.llama")}
"""config ``model_type`` -> (task kind, module with the model's pure functions)."""

_CHUNK = 1 << 20  # elements per float64 chunk in the weight comparison


# ------------------------------------------------------------------------------ metrics (pure numpy)

def cosine_rows(a, b) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64, shape (n,)); a zero
    row has cosine 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks, in float64.
    NaN when either input is constant (the correlation is undefined)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape or len(x) < 2:
        raise UsageError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    den = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


def retrieval(queries, passages, relevant) -> dict:
    """Recall@1 and mean reciprocal rank of cosine-similarity retrieval: query ``i`` (a row of
    ``queries``) ranks every row of ``passages``; ``relevant[i]`` is its one relevant passage.

    Deliberate difference from the usual argsort: a passage tied with the relevant one counts as
    ranked above it (pessimistic ties), so the result does not depend on the passage order."""
    q = np.asarray(queries, np.float64)
    p = np.asarray(passages, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-300)
    s = q @ p.T
    rel = np.asarray(relevant)
    ranks = (s >= s[np.arange(len(rel)), rel][:, None]).sum(1)
    return {"recall@1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks)), "queries": len(rel)}


def log_softmax(logits) -> np.ndarray:
    """``log softmax`` over the last axis, in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(ref_logits, logits) -> np.ndarray:
    """KL(p_ref || p) per position (float64), ``sum_v p_ref(v) (log p_ref(v) - log p(v))`` of the
    softmax distributions over the last axis; 0 exactly when the logits are equal."""
    lr, lm = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lr) * (lr - lm)).sum(-1), 0.0)


def next_token_nll(logits, targets) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of ``targets[..., t]`` under ``logits[..., t, :]``."""
    lp = log_softmax(logits)
    return -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def top1_agreement(ref_logits, logits) -> np.ndarray:
    """Per position, whether the most likely token (first on ties) is the same under both."""
    return np.argmax(np.asarray(ref_logits), -1) == np.argmax(np.asarray(logits), -1)


def family(name: str) -> str:
    """A tensor's family: its name with every standalone number (layer index) replaced by ``*``."""
    return re.sub(r"(?<![A-Za-z0-9])\d+(?![A-Za-z0-9])", "*", name)


# ----------------------------------------------------------------------------------- checkpoints

class Source(NamedTuple):
    """An opened checkpoint: ``raw`` (the stored tensors) and ``view`` (logical tensors, QArrays
    dequantized on read), its config (None when none was found) and where config and tokenizer are."""
    path: Path
    raw: Any
    view: Any
    specs: dict
    config: dict | None
    config_path: Path | None
    tokenizer_path: Path | None


def _dirs(path: Path, metadata: dict, reference: Path | None) -> list[Path]:
    """Where a checkpoint's config.json / tokenizer.json may be: its directory, the recipe's source,
    the reference's directory (in this order)."""
    out = [path if path.is_dir() else path.parent]
    try:
        src = json.loads(metadata.get("weightlab.recipe", "{}")).get("source")
    except (ValueError, AttributeError):
        src = None
    if isinstance(src, str) and src:
        s = Path(src)
        out.append(s if s.is_dir() else s.parent)
    if reference is not None:
        out.append(reference if reference.is_dir() else reference.parent)
    return out


def _find(name: str, dirs: list[Path]) -> Path | None:
    return next((d / name for d in dirs if (d / name).is_file()), None)


def open_source(path, reference=None) -> Source:
    """Open a checkpoint for evaluation (header only). ``reference``: the reference's path, searched
    last for config.json/tokenizer.json. Missing path, empty directory, a checkpoint with no tensors,
    an unreadable config.json: typed errors naming the path."""
    from .io import open_checkpoint
    from .quant.checkpoint import DequantizedCheckpoint, qarray_specs

    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    if p.is_dir() and not any(p.iterdir()):
        raise CheckpointNotFoundError(f"{p}: empty directory (expected config.json and model.safetensors, "
                                      "or a sharded model.safetensors.index.json)")
    from .interop.view import ImportedCheckpoint, is_exported
    from .io.header import read_json_object

    exported = is_exported(p)  # GPTQ / compressed-tensors / bitsandbytes directories: imported first
    raw = ImportedCheckpoint(p) if exported else open_checkpoint(p)
    try:
        view = raw.logical if exported else DequantizedCheckpoint(raw)
        if not view.keys():
            raise CheckpointError(f"{p}: holds no tensors")
        dirs = _dirs(p, raw.metadata, Path(reference) if reference is not None else None)
        cfg_path = _find("config.json", dirs)
        config = read_json_object(cfg_path) if cfg_path is not None else None
        specs = raw.specs if exported else qarray_specs(raw.metadata, str(p), names=raw.keys())
        return Source(p, raw, view, specs, config, cfg_path, _find("tokenizer.json", dirs))
    except BaseException:
        raw.close()
        raise


def _check_same_tensors(model: Source, ref: Source) -> None:
    """Same tensor names and shapes, or a StructureMismatchError / ShapeMismatchError naming the
    first mismatches (up to three)."""
    mk, rk = model.view.keys(), set(ref.view.keys())
    buffer = lambda src, n: not is_floating(src.view.dtype(n))  # position_ids ...: save_pretrained may drop them
    missing = [n for n in ref.view.keys() if n not in set(mk) and not buffer(ref, n)]
    extra = [n for n in mk if n not in rk and not buffer(model, n)]
    more = lambda xs: f" (and {len(xs) - 1} more: {', '.join(xs[1:3])}{' ...' if len(xs) > 3 else ''})" if len(xs) > 1 else ""
    if missing:
        raise StructureMismatchError(missing[0], f"a tensor (the reference {ref.path} has it)",
                                     f"missing from {model.path}{more(missing)}", what="tensor names")
    if extra:
        raise StructureMismatchError(extra[0], f"no such tensor (the reference {ref.path} lacks it)",
                                     f"a tensor of {model.path}{more(extra)}", what="tensor names")
    bad = [n for n in mk if n in rk and tuple(model.view.shape(n)) != tuple(ref.view.shape(n))]
    if bad:
        e = ShapeMismatchError(bad[0], ref.view.shape(bad[0]), model.view.shape(bad[0]))
        e.args = (f"{e} between {ref.path} (expected) and {model.path} (found){more(bad)}",)
        raise e


# ------------------------------------------------------------------------------------ weights

def weight_sizes(src: Source) -> dict:
    """Sizes from the header: ``bytes`` (true bytes of every stored tensor), ``dense_bytes`` (QArrays
    at their original dtype), ``file_bytes`` (the safetensors files on disk, headers included),
    ``tensors``/``params`` (logical tensors), and for the QArrays ``quantized`` = tensors, params,
    packed bytes, ``bits_per_weight`` and formats; ``bits_per_weight`` overall = 8 bytes / params."""
    from .dtypes import true_bytes

    raw, view, specs = src.raw, src.view, src.specs
    stored = {n: true_bytes(raw.shape(n), raw.dtype(n)) for n in raw.keys()}
    numel = {n: int(np.prod(view.shape(n), dtype=np.int64)) for n in view.keys()}
    packed = {p: sum(stored[f"{p}/{c}"] for c in s["children"]) for p, s in specs.items()}
    dense = sum(stored[n] for n in view.keys() if n not in specs)
    dense += sum(numel[p] * np.dtype(view.dtype(p)).itemsize for p in specs)
    root = src.path if src.path.is_dir() else src.path.parent
    files = sorted({raw.shard_of(n) for n in raw.keys()})
    total, params = sum(stored.values()), sum(numel.values())
    out = {"tensors": len(numel), "params": params, "bytes": total, "dense_bytes": dense,
           "file_bytes": sum((root / f).stat().st_size for f in files), "files": len(files),
           "bits_per_weight": 8 * total / max(params, 1)}
    if specs:
        qn = sum(numel[p] for p in specs)
        out["quantized"] = {"tensors": len(specs), "params": qn, "bytes": sum(packed.values()),
                            "bits_per_weight": 8 * sum(packed.values()) / max(qn, 1),
                            "formats": sorted({f"{s['format']['name']} g{s['group_size']}" for s in specs.values()})}
    return out


def _compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float, bool, int]:
    """(||a-b||^2, ||b||^2, a == b everywhere, non-finite values of a), in float64 chunks."""
    a, b = a.reshape(-1), b.reshape(-1)
    d2 = r2 = 0.0
    same, bad = True, 0
    for i in range(0, a.size, _CHUNK):
        x, y = a[i:i + _CHUNK].astype(np.float64), b[i:i + _CHUNK].astype(np.float64)
        bad += int(x.size - np.count_nonzero(np.isfinite(x)))
        same = same and bool(np.array_equal(x, y))
        d = x - y
        d2, r2 = d2 + float(d @ d), r2 + float(y @ y)
    return d2, r2, same, bad


def weight_diff(model: Source, ref: Source) -> dict:
    """Stream both checkpoints tensor by tensor (one tensor of each in memory) and report which
    tensors differ, per family the max / mean relative Frobenius error ``||W - W_ref|| / ||W_ref||``
    (None where undefined: a zero reference tensor that changed, or non-finite values), the overall
    relative error of all weights together, and the tensors holding NaN/Inf."""
    per, differ, nonfinite = {}, [], []
    tot_d2 = tot_r2 = 0.0
    rk = set(ref.view.keys())
    for n in [n for n in model.view.keys() if n in rk]:  # a non-float buffer only one side has is skipped
        d2, r2, same, bad = _compare(np.asarray(model.view.get(n, copy=False)), np.asarray(ref.view.get(n, copy=False)))
        rel = float(np.sqrt(d2 / r2)) if r2 > 0 else (0.0 if d2 == 0 else None)
        if rel is not None and not np.isfinite(rel):
            rel = None
        if not same:
            differ.append(n)
        if bad:
            nonfinite.append({"tensor": n, "values": bad})
        per[n] = rel
        tot_d2, tot_r2 = tot_d2 + d2, tot_r2 + r2
    fams: dict[str, dict] = {}
    changed = set(differ)
    for n, rel in per.items():
        f = fams.setdefault(family(n), {"tensors": 0, "differ": 0, "_rel": []})
        f["tensors"] += 1
        f["differ"] += n in changed
        f["_rel"].append(rel)
    for f in fams.values():
        rels = f.pop("_rel")
        ok = None not in rels
        f["max_rel_err"] = max(rels) if ok else None
        f["mean_rel_err"] = float(np.mean(rels)) if ok else None
    overall = float(np.sqrt(tot_d2 / tot_r2)) if tot_r2 > 0 and np.isfinite(tot_d2) else None
    return {"tensors_differ": len(differ), "differ": differ, "rel_err": overall, "families": dict(sorted(fams.items())),
            "tensor_rel_err": per, "nonfinite": nonfinite}


# ------------------------------------------------------------------------------------ task metrics

def _module(model_type: str):
    return importlib.import_module(TASKS[model_type][1])


@functools.lru_cache(maxsize=None)
def _jitted(fn):
    """``jax.jit(fn)`` with the config (third argument) static, made once per function, so repeated
    evaluations of one architecture compile once."""
    import jax

    return jax.jit(fn, static_argnums=2)


def _float32_flat(view) -> dict[str, np.ndarray]:
    """Every logical tensor, floats as float32 (one model's parameters for the forward pass)."""
    from .dtypes import is_floating

    out = {}
    for n in view.keys():
        a = np.asarray(view.get(n))
        out[n] = a.astype(np.float32, copy=False) if is_floating(a.dtype) else a
    return out


def _tokenizer(path: Path, max_length: int | None):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        from .errors import DependencyMissingError

        raise DependencyMissingError("task metrics need `tokenizers` (pip install 'weightlab[real]')") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a tokenizers tokenizer.json ({str(e)[:200]})") from None
    tok.no_padding()
    if max_length:
        tok.enable_truncation(max_length)
    return tok


def _bert_prefix(names) -> str:
    return "bert." if all(n.startswith("bert.") for n in names) else ""


def _bert_params(src: Source):
    """The model's parameters (float32, our BERT layout) for the forward pass."""
    from .models import bert

    flat = _float32_flat(src.view)
    return bert.hf_to_params(flat, strip_prefix=_bert_prefix(flat))


def encoder_metrics(model: Source, ref: Source | None, config, tokenizer_path: Path) -> dict:
    """Sentence-embedding behaviour (BERT): per held-out sentence the cosine of the model's embedding to
    the reference's (mean, min), Spearman of the pair cosines with :data:`weightlab.data.sts.PAIRS`'
    scores and retrieval recall@1 / MRR on :func:`weightlab.data.sts.retrieval_corpus`, for the model
    and the reference. Embedding = mean-pooled last hidden states, L2-normalised (sentence-transformers'
    all-MiniLM recipe); both models use the model's tokenizer. One model's parameters at a time."""
    from .data import sts
    from .data.sentences import HELD_OUT
    from .models import bert

    tok = _tokenizer(tokenizer_path, min(256, config.max_position))
    runner = bert.MiniLM(None, config, tok, max_length=min(256, config.max_position))  # its tokenize()
    queries, passages, relevant = sts.retrieval_corpus()
    texts = list(dict.fromkeys(list(HELD_OUT) + [a for a, _, _ in sts.PAIRS] + [b for _, b, _ in sts.PAIRS]
                               + queries + passages))
    where = {t: i for i, t in enumerate(texts)}
    scores = np.array([s for *_, s in sts.PAIRS])
    batches = [runner.tokenize(texts[i:i + 32]) for i in range(0, len(texts), 32)]

    def measure(src):
        params = _bert_params(src)
        e = np.concatenate([np.asarray(_jitted(bert.sentence_embedding)(params, b, config), np.float32)
                            for b in batches])
        del params
        pair = cosine_rows(e[[where[a] for a, _, _ in sts.PAIRS]], e[[where[b] for _, b, _ in sts.PAIRS]])
        r = retrieval(e[[where[q] for q in queries]], e[[where[p] for p in passages]], relevant)
        return e, {"sts_spearman": spearman(pair, scores), "recall@1": r["recall@1"], "mrr": r["mrr"]}

    em, out = measure(model)
    res = {"model": out, "pairs": len(sts.PAIRS), "queries": len(queries), "passages": len(passages)}
    if ref is not None:
        er, res["reference"] = measure(ref)
        idx = [where[t] for t in HELD_OUT]
        c = cosine_rows(em[idx], er[idx])
        res["cosine_to_reference"] = {"mean": float(c.mean()), "min": float(c.min()), "sentences": len(idx)}
    return res


def decoder_metrics(model: Source, ref: Source | None, config, tokenizer_path: Path, seq_len: int = 128) -> dict:
    """Language-model behaviour (llama): perplexity ``exp(mean NLL)`` on :data:`weightlab.data.sts.LM_TEXT`
    tokenized with the model's tokenizer (special tokens as the tokenizer adds them) and cut into
    non-overlapping windows of ``seq_len`` tokens (the first token of each window has no context in
    it, as in the common strided evaluation with stride = window; ``seq_len`` is capped at the
    config's ``max_position_embeddings``); with a reference, mean KL(reference ||
    model) of the next-token distributions and the top-1 agreement, over every position of every window.
    The reference's logits are kept (float32, tokens x vocab) while the model runs."""
    import jax
    import jax.numpy as jnp

    from .data import sts

    llama = _module("llama")
    seq_len = min(seq_len, getattr(config, "max_position", seq_len))
    tok = _tokenizer(tokenizer_path, None)
    ids = np.asarray(tok.encode(sts.LM_TEXT).ids, np.int32)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2] or [ids]
    apply = _jitted(llama.llama_apply)

    def logits_of(src):
        params = jax.tree.map(jnp.asarray, llama.hf_to_params(_float32_flat(src.view)))
        out = [np.asarray(apply(params, jnp.asarray(w[None]), config), np.float32)[0] for w in windows]
        del params
        return out

    def ppl(logits):
        nll = np.concatenate([next_token_nll(lg[:-1], w[1:]) for lg, w in zip(logits, windows)])
        return float(np.exp(nll.mean())), len(nll)

    lm = logits_of(model)
    p, n = ppl(lm)
    res = {"model": {"perplexity": p}, "tokens": int(len(ids)), "predicted": n, "windows": len(windows),
           "seq_len": seq_len}
    if ref is not None:
        lr = logits_of(ref)
        res["reference"] = {"perplexity": ppl(lr)[0]}
        res["kl"] = float(np.mean(np.concatenate([kl_divergence(a, b) for a, b in zip(lr, lm)])))
        res["top1_agreement"] = float(np.mean(np.concatenate([top1_agreement(a, b) for a, b in zip(lr, lm)])))
    return res


def _parse_config(model_type: str, cfg: dict, where: Path):
    mod = _module(model_type)
    cls = mod.BertConfig if model_type == "bert" else mod.LlamaConfig
    try:
        return cls.from_hf(cfg)
    except KeyError as e:
        raise CheckpointError(f"{where}: config lacks {e} (needed for {model_type} task metrics)") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: unusable {model_type} config ({e})") from None


def _config_diff(a, b) -> list[str]:
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return [] if a == b else ["<config>"]


def _check_layout(model_type: str, src: Source, config) -> None:
    """The checkpoint's tensors (names and header shapes) are the ones ``config`` describes, via the
    model module's ``check_shapes``; without one, BERT names are mapped on zero-byte placeholders."""
    mod, names = _module(model_type), src.view.keys()
    prefix = _bert_prefix(names) if model_type == "bert" else ""
    if hasattr(mod, "check_shapes"):
        mod.check_shapes({n[len(prefix):]: tuple(src.view.shape(n)) for n in names}, config, str(src.path))
    elif model_type == "bert":  # pragma: no cover - a bert module without check_shapes
        mod.hf_to_params({n: np.broadcast_to(np.float32(0), src.view.shape(n)) for n in names}, strip_prefix=prefix)


def _check_vocab(model_type: str, config, tok_path: Path, src: Source) -> None:
    """Token ids must index the embedding: a tokenizer larger than the vocabulary would be clamped
    silently by JAX's gather, so it is refused."""
    n, vocab = _tokenizer(tok_path, None).get_vocab_size(), getattr(config, "vocab_size", None)
    if vocab is not None and n > vocab:
        raise CheckpointError(f"{tok_path}: the tokenizer has {n} tokens but {src.config_path} says vocab_size "
                              f"{vocab}: not this model's tokenizer")


# ---------------------------------------------------------------------------------------- main

def evaluate(model, reference=None, *, weights_only: bool = False, seq_len: int = 128) -> dict:
    """Evaluate checkpoint ``model`` (against ``reference`` when given): see the module docstring for
    the report's fields. ``weights_only``: sizes and weight errors only (no config or tokenizer
    needed). Every input problem is raised before any tensor is read: a missing path or empty
    directory, a reference whose tensor names or shapes differ (the first mismatches named), a model
    with no config.json (names where it looked), a bert/llama model without tokenizer.json, model and
    reference configs that disagree."""
    if type(seq_len) is not int or seq_len < 2:
        raise UsageError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    m = open_source(model, reference)
    r = None
    try:
        r = open_source(reference) if reference is not None else None
        if r is not None:
            _check_same_tensors(m, r)
        report: dict[str, Any] = {"model": str(m.path), "reference": str(r.path) if r else None,
                                  "model_type": None, "task": None, "notes": []}
        task = None
        if not weights_only:
            task = _plan_task(m, r, report)
        report["weights"] = weight_sizes(m)
        if r is not None:
            report["reference_weights"] = weight_sizes(r)
            report["diff"] = weight_diff(m, r)
            if report["diff"]["nonfinite"]:
                report["notes"].append(f"{len(report['diff']['nonfinite'])} tensors hold NaN/Inf "
                                       f"(first: {report['diff']['nonfinite'][0]['tensor']})")
        else:
            report["notes"].append("no reference: weight errors, cosine, KL and agreement need --reference")
        if task is not None:
            kind, config = task
            fn = encoder_metrics if kind == "encoder" else decoder_metrics
            kw = {"seq_len": seq_len} if kind == "decoder" else {}
            report[kind] = fn(m, r, config, m.tokenizer_path, **kw)
        return report
    finally:
        m.raw.close()
        if r is not None:
            r.raw.close()


def _plan_task(m: Source, r: Source | None, report: dict):
    """Which task evaluator applies, validated before any tensor is read: returns (kind, config) or
    None (with a note in ``report``)."""
    if m.config is None:
        looked = ", ".join(str(d) for d in _dirs(m.path, m.raw.metadata, r.path if r else None))
        raise CheckpointNotFoundError(f"{m.path}: no config.json (looked in {looked}); task metrics need the model's "
                                      "config: give an HF directory or a reference that has one, or --weights-only "
                                      "for bytes and weight errors")
    mt = m.config.get("model_type")
    report["model_type"], report["config"] = mt, str(m.config_path)
    if mt not in TASKS:
        report["notes"].append(f"no task evaluator for model_type {mt!r} (have: {', '.join(TASKS)}): "
                               "bytes and weight errors only")
        return None
    kind = TASKS[mt][0]
    try:
        config = _parse_config(mt, m.config, m.config_path)
    except ModuleNotFoundError as e:
        report["notes"].append(f"no task evaluator: {TASKS[mt][1]} is not available ({e})")
        return None
    if r is not None and r.config is not None and r.config_path != m.config_path:
        if r.config.get("model_type") != mt:
            raise StructureMismatchError("config.json:model_type", repr(mt), f"{r.config.get('model_type')!r} in "
                                         f"{r.config_path}", what="config")
        rc = _parse_config(mt, r.config, r.config_path)
        diff = _config_diff(config, rc)
        if diff:
            raise StructureMismatchError(f"config.json:{diff[0]}", f"{getattr(config, diff[0], '?')} ({m.config_path})",
                                         f"{getattr(rc, diff[0], '?')} ({r.config_path})", what="config")
    if m.tokenizer_path is None:
        looked = ", ".join(str(d) for d in _dirs(m.path, m.raw.metadata, r.path if r else None))
        raise CheckpointNotFoundError(f"{m.path}: no tokenizer.json (looked in {looked}); {kind} task metrics "
                                      "tokenize the bundled text with the checkpoint's own tokenizer "
                                      "(or use --weights-only)")
    _check_layout(mt, m, config)
    _check_vocab(mt, config, m.tokenizer_path, m)
    report["task"], report["tokenizer"] = kind, str(m.tokenizer_path)
    return kind, config
