"""The merge family: `merge`, `merge_adapter`, `unmerge_adapter`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from .dora import merge_kernel, unmerge_kernel
from .weight import MultiLoraWeight, add_delta, is_lora_weight, is_trainable
from .weight import is_lora_node as _is_node

__all__ = ["merge", "merge_adapter", "unmerge_adapter"]


@jax.jit
def _merge(lp: Any) -> Any:
    def fold(x):
        if isinstance(x, MultiLoraWeight) or is_lora_weight(x):
            return x.effective()
        if is_trainable(x):
            return x.value
        return x

    return jax.tree_util.tree_map(fold, lp, is_leaf=_is_node)


@jax.jit
def _finite_flags(lp: Any) -> list:
    flags = []
    for x in jax.tree_util.tree_leaves(lp, is_leaf=_is_node):
        if isinstance(x, MultiLoraWeight) or is_lora_weight(x):
            flags.append(jnp.all(jnp.isfinite(x.effective())))
    return flags


def merge(lp: Any, *, safe: bool = False) -> Any:
    """PEFT's ``merge_and_unload``: a plain tree with exactly the original structure,
    each ``LoraWeight`` replaced by::

        W' = W + s · ΔW      (ΔW = A·B in W's layout; computed in float32, cast to W.dtype)
        W' = (m / ‖W + s·ΔW‖) ⊙ (W + s·ΔW)      with DoRA (the norm per output feature)

    (several active adapters on one kernel: in order, as PEFT, see :mod:`jlora.dora`;
    a PiSSA/OLoRA ``W`` is the residual, so ``W'`` is the trained model's kernel)

    and each ``Trainable`` by its value. One jitted ``tree_map``.

    Args:
      safe: first check that every merged kernel is finite; raise ``ValueError`` naming
        the first target that is not, before returning anything.

    >>> merged = merge(lp)                                    # doctest: +SKIP
    >>> model.apply({"params": merged}, x)                    # doctest: +SKIP
    """
    if safe:
        from .targets import path_names

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

    return jax.tree_util.tree_map(step, lp, is_leaf=_is_node)


def merge_adapter(lp: Any) -> Any:
    """PEFT's ``merge_adapter``: keeps the LoRA tree, with each ``w`` holding
    ``W + s·ΔW`` and ``merged=True`` so that ``jlora.lora`` does not add the delta
    twice (a merged forward costs what the base model costs). Undo with
    :func:`unmerge_adapter`.

    >>> lp2 = merge_adapter(lp); lp3 = unmerge_adapter(lp2)   # doctest: +SKIP
    """
    return _set_merged(lp, True)


def unmerge_adapter(lp: Any) -> Any:
    """PEFT's ``unmerge_adapter``: ``w ← w − s·ΔW`` (float32, so ``W`` comes back to
    within float32 rounding for a float32 base) and ``merged=False``. DoRA:
    ``w ← w·(n/m) − s·ΔW`` with the norm ``n`` that :func:`merge_adapter` kept."""
    return _set_merged(lp, False)
