"""View rules: a LoRA kernel stays factored through operations that only rearrange ``W``
(transpose, cast, copy, sharding, reshape, squeeze, broadcast, slices): the same view is
applied to the factors, so ``view(W) + s·view(A·B)`` is still one factored value.

A reshape that mixes input and output axes, or a slice along an axis the factors cannot
follow, forms ``W + s·A·B`` at that point (:func:`~jlora.transform.interpreter.rule_materialize`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from ..core.jaxprs import reshape_blocks
from .interpreter import bind, bind_with, register, rule_materialize
from .values import Axis, LoraValue

__all__: list[str] = []


def _rule_passthrough(eqn, invals, ctx):
    lv = invals[0]
    if not all(not isinstance(x, LoraValue) for x in invals[1:]):
        return rule_materialize(eqn, invals, ctx)
    return lv.with_w(bind(eqn, [lv.w, *invals[1:]]))


def _rule_reshard(eqn, invals, ctx):
    """``reshard`` (Explicit mesh axes, and the entry to ``auto_axes`` regions): ``W`` and
    each factor move to the destination's mesh, each factor axis sharded as the kernel
    axis it stands for, the rank axis unsharded."""
    lv = invals[0]
    if any(isinstance(x, LoraValue) for x in invals[1:]):
        return rule_materialize(eqn, invals, ctx)
    dst = eqn.params.get("dst_sharding")
    spec_of_w = getattr(dst, "spec", None)
    if spec_of_w is None or not hasattr(dst, "mesh"):
        return _rule_passthrough(eqn, invals, ctx)
    spec = tuple(spec_of_w) + (None,) * (lv.w.ndim - len(spec_of_w))
    by_axis = {ax: spec[i] for i, ax in enumerate(lv.axes)}
    ns = lv.n_stack
    stack = [by_axis.get(("s", k)) for k in range(ns)]

    def move(x, entries):
        sharding = jax.sharding.NamedSharding(dst.mesh, jax.sharding.PartitionSpec(*entries))
        return bind_with(eqn.primitive, dict(eqn.params, dst_sharding=sharding), [x])

    def ab(a, b):
        a_spec = stack + [by_axis.get(("a", k)) for k in range(a.ndim - ns - 1)] + [None]
        b_spec = stack + [None] + [by_axis.get(("b", k)) for k in range(b.ndim - ns - 1)]
        return move(a, a_spec), move(b, b_spec)

    return lv.with_w(bind(eqn, [lv.w]), ab=ab)


def _rule_convert(eqn, invals, ctx):
    """A float kernel cast to another float dtype stays factored (the factors keep
    their own dtype); a cast to an integer or boolean type (quantisation) does not."""
    (lv,) = invals
    new_dtype = eqn.params.get("new_dtype")
    if new_dtype is None or not (jnp.issubdtype(new_dtype, jnp.floating) and jnp.issubdtype(lv.w.dtype, jnp.floating)):
        return rule_materialize(eqn, invals, ctx, f"cast of a weight to {new_dtype}")
    return lv.with_w(bind(eqn, [lv.w]))


def _rule_transpose(eqn, invals, ctx):
    (lv,) = invals
    perm = eqn.params["permutation"]
    return lv.with_w(bind(eqn, [lv.w]), axes=[lv.axes[p] for p in perm])


def _reshape_lora(lv: LoraValue, new_shape: Sequence[int]) -> Optional[LoraValue]:
    """The factored value of ``reshape(view, new_shape)``, or None if it does not factor
    (nor for a grouped convolution's factors, whose A is wider than the kernel)."""
    if any(p.groups != 1 for p in lv.pairs):
        return None
    old = tuple(lv.w.shape)
    blocks = reshape_blocks(old, tuple(new_shape))
    if blocks is None:
        return None
    sizes = lv.sizes
    ns_old = lv.n_stack
    # per group: list of (first old factor idx, old idxs, new view axes, new sizes)
    plans: dict[str, list] = {"s": [], "a": [], "b": []}
    for oi, nj in blocks:
        if oi:
            groups = {lv.axes[i][0] for i in oi}
            if len(groups) != 1:
                return None
            g = groups.pop()
            idxs = [lv.axes[i][1] for i in oi]
            if idxs != list(range(idxs[0], idxs[0] + len(idxs))):
                return None
            plans[g].append((idxs[0], idxs, nj, [new_shape[j] for j in nj]))
        else:
            plans["b"].append((10**9, [], nj, [new_shape[j] for j in nj]))
    if plans["s"]:
        # stack axes may only pass through unchanged, or be dropped when of size 1
        for p in plans["s"]:
            if len(p[1]) != 1 or len(p[2]) > 1 or (not p[2] and sizes["s"][p[1][0]] != 1):
                return None
    new_axes: dict[int, Axis] = {}
    new_sizes: dict[str, list[int]] = {}
    for g, items in plans.items():
        items.sort(key=lambda p: p[0])
        covered = [k for p in items for k in p[1]]
        if sorted(covered) != list(range(len(sizes[g]))):
            return None
        out_sizes: list[int] = []
        for _, _, nj, nsz in items:
            for j, s in zip(nj, nsz):
                new_axes[j] = (g, len(out_sizes))
                out_sizes.append(int(s))
        new_sizes[g] = out_sizes
    if not new_sizes["a"] or not new_sizes["b"]:
        return None
    s, i, o = tuple(new_sizes["s"]), tuple(new_sizes["a"]), tuple(new_sizes["b"])
    axes = [new_axes[j] for j in range(len(new_shape))]
    return lv.with_w(
        lv.w, axes=axes, n_stack=len(s),
        ab=lambda a, b: (a.reshape(s + i + (a.shape[-1],)), b.reshape(s + (b.shape[ns_old],) + o)),
    )


def _rule_reshape(eqn, invals, ctx):
    lv = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        return rule_materialize(eqn, invals, ctx)
    new = _reshape_lora(lv, eqn.params["new_sizes"])
    if new is None:
        return rule_materialize(eqn, invals, ctx, "reshape mixes input and output axes")
    return dataclasses.replace(new, w=bind(eqn, [lv.w]))


def _rule_squeeze(eqn, invals, ctx):
    (lv,) = invals
    dims = set(d % lv.w.ndim for d in eqn.params["dimensions"])
    new_shape = [s for i, s in enumerate(lv.w.shape) if i not in dims]
    new = _reshape_lora(lv, new_shape)
    if new is None:
        return rule_materialize(eqn, invals, ctx, "squeeze removes a needed axis")
    return dataclasses.replace(new, w=bind(eqn, [lv.w]))


def _rule_broadcast_in_dim(eqn, invals, ctx):
    lv = invals[0]
    shape = tuple(eqn.params["shape"])
    bdims = tuple(eqn.params["broadcast_dimensions"])
    is_expand = (
        len(invals) == 1
        and list(bdims) == sorted(bdims)
        and all(shape[bdims[d]] == lv.w.shape[d] for d in range(lv.w.ndim))
        and all(shape[i] == 1 for i in range(len(shape)) if i not in bdims)
    )
    if not is_expand:
        return rule_materialize(eqn, invals, ctx, "broadcast of a weight")
    new = _reshape_lora(lv, shape)
    if new is None:
        return rule_materialize(eqn, invals, ctx)
    return dataclasses.replace(new, w=bind(eqn, [lv.w]))


def _factor_axis(lv: LoraValue, view_axis: int) -> list[tuple[str, int]]:
    """The factor axes (``("a"|"b", index)``) that view axis ``view_axis`` indexes."""
    g, k = lv.axes[view_axis]
    if g == "s":
        return [("a", k), ("b", k)]
    if g == "a":
        return [("a", lv.n_stack + k)]
    return [("b", lv.n_stack + 1 + k)]


def _rule_slice(eqn, invals, ctx):
    """``W[i0:i1, j0:j1]`` slices the matching axes of A and B (any role)."""
    (lv,) = invals
    p = eqn.params
    strides = p.get("strides") or (1,) * lv.w.ndim
    if 0 in eqn.outvars[0].aval.shape or any(q.groups != 1 for q in lv.pairs):
        return rule_materialize(eqn, invals, ctx, "empty slice")

    def cut(x, f):
        starts, limits, steps = [0] * x.ndim, list(x.shape), [1] * x.ndim
        for i in range(lv.w.ndim):
            for g, j in _factor_axis(lv, i):
                if g == f:
                    starts[j], limits[j], steps[j] = p["start_indices"][i], p["limit_indices"][i], strides[i]
        return jax.lax.slice(x, starts, limits, steps)

    return lv.with_w(bind(eqn, [lv.w]), ab=lambda a, b: (cut(a, "a"), cut(b, "b")))


def _rule_dynamic_slice(eqn, invals, ctx):
    """``lax.dynamic_slice(W, starts)`` (e.g. ``W[i]`` of stacked layers in a loop)."""
    lv, *starts = invals
    if any(isinstance(s, LoraValue) for s in starts) or len(starts) != lv.w.ndim or any(q.groups != 1 for q in lv.pairs):
        return rule_materialize(eqn, invals, ctx, "LoRA weight used as an index")
    sizes = eqn.params["slice_sizes"]
    dtype = jnp.asarray(starts[0]).dtype

    def cut(x, f):
        st, sz = [jnp.zeros((), dtype)] * x.ndim, list(x.shape)
        for i in range(lv.w.ndim):
            for g, j in _factor_axis(lv, i):
                if g == f:
                    st[j], sz[j] = jnp.asarray(starts[i]).astype(dtype), sizes[i]
        return jax.lax.dynamic_slice(x, st, sz)

    return lv.with_w(bind(eqn, [lv.w, *starts]), ab=lambda a, b: (cut(a, "a"), cut(b, "b")))


register("copy", "copy_p", "sharding_constraint")(_rule_passthrough)
register("reshard")(_rule_reshard)
register("convert_element_type")(_rule_convert)
register("transpose")(_rule_transpose)
register("reshape")(_rule_reshape)
register("squeeze")(_rule_squeeze)
register("broadcast_in_dim")(_rule_broadcast_in_dim)
register("slice")(_rule_slice)
register("dynamic_slice")(_rule_dynamic_slice)
# The same primitives as this JAX version names them (names have moved between releases).
try:
    from jax.extend.core import primitives as _prims
except ImportError:  # pragma: no cover - very old JAX
    _prims = None
for _attr, _rule in [("copy_p", _rule_passthrough), ("sharding_constraint_p", _rule_passthrough),
                     ("reshard_p", _rule_reshard)]:
    _prim = getattr(_prims, _attr, None) if _prims is not None else None
    if _prim is not None:
        register(_prim.name)(_rule)
