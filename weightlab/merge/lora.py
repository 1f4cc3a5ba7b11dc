"""LoRA-native merging and LoRA extraction, without forming dense ``in x out`` matrices where it
can be avoided.

A :class:`LoRA` leaf holds factors ``a`` (in, r) and ``b`` (r, out) with ``delta = a @ b`` in the
Flax ``(in, out)`` kernel layout; PEFT's scaling ``alpha / r`` is folded into ``a``
(:meth:`LoRA.from_peft` converts PEFT's ``lora_A`` (r, in) / ``lora_B`` (out, r)).

* :func:`extract_lora` (as mergekit's ``extract_lora`` / LoRA-extraction by truncated SVD, Eckart-
  Young): the best rank-r approximation of each matrix leaf of ``finetuned - base``; ``rank`` is an
  int, or a float in (0, 1) = the smallest rank keeping that fraction of the squared singular values
  (the Frobenius energy). Returns the LoRA tree and the relative Frobenius error per leaf.
* :func:`merge_loras` ``method="concat"``: the exact weighted sum ``sum_i w_i a_i b_i`` as one LoRA
  of rank ``sum_i r_i`` (task arithmetic in factor space); ``method="svd"``: that sum re-factored to
  rank ``rank`` via QR of the stacked factors and an SVD of the small (R x R) core, i.e. the best
  rank-``rank`` approximation of the dense sum at O((in + out) R^2) cost instead of O(in out R).
* :func:`apply_lora` adds (scaled) LoRA deltas to a base; :func:`lora_delta` densifies one leaf.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as wtree
from ..errors import MergeError

__all__ = ["LoRA", "LoraAppliedCheckpoint", "extract_lora", "extract_lora_checkpoint", "merge_loras", "apply_lora", "lora_delta", "is_lora"]


class LoRA(NamedTuple):
    a: jax.Array  # (in, r)
    b: jax.Array  # (r, out)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @classmethod
    def from_peft(cls, lora_A, lora_B, alpha: float | None = None) -> "LoRA":
        """PEFT factors (``lora_A`` (r, in), ``lora_B`` (out, r), delta_W = B A alpha/r in (out, in))."""
        r = lora_A.shape[0]
        s = 1.0 if alpha is None else alpha / r
        return cls(jnp.asarray(lora_A).T * s, jnp.asarray(lora_B).T)


def is_lora(x) -> bool:
    return isinstance(x, LoRA)


def lora_delta(x: LoRA) -> jax.Array:
    return x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)


def _rank_for(s: np.ndarray, rank) -> int:
    if isinstance(rank, float) and 0 < rank < 1:
        e = np.cumsum(s.astype(np.float64) ** 2)
        return int(np.searchsorted(e, rank * e[-1]) + 1) if e[-1] > 0 else 1
    if isinstance(rank, (int, np.integer)) and rank >= 1:
        return int(min(rank, s.shape[0]))
    raise MergeError(f"rank must be an int >= 1 or a float energy fraction in (0, 1), got {rank!r}")


def _factor(d, rank):
    """Best rank-r factors (left (m, r), right (r, n)) of the matrix ``d`` and the relative Frobenius
    error of the approximation (``rank``: int or energy fraction, see :func:`extract_lora`)."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(d, jnp.float32), full_matrices=False)
    r = _rank_for(np.asarray(s), rank)
    root = jnp.sqrt(s[:r])
    tot = jnp.sum(s ** 2)
    err = float(jnp.sqrt(jnp.sum(s[r:] ** 2) / jnp.where(tot == 0, 1.0, tot)))
    return u[:, :r] * root, root[:, None] * vt[:r], err


def extract_lora(base, finetuned, rank=16, *, select=None):
    """LoRA factors of ``finetuned - base`` for every 2-D leaf matched by ``select`` (path regex /
    predicate; default all). Other leaves hold the dense delta. Returns ``(tree, errors)`` with
    ``errors[path] = ||delta - a b||_F / ||delta||_F``."""
    wtree.check_compatible(base, finetuned, names=("base_model", "finetuned"))
    pick = wtree.predicate(select)
    errors = {}

    def one(path, b, f):
        if not wtree.is_array(b):
            return b
        d = f.astype(jnp.float32) - b.astype(jnp.float32)
        if b.ndim != 2 or not pick(path, b):
            return d
        a, b, errors[path] = _factor(d, rank)
        return LoRA(a, b)

    return wtree.map_with_path(one, base, finetuned), errors


def _refactor(a, b, rank):
    """Best rank-``rank`` factors of ``a @ b`` (a (in, R), b (R, out)) without the dense product."""
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b.T)
    u, s, vt = jnp.linalg.svd(ra @ rb.T)
    r = min(rank, s.shape[0])
    root = jnp.sqrt(s[:r])
    return LoRA(qa @ (u[:, :r] * root), (root[:, None] * vt[:r]) @ qb.T)


