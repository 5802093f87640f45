"""Freezing: `optimizer`, trainable/frozen labels, `partition` / `combine`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from .weight import MultiLoraWeight, Trainable, is_lora_weight, is_trainable
from .weight import is_lora_node as _is_node

__all__ = ["optimizer", "trainable_labels", "partition", "combine"]

TRAINABLE = "trainable"
FROZEN = "frozen"


def trainable_labels(lp: Any) -> Any:
    """A tree like ``lp`` with ``"trainable"`` at A, B and ``Trainable`` values and
    ``"frozen"`` everywhere else (the labels of :func:`optimizer`).

    >>> trainable_labels(lp)["dense"]["kernel"]   # doctest: +SKIP
    LoraWeight(w='frozen', a='trainable', b='trainable', ...)
    """

    def label(x):
        if is_lora_weight(x):
            return x.replace(w=FROZEN, a=TRAINABLE, b=TRAINABLE)
        if isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            adapters = {
                n: p.replace(a=TRAINABLE if id(p) in live else FROZEN, b=TRAINABLE if id(p) in live else FROZEN)
                for n, p in x.adapters.items()
            }
            return x.replace(w=FROZEN, adapters=adapters)
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
    return optax.multi_transform({TRAINABLE: tx, FROZEN: _frozen()}, trainable_labels)


def _frozen() -> optax.GradientTransformation:
    """``optax.set_to_zero()``, except that the ``float0`` gradient of an integer leaf (the
    codes of a quantized base, with ``jax.grad(..., allow_int=True)``) becomes an integer
    zero, so that ``optax.apply_updates`` leaves the codes as they are."""

    def update(updates, state, params=None):
        del params
        zero = lambda u: jnp.zeros(u.shape, jnp.uint8) if u.dtype == jax.dtypes.float0 else jnp.zeros_like(u)  # noqa: E731
        return jax.tree_util.tree_map(zero, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
        if isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            keep = lambda p: (id(p) in live) == want_trainable  # noqa: E731
            adapters = {n: p if keep(p) else p.replace(a=None, b=None) for n, p in x.adapters.items()}
            return x.replace(w=None if want_trainable else x.w, adapters=adapters)
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
        if isinstance(t, MultiLoraWeight):
            adapters = {
                n: p if p.a is not None else f.adapters[n] for n, p in t.adapters.items()
            }
            return t.replace(w=f.w, adapters=adapters)
        return f if t is None else t

    return jax.tree_util.tree_map(
        pick, trainable, frozen, is_leaf=lambda x: x is None or _is_node(x)
    )
