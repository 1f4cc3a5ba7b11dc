"""Permutation specs inferred from the program: trace ``apply_fn`` to a jaxpr, label axes, unify.

Every axis of every value in the traced program is a sequence of *atoms* (union-find nodes with a
size). Each primitive says which axes must be permuted alike: ``dot_general`` ties contracted and
batch axes of its operands; elementwise ops tie every axis of their operands and output;
``reshape`` regroups atoms (splitting one where a new axis boundary falls inside it — how a
``(B, T, H*D)`` projection becomes ``(B, T, H, D)`` heads); ``conv_general_dilated`` ties input and
kernel features, splitting them into (groups, features per group) for grouped and depthwise
convolutions; ``gather`` carries an embedding table's feature axis to its output. Reductions
leave their axes free (a sum does not care about order). Axes that meet the data, constants,
``iota`` (positions, RoPE tables), slices, padding, concatenation, sorting or cumulative ops are
*pinned*; so are the outputs, which must not change. What remains unpinned on the parameters is
a permutation symmetry of the function.

A group whose atoms, in every value of the program, appear together with another group's atoms
(and, in every parameter, as a more-minor factor of the same axis) is *nested* under it: it may
be permuted independently per position of its parent — the dimensions inside each attention head
(under GQA: query heads inside each key/value group).

The precedent is PLeaS (Nasery et al., 2024), which groups axes by union-find over torch.fx
handlers and gives up on the whole model at the first op it has no handler for. Here an unknown
primitive pins only the axes it touches; :attr:`Spec.report` names it and the leaves it left fixed.
No names or per-architecture code are involved: the same pass handles MLPs, ResNets, GQA + RoPE
transformers and BERT. Control flow (``scan``, ``while``, ``cond``) pins what passes through it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from .. import tree as wtree
from ..errors import SpecError
from .atoms import _UF, _Conflict
from .spec import Group, Spec, _merge_ints, validate

__all__ = ["infer_spec", "analyse", "Analysis"]

_ELEMENTWISE = set("""add sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh
logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt cbrt integer_pow square abs erf erfc
erf_inv lgamma digamma igamma convert_element_type select_n clamp eq ne lt le gt ge and or not xor copy copy_p
reduce_precision stop_gradient nextafter real imag conj population_count shift_left shift_right_logical
shift_right_arithmetic optimization_barrier sharding_constraint mesh_cast""".split())
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat2"}


def _sub_jaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        if j is not None:
            return (j.jaxpr, j.consts) if hasattr(j, "jaxpr") else (j, ())
    return None


class _Tracer:
    def __init__(self):
        self.uf = _UF()
        self.values: list[list[list[int]]] = []  # every value's axes, for the nesting analysis
        self.unknown: dict[str, int] = collections.Counter()
        self.param_ids: dict[int, int] = {}  # id(axes of a parameter) -> its index
        self.derived: dict[int, tuple] = {}  # id(axes) -> (param index, param axis of each axis): a param
        # seen through transposes and dtype casts
        self.consumed: set = set()  # (param index, param axis) contracted with activations (a layer's inputs)
        self.mixed: list = []  # (contracted axes, free axes) of each dot_general: no nesting across them
        self.first_use: list[int] = []
        self.sites: list[tuple] = []  # (eqn, operand, axis, atoms): activations contracted by a matmul/conv

    def fresh(self, shape, pinned=False, reason=None):
        v = [[self.uf.new(s, pinned, reason)] if s > 1 else [] for s in shape]
        self.values.append(v)
        return v

    def record(self, v):
        self.values.append(v)
        return v

    def pin_all(self, vals, reason):
        for v in vals:
            for ax in v:
                self.uf.pin(ax, reason)

    def run(self, jaxpr, consts, args):
        env = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                shape = np.shape(v.val)
                return self.fresh(shape, pinned=bool(shape), reason="constant")
            return env[v]

        for v in jaxpr.constvars:
            env[v] = self.fresh(v.aval.shape, pinned=True, reason="constant")
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            for x in ins:
                i = self.param_ids.get(id(x))
                if i is not None and i not in self.first_use:
                    self.first_use.append(i)
            shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
            try:
                outs = self.eqn(eqn, ins, shapes)
            except _Conflict:
                outs = None
            if outs is None:  # cannot follow: pin what goes in and comes out
                name = eqn.primitive.name
                reason = f"unsupported:{name}"
                self.pin_all(ins, reason)
                outs = [self.fresh(s, pinned=True, reason=reason) for s in shapes]
                if name not in {"iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap",
                                "random_unwrap", "threefry2x32", "argmax", "argmin"}:
                    self.unknown[name] += 1
            src = self.derived.get(id(ins[0])) if ins else None
            if src is not None and len(outs) == 1:
                if eqn.primitive.name == "transpose":
                    self.derived[id(outs[0])] = (src[0], tuple(src[1][i] for i in eqn.params["permutation"]))
                elif eqn.primitive.name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
                    self.derived[id(outs[0])] = src
            for v, o in zip(eqn.outvars, outs):
                env[v] = self.record(o)
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, shapes):
        """Output axes of one equation, or None (pinned) when it cannot be followed."""
        uf, name, p = self.uf, eqn.primitive.name, eqn.params
        if name in _CALLS:
            sub = _sub_jaxpr(eqn)
            if sub is None:
                return None
            n_in = len(sub[0].invars)
            return self.run(sub[0], sub[1], ins[len(ins) - n_in:])
        if name in _ELEMENTWISE:  # equal shapes, or size-1 axes broadcast (scalars too)
            shape = shapes[0]
            out: list = [None] * len(shape)
            for v, x in zip(eqn.invars, ins):
                vs = tuple(getattr(v.aval, "shape", ()))
                if len(vs) != len(shape):
                    continue
                for i, s in enumerate(shape):
                    if vs[i] == s and s > 1:
                        if out[i] is None:
                            out[i] = x[i]
                        else:
                            uf.unify(out[i], x[i])
            out = [o if o is not None else ([uf.new(s)] if s > 1 else []) for o, s in zip(out, shape)]
            return [out for _ in shapes]
        if name == "broadcast_in_dim":
            (x,), shape = ins[:1], shapes[0]
            out = [[uf.new(s)] if s > 1 else [] for s in shape]
            for i, d in enumerate(p["broadcast_dimensions"]):
                if eqn.invars[0].aval.shape[i] == shape[d]:
                    out[d] = x[i]
            return [out]
        if name == "reshape":
            if p.get("dimensions") is not None:
                return None
            return [uf.regroup([a for ax in ins[0] for a in ax], shapes[0])]
        if name == "transpose":
            return [[ins[0][i] for i in p["permutation"]]]
        if name == "squeeze":
            drop = {d % len(ins[0]) for d in p["dimensions"]}
            return [[ax for i, ax in enumerate(ins[0]) if i not in drop]]
        if name in _REDUCE:
            axes = set(p["axes"])
            return [[ax for i, ax in enumerate(ins[0]) if i not in axes]]
        if name in ("argmax", "argmin"):
            axes = set(p["axes"])
            for i in axes:
                uf.pin(ins[0][i], name)
            return [[ax for i, ax in enumerate(ins[0]) if i not in axes]]
        if name in _CUMULATIVE:
            uf.pin(ins[0][p["axis"]], name)
            return [ins[0]]
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            x, y = ins
            for k, (v, axes) in enumerate(((x, lc), (y, rc))):
                if id(v) not in self.param_ids and len(axes) == 1:
                    self.sites.append((eqn, k, axes[0], v[axes[0]]))
                src = self.derived.get(id(v))
                other = y if k == 0 else x
                if src is not None and id(other) not in self.derived:
                    self.consumed.update((src[0], src[1][a]) for a in axes)
            for i, j in list(zip(lc, rc)) + list(zip(lb, rb)):
                uf.unify(x[i], y[j])
            free_x = [x[i] for i in range(len(x)) if i not in lc and i not in lb]
            free_y = [y[i] for i in range(len(y)) if i not in rc and i not in rb]
            # a unit contracted while another group indexes an operand freely cannot be permuted per
            # position of that group (per-head dims only cancel when the heads are batch or contracted)
            self.mixed.append(([x[i] for i in lc], free_x + free_y))
            return [[x[i] for i in lb] + free_x + free_y]
        if name in ("slice", "pad", "dynamic_slice"):
            x, shape = ins[0], shapes[0]
            in_shape = eqn.invars[0].aval.shape
            if name == "slice":
                strides = p.get("strides") or (1,) * len(shape)
                whole = [p["start_indices"][i] == 0 and p["limit_indices"][i] == in_shape[i] and strides[i] == 1
                         for i in range(len(shape))]
            elif name == "pad":
                whole = [tuple(c) == (0, 0, 0) for c in p["padding_config"]]
            else:
                whole = [s == in_shape[i] for i, s in enumerate(p["slice_sizes"])]
            return [self._keep_or_pin(x, shape, whole, name)]
        if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "cumsum_window"):
            shape = shapes[0]  # pooling: channels (window 1, stride 1, no padding) pass through
            whole = [p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1 and tuple(p["padding"][i]) == (0, 0)
                     and p.get("base_dilation", (1,) * len(shape))[i] == 1 for i in range(len(shape))]
            return [self._keep_or_pin(ins[0], shape, whole, name)]
        if name == "concatenate":
            d, shape = p["dimension"], shapes[0]
            out = self._tie_except(ins, d, name)
            out[d] = [uf.new(shape[d], True, name)] if shape[d] > 1 else []
            return [out]
        if name == "split":
            ax = p["axis"]
            uf.pin(ins[0][ax], name)
            return [[ins[0][i] if i != ax else ([uf.new(s[ax], True, name)] if s[ax] > 1 else [])
                     for i in range(len(s))] for s in shapes]
        if name == "gather":
            return [self.gather(eqn, ins, shapes[0])]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins, shapes[0])]
        if name == "sort":
            out = self._tie_except(ins, p["dimension"], name)
            return [out for _ in shapes]
        return None

    def _tie_except(self, ins, d: int, name: str) -> list:
        """Axes of operands laid side by side along ``d`` (concatenate, sort): every other axis tied
        across them, axis ``d`` pinned (the output axis ``d`` is left as the first operand's)."""
        out = [list(a) for a in ins[0]]
        for x in ins:
            self.uf.pin(x[d], name)
            for i in range(len(out)):
                if i != d:
                    self.uf.unify(out[i], x[i])
        return out

    def _keep_or_pin(self, x, shape, whole, name: str) -> list:
        """Axes kept whole pass through (slice, pad, pooling windows of 1); the others are pinned."""
        out = []
        for i, n in enumerate(shape):
            if whole[i]:
                out.append(x[i])
            else:
                self.uf.pin(x[i], name)
                out.append([self.uf.new(n, True, name)] if n > 1 else [])
        return out

    def gather(self, eqn, ins, shape):
        uf, p = self.uf, eqn.params
        dn = p["dimension_numbers"]
        x, idx = ins
        in_shape = eqn.invars[0].aval.shape
        indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        if getattr(dn, "operand_batching_dims", ()):
            return None
        out: list = [None] * len(shape)
        offset_src = [i for i in range(len(x)) if i not in dn.collapsed_slice_dims]
        for i in indexed:
            uf.pin(x[i], "gather")
        for od, i in zip(dn.offset_dims, offset_src):
            if i in indexed or p["slice_sizes"][i] != in_shape[i]:
                uf.pin(x[i], "gather")
                out[od] = [uf.new(shape[od], True, "gather")] if shape[od] > 1 else []
            else:
                out[od] = x[i]
        uf.pin(idx[-1], "gather")  # the index-vector axis: which coordinate each entry is
        batch = [d for d in range(len(shape)) if d not in dn.offset_dims]
        for d, ax in zip(batch, idx[:-1]):
            out[d] = ax
        return [o if o is not None else ([uf.new(shape[d], True, "gather")] if shape[d] > 1 else [])
                for d, o in enumerate(out)]

    def conv(self, eqn, ins, shape):
        uf, p = self.uf, eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        x, w = ins
        if p.get("batch_group_count", 1) != 1:
            return None
        g = int(p.get("feature_group_count", 1))
        if g == 1 and id(x) not in self.param_ids:
            self.sites.append((eqn, 0, lhs_spec[1], x[lhs_spec[1]]))
        src = self.derived.get(id(w))
        if src is not None and id(x) not in self.derived:
            self.consumed.add((src[0], src[1][rhs_spec[1]]))
        cin = eqn.invars[0].aval.shape[lhs_spec[1]]
        cout = eqn.invars[1].aval.shape[rhs_spec[0]]
        xg, xc = uf.regroup(x[lhs_spec[1]], [g, cin // g])
        wo_g, wo_c = uf.regroup(w[rhs_spec[0]], [g, cout // g])
        uf.unify(xc, w[rhs_spec[1]])
        uf.unify(xg, wo_g)
        out: list = [None] * len(shape)
        out[out_spec[0]] = x[lhs_spec[0]]
        out[out_spec[1]] = wo_g + wo_c
        for d in lhs_spec[2:]:
            uf.pin(x[d], "conv spatial")
        for d in rhs_spec[2:]:
            uf.pin(w[d], "conv spatial")
        for d in out_spec[2:]:
            out[d] = [uf.new(shape[d], True, "conv spatial")] if shape[d] > 1 else []
        return out


def _abstract(x):
    if wtree.is_atomic(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # never copies an array to the host
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


class Analysis(NamedTuple):
    """What :func:`analyse` learned: the traced program, the spec, per group the matmul/conv
    operands (``(eqn, operand index, axis)``) whose contracted axis is exactly that group's units —
    where activation matching reads the units' activations — and which parameter axes are layer
    inputs (contracted with activations; every other labelled axis produces units)."""

    closed: Any
    spec: Spec
    sites: dict
    treedef: Any
    batch_def: Any
    consumed: frozenset = frozenset()  # (path, axis) of parameters contracted with activations (layer inputs)


def infer_spec(apply_fn: Callable, params: Any, batch: Any) -> Spec:
    """The permutation symmetries of ``apply_fn`` in ``params``, read off its jaxpr.

    ``apply_fn(params, batch)`` is traced once on abstract values (nothing is computed; QArray
    leaves are traced as float arrays of their shape). Returns a :class:`Spec` whose groups are
    named after the first leaf axis they move (``dense_0/kernel:1``; ``.k`` for the k-th factor of
    a factored axis); :meth:`Spec.summary` lists them. Every axis the function's outputs depend on
    in an order-sensitive way is left fixed; :attr:`Spec.report` names any primitive that could not
    be followed and the leaves it left fixed (the rest of the spec stands). Verify with
    :func:`check_spec`; fix the residual stream with ``spec.pin(spec.group_of("embed/kernel", 1))``.
    """
    return analyse(apply_fn, params, batch).spec


def analyse(apply_fn: Callable, params: Any, batch: Any) -> Analysis:
    """:func:`infer_spec`, keeping the traced program and the activation sites of each group."""
    pairs, treedef = wtree.flatten_with_paths(params, is_leaf=wtree.is_atomic)
    if not pairs:
        raise SpecError("infer_spec: params have no leaves")
    paths = [p for p, _ in pairs]
    abstract = [_abstract(x) for _, x in pairs]
    b_leaves, b_def = jax.tree.flatten(batch)
    b_abs = [_abstract(b) for b in b_leaves]
    closed = jax.make_jaxpr(lambda ls, bs: apply_fn(treedef.unflatten(ls), b_def.unflatten(bs)))(abstract, b_abs)
    tr = _Tracer()
    uf = tr.uf
    param_axes = [tr.fresh(a.shape) for a in abstract]
    tr.param_ids = {id(ax): i for i, ax in enumerate(param_axes)}
    tr.derived = {id(ax): (i, tuple(range(len(ax)))) for i, ax in enumerate(param_axes)}
    inputs = [tr.fresh(b.shape, pinned=True, reason="input") for b in b_abs]
    outs = tr.run(closed.jaxpr, closed.consts, param_axes + inputs)
    tr.pin_all(outs, "output")
    unused = [i for i in range(len(paths)) if i not in tr.first_use]
    tr.pin_all([param_axes[i] for i in unused], "unused")
    spec, names = _build(tr, paths, [a.shape for a in abstract], param_axes)
    if unused:
        note = ("unused", "leaves the function never reads (e.g. a pooler whose output is not returned) are fixed",
                tuple(paths[i] for i in unused))
        spec = dataclasses.replace(spec, report=spec.report + (note,))
    sites: dict = collections.defaultdict(list)
    for eqn, k, axis, atoms in tr.sites:
        ex = uf.expand(atoms)
        if len(ex) == 1 and ex[0] in names and not uf.is_pinned(ex[0]) and spec.groups[names[ex[0]]].parent is None:
            sites[names[ex[0]]].append((eqn, k, axis))
    consumed = frozenset((paths[i], a) for i, a in tr.consumed)
    return Analysis(closed, spec, dict(sites), treedef, b_def, consumed)


def _build(tr: _Tracer, paths, shapes, param_axes) -> Spec:
    uf = tr.uf
    for axes in param_axes:  # one group on two factors of one axis: no permutation of it is a symmetry
        for ax in axes:
            ex = uf.expand(ax)
            for a in {a for a in ex if ex.count(a) > 1}:
                uf.pin([a], "repeated factor")
    leaf_atoms = [[uf.expand(ax) for ax in axes] for axes in param_axes]
    free = lambda a: not uf.is_pinned(a)  # noqa: E731
    never: set = set()  # (A, B): B may not nest under A
    for contracted, loose in tr.mixed:
        cs = {b for ax in contracted for b in uf.expand(ax)}
        fs = {a for ax in loose for a in uf.expand(ax)}
        never |= {(a, b) for a in fs for b in cs}
    # nesting: B under A when A is present in every value holding B, and a more-major factor of
    # the same axis in every parameter axis holding B
    present: dict[int, set] = {}
    for v in tr.values:
        per_axis = [uf.expand(ax) for ax in v]
        atoms = {a for ax in per_axis for a in ax}
        for a in atoms:
            present[a] = present[a] & atoms if a in present else set(atoms)
        seen: collections.Counter = collections.Counter(a for ax in per_axis for a in set(ax))
        never |= {(a, b) for a, k in seen.items() if k > 1 for b in atoms if b != a}  # A copied onto two axes
    cand: dict[int, list] = {}
    for axes in leaf_atoms:
        for ax in axes:
            for k, b in enumerate(ax):
                if not free(b):
                    continue
                major = [a for a in ax[:k] if free(a) and a in present.get(b, set()) and (a, b) not in never]
                cand[b] = [a for a in cand[b] if a in major] if b in cand else major
    parent: dict[int, int] = {}
    for b, cs in cand.items():
        tops = [a for a in cs if not cand.get(a)]
        if tops:
            parent[b] = tops[0]
    # names after the first leaf axis that moves them, leaves in the order the program uses them
    names: dict[int, str] = {}
    order = tr.first_use + [i for i in range(len(paths)) if i not in tr.first_use]
    for p, axes in ((paths[j], leaf_atoms[j]) for j in order):
        for i, ax in reversed(list(enumerate(axes))):
            moving = [a for a in ax if free(a)]
            for k, a in enumerate(moving):
                if a not in names:
                    names[a] = f"{p}:{i}" + (f".{k}" if len(moving) > 1 else "")
    children = collections.Counter(parent.values())
    groups = {}
    for a, n in sorted(names.items(), key=lambda t: t[1]):
        kind = "heads" if a in children else ("within heads" if a in parent else "units")
        groups[n] = Group(n, uf.size[a], names[parent[a]] if a in parent else None, kind)
    axes = {}
    for p, la in zip(paths, leaf_atoms):
        fs = [_merge_ints(tuple(names[a] if free(a) else uf.size[a] for a in ax)) for ax in la]
        axes[p] = tuple(f if any(isinstance(x, str) for x in f) else () for f in fs)
    report = []
    for prim, count in sorted(tr.unknown.items()):
        hit = sorted({p for p, la in zip(paths, leaf_atoms) for ax in la for a in ax
                      if f"unsupported:{prim}" in uf.why(a)})
        report.append((prim, f"{count} equation(s) of '{prim}' could not be followed; the axes they touch are fixed",
                       tuple(hit)))
    spec = Spec(axes, groups, tuple(report))
    validate(spec, dict(zip(paths, shapes)))
    return spec, names
