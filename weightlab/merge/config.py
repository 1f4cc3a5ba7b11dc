"""mergekit-compatible YAML merge configurations.

Supported: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, global
``parameters``, ``dtype``/``out_dtype``. Parameter values follow mergekit's rules: a number, a
*gradient* (a list of numbers interpolated linearly over the layer position ``t = i / (L - 1)``;
tensors outside the layer stack use ``t = 0``), or a list of ``{filter, value}`` conditions where the
first whose ``filter`` is a substring of the tensor name (or absent / ``"*"``) wins. Lookup order:
the model's own parameters, then the global ``parameters``, then the method's default.

``slices`` (mergekit's layer stacking): each slice lists ``sources`` (``model`` + ``layer_range: [a, b)``
+ optional ``parameters``), all of the same length; the output stacks the slices' layers in order.
Every output layer is the merge of its sources' corresponding layers with ``merge_method``
(``passthrough`` with one source per slice = a frankenmerge); gradients run over each slice's own
layers; embeddings come from the first slice's sources and the final norm / ``lm_head`` from the last
slice's (as mergekit). Every problem is reported as a :class:`MergeError` naming the config line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import MergeError
from .registry import METHODS, check_count

__all__ = ["MergeConfig", "load_config", "parse_config", "evaluate_setting", "method_parameters"]

# mergekit parameter name -> our keyword; "int8_mask" only changes mergekit's memory use.
_RENAME = {"lambda": "lambda_"}
_YAML = {v: k for k, v in _RENAME.items()}
_IGNORED = {"int8_mask"}


def yaml_methods() -> list[str]:
    """Methods a YAML config may name: the registered ones that work tensor by tensor."""
    return METHODS.names(stream=True)


def method_parameters(method: str) -> set[str]:
    """Parameter names (mergekit spelling: ``lambda``) a YAML config may give the method."""
    if method not in yaml_methods():
        raise MergeError(f"unknown merge_method {method!r}; known: {sorted(yaml_methods())}")
    entry = METHODS[method]
    names = set(entry.parameters) - {k for k, _ in entry.stream_kwargs}
    return {_YAML.get(n, n) for n in names} | _IGNORED


def evaluate_setting(tensor_name: str, setting: Any, t: float = 0.0) -> Any:
    """mergekit's parameter evaluation: scalar, gradient over t, or filtered conditions."""
    if isinstance(setting, (int, float, bool, str)) or setting is None:
        return setting
    if isinstance(setting, list):
        if setting and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, (int, float, bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise MergeError(f"bad parameter condition {cond!r}: expected {{filter: ..., value: ...}}")
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t)
        return None
    raise MergeError(f"unexpected parameter value {setting!r}")


@dataclasses.dataclass
class ModelEntry:
    model: str
    parameters: dict
    line: int
    layer_range: tuple[int, int] | None = None


@dataclasses.dataclass
class SliceDef:
    sources: list[ModelEntry]
    parameters: dict
    line: int


