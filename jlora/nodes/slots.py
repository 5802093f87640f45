"""`AdapterSlots`: a kernel with a fixed-shape pool of adapter slots, for serving many
adapters without recompiling; a pytree node.

One node per targeted kernel holds ``N`` slots, each an adapter of rank at most ``R``
(zero-padded), and the slots' scales as an array::

    w       the frozen kernel (any rank, as LoraWeight's)
    a       (*stack, N, *in, R)        slot j: A_j zero-padded to R columns
    b       (*stack, N, R, *out)       slot j: B_j zero-padded to R rows
    scale   (N,) float32               s_j = alpha_j / r_j (0 for an empty slot)

    W_eff(j) = W + s_j · A_j · B_j          (the padding adds nothing)

Everything that differs between adapters (factors, ranks up to ``R``, alphas, which slots
are filled) is array *values*; the static data is only the kernel's ``layout``. So a
program compiled for a pool runs unchanged after any slot is loaded, replaced or cleared
(:mod:`jlora.adapters.slots`). The slot axis sits after the stack axes, so a scan over
stacked layers slices the pool as it slices ``w``.

>>> import jax.numpy as jnp
>>> s = AdapterSlots(jnp.zeros((4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 2, 3)), jnp.array([0.5, 0.0]))
>>> s.num_slots, s.max_rank, s.effective(0)[0, 0].item(), s.effective(1)[0, 0].item()
(2, 2, 1.0, 0.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..layouts.kernel import KernelLayout, Layout
from .factors import delta

__all__ = ["AdapterSlots", "is_adapter_slots"]


@dataclasses.dataclass(frozen=True)
class AdapterSlots:
    """A kernel ``w`` with ``N`` adapter slots of rank at most ``R``; a pytree node.

    Children: ``w``, ``a`` ``(*stack, N, *in, R)``, ``b`` ``(*stack, N, R, *out)``,
    ``scale`` ``(N,)``. Static: ``layout`` (a role per axis of ``w``, as
    :class:`~jlora.LoraWeight`'s). :func:`jlora.lora` applies slot ``adapter_ids[e]`` to
    example ``e`` (``-1``: the base model); see :mod:`jlora.adapters.slots`.
    """

    w: Any
    a: Any
    b: Any
    scale: Any
    layout: Layout = ("in", "out")

    _CHILDREN = ("w", "a", "b", "scale")

    def tree_flatten_with_keys(self):
        keys = tuple(jax.tree_util.GetAttrKey(n) for n in self._CHILDREN)
        return tuple(zip(keys, (getattr(self, n) for n in self._CHILDREN))), (self.layout,)

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self._CHILDREN), (self.layout,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for n, c in zip(cls._CHILDREN, children):
            object.__setattr__(obj, n, c)
        object.__setattr__(obj, "layout", aux[0])
        return obj

    @property
    def kernel_layout(self) -> KernelLayout:
        return KernelLayout(self.layout)

    @property
    def n_stack(self) -> int:
        return sum(1 for r in self.layout if r == "stack")

    @property
    def num_slots(self) -> int:
        return int(self.a.shape[self.n_stack])

    @property
    def max_rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    def slot_factors(self, slot: int) -> tuple[Any, Any]:
        """``(A_j, B_j)`` of slot ``j`` in the canonical shapes, padded to the pool's rank."""
        ns = self.n_stack
        return jnp.take(self.a, slot, axis=ns), jnp.take(self.b, slot, axis=ns)

    def effective(self, slot: int) -> jax.Array:
        """``W + s_j·A_j·B_j`` of slot ``j`` in ``W``'s dtype (computed in float32)."""
        a, b = self.slot_factors(slot)
        compute = jnp.promote_types(self.w.dtype, jnp.float32)
        d = delta(a, b, self.layout, compute) * jnp.asarray(self.scale, compute)[slot]
        return (self.w.astype(compute) + d).astype(self.w.dtype)

    def replace(self, **changes: Any) -> AdapterSlots:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_pytree_with_keys(
    AdapterSlots,
    lambda x: x.tree_flatten_with_keys(),
    AdapterSlots.tree_unflatten,
    lambda x: x.tree_flatten(),
)


def is_adapter_slots(x: Any) -> bool:
    return isinstance(x, AdapterSlots)
