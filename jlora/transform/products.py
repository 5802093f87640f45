"""Product rules: where a LoRA kernel is used. ``dot_general`` gives
``x·W + s·(x·A)·B`` (any contracting/batch dimensions whose roles fit the factors, the
transposed use ``x·Wᵀ`` of a tied embedding, stacked layers, DoRA's scale, mixed batches),
``gather`` by rows gives ``W[ids] + s·A[ids]·B``, and ``conv_general_dilated`` gives
``conv(x, W) + s·conv1x1(conv(x, A), B)``. :func:`lora_branch` emits one factor pair's
branch; the module docstring of :mod:`jlora.transform` has the precision rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..quant import forward as qforward
from . import fused
from .interpreter import bind, bind_with, register, rule_materialize
from .values import (
    LoraValue,
    apply_dropout,
    dora_sum,
    example_mask,
    factor_dtype,
    has_dora,
    k_on,
    roles_str,
    transposed_guess_error,
)

__all__ = ["lora_branch", "BranchSpec", "example_factors"]


def _base_product(eqn, invals, fdtype):
    """The model's own product with the base kernel, and the dtype the model asked for.

    Where that dtype is a float narrower than the factors' (a bfloat16 model with float32
    factors), the product is accumulated in the wider dtype and rounded only once, after
    the LoRA branch is added, as a merged kernel's product would be. A quantized kernel's
    product is the exception: it stays in the model's dtype, as bitsandbytes' layer computes
    it under PEFT (``base_layer(x)``, then ``+ lora_B(lora_A(x))·s``), because it is a
    product with a kernel dequantized inside ``jax.checkpoint`` that XLA cannot fuse with the
    branch's: a float32 output would be an activation-sized float32 array in HBM (for
    Llama-3-8B's MLP, 2048 tokens: 112 MiB per product instead of 56).
    """
    out_dtype = eqn.outvars[0].aval.dtype
    acc = _acc_dtype(out_dtype, fdtype)
    if acc == out_dtype or "preferred_element_type" not in eqn.params or any(qforward.is_view(v) for v in invals):
        return bind(eqn, invals), out_dtype
    params = dict(eqn.params, preferred_element_type=acc)
    return bind_with(eqn.primitive, params, invals), out_dtype


def _acc_dtype(out_dtype, fdtype):
    if not jnp.issubdtype(out_dtype, jnp.floating) or not jnp.issubdtype(fdtype, jnp.floating):
        return out_dtype
    return jnp.promote_types(out_dtype, fdtype)


def _like_output(base, target, labels):
    """Under a mesh with ``Explicit`` axes: the sharding of an intermediate of the LoRA
    branch whose axes are ``labels``, taken from the base product's output (axes
    ``target``); axes the output does not have (the rank) are unsharded. This is what
    makes the branch's contractions unambiguous where the model's own product named its
    ``out_sharding``, and the branch add up with the base product. ``None`` otherwise
    (Auto axes or no mesh: XLA propagates shardings itself)."""
    explicit = _explicit_sharding(base)
    if explicit is None:
        return None
    mesh, spec = explicit
    entries = [spec[target.index(lab)] if lab in target else None for lab in labels]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))


def _explicit_sharding(x) -> Optional[tuple[Any, tuple]]:
    """``(mesh, spec)`` of ``x`` (the spec with one entry per axis) where it lives on a
    mesh with Explicit axes; ``None`` otherwise."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def _take_rows(table, rows):
    """``table[rows]``; on an Explicit mesh with the output sharded as ``rows`` along the
    new leading axis and as ``table`` along the others (what JAX asks to be told)."""
    row, tab = _explicit_sharding(rows), _explicit_sharding(table)
    if row is None or tab is None:
        return table[rows]
    (mesh, row_spec), (_, tab_spec) = row, tab
    used = {row_spec[0]} if row_spec[0] is not None else set()
    spec = (row_spec[0],) + tuple(None if e in used else e for e in tab_spec[1:])
    return table.at[rows].get(out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def _scale_rows(scales, rows, found):
    """``where(found, scales[rows], 0)`` (E,) float32, by a one-hot sum over the ``N`` scales:
    no gather, so an index sharded on an Explicit mesh meets a constant (unsharded) table."""
    scales = jnp.asarray(scales, jnp.float32)
    hit = (rows[:, None] == jnp.arange(scales.shape[0], dtype=rows.dtype)[None, :]) & found[:, None]
    return jnp.sum(jnp.where(hit, scales[None, :], 0.0), axis=1)


def _add_delta(base, delta, out_dtype):
    """``base + delta`` in the wider of their dtypes, rounded once to ``out_dtype``."""
    acc = jnp.promote_types(base.dtype, delta.dtype)
    return (base.astype(acc) + delta.astype(acc)).astype(out_dtype)


def example_factors(pairs, ids, n_stack, fdtype):
    """Each example's own factors for a mixed batch: ``(A_e, B_e, s_e, row, found)``.

    ``A_e`` (E, *stack, *in, R) and ``B_e`` (E, *stack, R, *out) are the factors of
    example ``e``'s adapter, ``s_e`` (E,) float32 its scale, 0 where the example uses the
    base model or an adapter absent on this kernel (so its branch adds nothing).

    * Named adapters (``pairs`` with ``gid >= 0``): the tables ``[A₁, A₂, …]``, ``[B₁, B₂, …]``
      (ranks zero-padded to the largest) and ``[s₁, s₂, …]``, indexed by the position of
      the example's adapter among ``pairs``.
    * Adapter slots (one pair with ``slots = N``): the pool itself is the table, indexed by
      the slot id; nothing is stacked or padded per call, so the cost does not grow with
      ``N``, and the scales are values, not constants of the program.

    ``row`` (E,) is the table row of each example and ``found`` (E,) whether it has one.
    """
    ns = n_stack
    if pairs[0].slots:
        p = pairs[0]
        n = p.slots
        found = (ids >= 0) & (ids < n)
        row = jnp.clip(ids, 0, n - 1).astype(jnp.int32)
        if ns == 0:
            a_ex, b_ex = _take_rows(p.a, row), _take_rows(p.b, row)
        else:  # the slot axis follows the stack axes
            a_ex = jnp.moveaxis(jnp.take(p.a, row, axis=ns), ns, 0)
            b_ex = jnp.moveaxis(jnp.take(p.b, row, axis=ns), ns, 0)
        return a_ex.astype(fdtype), b_ex.astype(fdtype), _scale_rows(p.scale, row, found), row, found
    r_max = max(p.a.shape[-1] for p in pairs)

    def pad_r(arr, axis):
        extra = r_max - arr.shape[axis]
        if not extra:
            return arr
        widths = [(0, 0)] * arr.ndim
        widths[axis] = (0, extra)
        return jnp.pad(arr, widths)

    a_tab = jnp.stack([pad_r(p.a.astype(fdtype), -1) for p in pairs])
    b_tab = jnp.stack([pad_r(p.b.astype(fdtype), ns) for p in pairs])
    row = jnp.zeros_like(ids, dtype=jnp.int32)
    found = jnp.zeros(ids.shape, bool)
    for j, p in enumerate(pairs):
        hit = ids == p.gid
        row = jnp.where(hit, j, row)
        found = found | hit
    scales = [float(p.scale) for p in pairs]
    return _take_rows(a_tab, row), _take_rows(b_tab, row), _scale_rows(scales, row, found), row, found


def _gathered_mixed_delta(lv, x, ctx, mode, xc, xb, cgroups, stack_batch, stack_free, target, fdtype, precision,
                          base):
    """The LoRA branch of a mixed batch with each example's own factors gathered.

    With each example's factors ``A_e``, ``B_e`` and scale ``s_e`` (:func:`example_factors`:
    a table of the named adapters, or the pool of adapter slots; ``s_e = 0`` for the base
    model and adapters absent on this kernel), example ``e`` gets ``(s_e·(x_e·A_e))·B_e``:
    two batched products over the example axis, so the cost is one adapter's, whatever the
    number of adapters. Stack axes of the kernel may be batched against ``x`` (per-layer
    weights) or free (all stacked matrices applied to ``x``: Gemma's k/v ``kv_einsum``).
    Returns ``(branch, k)`` (``k``: DoRA's per-example scale shaped like the output, or
    None without DoRA adapters), or None where this form does not apply (the example axis of ``x`` is contracted or
    batched, contraction over the output axes, a lora_B bias, or dropout in training,
    which draws a mask per adapter); the caller then sums masked per-adapter branches instead.
    """
    ids = ctx.adapter_ids
    pairs = [p for p in lv.pairs if p.gid >= 0 or p.slots]
    if (
        ids is None or mode != "in" or not pairs or 0 in xc or 0 in xb
        or x.shape[0] != ids.shape[0] or any(p.bias is not None for p in pairs)
        or (ctx.key is not None and any(p.dropout > 0 for p in pairs))
    ):
        return None
    ns = lv.n_stack
    a_ex, b_ex, s_ex, row, found = example_factors(pairs, ids, ns, fdtype)
    nbat, nsf = len(xb), len(stack_free)
    nx_free = x.ndim - len(xc) - nbat
    x_rest = [("x", j) for j in range(1, nx_free)]
    stack_labels = [("s", k) for k in stack_free]
    t_labels = [("x", 0)] + [("batch", i) for i in range(nbat)] + x_rest + stack_labels
    labels = [("x", 0)] + [("batch", i) for i in range(nbat)] + stack_labels + x_rest + [("b", k) for k in range(lv.n_out)]
    first_contract = tuple(1 + ns + k for _, k in cgroups)
    t = jax.lax.dot_general(
        x.astype(fdtype), a_ex,
        ((xc, first_contract), ((0,) + tuple(xb), (0,) + tuple(1 + k for k in stack_batch))),
        precision=precision, preferred_element_type=fdtype,
        out_sharding=_like_output(base, target, t_labels + [("r", 0)]),
    )  # (E, batch..., x_free[1:]..., stack_free..., r)
    t = t * s_ex.astype(fdtype).reshape((-1,) + (1,) * (t.ndim - 1))
    t_free = tuple(1 + nbat + (nx_free - 1) + i for i in range(nsf))
    u = jax.lax.dot_general(
        t, b_ex,
        (((t.ndim - 1,), (1 + ns,)), (tuple(range(1 + nbat)) + t_free,
                                      (0,) + tuple(1 + k for k in stack_batch) + tuple(1 + k for k in stack_free))),
        precision=precision, preferred_element_type=fdtype,
        out_sharding=_like_output(base, target, labels),
    )  # (E, batch..., stack_free..., x_free[1:]..., out...)
    delta = jnp.transpose(u, [labels.index(lab) for lab in target])
    k_ex = None
    if any(p.k is not None for p in pairs):
        # DoRA: k gathered per example like the factors (the base model and LoRA adapters: k = 1)
        ones = jnp.ones(pairs[0].b.shape[:ns] + (1,) + pairs[0].b.shape[ns + 1:], jnp.float32)
        k_tab = jnp.stack([ones if p.k is None else p.k.astype(jnp.float32) for p in pairs])
        k_rows = _take_rows(k_tab, row)  # (E, *stack, 1, *out)
        k_rows = jnp.where(found.reshape((-1,) + (1,) * (k_rows.ndim - 1)), k_rows, 1.0)

        def stack_label(j):
            if j in stack_batch:
                return ("batch", list(stack_batch).index(j))
            return ("s", j)

        k_ex = k_on(k_rows, 1 + ns, target, lambda j: ("x", 0) if j == 0 else stack_label(j - 1))
    return delta, k_ex


def _rule_dot_general(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        return rule_materialize(eqn, invals, ctx, "both operands are LoRA weights")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lora_is_rhs = isinstance(rhs, LoraValue)
    if lora_is_rhs:
        lv, x, lvc, xc, lvb, xb = rhs, lhs, tuple(rc), tuple(lc), tuple(rb), tuple(lb)
    else:
        lv, x, lvc, xc, lvb, xb = lhs, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    free = [i for i in range(lv.w.ndim) if i not in lvc and i not in lvb]
    cgroups = [lv.axes[i] for i in lvc]
    bgroups = [lv.axes[i] for i in lvb]
    fgroups = [lv.axes[i] for i in free]
    ns = lv.n_stack

    def covers(groups, g, n):
        return all(gg == g for gg, _ in groups) and sorted(k for _, k in groups) == list(range(n))

    # Stack axes may be batch dimensions (per-layer weights applied to per-layer inputs,
    # e.g. vmapped layers) or free dimensions (all layers applied to one input); the
    # contraction must cover exactly the input axes (or exactly the output axes).
    stack_batch = [k for _, k in bgroups]
    stack_free = sorted(k for g, k in fgroups if g == "s")
    nonstack_free = [(g, k) for g, k in fgroups if g != "s"]
    stack_ok = all(g == "s" for g, _ in bgroups) and sorted(stack_batch + stack_free) == list(range(ns))
    if stack_ok and covers(cgroups, "a", lv.n_in) and covers(nonstack_free, "b", lv.n_out):
        mode = "in"
    elif stack_ok and covers(cgroups, "b", lv.n_out) and covers(nonstack_free, "a", lv.n_in):
        mode = "out"
    else:
        return rule_materialize(
            eqn, invals, ctx,
            f"contraction over kernel axes {tuple(lvc)} does not match its layout (roles {roles_str(lv)})",
        )
    if mode == "out" and lv.guessed:
        raise ValueError(transposed_guess_error(lv))
    if mode == "out" and any(p.bias is not None for p in lv.pairs):
        raise ValueError(f"jlora: {lv.path!r} has a lora_B bias (lora_bias=True) but the model contracts its output "
                         "axes (x·Wᵀ), where a bias on the output cannot be added")

    if ctx.adapter_ids is not None and 0 in xb and any(p.gid >= 0 or p.slots for p in lv.pairs):
        raise ValueError(
            f"jlora: a mixed batch (adapter_ids) needs the examples along axis 0 of the input of {lv.path!r}, but "
            "there axis 0 is batched against a stack axis of the kernel (experts of a dense dispatch, or layers): "
            "the rows of one expert mix examples. Route the tokens with jax.lax.ragged_dot (a sorted dispatch, "
            "whose rows jlora traces back to their examples), or call without adapter_ids"
        )
    fdtype = factor_dtype(lv)
    pair_x = None
    if mode == "out" and has_dora(lv):
        # x·W_effᵀ with W_eff = c₀⊙W + Σᵢ cᵢ⊙sᵢΔWᵢ (cᵢ: product of the k of adapters i..n):
        # DoRA scales the input along the contracted output axes
        pair_x = _dora_scaled_inputs(lv, x, xc, xb, cgroups, stack_batch, stack_free, ctx)
        if pair_x is None:
            return rule_materialize(eqn, invals, ctx, "DoRA on a contraction over output axes it cannot scale")
        x, pair_x = pair_x[0], pair_x[1:]
        lhs, rhs = (x, rhs) if lora_is_rhs else (lhs, x)
    fused_y = _fused_product(eqn, lv, x, lvc, xc, lvb, xb, free, stack_batch, stack_free, cgroups, mode, lora_is_rhs,
                             fdtype, ctx)
    if fused_y is not None:
        ctx.record(lv, eqn, "factored")
        return fused_y
    base, out_dtype = _base_product(eqn, [lhs.w if not lora_is_rhs else lhs, rhs.w if lora_is_rhs else rhs], fdtype)
    precision = eqn.params.get("precision")
    nbat = len(xb)
    nx_free = x.ndim - len(xc) - nbat
    x_free = [("x", j) for j in range(nx_free)]
    lora_free = [lv.axes[i] for i in free]
    target = [("batch", i) for i in range(nbat)] + (x_free + lora_free if lora_is_rhs else lora_free + x_free)
    # where axis 0 of x (the example axis of a mixed batch) lands in the output
    if 0 in xb:
        ex_axis = target.index(("batch", xb.index(0)))
    elif 0 in xc:
        ex_axis = None
    else:
        ex_axis = target.index(("x", 0))
    gathered = _gathered_mixed_delta(
        lv, x, ctx, mode, xc, xb, cgroups, stack_batch, tuple(stack_free), target, fdtype, precision, base
    )
    if gathered is not None:
        ctx.record(lv, eqn, "factored")
        delta, k_ex = gathered
        if k_ex is not None:  # DoRA: y_e = k_e⊙(x_e·W + s·(x_e·A)·B), k gathered per example
            acc = jnp.promote_types(base.dtype, delta.dtype)
            return (k_ex.astype(acc) * (base.astype(acc) + delta.astype(acc))).astype(out_dtype)
        return _add_delta(base, delta, out_dtype)
    stack_label = lambda j: ("batch", stack_batch.index(j)) if j in stack_batch else ("s", j)  # noqa: E731
    spec = BranchSpec(
        mode=mode, xc=xc, xb=xb, first_contract_in=tuple(k for _, k in cgroups), stack_batch=tuple(stack_batch),
        stack_free=tuple(stack_free), lora_free=tuple(lora_free), lora_is_rhs=lora_is_rhs, n_stack=ns,
        precision=precision, dtype=fdtype, base=base, target=tuple(target),
    )
    terms = []
    for i, pair in enumerate(lv.pairs):
        # y = x·W + (s·(dropout(x)·A))·B; over W's output axes (tied embeddings x·Wᵀ): (s·(x·Bᵀ))·Aᵀ
        if mode == "in":
            xd = apply_dropout(x.astype(fdtype), pair, ctx)
        else:
            xd = (x if pair_x is None else pair_x[i]).astype(fdtype)
        u = lora_branch(xd, pair.a, pair.b, pair.scale, spec)
        if pair.bias is not None:  # lora_bias: y += s·b_B along the output axes
            bias = k_on(pair.bias, ns, target, stack_label)
            if bias is None:
                raise ValueError(f"jlora: {lv.path!r}: the lora_B bias cannot be placed on this product's output")
            u = u + jnp.asarray(pair.scale, fdtype) * bias.astype(fdtype)
        mask = example_mask(pair, ctx, lv, u.ndim, ex_axis, None if ex_axis is None else u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        dropped = xd if mode == "in" and pair.k is not None and pair.dropout > 0 and ctx.key is not None else None
        terms.append((pair, u, mask, dropped))
    ctx.record(lv, eqn, "factored")
    if mode == "in" and has_dora(lv):

        def base_of(xd):
            operands = [xd.astype(x.dtype), rhs.w] if lora_is_rhs else [lhs.w, xd.astype(x.dtype)]
            return _base_product(eqn, operands, fdtype)[0]

        return dora_sum(base, terms, out_dtype, lambda p: k_on(p.k, ns, target, stack_label), base_of)
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), out_dtype)


def _default_precision(precision) -> bool:
    return precision is None or all(
        p in (None, jax.lax.Precision.DEFAULT) for p in (precision if isinstance(precision, tuple) else (precision,))
    )


def _fused_product(eqn, lv, x, lvc, xc, lvb, xb, free, stack_batch, stack_free, cgroups, mode, lora_is_rhs, fdtype,
                   ctx):
    """``x·W + Σ s·(x·A)·B`` through :func:`jlora.transform.fused.lora_product` (fewer
    passes over activations under differentiation on TPU; the same program as below
    elsewhere), where the branch is a plain one: ``x`` on the left contracted with W's input
    axes, W with one contracted axis or one output axis, no DoRA, no lora_bias, no mixed
    batch, no dropout mask, a dense base, no ``Explicit`` mesh axes, the default precision,
    the rule not turned off (``jlora.lora(fused=False)``). None otherwise."""
    precision = eqn.params.get("precision")
    nbat, nc = len(xb), len(xc)
    if (
        not ctx.fused or mode != "in" or not lora_is_rhs or stack_free or has_dora(lv) or ctx.adapter_ids is not None
        or any(p.bias is not None for p in lv.pairs)
        or (ctx.key is not None and any(p.dropout > 0 for p in lv.pairs)) or qforward.is_view(lv.w)
        or not _default_precision(precision) or tuple(xb) != tuple(range(nbat))
        or sorted(xc) != list(range(x.ndim - nc, x.ndim)) or (nc != 1 and len(free) != 1)
        or _explicit_sharding(x) is not None or _explicit_sharding(lv.w) is not None
        or not all(jnp.issubdtype(t.dtype, jnp.floating) for t in (x, lv.w))
    ):
        return None
    ns = lv.n_stack
    labels = list(lv.axes)  # the factor axis of each axis of W's view
    a_rank, b_rank = ns + lv.n_in, ns
    a_axis = lambda g, k: k if g == "s" else ns + k  # noqa: E731
    b_axis = lambda g, k: k if g == "s" else ns + 1 + k  # noqa: E731
    b_free = [b_axis(*labels[i]) for i in free]
    x_free_n = x.ndim - nc - nbat
    u_order = list(range(nbat + x_free_n)) + [nbat + x_free_n + sorted(b_free).index(j) for j in b_free]
    layout = fused.ProductLayout(
        dims=((tuple(xc), tuple(lvc)), (tuple(xb), tuple(lvb))),
        a_contract=tuple(a_axis(*labels[i]) for i in lvc),
        a_batch=tuple(a_axis(*labels[i]) for i in lvb),
        b_batch=tuple(b_axis(*labels[i]) for i in lvb),
        b_rank=b_rank,
        u_perm=None if u_order == sorted(u_order) else tuple(u_order),
        b_as_w=tuple(b_rank if i in lvc else b_axis(*labels[i]) for i in range(lv.w.ndim)) if nc == 1 else None,
        a_as_w=tuple(a_rank if i in free else a_axis(*labels[i]) for i in range(lv.w.ndim)) if len(free) == 1 else None,
        n_in=int(np.prod([lv.w.shape[i] for i in lvc], dtype=np.int64)),
        n_out=int(np.prod([lv.w.shape[i] for i in free], dtype=np.int64)),
    )
    out_dtype = eqn.outvars[0].aval.dtype
    target = [("batch", i) for i in range(nbat)] + [("x", j) for j in range(x_free_n)] + [labels[i] for i in free]
    scales = [p.scale for p in lv.pairs]

    def plain(x, w, a_list, b_list):
        # what _rule_dot_general computes for this case
        base, out = _base_product(eqn, [x, w], fdtype)
        spec = BranchSpec(
            mode=mode, xc=xc, xb=xb, first_contract_in=tuple(k for _, k in cgroups), stack_batch=tuple(stack_batch),
            stack_free=(), lora_free=tuple(labels[i] for i in free), lora_is_rhs=True, n_stack=ns,
            precision=precision, dtype=fdtype, base=base, target=tuple(target),
        )
        xd = x.astype(fdtype)
        terms = [lora_branch(xd, a, b, s, spec) for a, b, s in zip(a_list, b_list, scales)]
        return _add_delta(base, functools.reduce(jnp.add, terms), out)

    return fused.lora_product(
        plain, x, lv.w, [p.a for p in lv.pairs], [p.b for p in lv.pairs], scales, layout, out_dtype=out_dtype,
        acc_dtype=_acc_dtype(out_dtype, fdtype), precision=precision,
    )


def _dora_scaled_inputs(lv, x, xc, xb, cgroups, stack_batch, stack_free, ctx):
    """For ``x·W_effᵀ`` (a contraction over the kernel's output axes) with DoRA adapters:
    ``[x⊙c₀, x⊙c₁, …]`` where ``c₀ = Πⱼ kⱼ`` scales the base product and ``cᵢ = Π_{j≥i} kⱼ``
    adapter ``i``'s branch (PEFT's in-order composition). In a mixed batch each example
    ``e`` has one adapter ``j``: every entry is ``x_e⊙k_j`` (``x_e`` for the base model;
    the caller masks the other adapters' branches). None where it cannot be done (a stack
    axis of the kernel is not an axis of x, or the example axis of x is contracted)."""
    ids = ctx.adapter_ids
    if stack_free or (ids is not None and (0 in xc or x.shape[0] != ids.shape[0])):
        return None
    x_labels = []
    free = 0
    for ax in range(x.ndim):
        if ax in xc:
            x_labels.append(cgroups[xc.index(ax)])
        elif ax in xb:
            x_labels.append(("s", stack_batch[xb.index(ax)]))
        else:
            x_labels.append(("x", free))
            free += 1
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if ids is not None:  # one adapter per example: c_e = k of its adapter (1 for the base / plain LoRA)
        c = jnp.ones((), acc)
        for p in lv.pairs:
            if p.k is None:
                continue
            kk = k_on(p.k, lv.n_stack, x_labels)
            if kk is None:
                return None
            m = (ids == p.gid).astype(acc).reshape((-1,) + (1,) * (x.ndim - 1))
            c = c + m * (kk.astype(acc) - 1)
        scaled = (x.astype(acc) * c).astype(x.dtype)
        return [scaled] * (len(lv.pairs) + 1)
    cum = []
    c = None
    for p in reversed(lv.pairs):
        if p.k is not None:
            kk = k_on(p.k, lv.n_stack, x_labels)
            if kk is None:
                return None
            c = kk if c is None else c * kk
        cum.append(c)
    cum = cum[::-1]
    scaled = [x if ci is None else (x.astype(acc) * ci).astype(x.dtype) for ci in cum]
    return [scaled[0]] + scaled


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """How a ``dot_general`` with a LoRA kernel contracts, in factor terms (built by
    ``_rule_dot_general``; what :func:`lora_branch` needs to emit the branch).

    ``mode`` is ``"in"`` (the contraction covers W's input axes: ``(x·A)·B``) or ``"out"``
    (its output axes, e.g. tied embeddings: ``(x·Bᵀ)·Aᵀ``). ``xc``/``xb``: contracting and
    batch dimensions of ``x``; ``first_contract_in[i]`` the factor axis (input axis of A,
    or output axis of B in mode ``"out"``) that ``xc[i]`` contracts with; ``stack_batch``
    the stack axes matched to ``xb``; ``stack_free`` the stack axes left free (all layers
    applied to one input); ``lora_free`` the kernel's free view axes in view order;
    ``target`` the labels of the model's output axes.
    """

    mode: str
    xc: tuple
    xb: tuple
    first_contract_in: tuple
    stack_batch: tuple
    stack_free: tuple
    lora_free: tuple
    lora_is_rhs: bool
    n_stack: int
    precision: Any
    dtype: Any
    base: Any
    target: tuple


def lora_branch(xd: jax.Array, a: jax.Array, b: jax.Array, scale: float, spec: BranchSpec) -> jax.Array:
    """The LoRA branch ``(s·(x·A))·B`` of one factor pair, in the layout of the model's
    own product ``x·W`` (``spec.target``), computed in ``spec.dtype``.

    The scale multiplies the rank-``r`` intermediate ``t = x·A`` (``tokens x r``
    elements) rather than the product (``tokens x d_out``), so neither the forward nor the
    backward pass scales an activation-sized array. Where the contraction allows it (no
    stacked-free axes, batch dimensions leading, contracted axes trailing in ``x``, no
    ``Explicit`` mesh axes) both products are emitted as plain matrix products on
    ``x`` flattened to ``(batch..., tokens, d_in)``, with the tiny factors reshaped and
    permuted instead of the activations: XLA:CPU then runs all four backward products
    without transposing an activation-sized cotangent (measured in
    ``benchmarks/lora_train_step.py``). Otherwise the general ``dot_general`` form.

    >>> # inside the interpreter: u = lora_branch(x, pair.a, pair.b, pair.scale, spec)
    """
    flat = _flat_branch(xd, a, b, scale, spec)
    if flat is not None:
        return flat
    return _general_branch(xd, a, b, scale, spec)


def _factor_roles(a, b, spec: BranchSpec):
    """``(first, second, first_contract, first_r, second_r, second_free)`` for the mode."""
    ns = spec.n_stack
    if spec.mode == "in":
        first, second = a, b
        first_contract = [ns + k for k in spec.first_contract_in]
        first_r, second_r = a.ndim - 1, ns
        second_free = [ns + 1 + k for g, k in spec.lora_free if g != "s"]
    else:
        first, second = b, a
        first_contract = [ns + 1 + k for k in spec.first_contract_in]
        first_r, second_r = ns, a.ndim - 1
        second_free = [ns + k for g, k in spec.lora_free if g != "s"]
    return first, second, first_contract, first_r, second_r, second_free


def _flat_branch(xd, a, b, scale, spec: BranchSpec):
    """The branch as (batched) 2-D matrix products, or None where it does not apply."""
    nbat, nc = len(spec.xb), len(spec.xc)
    if (
        spec.stack_free or tuple(spec.xb) != tuple(range(nbat))
        or sorted(spec.xc) != list(range(xd.ndim - nc, xd.ndim))
        or _explicit_sharding(spec.base) is not None
    ):
        return None
    first, second, first_contract, first_r, second_r, second_free = _factor_roles(a, b, spec)
    dtype, precision = spec.dtype, spec.precision
    sb = list(spec.stack_batch)
    bshape = tuple(xd.shape[:nbat])
    free_shape = tuple(xd.shape[nbat:xd.ndim - nc])
    m = int(np.prod(free_shape, dtype=np.int64))
    k = int(np.prod(xd.shape[xd.ndim - nc:], dtype=np.int64))
    contract_order = [first_contract[i] for i in sorted(range(nc), key=lambda i: spec.xc[i])]
    r = first.shape[first_r]
    first_m = jnp.transpose(first, sb + contract_order + [first_r]).reshape(bshape + (k, r)).astype(dtype)
    out_shape = tuple(second.shape[i] for i in second_free)
    n = int(np.prod(out_shape, dtype=np.int64))
    second_m = jnp.transpose(second, sb + [second_r] + second_free).reshape(bshape + (r, n)).astype(dtype)
    x3 = xd.reshape(bshape + (m, k))
    bat = tuple(range(nbat))
    t = jax.lax.dot_general(
        x3, first_m, (((nbat + 1,), (nbat,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
    ) * jnp.asarray(scale, dtype)  # (batch..., tokens, r)
    if spec.lora_is_rhs:
        u = jax.lax.dot_general(
            t, second_m, (((nbat + 1,), (nbat,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
        )  # (batch..., tokens, d_out)
        return u.reshape(bshape + free_shape + out_shape)
    u = jax.lax.dot_general(
        second_m, t, (((nbat,), (nbat + 1,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
    )  # (batch..., d_out, tokens)
    return u.reshape(bshape + out_shape + free_shape)


def _general_branch(xd, a, b, scale, spec: BranchSpec):
    """The branch as two ``dot_general`` over the factors' own axes, then a transpose."""
    first, second, first_contract, _, second_r, _ = _factor_roles(a, b, spec)
    dtype, precision, base, target = spec.dtype, spec.precision, spec.base, list(spec.target)
    xc, xb, stack_batch, stack_free = spec.xc, spec.xb, spec.stack_batch, spec.stack_free
    nbat, nsf = len(xb), len(stack_free)
    nx_free = xd.ndim - len(xc) - nbat
    x_free = [("x", j) for j in range(nx_free)]
    g2, n2 = ("b", second.ndim - spec.n_stack - 1) if spec.mode == "in" else ("a", second.ndim - spec.n_stack - 1)
    labels = (
        [("batch", i) for i in range(nbat)] + [("s", k) for k in stack_free]
        + x_free + [(g2, k) for k in range(n2)]
    )
    t_labels = [("batch", i) for i in range(nbat)] + x_free + [("s", k) for k in stack_free] + [("r", 0)]
    # t: (batch..., x_free..., stack_free..., r), scaled
    t = jax.lax.dot_general(
        xd, first.astype(dtype), ((xc, tuple(first_contract)), (xb, tuple(stack_batch))),
        precision=precision, preferred_element_type=dtype,
        out_sharding=_like_output(base, target, t_labels),
    ) * jnp.asarray(scale, dtype)
    t_batch = tuple(range(nbat)) + tuple(nbat + nx_free + i for i in range(nsf))
    # u: (batch..., stack_free..., x_free..., second's free factor axes in factor order)
    u = jax.lax.dot_general(
        t, second.astype(dtype),
        (((t.ndim - 1,), (second_r,)), (t_batch, tuple(stack_batch) + tuple(stack_free))),
        precision=precision, preferred_element_type=dtype,
        out_sharding=_like_output(base, target, labels),
    )
    return jnp.transpose(u, [labels.index(lab) for lab in target])


def _rule_gather(eqn, invals, ctx):
    operand, indices = invals
    if not isinstance(operand, LoraValue) or isinstance(indices, LoraValue):
        return rule_materialize(eqn, invals, ctx, "LoRA weight used as gather indices")
    lv = operand
    dn = eqn.params["dimension_numbers"]
    slice_sizes = tuple(eqn.params["slice_sizes"])
    a_view = [i for i, (g, _) in enumerate(lv.axes) if g == "a"]
    other = [i for i, (g, _) in enumerate(lv.axes) if g != "a"]
    ok = (
        lv.n_stack == 0
        and not dn.operand_batching_dims
        and sorted(dn.collapsed_slice_dims) == a_view
        and sorted(dn.start_index_map) == a_view
        and all(slice_sizes[i] == 1 for i in a_view)
        and all(slice_sizes[i] == lv.w.shape[i] for i in other)
    )
    if not ok:
        return rule_materialize(eqn, invals, ctx, "gather is not a row lookup over the input axes")
    if any(p.bias is not None for p in lv.pairs):
        raise ValueError(f"jlora: {lv.path!r} has a lora_B bias (lora_bias=True) but is used as an embedding table; "
                         "PEFT has no lora_bias for embeddings")
    base = bind(eqn, [lv.w, indices])
    n_offset = len(other)
    batch_rank = base.ndim - n_offset
    fdtype = factor_dtype(lv)
    ks = [lv.axes[i][1] for i in other]  # view order of the b axes
    batch_out = [i for i in range(base.ndim) if i not in dn.offset_dims]
    ex_axis = batch_out[0] if batch_out else None
    terms = []
    for pair in lv.pairs:
        r = pair.a.shape[-1]
        a_dn = jax.lax.GatherDimensionNumbers(
            offset_dims=(batch_rank,),
            collapsed_slice_dims=tuple(range(lv.n_in)),
            start_index_map=tuple(lv.axes[i][1] for i in dn.start_index_map),
            operand_batching_dims=(),
            start_indices_batching_dims=(),
        )
        params = dict(eqn.params)
        params.update(dimension_numbers=a_dn, slice_sizes=(1,) * lv.n_in + (r,))
        ga = bind_with(eqn.primitive, params, [pair.a, indices])  # (batch..., r)
        u = jax.lax.dot_general(ga.astype(fdtype), pair.b.astype(fdtype), (((ga.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=fdtype)
        u = jnp.transpose(u, list(range(batch_rank)) + [batch_rank + k for k in ks])
        u = jnp.moveaxis(u, list(range(batch_rank, batch_rank + n_offset)), list(dn.offset_dims))
        u = u * jnp.asarray(pair.scale, fdtype)
        mask = example_mask(pair, ctx, lv, u.ndim, ex_axis, None if ex_axis is None else u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        terms.append((pair, u, mask, None))
    ctx.record(lv, eqn, "factored")
    if has_dora(lv):  # DoRA on an embedding: y = k⊙(W[ids] + s·A[ids]·B), k per feature
        target = [("x", i) for i in range(base.ndim)]
        for t, i in enumerate(dn.offset_dims):
            target[i] = lv.axes[other[t]]
        return dora_sum(base, terms, base.dtype, lambda p: k_on(p.k, 0, target), None)
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), base.dtype)


def _grouped_b(t, b, of, groups, fdtype):
    """PEFT's grouped 1×1 ``lora_B`` on ``t`` (``r`` features on axis ``of``): output
    ``o`` of group ``g = o // (out/groups)`` reads the rank features ``g·(r/groups) + j``
    with weight ``b[j, o]`` (``b``: ``(r/groups, out)``)."""
    rg, out = int(b.shape[0]), int(b.shape[1])
    t = jnp.moveaxis(t, of, -1)
    t = t.reshape(t.shape[:-1] + (groups, rg))
    b3 = b.astype(fdtype).reshape(rg, groups, out // groups)
    u = jnp.einsum("...gj,jgo->...go", t, b3, preferred_element_type=fdtype)
    return jnp.moveaxis(u.reshape(u.shape[:-2] + (out,)), -1, of)


def _rule_conv(eqn, invals, ctx):
    x, k = invals
    if isinstance(x, LoraValue) or not isinstance(k, LoraValue):
        return rule_materialize(eqn, invals, ctx, "LoRA weight used as conv input")
    lv = k
    p = eqn.params
    dn = p["dimension_numbers"]
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    groups = int(p["feature_group_count"])
    pair_groups = {pair.groups for pair in lv.pairs}
    layout_ok = (
        lv.n_stack == 0 and lv.n_out == 1 and lv.axes[out_dim] == ("b", 0)
        and all(g == "a" for i, (g, _) in enumerate(lv.axes) if i != out_dim) and p["batch_group_count"] == 1
    )
    if groups != 1 and pair_groups == {1}:
        raise ValueError(
            f"jlora: grouped convolution {lv.path!r} (feature_group_count={groups}): its adapter has a plain "
            f"convolution's factors (A {tuple(lv.pairs[0].a.shape)}), made without knowing the grouping. PEFT's LoRA "
            "on a grouped convolution has a full lora_A (every input channel) and a grouped lora_B: pass apply_fn= "
            "and example_args= to jlora.wrap so the grouping is found from the model, or leave the layer out"
        )
    if pair_groups != {groups}:
        raise ValueError(f"jlora: grouped convolution {lv.path!r}: the adapter is for groups={sorted(pair_groups)}, "
                         f"the model's convolution has feature_group_count={groups}")
    if groups != 1 and (not layout_ok or lv.axes[in_dim] != ("a", lv.n_in - 1)):
        raise ValueError(f"jlora: grouped convolution {lv.path!r}: the kernel's layout {roles_str(lv)} does not fit "
                         "the convolution's dimension numbers (input features must be the last input axis)")
    if not layout_ok:
        return rule_materialize(eqn, invals, ctx, "unusual kernel layout for a convolution")
    fdtype = factor_dtype(lv)
    base, out_dtype = _base_product(eqn, [x, lv.w], fdtype)
    perm = [lv.n_in if i == out_dim else lv.axes[i][1] for i in range(lv.w.ndim)]
    params = dict(p)
    params["preferred_element_type"] = fdtype
    params["feature_group_count"] = 1  # PEFT's lora_A is a full convolution, grouped or not
    of, ex_axis = dn.out_spec[1], dn.out_spec[0]
    target = [("x", i) for i in range(base.ndim)]
    target[of] = ("b", 0)
    terms = []
    for pair in lv.pairs:
        a_kernel = jnp.transpose(pair.a, perm).astype(fdtype)
        xd = apply_dropout(x.astype(fdtype), pair, ctx)
        t = bind_with(eqn.primitive, params, [xd, a_kernel])
        if groups != 1:
            u = _grouped_b(t, pair.b, of, groups, fdtype)
        else:
            u = jax.lax.dot_general(t, pair.b.astype(fdtype), (((of,), (0,)), ((), ())), preferred_element_type=fdtype)
            u = jnp.moveaxis(u, -1, of)
        if pair.bias is not None:  # lora_bias: lora_B's bias on the output features
            u = u + k_on(pair.bias, 0, target).astype(fdtype)
        u = u * jnp.asarray(pair.scale, fdtype)
        mask = example_mask(pair, ctx, lv, u.ndim, ex_axis, u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        dropped = xd if pair.k is not None and pair.dropout > 0 and ctx.key is not None else None
        terms.append((pair, u, mask, dropped))
    ctx.record(lv, eqn, "factored")
    if has_dora(lv):
        return dora_sum(base, terms, out_dtype, lambda p: k_on(p.k, 0, target),
                        lambda xd: _base_product(eqn, [xd.astype(x.dtype), lv.w], fdtype)[0])
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), out_dtype)


register("dot_general")(_rule_dot_general)
register("gather")(_rule_gather)
register("conv_general_dilated")(_rule_conv)
