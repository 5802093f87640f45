"""Freezing: `optimizer`, trainable/frozen labels, `partition` / `combine`, and the NNX
filter `nnx_trainable`."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..core.paths import path_names
from ..nodes.slots import AdapterSlots
from ..nodes.weight import (
    MultiLoraWeight,
    Trainable,
    is_lora_weight,
    is_trainable,
    is_trainable_tokens,
)
from ..nodes.weight import is_lora_node as _is_node

__all__ = ["optimizer", "trainable_labels", "partition", "combine", "nnx_trainable", "LoraOptState"]

TRAINABLE = "trainable"
FROZEN = "frozen"


def trainable_labels(lp: Any) -> Any:
    """A tree like ``lp`` with ``"trainable"`` at A, B, DoRA's magnitude, the lora_B bias,
    trainable token rows and ``Trainable`` values and ``"frozen"`` everywhere else (the
    labels of :func:`optimizer`), PiSSA/OLoRA's initial factors and DoRA's saved norm included.

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
        if is_trainable_tokens(x):
            return x.replace(w=FROZEN, values=TRAINABLE)
        if isinstance(x, AdapterSlots):
            return x.replace(w=FROZEN, a=TRAINABLE, b=TRAINABLE, scale=FROZEN)
        return FROZEN

    return jax.tree_util.tree_map(label, lp, is_leaf=_is_node)


def _label_pair(p: Any, how: str) -> Any:
    """Labels of one adapter's children: ``how`` for A, B and DoRA's magnitude; frozen
    for DoRA's saved norm and PiSSA/OLoRA's initial factors (absent children stay None)."""
    tag = lambda v, t: None if v is None else t  # noqa: E731
    return p.replace(a=how, b=how, magnitude=tag(p.magnitude, how), weight_norm=tag(p.weight_norm, FROZEN),
                     a0=tag(p.a0, FROZEN), b0=tag(p.b0, FROZEN), b_bias=tag(p.b_bias, how))


_TRAINED = ("a", "b", "magnitude", "b_bias")
_KEPT = ("weight_norm", "a0", "b0")


class LoraOptState(NamedTuple):
    """State of :func:`optimizer`: the wrapped transformation's state over the trainable
    arrays only, as a flat ``{path: array}`` dict (``".../a"``, ``".../b"``, trainable
    leaves by their own path)."""

    inner: Any


def _unwrap_variable(x: Any) -> Any:
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(x, nnx.Variable):
        return x.get_value()
    return x


def _is_node_or_variable(x: Any) -> bool:
    if _is_node(x):
        return True
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _trainable_arrays(tree: Any) -> dict[str, Any]:
    """``{path: array}`` of the trainable arrays of ``tree`` (a LoRA tree, its gradients,
    its ``partition``'s trainable half, or an ``nnx.State`` of Variables holding them)."""
    out: dict[str, Any] = {}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node_or_variable)[0]
    for path, x in flat:
        x = _unwrap_variable(x)
        name = "/".join(path_names(path))
        if is_lora_weight(x):
            _put_trained(out, name, x)
        elif isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            for n, p in x.adapters.items():
                if id(p) in live:
                    _put_trained(out, f"{name}/{n}", p)
        elif is_trainable(x):
            for sub, v in jax.tree_util.tree_flatten_with_path(x.value)[0]:
                out["/".join((name, *path_names(sub)))] = v
        elif is_trainable_tokens(x) and x.values is not None:
            out[f"{name}/values"] = x.values
        elif isinstance(x, AdapterSlots):  # the slots' factors (the zero padding gets zero gradients)
            for child in ("a", "b"):
                if getattr(x, child) is not None:
                    out[f"{name}/{child}"] = getattr(x, child)
    return out


def _put_trained(out: dict[str, Any], name: str, p: Any) -> None:
    """Adds one adapter's trained children (A, B and DoRA's magnitude) to ``out``."""
    for child in _TRAINED:
        v = getattr(p, child)
        if v is not None:
            out[f"{name}/{child}"] = v


def _pair_updates(p: Any, updates: dict[str, Any], name: str, zero: Any) -> Any:
    """One adapter with its trained children taken from ``updates`` (zeros where absent)
    and zeros for its frozen children (DoRA's saved norm, PiSSA/OLoRA's A0/B0)."""
    new = {c: updates.get(f"{name}/{c}", zero(getattr(p, c))) for c in _TRAINED}
    new.update({c: zero(getattr(p, c)) for c in _KEPT})
    return p.replace(**new)


