"""The merge family: `merge`, `merge_adapter`, `unmerge_adapter`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ..core.nnx_modules import is_nnx_module, map_module_state
from ..core.paths import path_names
from ..nodes.dora import merge_kernel, unmerge_kernel
from ..nodes.factors import add_delta
from ..nodes.slots import AdapterSlots
from ..nodes.weight import MultiLoraWeight, Trainable, is_lora_weight, is_trainable, is_trainable_tokens
from ..nodes.weight import is_lora_node as _is_node
from ..quant import merge as qmerge
from ..quant.array import is_quantized

__all__ = ["merge", "merge_adapter", "unmerge_adapter"]


def _lora_biases(x: Any) -> list[tuple[float, Any]]:
    """``[(s, b_B)]`` of the active adapters of a node that carry a lora_B bias."""
    if is_lora_weight(x):
        return [(x.scale, x.b_bias)] if x.b_bias is not None and not x.merged else []
    if isinstance(x, MultiLoraWeight):
        return [(p.scale, p.b_bias) for p in x.active_pairs() if p.b_bias is not None]
    return []


def _fold_lora_biases(flat: list, leaves: list, sign: float) -> list:
    """``leaves`` (one per node of ``flat``) with ``sign·s·b_B`` of every adapter's lora_B
    bias added to the base bias next to its kernel (the leaf ``bias`` of the same module,
    plain or ``Trainable``), as PEFT's merge does; ``ValueError`` where there is none."""
    where = {tuple(path_names(p)): i for i, (p, _) in enumerate(flat)}
    leaves = list(leaves)
    for i, (path, x) in enumerate(flat):
        biases = _lora_biases(x)
        if not biases:
            continue
        names = tuple(path_names(path))
        j = where.get(names[:-1] + ("bias",))
        if j is None:
            raise ValueError(
                f"{'/'.join(names)}: lora_bias: the module has no bias leaf to merge the lora_B bias into (PEFT cannot "
                "merge it either); keep the adapter unmerged, or train with lora_bias=False"
            )
        base = leaves[j]
        value = base.value if isinstance(base, Trainable) else base
        for scale, b in biases:
            if tuple(b.shape) != tuple(value.shape):
                raise ValueError(f"{'/'.join(names)}: lora_B bias of shape {tuple(b.shape)} does not fit the base bias "
                                 f"{'/'.join(names[:-1] + ('bias',))} of shape {tuple(value.shape)}")
            compute = jnp.promote_types(value.dtype, jnp.float32)
            value = (value.astype(compute) + (sign * scale) * b.astype(compute)).astype(value.dtype)
        leaves[j] = Trainable(value) if isinstance(base, Trainable) else value
    return leaves


def _check_mergeable(lp: Any) -> None:
    """``ValueError`` naming a grouped-convolution target: it has no merged kernel."""
    for path, x in jax.tree_util.tree_flatten_with_path(lp, is_leaf=_is_node)[0]:
        if isinstance(x, AdapterSlots):
            raise ValueError(
                f"{'/'.join(path_names(path))}: adapter slots hold N adapters, not one merged kernel; merge one slot "
                "with jlora.merge(jlora.adapters.get_slot(pool, slot))"
            )
        pairs = [x] if is_lora_weight(x) else x.active_pairs() if isinstance(x, MultiLoraWeight) else []
        for p in pairs:
            if p.groups != 1 and not getattr(x, "merged", False):
                raise ValueError(
                    f"{'/'.join(path_names(path))}: a LoRA adapter on a grouped convolution (groups={p.groups}) cannot "
                    "be merged: PEFT's lora_A reads every input channel, so W + s·ΔW is not a grouped kernel (PEFT's "
                    "merge raises too). Keep it unmerged (jlora.lora), or leave the layer out of target_modules"
                )


@jax.jit
def _merge(lp: Any) -> Any:
    def fold(x):
        if isinstance(x, MultiLoraWeight) or is_lora_weight(x):
            return x.effective()
        if is_trainable(x) or is_trainable_tokens(x):
            return x.value if is_trainable(x) else x.effective()
        return x

    flat, treedef = jax.tree_util.tree_flatten_with_path(lp, is_leaf=_is_node)
    leaves = _fold_lora_biases(flat, [fold(x) for _, x in flat], 1.0)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@jax.jit
def _finite_flags(lp: Any) -> list:
    flags = []
    for x in jax.tree_util.tree_leaves(lp, is_leaf=_is_node):
        if isinstance(x, MultiLoraWeight) or is_lora_weight(x):
            flags.append(jnp.all(jnp.isfinite(x.effective())))
    return flags


