"""mergekit-compatible YAML merge configurations.

Supported: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, global
``parameters``, ``dtype``/``out_dtype``. Parameter values follow mergekit's rules: a number, a
*gradient* (a list of numbers interpolated linearly over the layer position ``t = i / (L - 1)``;
tensors outside the layer stack use ``t = 0``), or a list of ``{filter, value}`` conditions where the
first whose ``filter`` is a substring of the tensor name (or absent / ``"*"``) wins. Lookup order:
the model's own parameters, then the global ``parameters``, then the method's default.

``slices`` (layer stacking for passthrough/frankenmerges) are recognised and refused with a clear
error for now. Every problem is reported as a :class:`MergeError` naming the config line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import MergeError
from .registry import SPECS

__all__ = ["MergeConfig", "load_config", "parse_config", "evaluate_setting", "method_parameters"]

# mergekit parameter name -> our keyword; "int8_mask" only changes mergekit's memory use.
_RENAME = {"lambda": "lambda_"}
_IGNORED = {"int8_mask"}


def method_parameters(method: str) -> set[str]:
    """Parameter names (mergekit spelling) a method accepts."""
    if method not in SPECS:
        raise MergeError(f"unknown merge_method {method!r}; known: {sorted(SPECS)}")
    return SPECS[method].parameters | _IGNORED


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

    @property
    def recipe_hash(self) -> str:
        canon = json.dumps({"method": self.method, "base_model": self.base_model, "parameters": self.parameters,
                            "models": [(m.model, m.parameters) for m in self.models], "dtype": self.dtype,
                            "out_dtype": self.out_dtype}, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    def model_paths(self) -> list[str]:
        refs = [m.model for m in self.models]
        if self.base_model and self.base_model not in refs:
            refs = [self.base_model] + refs
        return refs

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
    if "slices" in data:
        raise MergeError(f"{where('slices')}: 'slices' (layer stacking) is not supported yet; use 'models'")
    if "modules" in data:
        raise MergeError(f"{where('modules')}: 'modules' is not supported yet; use 'models'")
    method = data.get("merge_method")
    if method is None:
        raise MergeError(f"{source}: missing 'merge_method'")
    if method not in SPECS:
        raise MergeError(f"{where('merge_method')}: unknown merge_method {method!r}; known: {sorted(SPECS)}")
    allowed = method_parameters(method)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError(f"{where('parameters')}: 'parameters' must be a mapping")
    for k in params:
        if k not in allowed:
            raise MergeError(f"{where('parameters')}: {method} has no parameter {k!r} (it takes {sorted(allowed)})")
    entries = []
    raw_models = data.get("models") or []
    models_node = next((v for k, v in top if getattr(k, "value", None) == "models"), None)
    if not isinstance(raw_models, list) or not raw_models:
        raise MergeError(f"{where('models')}: 'models' must be a non-empty list")
    for i, m in enumerate(raw_models):
        line = models_node.value[i].start_mark.line + 1 if models_node is not None else 1
        if not isinstance(m, dict) or "model" not in m:
            raise MergeError(f"{source}:{line}: each entry of 'models' needs a 'model' path")
        mp = m.get("parameters") or {}
        for k in mp:
            if k not in allowed:
                raise MergeError(f"{source}:{line}: {method} has no parameter {k!r} (it takes {sorted(allowed)})")
        if "density" in mp:
            d = mp["density"]
            vals = [d] if isinstance(d, (int, float)) else [x for x in d if isinstance(x, (int, float))] \
                if isinstance(d, list) else []
            if any(not 0 < float(v) <= 1 for v in vals):
                raise MergeError(f"{source}:{line}: density must be in (0, 1], got {d!r}")
        entries.append(ModelEntry(str(m["model"]), dict(mp), line))
    if method == "nuslerp":  # mergekit requires a weight per model
        for e in entries:
            if "weight" not in e.parameters and "weight" not in params:
                raise MergeError(f"{source}:{e.line}: nuslerp needs a 'weight' for every model")
    base = data.get("base_model")
    needs_base = SPECS[method].kind in ("base", "pair")
    if needs_base and not base:
        raise MergeError(f"{source}: merge_method {method} needs a base_model")
    return MergeConfig(method, str(base) if base else None, entries, dict(params), data.get("dtype"),
                       data.get("out_dtype"), text, source)
