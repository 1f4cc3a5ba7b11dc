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
slice's (as mergekit).

Stricter than mergekit, so a config never silently means something else: unknown keys anywhere are
errors (with a did-you-mean), keys mergekit knows that we do not support yet (``modules``;
``tokenizer_source: union`` and ``tokenizer.tokens`` (vocabulary remapping); named chat templates; a
slice's ``base_model``/``residual_weight``) are refused by name, duplicate keys are refused (:mod:`.yamlsafe`), every parameter value — each
gradient element and condition value included — must fit the method's schema (:mod:`.params`;
booleans must be YAML booleans), a parameter that is not per-model may not sit under a model, and
``base_model`` is refused for methods that do not use one (mergekit would average it in).

Output files (:mod:`.hfout`): ``tokenizer_source`` (or ``tokenizer: {source: ...}``) is ``base`` or a
model path whose tokenizer files are copied (default: the base model's, else the first model's);
``chat_template`` is a literal Jinja template written into ``tokenizer_config.json``.
Every problem is a :class:`MergeError` naming ``source:line``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import MergeError
from . import yamlsafe
from .params import problem, spec
from .registry import METHODS, check_count

__all__ = ["MergeConfig", "load_config", "parse_config", "evaluate_setting", "method_parameters", "DTYPES"]

# mergekit parameter name -> our keyword; "int8_mask" only changes mergekit's memory use.
_RENAME = {"lambda": "lambda_"}
_YAML = {v: k for k, v in _RENAME.items()}
_IGNORED = {"int8_mask"}

#: ``dtype`` / ``out_dtype`` spellings -> canonical numpy names.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}

_TOP = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "tokenizer", "chat_template")
_REMAP = "it needs vocabulary remapping of the embeddings, which weightlab does not do yet"
_TOP_LATER = {"modules": "use 'models' or 'slices'"}
_TOKENIZER_KEYS = ("source",)
_TOKENIZER_LATER = {"tokens": _REMAP, "pad_to_multiple_of": _REMAP}
_SLICE_LATER = {"base_model": "give base_model at the top level", "residual_weight": "no residual mixing yet"}


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
    line: int = 1  # where the models (or this slice) are listed: plan-time errors point here
    tokenizer_source: str | None = None  # "base" or a model path (None: the base / first model's files)
    chat_template: str | None = None     # a literal Jinja template for tokenizer_config.json

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
                                   slices=None, line=sl.line)

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


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise MergeError(f"{p}: no such config file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{p}: unreadable config file ({e})") from None
    return parse_config(text, str(p))


@dataclasses.dataclass
class _Ctx:
    """What validating one config needs: where errors point, the method and its parameters."""
    source: str
    method: str = ""
    allowed: frozenset = frozenset()
    per_model: frozenset = frozenset()

    def fail(self, node, msg: str):
        yamlsafe.fail(self.source, node, msg)