def merge_loras(loras: Sequence, weights=None, *, method: str = "concat", rank: int | None = None):
    """Weighted sum of several LoRA trees (same structure) kept in factor form.

    Non-LoRA leaves (dense deltas) are summed with the same weights. ``method``: ``"concat"``
    (exact, rank adds up) or ``"svd"`` (re-factor to ``rank``, default the largest input rank)."""
    if not loras:
        raise MergeError("no LoRAs to merge")
    n = len(loras)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise MergeError(f"weights needs {n} values (one per LoRA), got {np.shape(weights)}")
    if method not in ("concat", "svd"):
        raise MergeError(f"method must be 'concat' or 'svd', got {method!r}")
    flat = [wtree.flatten_with_paths(t, is_leaf=is_lora)[0] for t in loras]
    for i, f in enumerate(flat[1:], 1):
        if [p for p, _ in f] != [p for p, _ in flat[0]]:
            raise MergeError(f"LoRA tree {i} has different paths than LoRA tree 0")
    out = []
    for j, (path, x0) in enumerate(flat[0]):
        xs = [f[j][1] for f in flat]
        if is_lora(x0):
            if not all(is_lora(x) and x.a.shape[0] == x0.a.shape[0] and x.b.shape[1] == x0.b.shape[1] for x in xs):
                raise MergeError(f"'{path}': LoRA factors disagree in (in, out) shape across inputs")
            a = jnp.concatenate([float(wi) * x.a.astype(jnp.float32) for wi, x in zip(w, xs)], axis=1)
            b = jnp.concatenate([x.b.astype(jnp.float32) for x in xs], axis=0)
            merged = LoRA(a, b)
            if method == "svd":
                merged = _refactor(a, b, rank or max(x.rank for x in xs))
            out.append(merged)
        elif wtree.is_array(x0):
            out.append(sum(float(wi) * jnp.asarray(x, jnp.float32) for wi, x in zip(w, xs)))
        else:
            out.append(x0)
    treedef = jax.tree.structure(loras[0], is_leaf=is_lora)
    return jax.tree.unflatten(treedef, out)


def apply_lora(base, loras, scale: float = 1.0):
    """``base + scale * delta`` for every leaf (LoRA leaves densified one at a time)."""
    def one(b, d):
        if not wtree.is_array(b):
            return b
        delta = lora_delta(d) if is_lora(d) else jnp.asarray(d, jnp.float32)
        if delta.shape != b.shape:
            raise MergeError(f"LoRA delta shape {delta.shape} does not match the base leaf {b.shape}")
        return (b.astype(jnp.float32) + scale * delta).astype(b.dtype)

    return jax.tree.map(one, base, loras, is_leaf=is_lora)


_NOT_LINEAR = r"(embed|wte|wpe|lm_head|norm|ln_)"


def extract_lora_checkpoint(base_dir, finetuned_dir, out_dir, *, rank=16, select: str | None = None,
                            overwrite: bool = False, echo=print) -> dict:
    """Extract a PEFT LoRA adapter from two Hugging Face safetensors checkpoints, tensor by tensor.

    Every 2-D ``*.weight`` tensor matched by ``select`` (regex; default: all except embeddings, the
    LM head and norms) becomes ``lora_B`` (out, r) ``lora_A`` (r, in) with ``B @ A`` the best rank-r
    approximation of ``finetuned - base`` (PyTorch (out, in) layout). Writes ``adapter_model.safetensors``
    and ``adapter_config.json`` (``lora_alpha = r`` per module, so PEFT's scaling is 1) atomically into
    ``out_dir``. Returns ``{tensor name: relative Frobenius error}``. Validation (names, shapes, NaN)
    happens before any SVD."""
    import json
    import re

    from ..io.atomic import atomic_dir
    from ..io.safetensors import Checkpoint, _write_file

    base, ft = Checkpoint(base_dir), Checkpoint(finetuned_dir)
    try:
        rx = re.compile(select) if select else None
        names = [n for n in base.keys() if n.endswith(".weight") and len(base.shape(n)) == 2
                 and (rx.search(n) if rx else not re.search(_NOT_LINEAR, n))]
        if not names:
            raise MergeError(f"no 2-D weight matched {select or 'the default selection'} in {base_dir}")
        for n in names:
            if n not in ft:
                raise MergeError(f"tensor '{n}' is missing from {finetuned_dir}")
            if ft.shape(n) != base.shape(n):
                raise MergeError(f"tensor '{n}': shape {tuple(ft.shape(n))} in {finetuned_dir} vs "
                                 f"{tuple(base.shape(n))} in {base_dir}")
        _rank_for(np.ones(2), rank)  # validates rank before any work
        tensors, errors, ranks = {}, {}, {}
        for n in names:
            d = ft.get(n).astype(np.float32) - base.get(n).astype(np.float32)
            if not np.all(np.isfinite(d)):
                raise MergeError(f"tensor '{n}': NaN/Inf in the difference")
            left, right, errors[n] = _factor(d, rank)
            mod = n[: -len(".weight")]
            tensors[f"base_model.model.{mod}.lora_B.weight"] = np.asarray(left)
            tensors[f"base_model.model.{mod}.lora_A.weight"] = np.asarray(right)
            ranks[mod] = int(left.shape[1])
        r0 = max(ranks.values())
        cfg = {"peft_type": "LORA", "r": r0, "lora_alpha": r0, "rank_pattern": ranks, "alpha_pattern": ranks,
               "target_modules": sorted({m.split(".")[-1] for m in ranks}), "lora_dropout": 0.0, "bias": "none",
               "fan_in_fan_out": False, "base_model_name_or_path": str(base_dir), "task_type": None,
               "inference_mode": True}
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            _write_file(tmp / "adapter_model.safetensors", list(tensors.items()),
                        {"weightlab.extracted_from": str(finetuned_dir), "weightlab.max_rank": str(r0)})
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        worst = max(errors, key=errors.get)
        echo(f"wrote {out_dir}: {len(names)} LoRA modules, rank <= {r0}; worst relative error "
             f"{errors[worst]:.3g} ({worst})")
        return errors
    finally:
        base.close()
        ft.close()


