"""The ragged product rule: LoRA on a stack of expert kernels used by ``jax.lax.ragged_dot``.

A mixture of experts sorts its tokens by expert and applies expert ``e``'s kernel to the
``group_sizes[e]`` rows of group ``e`` (``ragged_dot(x, W, group_sizes)``, the primitive
``ragged_dot_general``; ``W`` is ``(E, in, out)``, its expert axis a ``"stack"`` axis). With
factors ``A (E, in, r)`` and ``B (E, r, out)`` per expert the rule emits::

    ragged_dot(x, W, g) + ragged_dot(s·ragged_dot(dropout(x), A, g), B, g)

with the same group sizes ``g`` (and ``group_offset``), so no ``W + s·A·B`` is formed and
each row meets its own expert's factors: ``x_t·W_e + s·(x_t·A_e)·B_e``. Any dimension
numbers of that kind work (batch dimensions matched to further stack axes, several
contracted or kept axes); ragged dots whose kernel has no group axis (the other two
modes) form ``W + s·A·B`` there.

Mixed batches (``adapter_ids``, one adapter per example): the rows of ``x`` are token copies
sorted by expert, so the example of each row is traced back through the jaxpr
(:mod:`jlora.transform.rows`: the gather that sorted them, the reshapes and repeats before)
and the row's adapter is ``adapter_ids[example]``. The rows are then sorted once more, by
(expert, adapter) within the expert's group, and one pair of ragged products over
``E · n_adapters`` groups applies each row's own factors (rows of the base model fall
outside every group): one adapter's FLOPs whatever the number of adapters, plus a
permutation of ``x`` and of the branch. Supported where ``x`` is ``(rows, in)`` ragged
along its rows and the kernel ``(E, in, out)`` (``jax.lax.ragged_dot``); elsewhere, and
where the rows cannot be traced (a dense dispatch, a sort done outside the jaxpr), a
``ValueError`` says why.

DoRA on a kernel used by ``ragged_dot`` is refused (``ValueError``), as PEFT's
``ParamWrapper`` refuses it for 3-D expert parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..core import jaxprs
from .interpreter import register, rule_materialize
from .products import _add_delta, _base_product, _scale_rows
from .rows import RowsNotFound, example_rows
from .values import Context, LoraValue, Pair, apply_dropout, factor_dtype, has_dora, roles_str

__all__: list[str] = []


def _factor_axis(lv: LoraValue, view_axis: int, factor: str) -> int:
    """The axis of A (``factor="a"``) or B (``"b"``) that kernel view axis ``view_axis`` is."""
    g, k = lv.axes[view_axis]
    if g == "s":
        return k
    return lv.n_stack + k if factor == "a" else lv.n_stack + 1 + k


def _rule_ragged_dot(eqn: Any, invals: Sequence[Any], ctx: Context) -> jax.Array:
    x, lv, group_sizes = invals[:3]
    if isinstance(x, LoraValue) or isinstance(group_sizes, LoraValue) or not isinstance(lv, LoraValue):
        return rule_materialize(eqn, invals, ctx, "LoRA weight as the ragged operand or group sizes of ragged_dot")
    p = eqn.params
    dn = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = (tuple(map(tuple, d)) for d in dn.dot_dimension_numbers)
    ragged = tuple(dn.lhs_ragged_dimensions)
    if len(dn.rhs_group_dimensions) != 1 or len(ragged) != 1 or ragged[0] in lc or ragged[0] in lb:
        return rule_materialize(eqn, invals, ctx, "ragged_dot whose kernel has no group (expert) axis")
    group = dn.rhs_group_dimensions[0]
    free = [i for i in range(lv.w.ndim) if i not in rc and i not in rb and i != group]
    stack = [group, *rb]
    ok = (
        all(lv.axes[i][0] == "s" for i in stack) and sorted(lv.axes[i][1] for i in stack) == list(range(lv.n_stack))
        and all(lv.axes[i][0] == "a" for i in rc) and sorted(lv.axes[i][1] for i in rc) == list(range(lv.n_in))
        and all(lv.axes[i][0] == "b" for i in free) and sorted(lv.axes[i][1] for i in free) == list(range(lv.n_out))
    )
    if not ok:
        return rule_materialize(
            eqn, invals, ctx,
            f"ragged_dot with group axis {group}, contracting {rc}, batch {rb} does not match the kernel's layout "
            f"(roles {roles_str(lv)}; the group axis must be a stack axis)",
        )
    if has_dora(lv):
        raise ValueError(
            f"jlora: DoRA (use_dora=True) on {lv.path!r}, an expert kernel used by ragged_dot ({jaxprs.where(eqn)}), "
            "is not supported (PEFT's ParamWrapper refuses DoRA on expert parameters too); leave the experts out "
            "(exclude_modules) or use use_dora=False"
        )
    fdtype = factor_dtype(lv)
    base, out_dtype = _base_product(eqn, [x, lv.w, group_sizes], fdtype)
    common = dict(precision=p.get("precision"), preferred_element_type=fdtype, group_offset=p.get("group_offset"))
    if ctx.adapter_ids is not None and any(pair.gid >= 0 or pair.slots for pair in lv.pairs):
        delta = _mixed_delta(eqn, lv, x, group_sizes, ctx, fdtype, common)
    else:
        x_free = [i for i in range(x.ndim) if i not in lc and i not in lb]
        nb, nxf = len(lb), len(x_free)
        a_dn = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((lc, tuple(_factor_axis(lv, i, "a") for i in rc)),
                                   (lb, tuple(_factor_axis(lv, i, "a") for i in rb))),
            lhs_ragged_dimensions=ragged, rhs_group_dimensions=(_factor_axis(lv, group, "a"),),
        )
        perm = list(range(nb + nxf)) + [nb + nxf + lv.axes[i][1] for i in free]

        def branch(pair: Pair) -> jax.Array:
            xd = apply_dropout(x.astype(fdtype), pair, ctx)
            # t = s·(x·A_e) per group: (batch..., x free..., r)
            t = jax.lax.ragged_dot_general(xd, pair.a.astype(fdtype), group_sizes, a_dn, **common)
            t = t * jnp.asarray(pair.scale, fdtype)
            b_dn = jax.lax.RaggedDotDimensionNumbers(
                dot_dimension_numbers=(((t.ndim - 1,), (lv.n_stack,)),
                                       (tuple(range(nb)), tuple(_factor_axis(lv, i, "b") for i in rb))),
                lhs_ragged_dimensions=(nb + x_free.index(ragged[0]),),
                rhs_group_dimensions=(_factor_axis(lv, group, "b"),),
            )
            u = jax.lax.ragged_dot_general(t, pair.b.astype(fdtype), group_sizes, b_dn, **common)
            return jnp.transpose(u, perm)  # the kernel's output axes in view order, as the base product

        delta = functools.reduce(jnp.add, [branch(pair) for pair in lv.pairs])
    ctx.record(lv, eqn, "factored")
    return _add_delta(base, delta, out_dtype)


def _mixed_delta(eqn: Any, lv: LoraValue, x: jax.Array, group_sizes: jax.Array, ctx: Context, fdtype: Any,
                 common: dict) -> jax.Array:
    """The branch of a mixed batch: each row with the factors of its example's adapter.

    Rows are sorted by ``expert · N + adapter`` (stable, so within a group as before) and
    ``ragged_dot`` runs over ``E · N`` groups with the factor tables ``A[e·N + j] = A_j[e]``,
    ``B[e·N + j] = B_j[e]`` (ranks zero-padded to the largest), each row's ``x·A`` scaled by
    its adapter's ``s_j``; rows of the base model and rows outside every expert group sort
    last, outside every group, and get no branch. Adapter slots (``N`` slots) are such a
    table already: ``A (E, N, in, R)`` is reshaped, not copied, and their scales are values."""
    p = eqn.params
    dn = p["ragged_dot_dimension_numbers"]
    where = jaxprs.where(eqn)
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    simple = (
        x.ndim == 2 and lv.w.ndim == 3 and group_sizes.ndim == 1 and p.get("group_offset") is None
        and tuple(dn.lhs_ragged_dimensions) == (0,) and tuple(dn.rhs_group_dimensions) == (0,)
        and tuple(lc) == (1,) and tuple(rc) == (1,) and not lb and not rb
    )
    if not simple:
        raise ValueError(
            f"jlora: a mixed batch (adapter_ids) on the expert kernel {lv.path!r} ({where}) needs "
            "jax.lax.ragged_dot(x, W, group_sizes) with x (rows, in) and W (experts, in, out) and no group_offset; "
            f"this ragged_dot has x {tuple(x.shape)}, W {tuple(lv.w.shape)} and dimension numbers {dn}"
        )
    ids = ctx.adapter_ids
    if not ctx.frames:
        raise ValueError(f"jlora: mixed batch on {lv.path!r} ({where}): no frame to trace the rows of its input")
    var = eqn.invars[0]
    try:
        rows = example_rows(ctx.frames[-1], var, ids.shape[0])
    except RowsNotFound as err:
        raise ValueError(
            f"jlora: a mixed batch (adapter_ids) on the expert kernel {lv.path!r} used by ragged_dot ({where}): {err}. "
            "Without adapter_ids the active adapters apply to every example"
        ) from None
    row_ids = ids[rows]
    pairs = list(lv.pairs)
    n_experts, n_rows = group_sizes.shape[0], x.shape[0]
    if pairs[0].slots:  # adapter slots: the pool (E, N, in, R) is the table, slot j of expert e at e·N + j
        pool = pairs[0]
        n_pairs = pool.slots
        adapter = jnp.where((row_ids >= 0) & (row_ids < n_pairs), row_ids + 1, 0).astype(jnp.int32)
        a_tab = pool.a.astype(fdtype).reshape((n_experts * n_pairs,) + pool.a.shape[2:])
        b_tab = pool.b.astype(fdtype).reshape((n_experts * n_pairs,) + pool.b.shape[2:])
        scales = jnp.asarray(pool.scale, jnp.float32)
    else:
        n_pairs = len(pairs)
        adapter = jnp.zeros((n_rows,), jnp.int32)
        for j, pair in enumerate(pairs):
            adapter = jnp.where(row_ids == pair.gid, j + 1, adapter)
        r_max = max(pair.a.shape[-1] for pair in pairs)

        def pad(f, axis):
            widths = [(0, 0)] * f.ndim
            widths[axis] = (0, r_max - f.shape[axis])
            return jnp.pad(f, widths)

        # A: (E, in, r) per adapter → (E·N, in, r_max), row e·N + j = A_j[e]
        a_tab = jnp.stack([pad(pair.a.astype(fdtype), -1) for pair in pairs], axis=1)
        b_tab = jnp.stack([pad(pair.b.astype(fdtype), 1) for pair in pairs], axis=1)
        a_tab = a_tab.reshape((n_experts * n_pairs,) + a_tab.shape[2:])
        b_tab = b_tab.reshape((n_experts * n_pairs,) + b_tab.shape[2:])
        scales = jnp.asarray([float(pair.scale) for pair in pairs], jnp.float32)
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(n_rows, dtype=ends.dtype), side="right")  # E: after every group
    n_groups = n_experts * n_pairs
    key = jnp.where((adapter > 0) & (expert < n_experts), expert * n_pairs + adapter - 1, n_groups)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n_rows, dtype=order.dtype))
    sizes = jnp.bincount(key, length=n_groups + 1)[:n_groups].astype(group_sizes.dtype)
    xs = x.astype(fdtype)[order]
    if ctx.key is not None and any(pair.dropout > 0 for pair in pairs):
        # each row dropped at its adapter's rate (0 for the base model)
        rate = jnp.asarray([0.0] + [float(pair.dropout) for pair in pairs], fdtype)[adapter[order]][:, None]
        keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, xs.shape)
        xs = jnp.where(keep, xs / (1.0 - rate), jnp.zeros((), fdtype))
    row_scale = _scale_rows(scales, jnp.maximum(adapter - 1, 0), adapter > 0)[order]  # s of each sorted row
    common = dict(common, group_offset=None)
    t = jax.lax.ragged_dot(xs, a_tab, sizes, **common) * row_scale[:, None].astype(fdtype)
    u = jax.lax.ragged_dot(t, b_tab, sizes, **common)
    return u[inverse]


register("ragged_dot_general")(_rule_ragged_dot)