def parse_config(text: str, source: str = "<text>") -> MergeConfig:
    """Parse and validate mergekit YAML text; errors name ``source:line``."""
    root, data = yamlsafe.load(text, source)
    ctx = _Ctx(source)
    if not isinstance(data, dict):
        ctx.fail(root, "expected a mapping at the top level (merge_method, models, parameters ...)")
    yamlsafe.check_keys(source, data, root, _TOP, "the top level", _TOP_LATER)
    node = lambda key: yamlsafe.child(root, key)
    where = lambda key: f"{source}:{yamlsafe.key_line(root, key)}"
    method = data.get("merge_method")
    if method is None:
        ctx.fail(root, "missing 'merge_method'")
    if not isinstance(method, str) or method not in yaml_methods():
        known = isinstance(method, str) and method in METHODS
        hint = " (it does not work tensor by tensor: call it from Python)" if known else ""
        close = difflib.get_close_matches(str(method), yaml_methods(), n=1)
        hint += f" (did you mean {close[0]!r}?)" if close and not hint else ""
        raise MergeError(f"{where('merge_method')}: unknown merge_method {method!r}{hint}; known: "
                         f"{sorted(yaml_methods())}")
    entry = METHODS[method]
    ctx.method, ctx.allowed = method, frozenset(method_parameters(method))
    ctx.per_model = frozenset(_YAML.get(n, n) for n in entry.per_model if n in entry.parameters)
    params = _parse_params(ctx, data.get("parameters"), node("parameters"), "global")
    for key in ("dtype", "out_dtype"):
        v = data.get(key)
        if v is not None and (not isinstance(v, str) or v not in DTYPES):
            ctx.fail(node(key), f"{key} must be one of {', '.join(DTYPES)}, got {v!r}")
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        ctx.fail(node("base_model"), f"base_model must be a model path (a string), got {base!r}")
    if "slices" in data and "models" in data:
        raise MergeError(f"{where('slices')}: give either 'slices' or 'models', not both")
    if "slices" in data:
        slices = _parse_slices(ctx, data["slices"], node("slices"))
        entries, line = [], yamlsafe.key_line(root, "slices")
    else:
        if "models" not in data:
            ctx.fail(root, "missing 'models' (or 'slices'): the checkpoints to merge")
        slices, line = None, yamlsafe.key_line(root, "models")
        entries = _parse_models(ctx, data["models"], node("models"), "models", line, ranged=False)
    if entry.base == "required" and not base:
        ctx.fail(root, f"merge_method {method} needs a base_model")
    if entry.base == "unused" and base and base not in [m.model for m in entries] + \
            [m.model for sl in slices or [] for m in sl.sources]:
        raise MergeError(f"{where('base_model')}: {method} does not use a base_model (it merges the listed models "
                         "only; mergekit would average the base in): remove base_model or list it under models")
    for sl in slices or []:
        if entry.base == "required" and base not in [m.model for m in sl.sources]:
            raise MergeError(f"{source}:{sl.line}: base_model {base} must be one of this slice's sources")
        _check_count(entry, [m.model for m in sl.sources], base, f"{source}:{sl.line}")
    if not slices:
        _check_count(entry, [m.model for m in entries], base, f"{source}:{line}")
    _check_required(ctx, entry, params, entries, slices, base, root)
    tok, template = _parse_tokenizer(ctx, data, root, base)
    return MergeConfig(method, base, entries, params, data.get("dtype"), data.get("out_dtype"), text, source, slices,
                       line, tok, template)


def _parse_tokenizer(ctx, data: dict, root, base) -> tuple[str | None, str | None]:
    """``tokenizer_source`` / ``tokenizer: {source}`` and ``chat_template``, as mergekit spells them."""
    node = lambda key: yamlsafe.child(root, key)
    if "tokenizer_source" in data and "tokenizer" in data:
        ctx.fail(node("tokenizer"), "give either 'tokenizer_source' or 'tokenizer', not both")
    src, src_node = data.get("tokenizer_source"), node("tokenizer_source")
    if "tokenizer" in data:
        tok = data["tokenizer"]
        if not isinstance(tok, dict):
            ctx.fail(node("tokenizer"), f"'tokenizer' must be a mapping with 'source', got {tok!r}")
        yamlsafe.check_keys(ctx.source, tok, node("tokenizer"), _TOKENIZER_KEYS, "'tokenizer'", _TOKENIZER_LATER)
        src, src_node = tok.get("source"), yamlsafe.child(node("tokenizer"), "source")
    if src is not None:
        if not isinstance(src, str) or not src:
            ctx.fail(src_node, f"the tokenizer source must be 'base' or a model path, got {src!r}")
        if src == "union":
            ctx.fail(src_node, f"tokenizer source 'union' is not supported yet ({_REMAP}); use 'base' or a model path")
        if src == "base" and not base:
            ctx.fail(src_node, "tokenizer source 'base' needs a base_model")
        if src.startswith("model:"):
            src = src[len("model:"):]
    template = data.get("chat_template")
    if template is not None:
        if not isinstance(template, str) or "{" not in template:
            ctx.fail(node("chat_template"), f"chat_template must be a literal Jinja template (named templates such "
                     f"as {str(template)[:40]!r} are not supported yet)")
    return src, template


