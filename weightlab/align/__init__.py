"""weightlab.align: permutation alignment (the Git Re-Basin family) as a pillar.

>>> spec = align.infer_spec(apply_fn, params_a, batch)          # symmetries read off the jaxpr
>>> align.check_spec(spec, apply_fn, params_a, batch)            # permuted params, same outputs
>>> perms = align.weight_matching(spec, params_a, params_b)     # or activation/sinkhorn/ste matching
>>> params_b2 = align.permute(spec, perms, params_b)
>>> curve = align.loss_barrier(loss_fn, params_a, params_b2)   # and align.repair(...) the midpoint

A :class:`Spec` labels every axis of every leaf with permutation groups (:mod:`.spec`), nested for
the dims inside attention heads; :func:`infer_spec` derives it from the traced program with no
names or per-architecture code (:mod:`.infer`); :func:`check_spec` verifies any spec. Matchers are
registered in :data:`METHODS` (:mod:`.registry`): :func:`weight_matching` (head-aware, restarts),
:func:`activation_matching`, :func:`sinkhorn_matching`, :func:`ste_matching`; each is also
``align.transform(name)``, a :class:`~weightlab.WeightTransform` taking ``reference=``. Around them:
:func:`merge_many` (three or more models, cycle-consistent), :func:`zip_models` (ZipIt-style
merging within and across models), :func:`repair` (REPAIR),
:func:`interpolate` / :func:`loss_barrier`, :func:`align_and_merge`, the LAP solvers (:mod:`.lap`).
"""

from .. import _lazy

_WHERE = {
    **{n: "spec" for n in ("Group", "Spec", "make_spec", "permute", "random_perms", "identity_perms", "invert",
                           "compose", "check_perms")},
    **{n: "infer" for n in ("infer_spec", "analyse")},
    **{n: "check" for n in ("check_spec",)},
    **{n: "matching" for n in ("Perms", "weight_matching", "objective")},
    **{n: "activation" for n in ("activation_matching", "correlations")},
    **{n: "soft" for n in ("sinkhorn", "soft_permute", "sinkhorn_matching", "ste_matching")},
    **{n: "many" for n in ("merge_many", "MergeManyResult")},
    **{n: "zip" for n in ("zip_models", "zip_pairs")},
    **{n: "renorm" for n in ("repair", "repair_stats", "RepairInfo")},
    **{n: "barrier" for n in ("interpolate", "loss_barrier", "Barrier")},
    **{n: "registry" for n in ("METHODS", "transform", "align_method", "AlignState")},
    **{n: "api" for n in ("align", "align_and_merge")},
}
_SUBMODULES = {"spec", "infer", "check", "matching", "activation", "soft", "many", "renorm", "barrier", "registry",
               "api", "lap", "cli", "zip", "atoms"}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = _lazy.namespace(__name__, globals(), _WHERE, _SUBMODULES)
