"""`LoraWeight`, `MultiLoraWeight` and `Trainable`: the pytree nodes of a LoRA tree.

A ``LoraWeight`` holds a frozen kernel ``w`` of any rank with its factors in the canonical
shapes of its :class:`~jlora.KernelLayout` (``layout``: a role per kernel axis)::

    A: (*stack, *in, r)      B: (*stack, r, *out)
    ΔW[stack, in, out] = Σ_k A[stack, in, k] · B[stack, k, out]      W_eff = W + s·ΔW

permuted into ``w``'s axis order (:mod:`jlora.layouts.kernel` lists the layouts of the
usual kernels). A ``MultiLoraWeight`` holds one ``w`` and several named factor pairs;
a ``Trainable`` marks a leaf trained in full (biases, ``modules_to_save``).

>>> import jax.numpy as jnp
>>> lw = LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)
>>> lw.rank, lw.effective().tolist()[0]
(2, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax

from ..layouts.kernel import KernelLayout, Layout
from .dora import chain_kernel
from .factors import add_delta
from .slots import AdapterSlots

__all__ = [
    "LoraWeight",
    "MultiLoraWeight",
    "DEFAULT_ADAPTER",
    "is_lora_node",
    "Trainable",
    "is_lora_weight",
    "is_trainable",
    "TrainableTokens",
    "is_trainable_tokens",
]

DEFAULT_ADAPTER = "default"


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A kernel ``w`` with LoRA factors ``a`` and ``b``; a pytree node.

    Children: ``w`` (the frozen base kernel), ``a`` of shape ``(*stack, *in, r)`` and ``b``
    of shape ``(*stack, r, *out)``. Static data: ``scale`` (alpha/r), the kernel
    ``layout``, ``dropout`` (rate on the input of A) and ``merged`` (``w`` already holds
    ``W + scale·ΔW``, so a forward pass must not add the delta again).

    Optional children (``None`` unless the variant is used):

    - ``magnitude``: DoRA's trainable magnitude ``m``, ``(*stack, *out)``
      (``LoraConfig(use_dora=True)``; see :mod:`jlora.dora`).
    - ``weight_norm``: DoRA's norm ``‖W + s·ΔW‖`` saved by :func:`jlora.merge_adapter`
      (frozen), so that :func:`jlora.unmerge_adapter` restores ``W`` exactly.
    - ``a0``, ``b0``: the initial factors of PiSSA/OLoRA (frozen): ``w`` is then the
      residual ``W − s·a0·b0`` and ``init`` (static) names the initialisation; the
      original kernel is ``w + s·a0·b0`` (:func:`jlora.unload`).
    - ``b_bias``: PEFT's ``lora_B.bias`` (``LoraConfig(lora_bias=True)``), trainable,
      ``(*stack, *out)``: the target's output gains ``s·b_bias``; merging adds it to the
      base bias next to the kernel.

    More static data: ``groups`` (a grouped convolution with that
    ``feature_group_count``, adapted as PEFT does it: ``a`` is a full ``(*window,
    in·groups, r)`` convolution, ``b`` a grouped 1×1 convolution ``(r/groups, out)``;
    there is no kernel-shaped ``ΔW``, so it cannot be merged) and ``guessed`` (the layout
    is the tree's convention for a 2-D kernel, not evidence: :func:`jlora.lora` raises
    where the model reads the kernel transposed, instead of computing with a wrong
    orientation).

    The effective kernel is ``w + scale · delta(self)`` (times ``m / ‖w + scale·ΔW‖``
    per output with DoRA), or ``w`` when merged.

    >>> lw = LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)
    >>> float(lw.effective()[0, 0])
    1.0
    """

    w: Any
    a: Any
    b: Any
    scale: float = 1.0
    layout: Layout = ("in", "out")
    dropout: float = 0.0
    merged: bool = False
    magnitude: Any = None
    weight_norm: Any = None
    a0: Any = None
    b0: Any = None
    init: Optional[str] = None
    b_bias: Any = None
    groups: int = 1
    guessed: bool = False

    _CHILDREN = ("w", "a", "b", "magnitude", "weight_norm", "a0", "b0", "b_bias")
    _STATIC = ("scale", "layout", "dropout", "merged", "init", "groups", "guessed")

    def _aux(self):
        return tuple(getattr(self, n) for n in self._STATIC)

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self._CHILDREN), self._aux()

    def tree_flatten_with_keys(self):
        keys = tuple(jax.tree_util.GetAttrKey(n) for n in self._CHILDREN)
        return tuple(zip(keys, (getattr(self, n) for n in self._CHILDREN))), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for n, c in zip(cls._CHILDREN, children):
            object.__setattr__(obj, n, c)
        for n, v in zip(cls._STATIC, aux):
            object.__setattr__(obj, n, v)
        return obj

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def kernel_layout(self) -> KernelLayout:
        return KernelLayout(self.layout)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def residual(self) -> bool:
        """Whether ``w`` is a PiSSA/OLoRA residual (``W − s·a0·b0``)."""
        return self.a0 is not None

    def effective(self) -> jax.Array:
        """``W + scale·ΔW`` (DoRA: ``(m/‖W + scale·ΔW‖)⊙(W + scale·ΔW)``) in ``W``'s dtype
        (computed in float32); ``W`` if merged."""
        if self.merged:
            return self.w
        if self.groups != 1:
            raise ValueError(
                f"a LoRA adapter on a grouped convolution (groups={self.groups}) has no merged kernel: PEFT's lora_A "
                "reads every input channel, so W + s·ΔW is not a grouped kernel (PEFT cannot merge it either)"
            )
        if self.magnitude is not None:
            return chain_kernel(self.w, [self], self.layout)
        return add_delta(self.w, self.a, self.b, self.scale, self.layout, sign=1.0)

    def replace(self, **changes: Any) -> "LoraWeight":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_pytree_with_keys(
    LoraWeight,
    lambda x: x.tree_flatten_with_keys(),
    LoraWeight.tree_unflatten,
    lambda x: x.tree_flatten(),
)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class TrainableTokens:
    """Chosen rows of a token table trained in full (PEFT's trainable tokens,
    ``LoraConfig(trainable_token_indices=...)``); a pytree node.

    Children: ``w`` (the frozen table) and ``values`` (the trained rows, ``(n, d)``:
    PEFT's ``trainable_tokens_delta``, which holds the new rows themselves). Static:
    ``indices`` (the ``n`` token ids) and ``axis`` (the token axis of ``w``: 0 for an
    embedding table ``(vocab, d)``, 1 for a Flax ``Dense`` output head ``(d, vocab)``).
    The effective table is ``w`` with its token rows replaced::

        W'[indices[i]] = values[i]            (along ``axis``)

    which is ``W + P·(V − W[indices])`` with ``P`` the one-hot ``(vocab, n)`` matrix of
    the indices: a rank-``n`` update, applied factored by :func:`jlora.lora` (a lookup
    and a tied output layer ``x·Wᵀ`` alike).

    >>> tt = TrainableTokens(jnp.zeros((4, 2)), jnp.ones((1, 2)), (2,))
    >>> tt.effective()[:, 0].tolist()
    [0.0, 0.0, 1.0, 0.0]
    """

    w: Any
    values: Any
    indices: tuple[int, ...]
    axis: int = 0

    def tree_flatten_with_keys(self):
        keys = (jax.tree_util.GetAttrKey("w"), jax.tree_util.GetAttrKey("values"))
        return tuple(zip(keys, (self.w, self.values))), (self.indices, self.axis)

    def tree_flatten(self):
        return (self.w, self.values), (self.indices, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "w", children[0])
        object.__setattr__(obj, "values", children[1])
        object.__setattr__(obj, "indices", aux[0])
        object.__setattr__(obj, "axis", aux[1])
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    def rows(self) -> Any:
        """The trained rows in ``w``'s axis order (``values`` for ``axis=0``, ``values.T`` for 1)."""
        return self.values if self.axis == 0 else jax.numpy.swapaxes(self.values, 0, 1)

    def effective(self) -> jax.Array:
        """``w`` with the token rows replaced by ``values`` (in ``w``'s dtype)."""
        idx = jax.numpy.asarray(self.indices, jax.numpy.int32)
        rows = self.rows().astype(self.w.dtype)
        if self.axis == 0:
            return self.w.at[idx].set(rows)
        return self.w.at[:, idx].set(rows)

    def replace(self, **changes: Any) -> "TrainableTokens":
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a plain parameter as trainable in full (``bias`` or ``modules_to_save``).

    ``jlora.lora`` passes ``value`` to the model; ``jlora.optimizer`` trains it.
    """

    value: Any

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("value"), self.value),), None

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "value", children[0])
        return obj


@dataclasses.dataclass(frozen=True)
class MultiLoraWeight:
    """A kernel ``w`` with several named LoRA adapters; a pytree node.

    Children: ``w`` and ``adapters`` (a dict name → ``LoraWeight(w=None, a, b, ...)``).
    Static: ``active`` (names whose deltas are added: ``W + Σ_{i∈active} s_i·A_i·B_i``) and
    ``enabled`` (False: the base alone, PEFT's ``disable_adapter``).
    """

    w: Any
    adapters: Mapping[str, LoraWeight]
    active: tuple[str, ...] = (DEFAULT_ADAPTER,)
    enabled: bool = True

    @property
    def layout(self) -> tuple[str, ...]:
        return next(iter(self.adapters.values())).layout

    def active_pairs(self) -> list[LoraWeight]:
        if not self.enabled:
            return []
        return [self.adapters[n] for n in self.active if n in self.adapters]

    def effective(self) -> jax.Array:
        """``W + Σ_active s_i·ΔW_i`` in W's dtype (computed in float32); DoRA adapters scale
        the sum so far, in order (:func:`jlora.dora.chain_kernel`, PEFT's composition)."""
        pairs = self.active_pairs()
        if not pairs:
            return self.w
        return chain_kernel(self.w, pairs, pairs[0].layout)

    def replace(self, **changes: Any) -> "MultiLoraWeight":
        return dataclasses.replace(self, **changes)


# The adapter names live in the static data, in insertion order, and each factor pair is
# its own child: a dict child would be flattened in sorted key order, and the order of
# adapters (which `jlora.adapter_ids` indexes) would change under tree_map and jit.
def _flatten_multi(x: MultiLoraWeight):
    names = tuple(x.adapters)
    return (x.w, *(x.adapters[n] for n in names)), (names, x.active, x.enabled)


def _flatten_multi_with_keys(x: MultiLoraWeight):
    children, aux = _flatten_multi(x)
    keys = (jax.tree_util.GetAttrKey("w"), *(jax.tree_util.DictKey(n) for n in aux[0]))
    return tuple(zip(keys, children)), aux


def _unflatten_multi(aux, children) -> MultiLoraWeight:
    names, active, enabled = aux
    obj = object.__new__(MultiLoraWeight)
    object.__setattr__(obj, "w", children[0])
    object.__setattr__(obj, "adapters", dict(zip(names, children[1:])))
    object.__setattr__(obj, "active", active)
    object.__setattr__(obj, "enabled", enabled)
    return obj


jax.tree_util.register_pytree_with_keys(MultiLoraWeight, _flatten_multi_with_keys, _unflatten_multi, _flatten_multi)


def is_lora_node(x: Any) -> bool:
    """Whether ``x`` is one of jlora's nodes (``LoraWeight``, ``MultiLoraWeight``,
    ``Trainable``, ``TrainableTokens``, ``AdapterSlots``): the ``is_leaf`` for walking a
    LoRA tree node by node."""
    return isinstance(x, (LoraWeight, MultiLoraWeight, Trainable, TrainableTokens, AdapterSlots))


def is_trainable_tokens(x: Any) -> bool:
    return isinstance(x, TrainableTokens)


def is_lora_weight(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def is_trainable(x: Any) -> bool:
    return isinstance(x, Trainable)
