"""The values of the interpreter: a LoRA kernel as a view of ``W`` with its factor pairs
(:class:`LoraValue`), one adapter's factors (:class:`Pair`), the per-call :class:`Context`
(dropout key, adapter ids, the report), and what ``explain`` returns.

A :class:`LoraValue` ``lv`` stands for ``W + Σ_pairs s·A·B`` without forming it: ``lv.w``
is the current view of ``W`` (sliced, transposed, reshaped by the view rules) and
``lv.axes[i]`` says which factor axis view axis ``i`` is (``("s", k)`` stack, ``("a", k)``
an input axis of A, ``("b", k)`` an output axis of B), so any view of ``W`` is matched by
a view of the factors.

>>> import jax.numpy as jnp
>>> lv = LoraValue(jnp.zeros((3, 2)), (Pair(jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5, 0.0),), (("a", 0), ("b", 0)), 0, "w")
>>> lv.materialize().tolist()
[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from ..core import jaxprs
from ..quant import forward as qforward

__all__ = [
    "OnMaterialize", "MaterializationWarning", "MaterializationError", "LoraEvent", "LoraReport", "Axis", "Pair",
    "LoraValue", "Context", "roles_str", "roles_to_axes", "k_on", "dora_sum", "has_dora", "on_current_mesh",
    "apply_dropout", "factor_dtype", "example_mask", "transposed_guess_error",
]

OnMaterialize = Literal["warn", "error", "allow"]


class MaterializationWarning(UserWarning):
    """A LoRA weight was materialised as ``W + s·A·B`` (correct, but slower)."""


class MaterializationError(ValueError):
    """Raised by ``lora(fn, on_materialize="error")`` where a weight would be materialised."""


@dataclasses.dataclass(frozen=True)
class LoraEvent:
    path: str
    primitive: str
    action: str  # "factored" | "materialized"
    where: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """What ``lora(fn)`` did with each LoRA weight for one call: a list of events.

    ``factored``/``materialized`` list the target paths; ``str(report)`` is a table.
    """

    events: tuple[LoraEvent, ...]

    @property
    def factored(self) -> list[str]:
        return sorted({e.path for e in self.events if e.action == "factored"})

    @property
    def materialized(self) -> list[str]:
        return sorted({e.path for e in self.events if e.action == "materialized"})

    def __str__(self) -> str:
        rows = [("target", "primitive", "action", "where")]
        rows += [(e.path, e.primitive, e.action + (f" ({e.reason})" if e.reason else ""), e.where) for e in self.events]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * min(120, sum(widths) + 6 + max(len(r[3]) for r in rows)))
        return "\n".join(lines)


Axis = tuple[str, int]  # ("s", k) stack axis k, ("a", k) in-axis k of A, ("b", k) out-axis k of B


@dataclasses.dataclass(frozen=True)
class Pair:
    """One adapter's factors on a kernel: ``a`` (*stack, *in, r), ``b`` (*stack, r, *out)."""

    a: Any
    b: Any
    scale: float
    dropout: float
    gid: int = -2  # index of the adapter in the call's adapter list (for ``adapter_ids``)
    k: Any = None  # DoRA: m / ‖W + s·ΔW‖ (float32, b-shaped with r = 1: (*stack, 1, *out)); jlora.dora
    bias: Any = None  # lora_bias: lora_B's bias, b-shaped with r = 1: (*stack, 1, *out); added as s·bias
    groups: int = 1  # a grouped convolution: a is (*window, in·groups, r), b (r/groups, out)
    # adapter slots (jlora.nodes.slots): N > 0 slots, a (*stack, N, *in, R), b (*stack, N, R, *out) and
    # scale an (N,) array; slot adapter_ids[e] applies to example e (only in the gathered products)
    slots: int = 0

    @property
    def dtype(self):
        return jnp.promote_types(self.a.dtype, self.b.dtype)