class LoraAppliedCheckpoint:
    """A base checkpoint with a PEFT LoRA adapter applied, tensor by tensor (mergekit's
    ``model: base+adapter`` syntax): ``W + (alpha / r) * lora_B @ lora_A`` for every adapted module
    (``rank_pattern`` / ``alpha_pattern`` honoured), other tensors as in the base. The adapter's
    factors are read once (they are small); base tensors are read on demand."""

    def __init__(self, base, adapter_dir):
        import json
        from pathlib import Path

        from ..io.safetensors import Checkpoint

        d = Path(adapter_dir)
        cfg_path = d / "adapter_config.json"
        if not cfg_path.is_file():
            raise MergeError(f"{d}: not a PEFT adapter (no adapter_config.json)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("peft_type", "LORA").upper() != "LORA":
            raise MergeError(f"{d}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get("fan_in_fan_out"):
            raise MergeError(f"{d}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported")
        self._base, self.metadata = base, dict(getattr(base, "metadata", {}))
        ad = Checkpoint(d / "adapter_model.safetensors")
        try:
            mods = {}
            for k in ad.keys():
                for part in ("lora_A", "lora_B"):
                    tag = f".{part}."
                    if tag in k:
                        mod = k.split(tag)[0]
                        mod = mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod
                        mods.setdefault(mod, {})[part] = ad.get(k).astype(np.float32)
        finally:
            ad.close()
        self._delta = {}
        for mod, f in mods.items():
            if set(f) != {"lora_A", "lora_B"}:
                raise MergeError(f"{d}: module '{mod}' has {sorted(f)}, needs lora_A and lora_B")
            r = f["lora_A"].shape[0]
            leaf = mod.split(".")[-1]
            r_eff = cfg.get("rank_pattern", {}).get(mod, cfg.get("rank_pattern", {}).get(leaf, cfg.get("r", r)))
            alpha = cfg.get("alpha_pattern", {}).get(mod, cfg.get("alpha_pattern", {}).get(leaf,
                                                                                         cfg.get("lora_alpha", r_eff)))
            scale = alpha / (np.sqrt(r_eff) if cfg.get("use_rslora") else r_eff)
            name = f"{mod}.weight"
            if name not in base.keys():
                raise MergeError(f"{d}: adapter module '{mod}' has no '{name}' in the base checkpoint")
            shape = tuple(base.shape(name))
            if (f["lora_B"].shape[0], f["lora_A"].shape[1]) != shape:
                raise MergeError(f"{d}: '{mod}' adapter is {(f['lora_B'].shape[0], f['lora_A'].shape[1])}, "
                                 f"base weight is {shape}")
            self._delta[name] = (f["lora_B"], f["lora_A"], float(scale))

    def keys(self):
        return self._base.keys()

    def __contains__(self, name):
        return name in self._base

    def shape(self, name):
        return self._base.shape(name)

    def dtype(self, name):
        return self._base.dtype(name)

    def get(self, name, *, copy: bool = True):
        w = self._base.get(name)
        if name not in self._delta:
            return w
        b, a, s = self._delta[name]
        return (w.astype(np.float32) + s * (b @ a)).astype(w.dtype)

    __getitem__ = get

    def read_into(self, name, buf):
        if name not in self._delta:
            return self._base.read_into(name, buf)
        a = self.get(name)
        view = buf.reshape(-1).view(np.uint8)[:a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(view, a)
        return view

    def close(self):
        self._base.close()
