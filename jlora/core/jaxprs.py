"""What the two jaxpr walkers share: the one table of primitives that carry nested jaxprs,
how to open them, where an equation came from, and how a reshape splits into blocks.

jlora reads jaxprs in two places: the usage tracer (:mod:`jlora.layouts.from_use`, which
finds each kernel's layout from how the model uses it) and the interpreter
(:mod:`jlora.transform`, which keeps LoRA factored while it evaluates the model). A kernel
is found and kept factored only if both walkers follow it into the same nested bodies, so
the primitives that carry a body live in :data:`NESTED`, by *kind*:

=========  =====================================================================
``call``   the body runs once on the operands, in place (``jit``, ``closed_call``,
           ``custom_jvp_call``, ``custom_vjp_call``)
``remat``  a call whose body is recomputed in the backward pass (``checkpoint``)
``scan``   ``lax.scan``: constants, carry, and slices of the scanned operands
``cond``   ``lax.cond`` / ``lax.switch``: one of several branches
``while``  ``lax.while_loop`` / ``fori_loop``: a condition and a body over a carry
=========  =====================================================================

Each walker handles every kind (:func:`check_walker` at its import: a kind without a
handler is an ``ImportError``), so a primitive added here is known to both at once. A
primitive that carries a jaxpr but is not in the table (:func:`unknown_nested`) is left
closed by both walkers (the interpreter forms ``W + s·A·B`` there, correct but slower)
and ``tests/core/test_jaxprs.py`` lists the constructs whose primitives must be known.

>>> import jax, jax.numpy as jnp
>>> eqn = jax.make_jaxpr(jax.jit(jnp.sin))(1.0).jaxpr.eqns[0]
>>> nested(eqn).kind, len(body(eqn)[0].eqns)
('call', 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import jax.extend as jex

__all__ = [
    "CALL",
    "REMAT",
    "SCAN",
    "COND",
    "WHILE",
    "KINDS",
    "NestedPrimitive",
    "NESTED",
    "nested",
    "body",
    "open_jaxpr",
    "unknown_nested",
    "check_walker",
    "where",
    "reshape_blocks",
]

CALL = "call"
REMAT = "remat"
SCAN = "scan"
COND = "cond"
WHILE = "while"
KINDS = (CALL, REMAT, SCAN, COND, WHILE)


@dataclasses.dataclass(frozen=True)
class NestedPrimitive:
    """A primitive whose equation carries jaxprs: its kind and the parameters that hold
    the body (for ``call``/``remat``/``scan``: the first present is the body)."""

    kind: str
    body_params: tuple[str, ...]


_BY_NAME: dict[str, NestedPrimitive] = {
    "jit": NestedPrimitive(CALL, ("jaxpr",)),
    "pjit": NestedPrimitive(CALL, ("jaxpr",)),
    "closed_call": NestedPrimitive(CALL, ("call_jaxpr",)),
    "core_call": NestedPrimitive(CALL, ("call_jaxpr",)),
    "custom_jvp_call": NestedPrimitive(CALL, ("call_jaxpr", "fun_jaxpr")),
    "custom_vjp_call": NestedPrimitive(CALL, ("call_jaxpr", "fun_jaxpr")),
    "custom_vjp_call_jaxpr": NestedPrimitive(CALL, ("fun_jaxpr", "call_jaxpr")),
    "checkpoint": NestedPrimitive(REMAT, ("jaxpr",)),
    "remat2": NestedPrimitive(REMAT, ("jaxpr",)),
    "scan": NestedPrimitive(SCAN, ("jaxpr",)),
    "cond": NestedPrimitive(COND, ("branches",)),
    "while": NestedPrimitive(WHILE, ("cond_jaxpr", "body_jaxpr")),
}
# The same primitives as this JAX version names them (names have moved between releases).
_EXPORTED = {
    "jit_p": "jit",
    "closed_call_p": "closed_call",
    "call_p": "core_call",
    "custom_jvp_call_p": "custom_jvp_call",
    "custom_vjp_call_p": "custom_vjp_call",
    "remat_p": "checkpoint",
    "scan_p": "scan",
    "cond_p": "cond",
    "while_p": "while",
}
try:
    from jax.extend.core import primitives as _prims
except ImportError:  # pragma: no cover - very old JAX
    _prims = None
for _attr, _known in _EXPORTED.items():
    _prim = getattr(_prims, _attr, None) if _prims is not None else None
    if _prim is not None:
        _BY_NAME.setdefault(_prim.name, _BY_NAME[_known])

NESTED: Mapping[str, NestedPrimitive] = dict(_BY_NAME)
"""Primitive name → :class:`NestedPrimitive`, for every primitive both walkers enter."""


def nested(eqn: Any) -> Optional[NestedPrimitive]:
    """The table entry of ``eqn``'s primitive (an equation or a primitive name), or None."""
    name = eqn if isinstance(eqn, str) else eqn.primitive.name
    return NESTED.get(name)