@dataclasses.dataclass(frozen=True)
class LoraValue:
    """A kernel view ``w`` whose delta is ``Σ_pairs scale · Σ_r a[..., r] b[r, ...]``.

    Every pair has the same stack/in/out axes (ranks may differ). ``axes[i]`` says which
    factor axis view axis ``i`` of ``w`` corresponds to: ``("s", k)`` stack axis ``k``,
    ``("a", k)`` input axis ``k`` of A, ``("b", k)`` output axis ``k`` of B.
    """

    w: Any
    pairs: tuple[Pair, ...]
    axes: tuple[Axis, ...]
    n_stack: int
    path: str
    guessed: bool = False  # the layout is a naming convention, not evidence (LoraWeight.guessed)
    kernel_layout: tuple = ()  # the roles of the kernel's own axes (before any view), for messages

    @property
    def n_in(self) -> int:
        p = self.pairs[0]
        return p.a.ndim - self.n_stack - 1 - (1 if p.slots else 0)

    @property
    def n_out(self) -> int:
        p = self.pairs[0]
        return p.b.ndim - self.n_stack - 1 - (1 if p.slots else 0)

    @property
    def sizes(self) -> dict[str, list[int]]:
        p, ns = self.pairs[0], self.n_stack
        a, b = tuple(p.a.shape), tuple(p.b.shape)
        if p.slots:  # the slot axis (after the stack axes) is no axis of the kernel
            a, b = a[:ns] + a[ns + 1:], b[:ns] + b[ns + 1:]
        return {"s": list(a[:ns]), "a": list(a[ns:-1]), "b": list(b[ns + 1:])}

    @property
    def has_slots(self) -> bool:
        return any(p.slots for p in self.pairs)

    def with_w(self, w, axes=None, n_stack=None, ab=None) -> "LoraValue":
        """A new view: ``w`` replaced, and each pair's (a, b) replaced by ``ab(a, b)`` (for
        adapter slots, ``ab`` of each slot: vmapped over the slot axis, which stays after
        the stack axes)."""
        pairs = self.pairs
        if ab is not None:
            new_ns = self.n_stack if n_stack is None else n_stack

            def view(p):
                if p.slots:
                    a, b = jax.vmap(ab, in_axes=(self.n_stack, self.n_stack), out_axes=(new_ns, new_ns))(p.a, p.b)
                    return dataclasses.replace(p, a=a, b=b)
                # DoRA's k and lora_B's bias have B's axes (rank 1): they follow B through every view change
                return dataclasses.replace(p, **dict(zip(("a", "b"), ab(p.a, p.b))),
                                           k=None if p.k is None else ab(p.a, p.k)[1],
                                           bias=None if p.bias is None else ab(p.a, p.bias)[1])

            pairs = tuple(view(p) for p in pairs)
        return dataclasses.replace(
            self, w=w, pairs=pairs, axes=self.axes if axes is None else tuple(axes),
            n_stack=self.n_stack if n_stack is None else n_stack,
        )

    def pair_delta_view(self, p: Pair, dtype) -> jax.Array:
        """``scale · ΔW`` of one pair in the view's axis order, computed in ``dtype``."""
        ns = self.n_stack
        stack = tuple(range(ns))
        d = jax.lax.dot_general(
            p.a.astype(dtype), p.b.astype(dtype),
            (((p.a.ndim - 1,), (ns,)), (stack, stack)),
            precision=jax.lax.Precision.HIGHEST,
        ) * jnp.asarray(p.scale, dtype)
        offsets = {"s": 0, "a": ns, "b": ns + self.n_in}
        return jnp.transpose(d, [offsets[g] + k for g, k in self.axes])

    def delta_view(self, dtype) -> jax.Array:
        """``Σ scale · ΔW`` in the view's axis order, computed in ``dtype``."""
        return functools.reduce(jnp.add, [self.pair_delta_view(p, dtype) for p in self.pairs])

    def check_materializable(self, where: str = "") -> None:
        """``ValueError`` where ``W + s·A·B`` is not the adapter: a grouped convolution's
        (no kernel-shaped ``ΔW``) or one with a lora_B bias (the bias is not in ``W``)."""
        at = f" at {where}" if where else ""
        if self.has_slots:
            raise ValueError(
                f"jlora: the adapter slots of {self.path!r} are used{at} other than in a product over the kernel's "
                "input axes (x·W, where each example's slot is gathered); a pool of adapters has no single W + s·ΔW "
                "to form there. Take one slot out (jlora.adapters.get_slot) to run that model"
            )
        if any(p.groups != 1 for p in self.pairs):
            raise ValueError(
                f"jlora: the grouped convolution {self.path!r} (PEFT's LoRA: a full lora_A and a grouped lora_B) is "
                f"used{at} other than as the kernel of its convolution; it has no merged kernel W + s·ΔW, so it cannot "
                "be formed there"
            )
        if any(p.bias is not None for p in self.pairs):
            raise ValueError(
                f"jlora: {self.path!r} has a lora_B bias (lora_bias=True) and is used{at} where the bias cannot be "
                "added (not a contraction over its input axes or a convolution); W + s·A·B alone would drop it"
            )

    def materialize(self, adapter_ids=None) -> jax.Array:
        self.check_materializable()
        if adapter_ids is not None and any(p.gid >= 0 for p in self.pairs):
            raise ValueError(
                f"jlora: LoRA weight {self.path!r} would have to be materialised, but a mixed batch "
                "(adapter_ids=) needs every use of a weight to stay factored"
            )
        w = qforward.dense(self.w)  # a quantized base is dequantized here
        compute = jnp.promote_types(w.dtype, jnp.float32)
        if any(p.k is not None for p in self.pairs):
            # DoRA: out ← k⊙(out + s·ΔW) per adapter, in order (jlora.dora.chain_kernel)
            out = w.astype(compute)
            for p in self.pairs:
                out = out + self.pair_delta_view(p, compute)
                if p.k is not None:
                    out = out * k_on(p.k, self.n_stack, list(self.axes)).astype(compute)
            return out.astype(w.dtype)
        return (w.astype(compute) + self.delta_view(compute)).astype(w.dtype)


