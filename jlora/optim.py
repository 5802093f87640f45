"""Freezing: `optimizer`, trainable/frozen labels, `partition` / `combine`."""

from __future__ import annotations

from typing import Any

import jax
import optax

from .weight import LoraWeight, Trainable, is_lora_weight, is_trainable

__all__ = ["optimizer", "trainable_labels", "partition", "combine"]

TRAINABLE = "trainable"
FROZEN = "frozen"


def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraWeight, Trainable))


def trainable_labels(lp: Any) -> Any:
    """A tree like ``lp`` with ``"trainable"`` at A, B and ``Trainable`` values and
    ``"frozen"`` everywhere else (the labels of :func:`optimizer`).

    >>> trainable_labels(lp)["dense"]["kernel"]   # doctest: +SKIP
    LoraWeight(w='frozen', a='trainable', b='trainable', ...)
    """

    def label(x):
        if is_lora_weight(x):
            return x.replace(w=FROZEN, a=TRAINABLE, b=TRAINABLE)
        if is_trainable(x):
            return Trainable(jax.tree_util.tree_map(lambda _: TRAINABLE, x.value))
        return FROZEN

    return jax.tree_util.tree_map(label, lp, is_leaf=_is_node)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, ``optax.set_to_zero()`` on the frozen ones.

    An ``optax.multi_transform`` over :func:`trainable_labels`: A, B and leaves marked
    ``Trainable`` (by ``bias=`` or ``modules_to_save``) are updated by ``tx``; every other
    leaf, the base kernels included, gets a zero update and holds no optimizer state::

        updates[θ] = tx(g)[θ] if θ is trainable else 0

    Example:
      >>> tx = optimizer(optax.adamw(1e-4))               # doctest: +SKIP
      >>> state = tx.init(lp)                              # doctest: +SKIP
      >>> updates, state = tx.update(grads, state, lp)     # doctest: +SKIP
      >>> lp = optax.apply_updates(lp, updates)            # doctest: +SKIP
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, trainable_labels)


def partition(lp: Any) -> tuple[Any, Any]:
    """Splits a LoRA tree into ``(trainable, frozen)`` trees of the same structure, with
    ``None`` where the other part holds the leaf (equinox's ``partition``).

    Differentiate the trainable part only, so no gradient is ever computed for a frozen
    leaf::

        trainable, frozen = jlora.partition(lp)
        grads = jax.grad(lambda t: loss(jlora.combine(t, frozen)))(trainable)

    ``combine(trainable, frozen)`` rebuilds ``lp``.
    """

    def split(x, want_trainable: bool):
        if is_lora_weight(x):
            return x.replace(w=None, a=x.a, b=x.b) if want_trainable else x.replace(w=x.w, a=None, b=None)
        if is_trainable(x):
            return x if want_trainable else None
        return None if want_trainable else x

    trainable = jax.tree_util.tree_map(lambda x: split(x, True), lp, is_leaf=_is_node)
    frozen = jax.tree_util.tree_map(lambda x: split(x, False), lp, is_leaf=_is_node)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`: takes each leaf from whichever tree holds it."""

    def pick(t, f):
        if is_lora_weight(t):
            return t.replace(w=f.w)
        return f if t is None else t

    return jax.tree_util.tree_map(
        pick, trainable, frozen, is_leaf=lambda x: x is None or _is_node(x)
    )