def _check_required(ctx, entry, params, entries, slices, base, root) -> None:
    """Parameters without a default (slerp's ``t``, nuslerp's ``weight``) must be given: for every
    merged model (per-model ones), in the global parameters or in every slice's."""
    for r in sorted(_YAML.get(n, n) for n in entry.required if n in entry.parameters):
        if r in params:
            continue
        groups = [(sl.parameters, sl.sources, sl.line) for sl in slices] if slices else [({}, entries, None)]
        for sp, models, sline in groups:
            if r in sp:
                continue
            if r in ctx.per_model:
                for m in models:
                    if m.model != base and r not in m.parameters:
                        raise MergeError(f"{ctx.source}:{m.line}: {ctx.method} needs {r!r} for every model (here, "
                                         "in the slice or in the global parameters)")
            else:
                raise MergeError(f"{ctx.source}:{sline or yamlsafe.line(root)}: {ctx.method} needs the parameter "
                                 f"{r!r} (in the global parameters{' or every slice' if slices else ''})")


def _check_count(entry, models: list[str], base: str | None, where: str) -> None:
    """The method's model-count rule (its registry entry) against a config's model list."""
    n = len(models) if entry.base == "unused" else len([m for m in models if m != base])
    check_count(entry.name, entry.base, entry.count, n, where)