def _full_updates(params: Any, updates: dict[str, Any]) -> Any:
    """``params``' structure with ``updates`` at the trainable arrays and zeros elsewhere."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    # zeros for every array under a frozen child (a QuantizedArray base holds several)
    zero = lambda v: None if v is None else jax.tree_util.tree_map(_zero_update, v)  # noqa: E731
    leaves = []
    for path, x in flat:
        name = "/".join(path_names(path))
        if is_lora_weight(x):
            leaves.append(_pair_updates(x, updates, name, zero).replace(w=zero(x.w)))
        elif isinstance(x, MultiLoraWeight):
            adapters = {n: _pair_updates(p, updates, f"{name}/{n}", zero) for n, p in x.adapters.items()}
            leaves.append(x.replace(w=zero(x.w), adapters=adapters))
        elif is_trainable(x):
            sub_flat, sub_def = jax.tree_util.tree_flatten_with_path(x.value)
            vals = [updates.get("/".join((name, *path_names(sp))), None) for sp, _ in sub_flat]
            vals = [zero(v) if u is None else u for u, (_, v) in zip(vals, sub_flat)]
            leaves.append(Trainable(jax.tree_util.tree_unflatten(sub_def, vals)))
        elif is_trainable_tokens(x):
            leaves.append(x.replace(w=zero(x.w), values=updates.get(f"{name}/values", zero(x.values))))
        elif isinstance(x, AdapterSlots):
            leaves.append(x.replace(w=zero(x.w), scale=zero(x.scale), a=updates.get(f"{name}/a", zero(x.a)),
                                    b=updates.get(f"{name}/b", zero(x.b))))
        else:
            leaves.append(zero(x))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, a zero update on the frozen ones.

    A, B, DoRA's magnitude, the lora_B bias (``lora_bias``), trainable token rows and
    leaves marked ``Trainable`` (by ``bias=`` or ``modules_to_save``) are updated by ``tx``;
    every other leaf, the base kernels included, gets a zero update
    and holds no optimizer state::

        updates[θ] = tx(g)[θ] if θ is trainable else 0

    ``tx`` sees the trainable arrays as a flat dict ``{path: array}`` (paths such as
    ``"layers/0/up/kernel/a"``), so its state holds plain arrays only: it works on plain
    trees, on ``nnx.State``, and inside ``nnx.Optimizer(model, jlora.optimizer(tx),
    wrt=jlora.nnx_trainable)``.

    Example:
      >>> tx = optimizer(optax.adamw(1e-4))               # doctest: +SKIP
      >>> state = tx.init(lp)                              # doctest: +SKIP
      >>> updates, state = tx.update(grads, state, lp)     # doctest: +SKIP
      >>> lp = optax.apply_updates(lp, updates)            # doctest: +SKIP
    """

    def init(params: Any) -> LoraOptState:
        return LoraOptState(tx.init(_trainable_arrays(params)))

    def update(updates: Any, state: LoraOptState, params: Any = None, **extra: Any):
        grads = _trainable_arrays(updates)
        inner_params = _trainable_arrays(params) if params is not None else None
        new, inner = tx.update(grads, state.inner, inner_params, **extra)
        return _full_updates(updates, new), LoraOptState(inner)

    return optax.GradientTransformationExtraArgs(init, update)


def nnx_trainable(path: Any, x: Any) -> bool:
    """The NNX filter of a wrapped module's trainable Variables: those holding a
    ``LoraWeight``, ``MultiLoraWeight`` or ``Trainable`` (LoRA kernels, trained biases and
    ``modules_to_save`` leaves). Use it as ``wrt=`` of ``nnx.Optimizer`` and in
    ``nnx.grad(..., argnums=nnx.DiffState(0, jlora.nnx_trainable))``, with
    ``jlora.optimizer(tx)`` as the transformation: the optimizer state then holds the
    factors and trainable leaves only (exactly what ``jlora.optimizer`` holds on a plain
    tree), and gradients are computed for those Variables only::

        opt = nnx.Optimizer(model, jlora.optimizer(optax.adamw(1e-3)), wrt=jlora.nnx_trainable)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, jlora.nnx_trainable))(model, batch)
        opt.update(model, grads)

    A filter selects whole Variables, and a targeted kernel's Variable holds ``W`` with
    its factors: ``jlora.optimizer`` is what freezes ``W`` inside it (a zero update, no
    state). With a plain ``tx`` the optimizer would keep moments for ``W`` (and
    ``wrt=nnx.Param`` with a plain ``tx`` trains every parameter of the model).

    >>> nnx_trainable((), jlora.Trainable(jnp.zeros(3)))   # doctest: +SKIP
    True
    """
    del path
    return _is_node(_unwrap_variable(x))


def _zero_update(u: Any) -> Any:
    """A zero update like ``u``; for the ``float0`` gradient of an integer leaf (the codes of
    a quantized base, with ``jax.grad(..., allow_int=True)``) an integer zero, so that
    ``optax.apply_updates`` leaves the codes as they are."""
    return jnp.zeros(u.shape, jnp.uint8) if u.dtype == jax.dtypes.float0 else jnp.zeros_like(u)


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
        if is_trainable_tokens(x):
            return x.replace(w=None) if want_trainable else x.replace(values=None)
        if isinstance(x, AdapterSlots):
            return x.replace(w=None, scale=None) if want_trainable else x.replace(a=None, b=None)
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
        if is_trainable_tokens(t):
            return t.replace(w=f.w)
        if isinstance(t, AdapterSlots):
            return t.replace(w=f.w, scale=f.scale)
        return f if t is None else t

    return jax.tree_util.tree_map(
        pick, trainable, frozen, is_leaf=lambda x: x is None or _is_node(x)
    )
