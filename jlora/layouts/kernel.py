"""`KernelLayout`: the role of each axis of a kernel, and the canonical factor shapes.

A kernel ``W`` of any rank is described by its *layout*: a role for each of its axes,
``"stack"`` (a layer axis from ``nn.scan``/stacked layers, or any axis along which the
kernel holds independent matrices, at any position), ``"in"`` (contracted with the
input) or ``"out"`` (an output feature axis). The factors are stored in a canonical
shape whatever the kernel's layout, the stack axes first, in their kernel order::

    A: (*stack, *in, r)      B: (*stack, r, *out)
    ΔW[stack, in, out] = Σ_k A[stack, in, k] · B[stack, k, out]

and ``ΔW`` is then permuted into ``W``'s axis order. Examples of layouts:

==================================================  =================================
Flax ``Dense`` kernel (in, out)                     ``("in", "out")``
HF GPT-2 ``FlaxConv1D`` kernel (out, in)            ``("out", "in")``
``DenseGeneral`` (embed, heads, head_dim)           ``("in", "out", "out")``
``DenseGeneral`` (heads, head_dim, embed)           ``("in", "in", "out")``
``nn.scan``-stacked Dense (layers, in, out)         ``("stack", "in", "out")``
MaxText stack, scan axis 1 (in, layers, out)        ``("in", "stack", "out")``
Gemma ``kv_einsum`` (2, kv_heads, embed, head_dim)  ``("stack", "out", "in", "out")``
``Conv`` kernel (h, w, in, out)                     ``("in", "in", "in", "out")``
``Embed`` table (vocab, features)                   ``("in", "out")``
==================================================  =================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["KernelLayout", "Layout", "ROLES"]

Layout = tuple[str, ...]
ROLES = ("stack", "in", "out")


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Role of each axis of a kernel: ``"stack"``, ``"in"`` or ``"out"``.

    >>> KernelLayout(("out", "in")).in_axes
    (1,)
    """

    roles: Layout

    def __post_init__(self) -> None:
        roles = tuple(self.roles)
        object.__setattr__(self, "roles", roles)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ValueError(f"KernelLayout{roles}: unknown roles {bad}; valid roles are {ROLES}")
        if "in" not in roles or "out" not in roles:
            raise ValueError(f"KernelLayout{roles}: needs at least one 'in' and one 'out' axis")

    @property
    def stack_axes(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "stack")

    @property
    def in_axes(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "in")

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "out")

    def factor_shapes(self, shape: Sequence[int], r: int, groups: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for a kernel of ``shape``.

        ``groups > 1``: a grouped convolution (``feature_group_count``) adapted as PEFT
        does it: A is a full convolution, its last input axis (the input features)
        ``groups`` times the kernel's; B a grouped 1×1 convolution ``(r / groups, *out)``.

        >>> KernelLayout(("in", "in", "out")).factor_shapes((3, 4, 8), 4, groups=2)
        ((3, 8, 4), (2, 8))
        """
        if len(shape) != len(self.roles):
            raise ValueError(f"kernel of shape {tuple(shape)} does not fit layout {self.roles}")
        stack = tuple(shape[i] for i in self.stack_axes)
        ins = tuple(shape[i] for i in self.in_axes)
        outs = tuple(shape[i] for i in self.out_axes)
        if groups != 1:
            if stack or len(outs) != 1 or r % groups or outs[0] % groups:
                raise ValueError(
                    f"grouped convolution (groups={groups}) with kernel shape {tuple(shape)}, layout {self.roles} "
                    f"and r={r}: needs one output axis divisible by groups, no stack axis and r divisible by groups"
                )
            return ins[:-1] + (ins[-1] * groups, r), (r // groups,) + outs
        return stack + ins + (r,), stack + (r,) + outs

    def canonical_permutation(self) -> tuple[int, ...]:
        """Permutation taking the canonical (stack, in, out) order to the kernel's order."""
        canonical = self.stack_axes + self.in_axes + self.out_axes
        # kernel axis i lives at canonical position canonical.index(i)
        return tuple(canonical.index(i) for i in range(len(self.roles)))