def open_jaxpr(j: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` or an open ``Jaxpr``."""
    if hasattr(j, "consts") and hasattr(j, "jaxpr"):
        return j.jaxpr, j.consts
    return j, ()


def body(eqn: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of the body of a ``call``/``remat``/``scan`` equation."""
    entry = nested(eqn)
    if entry is None or entry.kind not in (CALL, REMAT, SCAN):
        raise ValueError(f"{eqn.primitive.name}: not a call, remat or scan primitive")
    for name in entry.body_params:
        if name in eqn.params:
            return open_jaxpr(eqn.params[name])
    raise KeyError(f"{eqn.primitive.name}: none of {entry.body_params} in its params {sorted(eqn.params)}")


def _holds_jaxpr(value: Any) -> bool:
    if isinstance(value, (jex.core.Jaxpr, jex.core.ClosedJaxpr)):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_jaxpr(v) for v in value)
    return False


def unknown_nested(eqn: Any) -> bool:
    """Whether ``eqn`` carries a jaxpr in its params but its primitive is not in
    :data:`NESTED` (neither walker enters it)."""
    return nested(eqn) is None and any(_holds_jaxpr(v) for v in eqn.params.values())


def check_walker(walker: str, handled: Iterable[str]) -> None:
    """Raises ``ImportError`` when ``walker`` lacks a handler for a kind of :data:`NESTED`.

    >>> check_walker("demo", KINDS)
    >>> check_walker("demo", ["call"])
    Traceback (most recent call last):
    ...
    ImportError: demo handles no nested-jaxpr kind 'remat', 'scan', 'cond', 'while' (used by ...
    """
    missing = [k for k in sorted({e.kind for e in NESTED.values()}, key=KINDS.index) if k not in set(handled)]
    if missing:
        users = sorted(n for n, e in NESTED.items() if e.kind in missing)
        raise ImportError(
            f"{walker} handles no nested-jaxpr kind {', '.join(map(repr, missing))} (used by {', '.join(users)}); "
            "every kind in jlora.core.jaxprs.NESTED needs a handler in both the usage tracer and the transform"
        )


def where(eqn: Any, prefix: Any = None) -> str:
    """``"name/stack @ file:line (function)"`` of an equation (best effort), for messages;
    ``prefix`` is the name stack of the bodies it sits in."""
    if eqn is None:
        return "function output"
    try:
        summary = jex.source_info_util.summarize(eqn.source_info)
        stack = eqn.source_info.name_stack if prefix is None else prefix + eqn.source_info.name_stack
        stack = str(stack)
        return f"{stack} @ {summary}" if stack else summary
    except Exception:  # pragma: no cover - source info is best effort
        return "?"


def reshape_blocks(old: Sequence[int], new: Sequence[int]) -> Optional[list[tuple[list[int], list[int]]]]:
    """A reshape from ``old`` to ``new`` as blocks ``(old axes, new axes)`` with equal products
    (size-1 axes alone); None where no such split exists (e.g. a zero-size axis).

    >>> reshape_blocks((2, 3, 4), (6, 4))
    [([0, 1], [0]), ([2], [1])]
    """
    if 0 in old or 0 in new:
        return None
    blocks, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        oi, nj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                if i >= len(old):
                    return None
                oi.append(i)
                po *= old[i]
                i += 1
            else:
                if j >= len(new):
                    return None
                nj.append(j)
                pn *= new[j]
                j += 1
        blocks.append((oi, nj))
    return blocks
