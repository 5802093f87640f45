"""Kernel layouts found by use: which leaves a model contracts, and how.

``jlora.wrap(params, config, apply_fn=f, example_args=(x,))`` traces ``f(params, x)``
abstractly (``jax.make_jaxpr`` on ``ShapeDtypeStruct`` stand-ins: nothing is computed)
and follows every floating leaf of rank ≥ 2 through the jaxpr to the places where the
model *uses* it as a kernel:

* ``dot_general``: axes contracted with the other operand are ``"in"``, batch axes are
  ``"stack"``, axes that stay in the output are ``"out"``;
* ``ragged_dot_general`` (``jax.lax.ragged_dot``, experts applied to the tokens sorted by
  expert): the kernel's group (expert) axis is a ``"stack"`` axis, the rest as for
  ``dot_general``;
* ``conv_general_dilated`` (as the kernel): the output-feature axis is ``"out"``, the
  input-feature and window axes ``"in"``;
* ``gather`` by rows (an embedding lookup ``W[ids]``): the indexed axes are ``"in"``,
  the gathered ones ``"out"``.

On the way a leaf may be transposed, cast (float to float), reshaped, squeezed,
expanded, sliced (``slice``/``dynamic_slice``), copied or resharded, and it may enter
nested ``jit``/``closed_call``/``custom_jvp``/``custom_vjp``/``checkpoint`` (remat)
bodies, ``cond`` branches, ``while`` loops and ``scan`` (as a constant, or scanned over:
a stacked weight). An axis that is indexed away before the use (``W[i]`` of a layer
stack, each step of a ``scan`` over it) is a ``"stack"`` axis. This is the same set of
operations through which :func:`jlora.lora` keeps a LoRA weight factored, so a layout
found here is one ``lora`` can apply without forming ``W + s·A·B``.

Uses cannot tell a free ``"stack"`` axis (all slices applied to the same input, such as
Gemma's ``kv_einsum (2, K, D, H)`` computing k and v in one einsum) from an ``"out"``
axis: both stay in the output. Use reports ``"out"``; ``layouts=`` may say ``"stack"``
for such an axis (a separate adapter per slice), and is checked against the uses.

A leaf used in two ways that no single layout serves (e.g. contracted over axis 0 in
one place and over axis 1 in another, except the transposed use of a tied embedding
``x·Wᵀ``, which ``lora`` factors too), or whose one use splits an axis between
contracted and kept parts, has no layout: :meth:`LeafUse.layout` raises a
``ValueError`` naming the leaf and both uses (``wrap`` raises it only for targets).

Only public JAX API is used (``jax.make_jaxpr``, ``jax.extend.core``, ``jax.tree_util``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from ..core import jaxprs
from ..core.jaxprs import open_jaxpr, reshape_blocks
from ..core.paths import path_names
from ..quant.array import is_quantized

__all__ = ["Use", "LeafUse", "find_kernel_uses", "leaf_paths"]

_PASS = ("copy", "copy_p", "sharding_constraint", "reshard")
KERNEL_PRIMITIVES = ("dot_general", "ragged_dot_general", "conv_general_dilated", "gather")


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a leaf: the primitive, the role it gives each leaf axis, and where.

    ``roles`` is empty for a use that is not a kernel use (an elementwise op, a
    reduction, ...): there ``lora`` would form ``W + s·A·B``. ``problem`` says why a
    contraction fits no layout (an axis split between contracted and kept parts, no
    contracted or no kept axis).
    """

    primitive: str
    roles: tuple[str, ...]
    where: str
    problem: str = ""
    groups: int = 1  # a convolution's feature_group_count
    feature_axis: Optional[int] = None  # a convolution kernel's input-feature axis (leaf axis)

    @property
    def is_kernel_use(self) -> bool:
        return bool(self.roles) and not self.problem

    def describe(self) -> str:
        what = f"as {self.roles}" if self.roles else "(not as a kernel)"
        if self.problem:
            what = f"({self.problem})"
        return f"{self.primitive} {what} at {self.where}"


