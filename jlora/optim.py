"""Freezing: `optimizer`, trainable/frozen labels, `partition` / `combine`, and the NNX
filter `nnx_trainable`."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .weight import LoraWeight, MultiLoraWeight, Trainable, is_lora_weight, is_trainable
from .weight import is_lora_node as _is_node

__all__ = ["optimizer", "trainable_labels", "partition", "combine", "nnx_trainable", "LoraOptState"]

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
    from .targets import path_names

    out: dict[str, Any] = {}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node_or_variable)[0]
    for path, x in flat:
        x = _unwrap_variable(x)
        name = "/".join(path_names(path))
        if is_lora_weight(x):
            if x.a is not None:
                out[f"{name}/a"], out[f"{name}/b"] = x.a, x.b
        elif isinstance(x, MultiLoraWeight):
            live = {id(p) for p in x.active_pairs()}
            for n, p in x.adapters.items():
                if id(p) in live and p.a is not None:
                    out[f"{name}/{n}/a"], out[f"{name}/{n}/b"] = p.a, p.b
        elif is_trainable(x):
            for sub, v in jax.tree_util.tree_flatten_with_path(x.value)[0]:
                out["/".join((name, *path_names(sub)))] = v
    return out


def _full_updates(params: Any, updates: dict[str, Any]) -> Any:
    """``params``' structure with ``updates`` at the trainable arrays and zeros elsewhere."""
    from .targets import path_names

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    zero = lambda v: None if v is None else jnp.zeros_like(v)  # noqa: E731
    leaves = []
    for path, x in flat:
        name = "/".join(path_names(path))
        if is_lora_weight(x):
            a, b = updates.get(f"{name}/a"), updates.get(f"{name}/b")
            leaves.append(x.replace(w=zero(x.w), a=zero(x.a) if a is None else a, b=zero(x.b) if b is None else b))
        elif isinstance(x, MultiLoraWeight):
            adapters = {}
            for n, p in x.adapters.items():
                a, b = updates.get(f"{name}/{n}/a"), updates.get(f"{name}/{n}/b")
                adapters[n] = p.replace(a=zero(p.a) if a is None else a, b=zero(p.b) if b is None else b)
            leaves.append(x.replace(w=zero(x.w), adapters=adapters))
        elif is_trainable(x):
            sub_flat, sub_def = jax.tree_util.tree_flatten_with_path(x.value)
            vals = [updates.get("/".join((name, *path_names(sp))), None) for sp, _ in sub_flat]
            vals = [zero(v) if u is None else u for u, (_, v) in zip(vals, sub_flat)]
            leaves.append(Trainable(jax.tree_util.tree_unflatten(sub_def, vals)))
        else:
            leaves.append(zero(x))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, a zero update on the frozen ones.

    A, B and leaves marked ``Trainable`` (by ``bias=`` or ``modules_to_save``) are
    updated by ``tx``; every other leaf, the base kernels included, gets a zero update
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
    return isinstance(_unwrap_variable(x), (LoraWeight, MultiLoraWeight, Trainable))


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
