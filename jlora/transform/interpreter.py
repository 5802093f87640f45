"""The interpreter: evaluates a jaxpr in which some values are :class:`LoraValue` s, by
rules registered per primitive (:data:`RULES`, filled by :mod:`.views`, :mod:`.products`
and :mod:`.control_flow` at import, as JAX's own rule tables are filled).

An equation with a LoRA operand goes to its primitive's rule, or to :func:`rule_materialize`
(``W + s·A·B`` formed at that one point: correct, only slower). An equation whose rule is
*structural* (it evaluates nested bodies) is also handed a quantized kernel alone
(:mod:`jlora.quant.forward`). Everything else is bound as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax.extend as jex

from ..core import jaxprs
from ..quant import forward as qforward
from .rows import Frame
from .values import Context, LoraValue

__all__ = ["RULES", "register", "eval_jaxpr", "bind", "bind_with", "materialize", "rule_materialize", "is_structural"]

Rule = Callable[[Any, Sequence[Any], Context], Any]
RULES: dict[str, Rule] = {}
"""Primitive name → rule ``(eqn, invals, ctx) -> outvals`` for equations with a LoRA operand."""


def register(*names: str, structural: bool = False) -> Callable[[Rule], Rule]:
    """Registers a rule for the primitives ``names`` (a decorator). ``structural``: the
    rule evaluates a nested body (also used for a quantized kernel alone)."""

    def add(rule: Rule) -> Rule:
        if structural:
            rule.structural = True
        for name in names:
            RULES.setdefault(name, rule)
        return rule

    return add


def _eqn_context(eqn: Any) -> Any:
    """The context the equation was traced in (``JaxprEqn.ctx``: abstract mesh inside
    ``auto_axes``/``explicit_axes`` regions, compute type, ...), entered while evaluating
    it, as ``jax.core.eval_jaxpr`` does; a no-op where this JAX has none."""
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    return manager if manager is not None else contextlib.nullcontext()


def _bind_params(primitive: Any, params: dict) -> tuple[tuple, dict]:
    """``(subfuns, params)`` for ``primitive.bind`` (older JAX returns a pair, newer a dict)."""
    got = primitive.get_bind_params(params)
    if isinstance(got, tuple):
        return tuple(got[0]), got[1]
    return (), got


def bind_with(primitive: Any, params: dict, invals: Sequence[Any]) -> Any:
    if any(qforward.is_view(x) for x in invals):  # a quantized kernel (jlora.qforward)
        return qforward.bind(primitive, params, invals, bind_with)
    subfuns, bind_params = _bind_params(primitive, params)
    return primitive.bind(*subfuns, *invals, **bind_params)


def bind(eqn: Any, invals: Sequence[Any]) -> Any:
    return bind_with(eqn.primitive, eqn.params, invals)


def materialize(x: Any, ctx: Context, eqn: Any, reason: str = "") -> Any:
    if isinstance(x, LoraValue):
        x.check_materializable(eqn.primitive.name if eqn is not None else "the function's output")
        ctx.record(x, eqn, "materialized", reason)
        return x.materialize(ctx.adapter_ids)
    return qforward.dense(x)


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context, materialize_out: bool = True,
               caller: Any = None):
    """Evaluates ``jaxpr`` where some values may be ``LoraValue``. ``caller``: the ``jit``-like
    equation whose body this is (kept with the frame in a mixed batch, see :mod:`.rows`)."""
    env: dict[Any, Any] = {}
    if not ctx.tracks_rows:
        return _eval(jaxpr, consts, args, ctx, materialize_out, env)
    parent = ctx.frames[-1] if ctx.frames and caller is not None else None
    frame = Frame(jaxpr, env, caller, parent)
    if parent is not None:
        parent.children[id(caller)] = frame
    ctx.frames.append(frame)
    try:
        return _eval(jaxpr, consts, args, ctx, materialize_out, env)
    finally:
        ctx.frames.pop()


def _inline(eqn: Any, ctx: Context) -> bool:
    """In a mixed batch, ``jit`` bodies are evaluated in place (same program under ``jit``) so
    that the rows of a value can be traced through them (``jnp.take`` is one)."""
    entry = jaxprs.nested(eqn)
    return ctx.tracks_rows and entry is not None and entry.kind == jaxprs.CALL and "jaxpr" in eqn.params


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context, materialize_out: bool, env: dict):
    def read(v):
        if isinstance(v, jex.core.Literal):
            return v.val
        return env[v]

    def write(v, val):
        if not isinstance(v, jex.core.DropVar):
            env[v] = val

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c)
    for v, a in zip(jaxpr.invars, args):
        write(v, a)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name_stack = jex.source_info_util.current_name_stack() + eqn.source_info.name_stack
        with jex.source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), _eqn_context(eqn):
            if any(isinstance(x, LoraValue) for x in invals):
                rule = RULES.get(eqn.primitive.name, rule_materialize)
                outvals = rule(eqn, invals, ctx)
            elif (is_structural(eqn) and any(qforward.is_view(x) for x in invals)) or _inline(eqn, ctx):
                outvals = RULES[eqn.primitive.name](eqn, invals, ctx)  # a quantized kernel goes inside
            else:
                outvals = bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for v, val in zip(eqn.outvars, outvals):
            write(v, val)
    outs = [read(v) for v in jaxpr.outvars]
    if materialize_out:
        outs = [materialize(o, ctx, None, "returned from the function") for o in outs]
    return outs


def rule_materialize(eqn, invals, ctx, reason: str = ""):
    reason = reason or f"no factored rule for {eqn.primitive.name}"
    vals = [materialize(x, ctx, eqn, reason) for x in invals]
    return bind(eqn, vals)


def is_structural(eqn: Any) -> bool:
    """Whether the equation's rule evaluates a nested body (jit, scan, remat, cond, ...)."""
    return getattr(RULES.get(eqn.primitive.name), "structural", False)