@dataclasses.dataclass(frozen=True)
class LeafUse:
    """Every use of one leaf of the traced tree."""

    path: str
    shape: tuple[int, ...]
    uses: tuple[Use, ...]

    @property
    def kernel_uses(self) -> tuple[Use, ...]:
        return tuple(u for u in self.uses if u.is_kernel_use)

    @property
    def contracted(self) -> bool:
        """Whether the model uses this leaf as a kernel at all (a candidate target)."""
        return any(u.primitive in KERNEL_PRIMITIVES and u.roles for u in self.uses)

    @property
    def kind(self) -> Optional[str]:
        """``"embedding"`` (gathered by rows), ``"conv"`` (a convolution kernel),
        ``"linear"`` (contracted in ``dot_general`` only) or ``None`` (not a kernel)."""
        prims = {u.primitive for u in self.kernel_uses}
        if "gather" in prims:
            return "embedding"
        if "conv_general_dilated" in prims:
            return "conv"
        if "dot_general" in prims or "ragged_dot_general" in prims:
            return "linear"
        return None

    @property
    def groups(self) -> int:
        """The ``feature_group_count`` of the convolutions that use this leaf (1 when it is
        not a grouped convolution kernel); a ``ValueError`` if two convolutions disagree."""
        got = {u.groups for u in self.kernel_uses if u.primitive == "conv_general_dilated"}
        if len(got) > 1:
            raise ValueError(f"{self.path}: used in convolutions with different feature_group_count {sorted(got)}")
        return got.pop() if got else 1

    @property
    def feature_axis(self) -> Optional[int]:
        """The input-feature axis of a convolution kernel (None when not used in a convolution)."""
        got = {u.feature_axis for u in self.kernel_uses if u.primitive == "conv_general_dilated"}
        return got.pop() if len(got) == 1 else None

    def layout(self) -> tuple[str, ...]:
        """The one kernel layout that serves every kernel use, or a ``ValueError``.

        The reference is the row lookup (for an embedding), else the convolution, else
        the first contraction; every other use must give each axis the same role, up to
        ``"stack"`` ≈ ``"out"`` (a kept axis may be a stack axis) and up to swapping
        ``"in"`` and ``"out"`` for a contraction over the output axes (``x·Wᵀ``).
        """
        bad = [u for u in self.uses if u.problem]
        if bad:
            raise ValueError(
                f"{self.path} (shape {self.shape}): its use fits no kernel layout: {bad[0].describe()}. "
                "Leave it out of target_modules, or pass layouts= for it (jlora.lora then forms W + s·A·B "
                "at the uses the layout does not fit; jlora.explain lists them)"
            )
        uses = self.kernel_uses
        if not uses:
            raise ValueError(f"{self.path}: not used as a kernel (no dot_general, conv or row gather)")
        order = {"gather": 0, "conv_general_dilated": 1, "dot_general": 2, "ragged_dot_general": 3}
        ref = sorted(uses, key=lambda u: order[u.primitive])[0]
        layout = list(ref.roles)
        for u in uses:
            if u is ref:
                continue
            merged = _merge_roles(layout, u.roles)
            if merged is None and u.primitive == "dot_general":
                merged = _merge_roles(layout, _swap(u.roles))
            if merged is None:
                raise ValueError(
                    f"{self.path} (shape {self.shape}) is used in two incompatible ways: "
                    f"{ref.describe()}; and {u.describe()}. One kernel layout cannot serve both: leave it out "
                    "of target_modules, or pass layouts= for it (jlora.lora then forms W + s·A·B at the uses "
                    "the layout does not fit; jlora.explain lists them)"
                )
            layout = merged
        return tuple(layout)

    def check(self, layout: Sequence[str]) -> None:
        """Raises ``ValueError`` when ``layout`` (from ``layouts=``) fits none of the uses.

        Where the uses agree, the layout must fit them all; where they conflict, fitting
        one of them is enough (``lora`` forms ``W + s·A·B`` at the others)."""
        layout = tuple(layout)
        if len(layout) != len(self.shape):
            raise ValueError(f"{self.path}: layout {layout} has {len(layout)} roles for a kernel of shape {self.shape}")
        uses = self.kernel_uses
        fits = [_fits(layout, u.roles) or (u.primitive == "dot_general" and _fits(layout, _swap(u.roles))) for u in uses]
        if all(fits):
            return
        try:
            self.layout()
            agree = True
        except ValueError:
            agree = False
        if agree or not any(fits):
            u = uses[fits.index(False)]
            raise ValueError(
                f"{self.path} (shape {self.shape}): layouts= gives {layout}, but the model uses it "
                f"{u.describe()}; a 'stack' axis may be kept in the output or batched, 'in' axes must be "
                "the contracted ones"
            )


