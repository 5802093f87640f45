"""qwix's LoRA factors against jlora's canonical ones: which *form* a qwix factor pair has
for a kernel (the op decides it, see :mod:`jlora.io.qwix_state`), and the rearrangement
both ways.

=======================  ====================================  =============================
op on kernel W           ``A_q``                               ``B_q``
=======================  ====================================  =============================
einsum                   W's axes the input shares (contracted  ``(r, *`` the other axes ``)``
                         or batch), in W's order, then ``r``    in W's order
dot_general              ``(*batch, prod(contracted), r)``      ``(*batch, r, prod(kept))``
conv                     ``(*W.shape[:-1], r)``                 ``(r, W.shape[-1])``
=======================  ====================================  =============================

>>> [f.natural_layout(3) for f in qwix_forms((8, 2, 4), (8, 3), (3, 2, 4))]
[('in', 'out', 'out')]
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..nodes.weight import LoraWeight

__all__ = ["QwixForm", "qwix_forms", "qwix_to_canonical", "canonical_to_qwix", "required_rank", "kernel_roles",
           "clean_number"]


def clean_number(x: float) -> Any:
    """``2.0 -> 2`` (an alpha as a user writes it), other floats unchanged."""
    x = float(x)
    return int(x) if x.is_integer() else x


# qwix's factor forms


@dataclasses.dataclass(frozen=True)
class QwixForm:
    """Which kernel axes qwix's ``A_q`` and ``B_q`` hold, in their order.

    ``both``: axes leading both factors (dot_general batch axes, a scanned stack);
    ``a``/``b``: groups of kernel axes, one factor dimension each (a group of several
    axes is flattened into one dimension, as qwix's dot_general does).
    ``A_q: (*both, *[prod(g) for g in a], r)``, ``B_q: (*both, r, *[prod(g) for g in b])``.
    """

    both: tuple[int, ...]
    a: tuple[tuple[int, ...], ...]
    b: tuple[tuple[int, ...], ...]

    @property
    def a_axes(self) -> tuple[int, ...]:
        return tuple(j for g in self.a for j in g)

    @property
    def b_axes(self) -> tuple[int, ...]:
        return tuple(j for g in self.b for j in g)

    def natural_layout(self, ndim: int) -> tuple[str, ...]:
        """The roles qwix's op gives: batch → ``"stack"``, in A → ``"in"``, in B → ``"out"``."""
        roles = ["out"] * ndim
        for j in self.both:
            roles[j] = "stack"
        for j in self.a_axes:
            roles[j] = "in"
        return tuple(roles)

    def fits(self, layout: Sequence[str]) -> bool:
        """Whether a jlora kernel of ``layout`` can hold these factors exactly: ``"in"``
        axes only in A, ``"out"`` axes only in B, ``"stack"`` axes in both or alone (not
        flattened with others) in one of them (the other factor is then shared along it)."""
        singles = {g[0] for g in self.a + self.b if len(g) == 1}
        for j, role in enumerate(layout):
            if role == "in" and (j not in self.a_axes):
                return False
            if role == "out" and (j not in self.b_axes):
                return False
            if role == "stack" and j not in self.both and j not in singles:
                return False
        return True

    def shapes(self, shape: Sequence[int], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        both = tuple(int(shape[j]) for j in self.both)
        a = tuple(math.prod(int(shape[j]) for j in g) for g in self.a)
        b = tuple(math.prod(int(shape[j]) for j in g) for g in self.b)
        return both + a + (r,), both + (r,) + b


def qwix_forms(shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]) -> list[QwixForm]:
    """Every :class:`QwixForm` under which a kernel of ``shape`` has qwix factors of
    ``a_shape`` and ``b_shape`` (einsum forms, dot_general's flattened forms, leading
    shared axes), without repeats."""
    shape = tuple(int(s) for s in shape)
    a_shape, b_shape = tuple(int(s) for s in a_shape), tuple(int(s) for s in b_shape)
    nd = len(shape)
    out: list[QwixForm] = []
    if len(a_shape) < 2 or len(b_shape) < 2:
        return out
    r = a_shape[-1]
    for n_both in range(0, min(len(a_shape), len(b_shape)) - 1):
        if b_shape[n_both] != r:
            continue
        for both in itertools.combinations(range(nd), n_both):
            if tuple(shape[j] for j in both) != a_shape[:n_both] or a_shape[:n_both] != b_shape[:n_both]:
                continue
            rest = [j for j in range(nd) if j not in both]
            a_rest, b_rest = a_shape[n_both:-1], b_shape[n_both + 1:]
            if not a_rest or not b_rest:
                continue
            # one factor dimension per kernel axis (einsum, conv, 2-D dot_general)
            if len(a_rest) + len(b_rest) == len(rest):
                for a in itertools.combinations(rest, len(a_rest)):
                    b = [j for j in rest if j not in a]
                    if tuple(shape[j] for j in a) == a_rest and tuple(shape[j] for j in b) == b_rest:
                        out.append(QwixForm(both, tuple((j,) for j in a), tuple((j,) for j in b)))
            # dot_general: the contracted axes flattened into one, the kept ones into one
            if len(a_rest) == 1 and len(b_rest) == 1 and len(rest) > 2:
                for k in range(1, len(rest)):
                    for a in itertools.combinations(rest, k):
                        b = tuple(j for j in rest if j not in a)
                        if math.prod(shape[j] for j in a) == a_rest[0] and math.prod(shape[j] for j in b) == b_rest[0]:
                            out.append(QwixForm(both, (a,), (b,)))
    seen: list[QwixForm] = []
    for f in out:
        if f not in seen:
            seen.append(f)
    return seen


def _arrange(x: Any, labels: Sequence[Any], target: Sequence[Any], sizes: Mapping[Any, int]) -> Any:
    """``x`` (axes named ``labels``) with its axes in ``target``'s order; a target axis
    that ``x`` lacks is broadcast (the factor is shared along it)."""
    labels = list(labels)
    for t in target:
        if t not in labels:
            x = jnp.broadcast_to(x[..., None], x.shape + (sizes[t],))
            labels.append(t)
    extra = [t for t in labels if t not in target]
    if extra:
        raise AssertionError(f"axes {extra} of a factor have no place in {tuple(target)}")
    return jnp.transpose(x, [labels.index(t) for t in target])


def kernel_roles(layout: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
    stack = [j for j, r in enumerate(layout) if r == "stack"]
    ins = [j for j, r in enumerate(layout) if r == "in"]
    outs = [j for j, r in enumerate(layout) if r == "out"]
    return stack, ins, outs


def qwix_to_canonical(a_q: Any, b_q: Any, shape: Sequence[int], form: QwixForm,
                      layout: Sequence[str]) -> tuple[Any, Any]:
    """qwix's ``(A_q, B_q)`` of ``form`` as jlora's ``A (*stack, *in, r)``,
    ``B (*stack, r, *out)`` for a kernel of ``shape`` and ``layout`` (same ``ΔW``)."""
    sizes = {j: int(s) for j, s in enumerate(shape)}
    r = int(a_q.shape[-1])
    sizes["r"] = r
    stack, ins, outs = kernel_roles(layout)
    a = jnp.reshape(a_q, tuple(sizes[j] for j in form.both + form.a_axes) + (r,))
    b = jnp.reshape(b_q, tuple(sizes[j] for j in form.both) + (r,) + tuple(sizes[j] for j in form.b_axes))
    a = _arrange(a, list(form.both + form.a_axes) + ["r"], stack + ins + ["r"], sizes)
    b = _arrange(b, list(form.both) + ["r"] + list(form.b_axes), stack + ["r"] + outs, sizes)
    return a, b


def _take_first(x: Any, axes: Sequence[int]) -> Any:
    return x[tuple(0 if i in axes else slice(None) for i in range(x.ndim))]


def _equal_along(x: Any, axes: Sequence[int]) -> Optional[bool]:
    """Whether ``x`` is the same along ``axes`` (None for abstract values)."""
    if not axes:
        return True
    if isinstance(x, jax.ShapeDtypeStruct) or isinstance(x, jax.core.Tracer):
        return None
    first = np.asarray(_take_first(x, axes))
    arr = np.asarray(x)
    return bool(np.array_equal(arr, np.broadcast_to(np.expand_dims(first, tuple(axes)), arr.shape)))


def _shared_axes(lw: LoraWeight, form: QwixForm) -> tuple[list[int], list[int]]:
    """The stack axes of ``lw`` along which qwix's ``A_q`` (first list) or ``B_q``
    (second) has no axis: one factor shared by every slice."""
    stack, _, _ = kernel_roles(lw.layout)
    shared_a = [j for j in stack if j not in form.both and j not in form.a_axes]
    shared_b = [j for j in stack if j not in form.both and j not in form.b_axes]
    return shared_a, shared_b


def required_rank(lw: LoraWeight, form: QwixForm) -> int:
    """The qwix rank that holds ``lw`` exactly in ``form``: ``lw.rank`` when the factor qwix
    shares along a stack axis is equal along it, else ``n·lw.rank`` (``n`` slices side by
    side along the rank)."""
    shared_a, shared_b = _shared_axes(lw, form)
    stack, _, _ = kernel_roles(lw.layout)
    a_labels = stack + [None]
    b_labels = stack + [None]
    eq_a = _equal_along(lw.a, [a_labels.index(j) for j in shared_a])
    eq_b = _equal_along(lw.b, [b_labels.index(j) for j in shared_b])
    if eq_a is False or eq_b is False:
        return lw.rank * math.prod(int(lw.shape[j]) for j in shared_a + shared_b)
    return lw.rank


def canonical_to_qwix(lw: LoraWeight, form: QwixForm, rank: int, where: str) -> tuple[Any, Any]:
    """jlora's factors of ``lw`` as qwix's ``(A_q, B_q)`` of ``form`` at qwix rank
    ``rank``: ``lw.rank``, where the factor qwix shares along a stack axis is equal
    along it, or ``n·lw.rank`` (the ``n`` slices side by side along the rank, each with
    its own block of ``B_q``/``A_q``)."""
    shape = lw.shape
    layout = tuple(lw.layout)
    sizes = {j: int(s) for j, s in enumerate(shape)}
    r = lw.rank
    stack, ins, outs = kernel_roles(layout)
    a_labels = stack + ins + ["r"]
    b_labels = stack + ["r"] + outs
    shared_a, shared_b = _shared_axes(lw, form)
    shared = sorted(shared_a + shared_b)
    n = math.prod(sizes[j] for j in shared)
    a_target = list(form.both + form.a_axes) + ["r"]
    b_target = list(form.both) + ["r"] + list(form.b_axes)
    a_q_shape, b_q_shape = form.shapes(shape, rank)

    def finish(a, b, labels_a, labels_b, rr):
        sz = dict(sizes, r=rr)
        a = _arrange(a, labels_a, a_target, sz)
        b = _arrange(b, labels_b, b_target, sz)
        return jnp.reshape(a, a_q_shape), jnp.reshape(b, b_q_shape)

    if rank == r:
        bad = []
        for name, x, axes, labels in (("A", lw.a, shared_a, a_labels), ("B", lw.b, shared_b, b_labels)):
            eq = _equal_along(x, [labels.index(j) for j in axes])
            if eq is False:
                bad.append(f"{name} differs along kernel axis {axes}")
        if bad:
            raise ValueError(
                f"{where}: qwix shares one {'A' if shared_a else 'B'} over kernel axes {shared} of this kernel "
                f"(its factors {a_q_shape} / {b_q_shape}), but this adapter's {'; '.join(bad)}. qwix holds it exactly "
                f"at rank {n * r} = {n} × {r}: build the qwix model with a rule of rank {n * r} and alpha "
                f"{clean_number(lw.scale * n * r)} for this module (the same scale {clean_number(lw.scale)}), or see "
                "jlora.io.qwix_state.qwix_rules(lp, qwix_model)"
            )
        a = _take_first(lw.a, [a_labels.index(j) for j in shared_a])
        b = _take_first(lw.b, [b_labels.index(j) for j in shared_b])
        la = [t for t in a_labels if t not in shared_a]
        lb = [t for t in b_labels if t not in shared_b]
        return finish(a, b, la, lb, r)
    if shared and rank == n * r:
        # block g of the rank: A with the qwix-shared-A axes at g (one-hot masks where qwix A
        # keeps a shared-B axis), B the other way round; Σ_g A_g·B_g = ΔW slice by slice.
        a_blocks, b_blocks = [], []
        for g in itertools.product(*(range(sizes[j]) for j in shared)):
            at = dict(zip(shared, g))
            a_g, b_g = lw.a, lw.b
            for j in shared_b:  # qwix A keeps this axis: zero every slice but g's
                ax = a_labels.index(j)
                mask = (jnp.arange(sizes[j]) == at[j]).astype(a_g.dtype)
                a_g = a_g * jnp.reshape(mask, [-1 if i == ax else 1 for i in range(a_g.ndim)])
            for j in shared_a:
                ax = b_labels.index(j)
                mask = (jnp.arange(sizes[j]) == at[j]).astype(b_g.dtype)
                b_g = b_g * jnp.reshape(mask, [-1 if i == ax else 1 for i in range(b_g.ndim)])
            a_g = a_g[tuple(at[j] if j in shared_a else slice(None) for j in a_labels[:-1]) + (slice(None),)]
            b_g = b_g[tuple(at[t] if t in shared_b else slice(None) for t in b_labels)]
            a_blocks.append(a_g)
            b_blocks.append(b_g)
        la = [t for t in a_labels if t not in shared_a]
        lb = [t for t in b_labels if t not in shared_b]
        a = jnp.concatenate(a_blocks, axis=la.index("r"))
        b = jnp.concatenate(b_blocks, axis=lb.index("r"))
        return finish(a, b, la, lb, n * r)
    valid = f"{r}" + (f" (or {n * r} = {n} × {r}, its slices side by side)" if shared else "")
    raise ValueError(
        f"{where}: the qwix model's factors have rank {rank} ({a_q_shape} / {b_q_shape}), this adapter's rank "
        f"is {r}; build the qwix model with rank {valid} for this module"
    )