def transposed_guess_error(lv: "LoraValue") -> str:
    """The message for a kernel whose guessed layout the model reads transposed."""
    module = lv.path.rsplit("/", 1)[0].replace("/", ".") if "/" in lv.path else lv.path
    swapped = tuple({"in": "out", "out": "in"}.get(r, r) for r in lv.kernel_layout)
    return (
        f"jlora: the layout of {lv.path!r} {lv.kernel_layout} was guessed from the tree (a 2-D kernel is taken to be "
        "(in, out), Flax's Dense), but the model contracts its output axis: it reads the kernel as (out, in), like "
        "transformers' FlaxConv1D. The LoRA factors would sit on the wrong axes (and a PEFT file would not match). "
        f"Pass apply_fn= and example_args= (layouts found from how the model uses each kernel), or layouts={{"
        f"{module!r}: {swapped}}}, to jlora.wrap / jlora.load_peft / jlora.load"
    )


def roles_str(lv: "LoraValue") -> str:
    names = {"s": "stack", "a": "in", "b": "out"}
    return "(" + ", ".join(names[g] for g, _ in lv.axes) + ")"


def roles_to_axes(layout: Sequence[str]) -> tuple[tuple[Axis, ...], int]:
    counts = {"s": 0, "a": 0, "b": 0}
    axes = []
    for role in layout:
        g = {"stack": "s", "in": "a", "out": "b"}[role]
        axes.append((g, counts[g]))
        counts[g] += 1
    return tuple(axes), counts["s"]


def k_on(k: jax.Array, n_stack: int, target: Sequence[Any], stack_label=None) -> Optional[jax.Array]:
    """DoRA's ``k`` (``(*stack, 1, *out)``) arranged to broadcast against an array whose
    axes carry the labels ``target``: stack axis ``j`` is labelled ``stack_label(j)``
    (default ``("s", j)``), output axis ``j`` ``("b", j)``; target labels that are neither
    get size 1. None where ``k`` varies along an axis the target does not have."""
    k = jnp.squeeze(k, n_stack)
    label = stack_label or (lambda j: ("s", j))
    labels = [label(j) for j in range(n_stack)] + [("b", j) for j in range(k.ndim - n_stack)]
    present = [lab for lab in target if lab in labels]
    if len(present) != len(labels):
        return None
    k = jnp.transpose(k, [labels.index(lab) for lab in present])
    return k.reshape([k.shape[present.index(lab)] if lab in labels else 1 for lab in target])


def dora_sum(base, terms, out_dtype, k_of, base_of):
    """The output of one use of a kernel from its base product and each adapter's branch,
    in order, as PEFT composes them (``terms``: ``(pair, s·branch, mask, x̃)``, the branch
    already masked in a mixed batch, ``x̃`` the dropped input where dropout is on):

    - LoRA: ``y ← y + s·(x̃·A)·B``
    - DoRA: ``y ← k⊙(y + s·(x·A)·B)`` without dropout (reuses the base product);
      ``y ← y + (k−1)⊙(x̃·W) + k⊙s·(x̃·A)·B`` with dropout (PEFT's formula);
      in a mixed batch each example has one adapter: ``y ← y + mask⊙((k−1)⊙(x̃·W) + k⊙u)``.

    ``k_of(pair)`` is ``k`` shaped like the output, ``base_of(x̃)`` the base product of ``x̃``.
    The sum is formed in the wider of the base's and the branches' dtypes and rounded once.
    """
    acc = functools.reduce(jnp.promote_types, [base.dtype] + [u.dtype for _, u, _, _ in terms])
    y = base.astype(acc)
    for pair, u, mask, dropped in terms:
        if pair.k is None:
            y = y + u.astype(acc)
            continue
        kk = k_of(pair).astype(acc)
        bd = base.astype(acc) if dropped is None else base_of(dropped).astype(acc)
        if mask is not None:
            y = y + mask.astype(acc) * (kk - 1) * bd + kk * u.astype(acc)
        elif dropped is not None:
            y = y + (kk - 1) * bd + kk * u.astype(acc)
        else:
            y = kk * (y + u.astype(acc))
    return y.astype(out_dtype)