def _swap(roles: Sequence[str]) -> tuple[str, ...]:
    return tuple({"in": "out", "out": "in"}.get(r, r) for r in roles)


def _merge_roles(a: Sequence[str], b: Sequence[str]) -> Optional[list[str]]:
    out = []
    for x, y in zip(a, b):
        if x == y:
            out.append(x)
        elif {x, y} == {"stack", "out"}:
            out.append("stack")
        else:
            return None
    return out


def _fits(layout: Sequence[str], roles: Sequence[str]) -> bool:
    """Whether a kernel of ``layout`` can serve a use giving ``roles`` (a stack axis may
    be batched or kept)."""
    return all(lay == r or (lay == "stack" and r == "out") for lay, r in zip(layout, roles))


# ----------------------------------------------------------------------------------
# Tracking leaves through a jaxpr
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Track:
    """A value derived from leaf ``leaf`` by shape-only operations.

    ``axes[i]``: the leaf axes that view axis ``i`` covers (several after a reshape that
    merges, one leaf axis in several view axes after one that splits, none for an axis
    added by ``expand_dims``). ``gone``: leaf axes indexed away (a stack axis).
    ``gather``: the index of the row-gather use this value came out of, if any.
    """

    leaf: int
    axes: tuple[frozenset, ...]
    gone: frozenset = frozenset()
    gather: Optional[int] = None

    def with_axes(self, axes: Sequence[frozenset]) -> "_Track":
        axes = tuple(axes)
        before = set().union(*self.axes) if self.axes else set()
        after = set().union(*axes) if axes else set()
        return dataclasses.replace(self, axes=axes, gone=self.gone | frozenset(before - after))


class _Recorder:
    def __init__(self, n_leaves: int, ndims: Sequence[int]):
        self.uses: list[list[Use]] = [[] for _ in range(n_leaves)]
        self.ndims = list(ndims)
        self.superseded: set[tuple[int, int]] = set()

    def add(self, leaf: int, use: Use) -> int:
        self.uses[leaf].append(use)
        return len(self.uses[leaf]) - 1


_where = jaxprs.where


def _roles_of(t: _Track, view_roles: Sequence[str], ndim: int) -> tuple[tuple[str, ...], str]:
    """Leaf-axis roles from the roles of the view's axes, and a problem string if an axis
    gets two roles; no roles where the use has no contracted or no kept axis (then it is
    not a kernel use)."""
    got: dict[int, set[str]] = {}
    for ax, role in zip(t.axes, view_roles):
        for k in ax:
            got.setdefault(k, set()).add(role)
    roles = []
    problem = ""
    for k in range(ndim):
        rs = got.get(k)
        if not rs:
            roles.append("stack")  # indexed away before the use
        elif len(rs) == 1:
            roles.append(next(iter(rs)))
        else:
            roles.append("?")
            problem = problem or f"axis {k} is split between {' and '.join(sorted(rs))} parts"
    if not problem and ("in" not in roles or "out" not in roles):
        return (), ""  # nothing contracted, or nothing kept: not a kernel use (e.g. x·w·y)
    return tuple(roles), problem


def _reshape_track(t: _Track, old: Sequence[int], new: Sequence[int]) -> Optional[_Track]:
    groups = reshape_blocks(tuple(old), tuple(new))
    if groups is None:
        return None
    axes: list[frozenset] = [frozenset()] * len(new)
    for oi, nj in groups:
        covered = frozenset().union(*(t.axes[i] for i in oi)) if oi else frozenset()
        for j in nj:
            axes[j] = covered
    return t.with_axes(axes)


