"""The merge methods the YAML engine knows, with how each is called and which of its parameters are
per model. mergekit's methods keep mergekit's names; the others (marked ``extra``) are weightlab
extensions that work tensor by tensor and so stream as well.

Call conventions (``kind``):
``base``   fn(base, stacked_models, **kw)   most task-vector methods;
``pair``   fn(base, other, **kw)            exactly one model besides the base;
``nobase`` fn(stacked_models, **kw)         linear, karcher, passthrough (base counts as a model);
``opt``    fn(stacked_models, base=..., **kw) nuslerp / multislerp (base optional).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from pathlib import Path


@functools.cache
def _signature(module: str, name: str) -> tuple[str, ...]:
    """Keyword-only parameter names of ``module.name``, read from the source with :mod:`ast`, so
    validating a YAML config does not import JAX (tests check this against ``inspect.signature``)."""
    tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return tuple(a.arg for a in fn.args.kwonlyargs)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    where: str                 # "module:function" inside weightlab.merge (imported on first call)
    kind: str
    per_model: frozenset = frozenset()
    fixed: tuple = ()          # keyword arguments the streaming engine always passes
    extra: bool = False        # not a mergekit method
    magnitude: bool = False    # top-k magnitude trimming: cut-offs computed on the host when streaming

    @property
    def fn(self):
        module, name = self.where.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)

    @property
    def parameters_all(self) -> set[str]:
        return set(_signature(*self.where.split(":")))

    @property
    def parameters(self) -> set[str]:
        """Keyword parameter names, mergekit spelling (``lambda``)."""
        names = self.parameters_all - {"key", "base", "exclude", "threshold"}
        names -= {k for k, _ in self.fixed}
        return (names - {"lambda_"}) | {"lambda"} if "lambda_" in names else names


_GTA = frozenset({"weight", "density", "gamma", "epsilon"})
SPECS: dict[str, MethodSpec] = {
    "ties": MethodSpec("methods:ties", "base", _GTA, magnitude=True),
    **{n: MethodSpec(f"methods:{n}", "base", _GTA)
       for n in ("task_arithmetic", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                 "della_linear")},
    "sce": MethodSpec("methods:sce", "base"),
    "model_stock": MethodSpec("methods:model_stock", "base"),
    "linear": MethodSpec("methods:linear", "nobase", frozenset({"weight"})),
    "karcher": MethodSpec("methods:karcher", "nobase", frozenset({"weight"})),
    "passthrough": MethodSpec("methods:passthrough", "nobase"),
    "slerp": MethodSpec("methods:slerp", "pair"),
    "nearswap": MethodSpec("methods:nearswap", "pair"),
    "arcee_fusion": MethodSpec("masking:arcee_fusion", "pair"),
    "nuslerp": MethodSpec("spherical:nuslerp", "opt", frozenset({"weight"})),
    "multislerp": MethodSpec("spherical:multislerp", "opt", frozenset({"weight"})),
    "ram": MethodSpec("masking:ram", "base"),
    "ramplus_tl": MethodSpec("masking:ramplus_tl", "base"),
    # weightlab extensions (per tensor, so they stream; HF weights are (out, in))
    "magmax": MethodSpec("masking:magmax", "base", extra=True),
    "consensus": MethodSpec("masking:consensus", "base", extra=True),
    "tsv_m": MethodSpec("subspace:tsv_m", "base", frozenset({"weight"}), extra=True),
    "iso_c": MethodSpec("subspace:iso_c", "base", frozenset({"weight"}), extra=True),
    "iso_cts": MethodSpec("subspace:iso_cts", "base", frozenset({"weight"}), extra=True),
    "wudi": MethodSpec("subspace:wudi", "base", frozenset({"weight"}), fixed=(("input_axis", 1),), extra=True),
    "pcb": MethodSpec("masking:pcb", "base", frozenset({"weight"}), fixed=(("scope", "tensor"),), extra=True),
}
