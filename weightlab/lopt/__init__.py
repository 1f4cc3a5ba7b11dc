"""weightlab.lopt: learned optimizers as plain optax transforms, their meta-training, and the
optimizer variants of the seed papers.

>>> opt = lopt.pretrained("small_fc_mnist1d")          # an optax.GradientTransformationExtraArgs
>>> state = opt.init(params)
>>> updates, state = opt.update(grads, state, params)  # loss= optional (hyper uses it)
>>> opt = optax.chain(optax.clip_by_global_norm(1.0), lopt.small_fc(meta, learning_rate=schedule))
>>> res = lopt.meta.train(lopt.small_fc, lopt.tasks.family("mnist1d_mlp"), lopt.meta.pes(...), ...)

Learned optimizers (:mod:`.perparam`: :func:`small_fc`, :func:`mulo`; :mod:`.hierarchical`:
:func:`hyper`) and hand-designed variants (:mod:`.variants`: cautious, cautious weight decay, TAM,
AdamP/SGDP, Grams, Switch EMA) are registered in :data:`METHODS`; :func:`optimizer` builds one by
name and :func:`transform` makes it a :class:`~weightlab.WeightTransform`. :mod:`.meta` meta-trains
(ES, PES, truncated backprop: :mod:`.estimators`) on task families (:mod:`.tasks`);
:func:`pretrained` loads the meta-weights shipped in the package (:mod:`.shipped`).
"""

from .. import _lazy

_WHERE = {
    **{n: "perparam" for n in ("small_fc", "mulo", "init_meta", "SmallFCState", "mup_multipliers")},
    **{n: "hierarchical" for n in ("hyper", "init_hyper_meta")},
    **{n: "variants" for n in ("cautious", "cautious_adamw", "cautious_weight_decay", "adamw_cwd", "tam", "adatam", "adamp",
                               "sgdp", "grams", "switch_ema")},
    **{n: "shipped" for n in ("pretrained", "available", "save_meta", "load_meta")},
    **{n: "registry" for n in ("METHODS", "lopt_method", "optimizer", "transform")},
}
_SUBMODULES = {"registry", "perparam", "hierarchical", "variants", "shipped", "meta", "estimators", "tasks", "cli"}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = _lazy.namespace(__name__, globals(), _WHERE, _SUBMODULES)