def _walk(jaxpr: Any, tracks: Sequence[Optional[_Track]], rec: _Recorder, prefix: Any) -> list[Optional[_Track]]:
    """Follows the tracked inputs of ``jaxpr`` to their uses; returns the outputs' tracks."""
    env: dict[Any, _Track] = {}
    for v, t in zip(jaxpr.invars, tracks):
        if t is not None:
            env[v] = t

    def read(v):
        if isinstance(v, jex.core.Literal):
            return None
        return env.get(v)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if not any(t is not None for t in ins):
            continue
        outs = _apply(eqn, ins, rec, prefix)
        for v, t in zip(eqn.outvars, outs):
            if t is not None and not isinstance(v, jex.core.DropVar):
                env[v] = t
    return [read(v) for v in jaxpr.outvars]


def _other(eqn, ins, rec, prefix, reason: str = "") -> list[None]:
    for t in ins:
        if t is not None:
            if t.gather is not None:
                continue  # the rows of an embedding, used further: not a use of the table
            rec.add(t.leaf, Use(eqn.primitive.name, (), _where(eqn, prefix)))
    return [None] * len(eqn.outvars)


def _apply(eqn, ins, rec: _Recorder, prefix) -> list[Optional[_Track]]:
    name = eqn.primitive.name
    p = eqn.params
    t = ins[0]
    single = t is not None and all(x is None for x in ins[1:])
    if name == "transpose" and single:
        return [t.with_axes([t.axes[i] for i in p["permutation"]])]
    if name == "convert_element_type" and single:
        new = p.get("new_dtype")
        old = eqn.invars[0].aval.dtype
        if new is not None and jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(old, jnp.floating):
            return [t]
        return _other(eqn, ins, rec, prefix)
    if name in _PASS and single:
        return [t] + [None] * (len(eqn.outvars) - 1)
    if name in ("slice", "dynamic_slice") and single:
        return [t]
    if name == "reshape" and single and p.get("dimensions") is None:
        new = _reshape_track(t, eqn.invars[0].aval.shape, p["new_sizes"])
        return [new] if new is not None else _other(eqn, ins, rec, prefix)
    if name == "squeeze" and single:
        nd = len(t.axes)
        dims = {d % nd for d in p["dimensions"]}
        return [t.with_axes([a for i, a in enumerate(t.axes) if i not in dims])]
    if name == "broadcast_in_dim" and single:
        shape, bdims = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
        old = eqn.invars[0].aval.shape
        if list(bdims) == sorted(bdims) and all(shape[b] == old[d] for d, b in enumerate(bdims)) and all(
            shape[i] == 1 for i in range(len(shape)) if i not in bdims
        ):
            axes = [frozenset()] * len(shape)
            for d, b in enumerate(bdims):
                axes[b] = t.axes[d]
            return [t.with_axes(axes)]
        return _other(eqn, ins, rec, prefix)
    if name == "dot_general":
        return _dot(eqn, ins, rec, prefix)
    if name == "ragged_dot_general":
        return _ragged_dot(eqn, ins, rec, prefix)
    if name == "conv_general_dilated":
        return _conv(eqn, ins, rec, prefix)
    if name == "gather" and t is not None and ins[1] is None:
        return _gather(eqn, t, rec, prefix)
    entry = jaxprs.nested(name)
    if entry is not None:
        inner = prefix + eqn.source_info.name_stack if prefix is not None else None
        return _NESTED_HANDLERS[entry.kind](eqn, ins, rec, prefix, inner)
    return _other(eqn, ins, rec, prefix)


def _call(eqn, ins, rec, prefix, inner):
    """A nested body run once on the operands (``jit``, ``custom_jvp``, ``checkpoint``, ...)."""
    try:
        jaxpr, _ = jaxprs.body(eqn)
    except KeyError:
        return _other(eqn, ins, rec, prefix)
    if len(jaxpr.invars) != len(ins):
        return _other(eqn, ins, rec, prefix)
    outs = _walk(jaxpr, ins, rec, inner)
    return outs if len(outs) == len(eqn.outvars) else [None] * len(eqn.outvars)