def _parse_params(ctx: _Ctx, raw, node, scope: str) -> dict:
    """A ``parameters`` mapping: known names, per-model ones only under a model, every value checked."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ctx.fail(node, f"'parameters' must be a mapping (name: value), got {type(raw).__name__}")
    for k, v in raw.items():
        knode, vnode = yamlsafe.key_line(node, k), yamlsafe.child(node, k)
        if k not in ctx.allowed:
            close = difflib.get_close_matches(str(k), sorted(ctx.allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MergeError(f"{ctx.source}:{knode}: {ctx.method} has no parameter {k!r}{hint} (it takes "
                             f"{sorted(ctx.allowed)})")
        if scope == "model" and k not in ctx.per_model:
            raise MergeError(f"{ctx.source}:{knode}: {ctx.method}'s {k!r} is not a per-model parameter: give it in the "
                             "top-level (or slice) parameters")
        _check_setting(ctx, k, v, vnode if vnode is not None else node)
    return dict(raw)


def _check_setting(ctx: _Ctx, name: str, value, node, in_condition: bool = False) -> None:
    """One parameter setting (mergekit's forms): every value in it must fit the schema."""
    arg = _RENAME.get(name, name)
    p = spec(ctx.method, arg)
    what = f"{ctx.method} parameter {name!r}"
    forms = "a value, a gradient (list of numbers) or a list of {filter, value} conditions"
    if value is None:
        ctx.fail(node, f"{what} has no value")
    if isinstance(value, dict):
        ctx.fail(node, f"{what} must be {forms}, got a mapping")
    if not isinstance(value, list):
        bad = problem(ctx.method, arg, value, yaml=True)
        if bad:
            ctx.fail(node, f"{what} {bad}")
        return
    if not value:
        ctx.fail(node, f"{what} is an empty list")
    if all(isinstance(e, dict) for e in value) and not in_condition:
        for i, cond in enumerate(value):
            cnode = yamlsafe.item(node, i)
            yamlsafe.check_keys(ctx.source, cond, cnode, ("filter", "value"), f"a condition of {name!r}")
            if "value" not in cond:
                ctx.fail(cnode, f"a condition of {name!r} needs a 'value'")
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                ctx.fail(yamlsafe.child(cnode, "filter"), f"a filter must be a string (a part of tensor names), got {f!r}")
            _check_setting(ctx, name, cond["value"], yamlsafe.child(cnode, "value") or cnode, in_condition=True)
        return
    for i, e in enumerate(value):
        enode = yamlsafe.item(node, i)
        if isinstance(e, (dict, list)) or e is None:
            ctx.fail(enode, f"{what} must be {forms}" + (" (a condition's value is a value or a gradient)"
                                                         if in_condition else "") + f", got the element {e!r}")
        bad = problem(ctx.method, arg, e, yaml=True)
        if bad:
            ctx.fail(enode, f"{what} {bad}")
    if len(value) > 1 and p is not None and p.kind != "float":
        ctx.fail(node, f"{what} must be {p.describe()}: a gradient (a list of values) only works for numbers")


def _parse_models(ctx: _Ctx, raw, node, what: str, line: int, ranged: bool) -> list[ModelEntry]:
    if not isinstance(raw, list) or not raw:
        raise MergeError(f"{ctx.source}:{yamlsafe.line(node, line)}: '{what}' must be a non-empty list")
    keys = ("model", "layer_range", "parameters") if ranged else ("model", "parameters")
    entries = []
    for i, m in enumerate(raw):
        mnode = yamlsafe.item(node, i)
        if not isinstance(m, dict):
            ctx.fail(mnode, f"each entry of '{what}' must be a mapping with a 'model' path, got {m!r}")
        yamlsafe.check_keys(ctx.source, m, mnode, keys, f"an entry of '{what}'")
        if "model" not in m:
            ctx.fail(mnode, f"each entry of '{what}' needs a 'model' path")
        ref = m["model"]
        if not isinstance(ref, str) or not ref:
            ctx.fail(yamlsafe.child(mnode, "model") or mnode, f"'model' must be a path (a string), got {ref!r}")
        mp = _parse_params(ctx, m.get("parameters"), yamlsafe.child(mnode, "parameters") or mnode, "model")
        lr = None
        if ranged:
            lr = m.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(type(v) is int for v in lr)
                    or not 0 <= lr[0] < lr[1]):
                ctx.fail(yamlsafe.child(mnode, "layer_range") or mnode,
                         f"layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
            lr = (lr[0], lr[1])
        twin = next((e for e in entries if e.model == ref), None)
        if twin is not None:  # parameters are looked up by model path: the second entry's would be ignored
            ctx.fail(mnode, f"model {ref!r} is listed twice in '{what}' (first at line {twin.line})")
        entries.append(ModelEntry(ref, mp, yamlsafe.line(mnode), lr))
    return entries


def _parse_slices(ctx: _Ctx, raw, node) -> list[SliceDef]:
    if not isinstance(raw, list) or not raw:
        ctx.fail(node, "'slices' must be a non-empty list")
    out = []
    for i, sl in enumerate(raw):
        snode = yamlsafe.item(node, i)
        if not isinstance(sl, dict):
            ctx.fail(snode, f"each slice must be a mapping with 'sources', got {sl!r}")
        yamlsafe.check_keys(ctx.source, sl, snode, ("sources", "parameters"), "a slice", _SLICE_LATER)
        if "sources" not in sl:
            ctx.fail(snode, "each slice needs 'sources'")
        line = yamlsafe.line(snode)
        sources = _parse_models(ctx, sl["sources"], yamlsafe.child(snode, "sources"), "sources", line, ranged=True)
        lengths = {m.layer_range[1] - m.layer_range[0] for m in sources}
        if len(lengths) != 1:
            ctx.fail(snode, f"all sources of a slice need the same number of layers, got "
                            f"{[list(m.layer_range) for m in sources]}")
        params = _parse_params(ctx, sl.get("parameters"), yamlsafe.child(snode, "parameters") or snode, "slice")
        out.append(SliceDef(sources, params, line))
    return out
