"""Freezing: `optimizer`, trainable/frozen labels, `partition` / `combine`."""

from __future__ import annotations

from typing import Any

import jax
import optax

from .weight import MultiLoraWeight, Trainable, is_lora_weight, is_trainable
from .weight import is_lora_node as _is_node

__all__ = ["optimizer", "trainable_labels", "partition", "combine"]

TRAINABLE = "trainable"
FROZEN = "frozen"


def trainable_labels(lp: Any) -> Any:
    """A tree like ``lp`` with ``"trainable"`` at A, B, DoRA's magnitude and ``Trainable``
    values and ``"frozen"`` everywhere else (the labels of :func:`optimizer`), PiSSA/OLoRA's
    initial factors and DoRA's saved norm included.

    >>> trainable_labels(lp)["dense"]["kernel"]   # doctest: +SKIP
    LoraWeight(w='frozen', a='trainable', b='trainable', ...)
    """

    def label(x):
        if is_lora_weight(x):
            return _label_pair(x, TRAINABLE).replace(w=FROZEN)
        if isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            adapters = {n: _label_pair(p, TRAINABLE if id(p) in live else FROZEN) for n, p in x.adapters.items()}
            return x.replace(w=FROZEN, adapters=adapters)
        if is_trainable(x):
            return Trainable(jax.tree_util.tree_map(lambda _: TRAINABLE, x.value))
        return FROZEN

    return jax.tree_util.tree_map(label, lp, is_leaf=_is_node)


def _label_pair(p: Any, how: str) -> Any:
    """Labels of one adapter's children: ``how`` for A, B and DoRA's magnitude; frozen
    for DoRA's saved norm and PiSSA/OLoRA's initial factors (absent children stay None)."""
    tag = lambda v, t: None if v is None else t  # noqa: E731
    return p.replace(a=how, b=how, magnitude=tag(p.magnitude, how), weight_norm=tag(p.weight_norm, FROZEN),
                     a0=tag(p.a0, FROZEN), b0=tag(p.b0, FROZEN))


_TRAINED = ("a", "b", "magnitude")
_KEPT = ("weight_norm", "a0", "b0")


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

    def part(p, trained: bool, want_trainable: bool):
        # the trained children (A, B, m) of a trained adapter go to the trainable part;
        # everything else (W, a frozen adapter, DoRA's saved norm, PiSSA's A0/B0) to the frozen one
        if trained and want_trainable:
            return p.replace(**{n: None for n in _KEPT})
        if trained:
            return p.replace(**{n: None for n in _TRAINED})
        return p if not want_trainable else p.replace(**{n: None for n in _TRAINED + _KEPT})

    def split(x, want_trainable: bool):
        if is_lora_weight(x):
            return part(x, True, want_trainable).replace(w=None if want_trainable else x.w)
        if isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            adapters = {n: part(p, id(p) in live, want_trainable) for n, p in x.adapters.items()}
            return x.replace(w=None if want_trainable else x.w, adapters=adapters)
        if is_trainable(x):
            return x if want_trainable else None
        return None if want_trainable else x

    trainable = jax.tree_util.tree_map(lambda x: split(x, True), lp, is_leaf=_is_node)
    frozen = jax.tree_util.tree_map(lambda x: split(x, False), lp, is_leaf=_is_node)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`: takes each leaf from whichever tree holds it."""

    def join(t, f):
        both = {n: getattr(t, n) if getattr(t, n) is not None else getattr(f, n) for n in _TRAINED + _KEPT}
        return t.replace(**both)

    def pick(t, f):
        if is_lora_weight(t):
            return join(t, f).replace(w=f.w)
        if isinstance(t, MultiLoraWeight):
            adapters = {n: join(p, f.adapters[n]) for n, p in t.adapters.items()}
            return t.replace(w=f.w, adapters=adapters)
        return f if t is None else t

    return jax.tree_util.tree_map(
        pick, trainable, frozen, is_leaf=lambda x: x is None or _is_node(x)
    )