def _scan(eqn, ins, rec, prefix, inner):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    body, _ = jaxprs.body(eqn)
    inner_ins = list(ins[:nc + ncar])
    for t in ins[nc + ncar:]:
        if t is None or not t.axes:
            inner_ins.append(None)
        else:
            inner_ins.append(t.with_axes(t.axes[1:]))  # each step sees one slice: a stack axis
    outs = _walk(body, inner_ins, rec, inner)
    return outs[:ncar] + [None] * (len(eqn.outvars) - ncar)


def _while(eqn, ins, rec, prefix, inner):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cj, _ = open_jaxpr(p["cond_jaxpr"])
    bj, _ = open_jaxpr(p["body_jaxpr"])
    carry = list(ins[cn + bn:])
    _walk(cj, list(ins[:cn]) + carry, rec, inner)
    return _walk(bj, list(ins[cn:cn + bn]) + carry, rec, inner)


def _cond(eqn, ins, rec, prefix, inner):
    outs = None
    for br in eqn.params["branches"]:
        bj, _ = open_jaxpr(br)
        got = _walk(bj, list(ins[1:]), rec, inner)
        outs = got if outs is None else [a if a == b else None for a, b in zip(outs, got)]
    if ins[0] is not None:
        _other(eqn, [ins[0]], rec, prefix)
    return outs or [None] * len(eqn.outvars)


# One handler per kind of jlora.core.jaxprs.NESTED (the interpreter has one per kind too).
_NESTED_HANDLERS = {
    jaxprs.CALL: _call,
    jaxprs.REMAT: _call,
    jaxprs.SCAN: _scan,
    jaxprs.WHILE: _while,
    jaxprs.COND: _cond,
}
jaxprs.check_walker("jlora.layouts.from_use", _NESTED_HANDLERS)


def _dot(eqn, ins, rec, prefix):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    where = _where(eqn, prefix)
    for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if t is None:
            continue
        view = ["in" if i in c else "stack" if i in b else "out" for i in range(len(t.axes))]
        roles, problem = _roles_of(t, view, rec.ndims[t.leaf])
        rec.add(t.leaf, Use("dot_general", roles, where, problem))
        if t.gather is not None:
            rec.superseded.add((t.leaf, t.gather))
    return [None]


def _ragged_dot(eqn, ins, rec, prefix):
    """``ragged_dot(x, W, group_sizes)``: a kernel with a group (expert) axis, which is a
    ``"stack"`` axis as are its batch axes; contracted axes are ``"in"``, kept ones ``"out"``.
    Other uses (the ragged operand, a ragged dot without a group axis) are not kernel uses."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    x, w = ins[0], ins[1]
    others = [t for t in (x, *ins[2:]) if t is not None]
    if w is not None and len(dn.rhs_group_dimensions) != 1:
        others.append(w)
        w = None
    if others:
        _other(eqn, others, rec, prefix)
    if w is not None:
        group = dn.rhs_group_dimensions[0]
        view = ["in" if i in rc else "stack" if i in rb or i == group else "out" for i in range(len(w.axes))]
        roles, problem = _roles_of(w, view, rec.ndims[w.leaf])
        rec.add(w.leaf, Use("ragged_dot_general", roles, _where(eqn, prefix), problem))
        if w.gather is not None:
            rec.superseded.add((w.leaf, w.gather))
    return [None]


def _conv(eqn, ins, rec, prefix):
    x, k = ins
    if x is not None:
        _other(eqn, [x], rec, prefix)
    if k is not None:
        out_dim, in_dim = eqn.params["dimension_numbers"].rhs_spec[:2]
        view = ["out" if i == out_dim else "in" for i in range(len(k.axes))]
        roles, problem = _roles_of(k, view, rec.ndims[k.leaf])
        feature = next(iter(k.axes[in_dim])) if len(k.axes[in_dim]) == 1 else None
        rec.add(k.leaf, Use("conv_general_dilated", roles, _where(eqn, prefix), problem,
                            groups=int(eqn.params["feature_group_count"]), feature_axis=feature))
    return [None]


def _gather(eqn, t: _Track, rec, prefix):
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    shape = eqn.invars[0].aval.shape
    indexed = sorted(dn.start_index_map)
    others = [i for i in range(len(shape)) if i not in indexed]
    rows = (
        not dn.operand_batching_dims
        and sorted(dn.collapsed_slice_dims) == indexed
        and all(sizes[i] == 1 for i in indexed)
        and all(sizes[i] == shape[i] for i in others)
    )
    if not rows:
        return _other(eqn, [t], rec, prefix)
    view = ["in" if i in indexed else "out" for i in range(len(shape))]
    roles, problem = _roles_of(t, view, rec.ndims[t.leaf])
    idx = rec.add(t.leaf, Use("gather", roles, _where(eqn, prefix), problem))
    # The gathered rows: the offset axes are the table's other axes, in order; batch axes
    # (one per index) are new. A row lookup whose result is contracted later was an
    # index into a stack (``W[i]``), not an embedding: the later use supersedes it.
    out_nd = len(eqn.outvars[0].aval.shape)
    axes = [frozenset()] * out_nd
    for j, d in zip(sorted(dn.offset_dims), others):
        axes[j] = t.axes[d]
    new = t.with_axes(axes)
    return [dataclasses.replace(new, gather=idx)]


# ----------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or isinstance(
        x, jax.core.Tracer
    ) or is_quantized(x)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if is_quantized(x):  # a quantized kernel is used as the kernel it stands for (jlora.quant.forward)
        return jax.ShapeDtypeStruct(x.shape, x.compute_dtype)
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    t = jax.typeof(x)
    return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=getattr(t, "sharding", None))


def leaf_paths(params: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> list[str]:
    """``/``-joined paths of ``params``' leaves, in flattening order."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]
    return ["/".join(path_names(p)) for p, _ in flat]