def merge(lp: Any, *, safe: bool = False, requantize: bool = False, with_report: bool = False) -> Any:
    """PEFT's ``merge_and_unload``: a plain tree with exactly the original structure,
    each ``LoraWeight`` replaced by::

        W' = W + s · ΔW      (ΔW = A·B in W's layout; computed in float32, cast to W.dtype)
        W' = (m / ‖W + s·ΔW‖) ⊙ (W + s·ΔW)      with DoRA (the norm per output feature)

    (several active adapters on one kernel: in order, as PEFT, see :mod:`jlora.nodes.dora`;
    a PiSSA/OLoRA ``W`` is the residual, so ``W'`` is the trained model's kernel)

    and each ``Trainable`` by its value. With ``lora_bias``, ``s·b_B`` is added to the
    base bias next to each kernel (PEFT's merge; a ``ValueError`` where the module has no
    bias); trainable token rows replace their rows of the table (PEFT's
    ``index_copy``). One jitted ``tree_map``. A LoRA adapter on a grouped convolution
    has no merged kernel (PEFT's lora_A reads every input channel): ``ValueError``, as
    PEFT raises.

    Over a quantized base (:func:`jlora.quantize`) each quantized kernel is dequantized to
    its ``compute_dtype`` first, so the result is the dense model that was trained,
    ``dequant(W) + s·ΔW``. With ``requantize=True`` the merged targets are quantized again
    like their base (PEFT's merge into a bitsandbytes base), which drops most of a small
    ``ΔW``: a :class:`jlora.quant.RequantizeWarning` says how much survived.

    Args:
      safe: first check that every merged kernel is finite; raise ``ValueError`` naming
        the first target that is not, before returning anything.
      requantize: re-quantize the merged kernels of a quantized base (see above).
      with_report: with ``requantize``, return ``(merged, RequantizeReport)``.

    An ``nnx.Module`` gives a module of the same class (its ``nnx.State`` a State).

    >>> merged = merge(lp)                                    # doctest: +SKIP
    >>> model.apply({"params": merged}, x)                    # doctest: +SKIP
    """
    if is_nnx_module(lp):
        if requantize and with_report:
            reports = []

            def merge_state(s):
                merged, report = merge(s, safe=safe, requantize=True, with_report=True)
                reports.append(report)
                return merged

            return map_module_state(merge_state, lp), reports[0]
        return map_module_state(lambda s: merge(s, safe=safe, requantize=requantize), lp)
    _check_mergeable(lp)  # after the nnx branch: runs on the module's state
    if requantize:
        if safe:
            merge(lp, safe=True)
        is_target = lambda x: isinstance(x, MultiLoraWeight) or is_lora_weight(x)  # noqa: E731
        out, report = qmerge.requantize_merge(lp, _merge, _is_node, is_target)
        qmerge.warn_requantized(report)
        return (out, report) if with_report else out
    lp = qmerge.dequantize_bases(lp)  # a quantized base: dense, in compute_dtype
    if safe:
        flags = _finite_flags(lp)
        flat = jax.tree_util.tree_flatten_with_path(lp, is_leaf=_is_node)[0]
        paths = ["/".join(path_names(p)) for p, x in flat if isinstance(x, MultiLoraWeight) or is_lora_weight(x)]
        for path, ok in zip(paths, flags):
            if not bool(ok):
                raise ValueError(f"merge(safe=True): merged kernel at {path!r} has NaN or Inf values; nothing merged")
    return _merge(lp)


@functools.partial(jax.jit, static_argnums=1)
def _set_merged(lp: Any, to_merged: bool) -> Any:
    def step(x):
        if isinstance(x, MultiLoraWeight):
            raise ValueError(
                "merge_adapter/unmerge_adapter work on single-adapter trees; for several adapters use "
                "jlora.merge(lp) (merges the active ones) or jlora.get_adapter(lp, name)"
            )
        if not is_lora_weight(x) or x.merged == to_merged:
            return x
        if is_quantized(x.w):
            raise ValueError(
                "merge_adapter/unmerge_adapter over a quantized base would re-quantize it after every call; use "
                "jlora.merge(lp) (a dense merged tree) or jlora.merge(lp, requantize=True)"
            )
        if x.magnitude is not None:
            # DoRA: W' = (m/n)⊙(W + s·ΔW); n is kept (frozen) so that unmerge restores W exactly
            if to_merged:
                w, n = merge_kernel(x.w, x.a, x.b, x.magnitude, x.scale, x.layout)
                return x.replace(w=w, weight_norm=n, merged=True)
            w = unmerge_kernel(x.w, x.a, x.b, x.magnitude, x.weight_norm, x.scale, x.layout)
            return x.replace(w=w, weight_norm=None, merged=False)
        sign = 1.0 if to_merged else -1.0
        w = add_delta(x.w, x.a, x.b, x.scale, x.layout, sign)
        return x.replace(w=w, merged=to_merged)

    flat, treedef = jax.tree_util.tree_flatten_with_path(lp, is_leaf=_is_node)
    # the lora_B biases of the adapters that change state go into (out of) the base biases
    changing = [(p, x if is_lora_weight(x) and x.merged != to_merged else None) for p, x in flat]
    leaves = [step(x) for _, x in flat]
    if to_merged:
        leaves = _fold_lora_biases(changing, leaves, 1.0)
    else:
        leaves = _fold_lora_biases([(p, None if x is None else x.replace(merged=False)) for p, x in changing], leaves,
                                   -1.0)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def merge_adapter(lp: Any) -> Any:
    """PEFT's ``merge_adapter``: keeps the LoRA tree, with each ``w`` holding
    ``W + s·ΔW`` and ``merged=True`` so that ``jlora.lora`` does not add the delta
    twice (a merged forward costs what the base model costs). Undo with
    :func:`unmerge_adapter`.

    >>> lp2 = merge_adapter(lp); lp3 = unmerge_adapter(lp2)   # doctest: +SKIP
    """
    if is_nnx_module(lp):
        return map_module_state(merge_adapter, lp)
    _check_mergeable(lp)
    return _set_merged(lp, True)


def unmerge_adapter(lp: Any) -> Any:
    """PEFT's ``unmerge_adapter``: ``w ← w − s·ΔW`` (float32, so ``W`` comes back to
    within float32 rounding for a float32 base) and ``merged=False``. DoRA:
    ``w ← w·(n/m) − s·ΔW`` with the norm ``n`` that :func:`merge_adapter` kept."""
    if is_nnx_module(lp):
        return map_module_state(unmerge_adapter, lp)
    return _set_merged(lp, False)