@dataclasses.dataclass
class MergeConfig:
    method: str
    base_model: str | None
    models: list[ModelEntry]
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    text: str
    source: str
    slices: list[SliceDef] | None = None

    @property
    def recipe_hash(self) -> str:
        slices = [[(m.model, m.layer_range, m.parameters) for m in s.sources] + [s.parameters]
                  for s in self.slices or []]
        canon = json.dumps({"method": self.method, "base_model": self.base_model, "parameters": self.parameters,
                            "models": [(m.model, m.parameters) for m in self.models], "dtype": self.dtype,
                            "out_dtype": self.out_dtype, "slices": slices}, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    def merged_models(self) -> list[str]:
        """The models merged into the base (the base itself excluded)."""
        return [m.model for m in self.models if m.model != self.base_model]

    def model_paths(self) -> list[str]:
        refs = list(dict.fromkeys([m.model for m in self.models] +
                                  [m.model for s in self.slices or [] for m in s.sources]))
        if self.base_model and self.base_model not in refs:
            refs = [self.base_model] + refs
        return refs

    def for_slice(self, i: int) -> "MergeConfig":
        """The configuration of slice ``i``: its sources as the models, slice parameters over globals."""
        sl = self.slices[i]
        return dataclasses.replace(self, models=sl.sources, parameters={**self.parameters, **sl.parameters},
                                   slices=None)

    def parameter(self, name: str, tensor: str, t: float, model: str | None = None, default: Any = None) -> Any:
        if model is not None:
            for m in self.models:
                if m.model == model and name in m.parameters:
                    v = evaluate_setting(tensor, m.parameters[name], t)
                    if v is not None:
                        return v
        if name in self.parameters:
            v = evaluate_setting(tensor, self.parameters[name], t)
            if v is not None:
                return v
        return default


def _line(node_map, key: str, default: int = 1) -> int:
    for k, v in node_map:
        if getattr(k, "value", None) == key:
            return k.start_mark.line + 1
    return default


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise MergeError(f"{p}: no such config file")
    return parse_config(p.read_text(), str(p))


def parse_config(text: str, source: str = "<text>") -> MergeConfig:
    """Parse and validate mergekit YAML text; errors name ``source:line``."""
    import yaml

    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError(f"{source}: unreadable YAML: {e}") from None
    if not isinstance(data, dict) or root is None:
        raise MergeError(f"{source}: expected a mapping at the top level")
    top = root.value
    where = lambda key: f"{source}:{_line(top, key)}"
    if "modules" in data:
        raise MergeError(f"{where('modules')}: 'modules' is not supported yet; use 'models'")
    method = data.get("merge_method")
    if method is None:
        raise MergeError(f"{source}: missing 'merge_method'")
    if method not in yaml_methods():
        hint = " (it does not work tensor by tensor: call it from Python)" if method in METHODS else ""
        raise MergeError(f"{where('merge_method')}: unknown merge_method {method!r}{hint}; known: "
                         f"{sorted(yaml_methods())}")
    allowed = method_parameters(method)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError(f"{where('parameters')}: 'parameters' must be a mapping")
    for k in params:
        if k not in allowed:
            raise MergeError(f"{where('parameters')}: {method} has no parameter {k!r} (it takes {sorted(allowed)})")
    if "slices" in data and "models" in data:
        raise MergeError(f"{where('slices')}: give either 'slices' or 'models', not both")
    slices = _parse_slices(data["slices"], _node(top, "slices"), source, method, allowed) if "slices" in data else None
    entries = [] if slices else _parse_models(data.get("models") or [], _node(top, "models"), source, where('models'),
                                              method, allowed, "models")
    entry = METHODS[method]
    required = {_YAML.get(n, n) for n in entry.required}
    for e in entries + [m for sl in slices or [] for m in sl.sources]:  # e.g. nuslerp's weight, slerp's t
        for r in sorted(required):
            if r not in e.parameters and r not in params and not (slices and any(r in sl.parameters for sl in slices)):
                raise MergeError(f"{source}:{e.line}: {method} needs {r!r} (for every model, or in the global "
                                 "parameters)")
    base = data.get("base_model")
    if entry.base == "required" and not base:
        raise MergeError(f"{source}: merge_method {method} needs a base_model")
    for sl in slices or []:
        if entry.base == "required" and str(base) not in [m.model for m in sl.sources]:
            raise MergeError(f"{source}:{sl.line}: base_model {base} must be one of this slice's sources")
        _check_count(entry, [m.model for m in sl.sources], str(base) if base else None, f"{source}:{sl.line}")
    if not slices:
        _check_count(entry, [m.model for m in entries], str(base) if base else None, where("models"))
    return MergeConfig(method, str(base) if base else None, entries, dict(params), data.get("dtype"),
                       data.get("out_dtype"), text, source, slices)


def _check_count(entry, models: list[str], base: str | None, where: str) -> None:
    """The method's model-count rule (its registry entry) against a config's model list."""
    n = len(models) if entry.base == "unused" else len([m for m in models if m != base])
    check_count(entry.name, entry.base, entry.count, n, where)


def _node(top, key):
    return next((v for k, v in top if getattr(k, "value", None) == key), None)


def _check_params(mp, source, line, method, allowed):
    if not isinstance(mp, dict):
        raise MergeError(f"{source}:{line}: 'parameters' must be a mapping")
    for k in mp:
        if k not in allowed:
            raise MergeError(f"{source}:{line}: {method} has no parameter {k!r} (it takes {sorted(allowed)})")
    if "density" in mp:
        d = mp["density"]
        vals = [d] if isinstance(d, (int, float)) else [x for x in d if isinstance(x, (int, float))] \
            if isinstance(d, list) else []
        if any(not 0 < float(v) <= 1 for v in vals):
            raise MergeError(f"{source}:{line}: density must be in (0, 1], got {d!r}")


def _parse_models(raw, node, source, where, method, allowed, what, ranged=False) -> list[ModelEntry]:
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{where}: '{what}' must be a non-empty list")
    entries = []
    for i, m in enumerate(raw):
        line = node.value[i].start_mark.line + 1 if node is not None and hasattr(node, "value") else 1
        if not isinstance(m, dict) or "model" not in m:
            raise MergeError(f"{source}:{line}: each entry of '{what}' needs a 'model' path")
        mp = m.get("parameters") or {}
        _check_params(mp, source, line, method, allowed)
        lr = None
        if ranged:
            lr = m.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(v, int) for v in lr)
                    or not 0 <= lr[0] < lr[1]):
                raise MergeError(f"{source}:{line}: layer_range must be [start, end) with 0 <= start < end, "
                                 f"got {lr!r}")
            lr = (lr[0], lr[1])
        entries.append(ModelEntry(str(m["model"]), dict(mp), line, lr))
    return entries


def _parse_slices(raw, node, source, method, allowed) -> list[SliceDef]:
    line0 = node.start_mark.line + 1 if node is not None else 1
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{source}:{line0}: 'slices' must be a non-empty list")
    out = []
    for i, sl in enumerate(raw):
        snode = node.value[i] if node is not None else None
        line = snode.start_mark.line + 1 if snode is not None else line0
        if not isinstance(sl, dict) or "sources" not in sl:
            raise MergeError(f"{source}:{line}: each slice needs 'sources'")
        src_node = _node(snode.value, "sources") if snode is not None else None
        sources = _parse_models(sl["sources"], src_node, source, f"{source}:{line}", method, allowed, "sources",
                                ranged=True)
        lengths = {m.layer_range[1] - m.layer_range[0] for m in sources}
        if len(lengths) != 1:
            raise MergeError(f"{source}:{line}: all sources of a slice need the same number of layers, got "
                             f"{[m.layer_range for m in sources]}")
        params = sl.get("parameters") or {}
        _check_params(params, source, line, method, allowed)
        out.append(SliceDef(sources, dict(params), line))
    return out