def find_kernel_uses(
    apply_fn: Callable[..., Any],
    params: Any,
    example_args: Sequence[Any] = (),
    *,
    is_leaf: Optional[Callable[[Any], bool]] = None,
) -> dict[int, LeafUse]:
    """Traces ``apply_fn(params, *example_args)`` abstractly and returns, for each
    floating leaf of rank ≥ 2 that is used at all (by flattening index, as
    ``jax.tree_util.tree_flatten(params, is_leaf)``), every use of it.

    Array arguments (and ``jax.ShapeDtypeStruct``) are traced; anything else in
    ``example_args`` (Python flags, strings) is passed as it is. Nothing is computed.

    >>> uses = find_kernel_uses(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 4))}, (jnp.ones((2, 3)),))
    >>> uses[0].layout()
    ('in', 'out')
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    leaves = [x for _, x in flat]
    paths = leaf_paths(params, is_leaf)
    tracked = [
        i for i, x in enumerate(leaves)
        if _is_array(x) and len(np.shape(x)) >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    dyn_p = [i for i, x in enumerate(leaves) if _is_array(x)]
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(tuple(example_args))
    dyn_a = [i for i, x in enumerate(arg_leaves) if _is_array(x)]

    def flat_fn(p_vals, a_vals):
        full = list(leaves)
        for i, v in zip(dyn_p, p_vals):
            full[i] = v
        args = list(arg_leaves)
        for i, v in zip(dyn_a, a_vals):
            args[i] = v
        return apply_fn(jax.tree_util.tree_unflatten(treedef, full), *jax.tree_util.tree_unflatten(arg_tree, args))

    closed = jax.make_jaxpr(flat_fn)([_abstract(leaves[i]) for i in dyn_p], [_abstract(arg_leaves[i]) for i in dyn_a])
    jaxpr = closed.jaxpr
    ndims = [len(np.shape(x)) if _is_array(x) else 0 for x in leaves]
    rec = _Recorder(len(leaves), ndims)
    tracks: list[Optional[_Track]] = [None] * len(jaxpr.invars)
    want = set(tracked)
    for pos, i in enumerate(dyn_p):
        if i in want:
            tracks[pos] = _Track(i, tuple(frozenset([k]) for k in range(ndims[i])))
    _walk(jaxpr, tracks, rec, jex.source_info_util.new_name_stack())
    out: dict[int, LeafUse] = {}
    for i in tracked:
        uses = [u for k, u in enumerate(rec.uses[i]) if (i, k) not in rec.superseded]
        if uses:
            out[i] = LeafUse(paths[i], tuple(int(s) for s in np.shape(leaves[i])), tuple(uses))
    return out