def has_dora(lv: "LoraValue") -> bool:
    return any(p.k is not None for p in lv.pairs)


def on_current_mesh(x: Optional[jax.Array]) -> Optional[jax.Array]:
    """``x`` (adapter ids, a dropout key: values from outside ``fn``'s jaxpr) moved onto
    the abstract mesh of the equation being evaluated, replicated, where that mesh is not
    the one ``x`` lives on (inside an ``auto_axes`` region of an Explicit mesh)."""
    if x is None:
        return None
    current = jax.sharding.get_abstract_mesh()
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is None or current is None or mesh == current:
        return x
    if getattr(current, "empty", True) or getattr(mesh, "empty", True):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(current, jax.sharding.PartitionSpec()))


class Context:
    def __init__(self, key: Optional[jax.Array], on_materialize: str, events: list[LoraEvent],
                 adapter_ids: Optional[jax.Array] = None, fused: bool = True):
        self.key = key
        self.on_materialize = on_materialize
        self.fused = fused  # jlora.lora(fused=): the products' TPU rule (jlora.transform.fused)
        self.events = events
        self._adapter_ids = adapter_ids
        self._counter = [0]
        # the jaxprs under evaluation (jlora.transform.rows.Frame), innermost last; kept in a
        # mixed batch only, where the rows of an expert kernel's input are traced to examples
        self.frames: list = []

    @property
    def adapter_ids(self) -> Optional[jax.Array]:
        return on_current_mesh(self._adapter_ids)

    def child(self, key: Optional[jax.Array]) -> "Context":
        c = Context(key, self.on_materialize, self.events, self._adapter_ids, self.fused)
        c._counter = self._counter
        c.frames = self.frames
        return c

    @property
    def tracks_rows(self) -> bool:
        """Whether the interpreter keeps its frames (a mixed batch: ``adapter_ids`` given)."""
        return self._adapter_ids is not None

    def next_key(self) -> Optional[jax.Array]:
        if self.key is None:
            return None
        self._counter[0] += 1
        return jax.random.fold_in(on_current_mesh(self.key), self._counter[0])

    def record(self, lv: LoraValue, eqn: Any, action: str, reason: str = "") -> None:
        where = jaxprs.where(eqn)
        event = LoraEvent(lv.path, eqn.primitive.name if eqn is not None else "output", action, where, reason)
        self.events.append(event)
        if action == "materialized":
            msg = (
                f"jlora: LoRA weight {lv.path!r} materialised as W + s·A·B at {event.primitive} "
                f"({where}){': ' + reason if reason else ''}. Correct, but gradients cost a full "
                "d_in x d_out product here."
            )
            if self.on_materialize == "error":
                raise MaterializationError(msg + " (on_materialize='error')")
            if self.on_materialize == "warn":
                warnings.warn(msg, MaterializationWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` pointing at the first frame outside jlora and JAX."""
    skip = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(jax.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def apply_dropout(x: jax.Array, pair: Pair, ctx: Context) -> jax.Array:
    """Inverted dropout on ``x`` (the input of one adapter's A), if a key was given."""
    if pair.dropout <= 0.0:
        return x
    key = ctx.next_key()
    if key is None:
        return x
    keep = 1.0 - pair.dropout
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def factor_dtype(lv: LoraValue):
    return functools.reduce(jnp.promote_types, [p.dtype for p in lv.pairs])


def example_mask(pair: Pair, ctx: Context, lv: LoraValue, ndim: int, axis: Optional[int], size: Optional[int], dtype):
    """For a mixed batch (``adapter_ids``), the 0/1 mask selecting the examples that use
    ``pair``'s adapter, shaped to broadcast along output axis ``axis``; else None."""
    ids = ctx.adapter_ids
    if pair.slots:
        raise ValueError(
            f"jlora: the adapter slots of {lv.path!r} are used where each example's slot cannot be gathered (a "
            "contraction over the example axis or over the kernel's output axes, an embedding lookup, a convolution); "
            "slots serve products x·W over the kernel's input axes, with adapter_ids"
        )
    if ids is None:
        return None
    if axis is None or size != ids.shape[0]:
        raise ValueError(
            f"jlora: adapter_ids has {ids.shape[0]} entries but the input of {lv.path!r} has "
            f"{'no batch axis' if axis is None else f'leading axis of size {size}'}; adapter_ids "
            "selects an adapter per example along axis 0 of each layer's input"
        )
    shape = [1] * ndim
    shape[axis] = size
    return (ids == pair.gid).astype(dtype).reshape(shape)
