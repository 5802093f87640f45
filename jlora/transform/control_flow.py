"""Control-flow rules: LoRA values go into nested bodies and stay factored there. One rule
per kind of :data:`jlora.core.jaxprs.NESTED` (the usage tracer has one per kind too):
``call`` bodies (jit, custom_jvp/vjp) are evaluated in place, ``remat`` bodies are
re-applied under ``jax.checkpoint`` with the same policy, ``scan`` takes stacked LoRA
values as scanned operands, ``cond`` interprets every branch, ``while`` keeps LoRA
weights as loop constants. A LoRA value in a carry is materialised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..core import jaxprs
from ..core.jaxprs import open_jaxpr
from ..quant import forward as qforward
from .interpreter import eval_jaxpr, materialize, register, rule_materialize
from .values import LoraValue, Pair

__all__: list[str] = []


def _call(eqn, invals, ctx):
    """A nested jit / call / custom_jvp / custom_vjp body, evaluated in place, so LoRA
    values stay factored inside it and may also come back out of it."""
    jaxpr, consts = jaxprs.body(eqn)
    return eval_jaxpr(jaxpr, consts, invals, ctx, materialize_out=False, caller=eqn)


_OPTIONAL = ("k", "bias")  # a pair's optional arrays (DoRA's k, lora_B's bias)


def _pair_names(p: Pair) -> list[str]:
    # adapter slots carry their scales as an array (values, not program constants)
    return ["a", "b"] + [n for n in _OPTIONAL if getattr(p, n) is not None] + (["scale"] if p.slots else [])


def _lora_arrays(v: LoraValue) -> list[Any]:
    return [v.w] + [getattr(p, n) for p in v.pairs for n in _pair_names(p)]


def _lora_spec(v: LoraValue) -> LoraValue:
    # True marks an optional array the pair has (one more array each)
    return dataclasses.replace(
        v, w=None, pairs=tuple(
            dataclasses.replace(p, a=None, b=None, **{n: None if getattr(p, n) is None else True for n in _OPTIONAL},
                                **({"scale": None} if p.slots else {}))
            for p in v.pairs
        )
    )


def _n_arrays(spec: LoraValue) -> int:
    return 1 + sum(len(_pair_names(p)) for p in spec.pairs)


def _lora_from(spec: LoraValue, arrays: Sequence[Any]) -> LoraValue:
    pairs, i = [], 1
    for p in spec.pairs:
        names = _pair_names(p)
        got = dict(zip(names, arrays[i:i + len(names)]))
        pairs.append(dataclasses.replace(p, **got))
        i += len(names)
    return dataclasses.replace(spec, w=arrays[0], pairs=tuple(pairs))


def _flatten_vals(vals: Sequence[Any]):
    """Splits values into arrays (a LoRA value as its w and factors) and a rebuild function."""
    flat: list[Any] = []
    specs: list[Any] = []
    for v in vals:
        if isinstance(v, LoraValue):
            specs.append(_lora_spec(v))
            flat.extend(_lora_arrays(v))
        else:
            specs.append(None)
            flat.append(v)

    def rebuild(arrays: Sequence[Any]) -> list[Any]:
        out, i = [], 0
        for s in specs:
            if s is None:
                out.append(arrays[i])
                i += 1
            else:
                n = _n_arrays(s)
                out.append(_lora_from(s, arrays[i:i + n]))
                i += n
        return out

    return flat, rebuild


def _rule_remat(eqn, invals, ctx):
    """``jax.checkpoint`` / ``nn.remat`` / ``nnx.remat``: re-applied around the interpreted
    body with the same ``policy`` and ``prevent_cse``; the dropout key is an argument, so
    the recomputation draws the same masks. LoRA values returned by the body stay
    factored (``nnx.remat`` returns the module's state)."""
    p = eqn.params
    jaxpr, consts = jaxprs.body(eqn)
    flat, rebuild = _flatten_vals(invals)
    has_key = ctx.key is not None
    out_rebuild: list[Callable] = []

    def body(key, *arrays):
        sub = ctx.child(key if has_key else None)
        # LoRA values the body returns (an NNX module's state going in and out of
        # nnx.remat) leave factored, as W and its factors, and are rebuilt outside.
        outs = eval_jaxpr(jaxpr, consts, rebuild(arrays), sub, materialize_out=False)
        out_flat, out_rb = _flatten_vals(outs)
        out_rebuild.append(out_rb)
        return out_flat

    key = ctx.next_key() if has_key else jnp.zeros((), jnp.uint32)
    fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
    out = fn(key, *flat)
    return out_rebuild[-1](out)


def _rule_cond(eqn, invals, ctx):
    """``lax.cond`` / ``lax.switch``: every branch is interpreted with the LoRA operands."""
    index, *ops = invals
    if isinstance(index, LoraValue):
        return rule_materialize(eqn, invals, ctx, "LoRA weight used as a cond predicate")
    flat, rebuild = _flatten_vals(ops)
    key = ctx.next_key()

    def branch(closed):
        jaxpr, consts = open_jaxpr(closed)

        def run(*arrays):
            return eval_jaxpr(jaxpr, consts, rebuild(arrays), ctx.child(key))

        return run

    return jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *flat)


def _rule_while(eqn, invals, ctx):
    """``lax.while_loop`` / ``fori_loop``: LoRA weights as loop constants stay factored
    (a LoRA value in the carry is materialised). With dropout, each iteration draws its
    own masks."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
    init = [materialize(v, ctx, eqn, "LoRA weight carried through a loop") for v in invals[cn + bn:]]
    cjaxpr, cjconsts = open_jaxpr(p["cond_jaxpr"])
    bjaxpr, bjconsts = open_jaxpr(p["body_jaxpr"])
    key = ctx.next_key()

    def cond_fn(state):
        _, carry = state
        return eval_jaxpr(cjaxpr, cjconsts, [*cconsts, *carry], ctx.child(None))[0]

    def body_fn(state):
        i, carry = state
        sub = ctx.child(None if key is None else jax.random.fold_in(key, i))
        return i + 1, eval_jaxpr(bjaxpr, bjconsts, [*bconsts, *carry], sub)

    _, out = jax.lax.while_loop(cond_fn, body_fn, (jnp.zeros((), jnp.int32), init))
    return out


def _rule_scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts = list(invals[:nc])
    init = [materialize(v, ctx, eqn, "LoRA weight carried through a scan") for v in invals[nc:nc + ncar]]
    xs = []
    for v in invals[nc + ncar:]:
        v = v.with_w(qforward.prepare_scanned(v.w)) if isinstance(v, LoraValue) else qforward.prepare_scanned(v)
        if isinstance(v, LoraValue) and v.axes[0][0] != "s":
            v = materialize(v, ctx, eqn, "scan slices a non-stack axis of the weight")
        xs.append(v)

    # A packed kernel scanned over its stack axis is not sliced by the scan: the body gets
    # a view of the whole stack and the iteration's index (quant.forward.scanned_view), so
    # a product reads its kernel from the stack where it is used.
    stacks: dict[int, Any] = {}
    for i, v in enumerate(xs):
        w = v.w if isinstance(v, LoraValue) else v
        if qforward.is_view(w):
            stacks[i] = w
            xs[i] = v.with_w(None) if isinstance(v, LoraValue) else None

    # stacked LoRA values scanned over their leading stack axis
    xs_flat: list[Any] = []
    xs_specs: list[Any] = []
    for v in xs:
        if isinstance(v, LoraValue):
            m = v.axes[0][1]
            moved = v.with_w(v.w, ab=lambda a, b: (jnp.moveaxis(a, m, 0), jnp.moveaxis(b, m, 0)))
            # adapter slots' scales (N,) hold for every iteration: scanned as (length, N)
            moved = dataclasses.replace(moved, pairs=tuple(
                dataclasses.replace(q, scale=jnp.broadcast_to(q.scale, (p["length"],) + tuple(q.scale.shape)))
                if q.slots else q for q in moved.pairs
            ))
            inner_axes = tuple(("s", k if k < m else k - 1) if g == "s" else (g, k) for g, k in v.axes[1:])
            xs_specs.append(dataclasses.replace(_lora_spec(v), axes=inner_axes, n_stack=v.n_stack - 1))
            xs_flat.append(tuple(_lora_arrays(moved)))
        else:
            xs_specs.append(None)
            xs_flat.append(v)
    length = p["length"]
    keys = None
    if ctx.key is not None:
        keys = jax.random.split(ctx.next_key(), length)
    body_jaxpr, body_consts = jaxprs.body(eqn)

    def body(carry, xs_and_key):
        (xs_vals, index), key = xs_and_key
        vals = []
        for i, (spec, val) in enumerate(zip(xs_specs, xs_vals)):
            if spec is None:
                val = qforward.scanned_view(stacks[i], index) if i in stacks else val
            else:
                val = _lora_from(spec, val)
                if i in stacks:
                    val = val.with_w(qforward.scanned_view(stacks[i], index))
            vals.append(val)
        sub = ctx.child(key)
        outs = eval_jaxpr(body_jaxpr, body_consts, [*consts, *carry, *vals], sub)
        return outs[:ncar], outs[ncar:]

    carry, ys = jax.lax.scan(
        body, init, ((xs_flat, jnp.arange(length, dtype=jnp.int32) if stacks else None), keys), length=length,
        reverse=p["reverse"], unroll=p["unroll"],
    )
    return [*carry, *ys]


# One rule per kind of jlora.core.jaxprs.NESTED, registered for every primitive of that kind.
_HANDLERS = {
    jaxprs.CALL: _call,
    jaxprs.REMAT: _rule_remat,
    jaxprs.SCAN: _rule_scan,
    jaxprs.COND: _rule_cond,
    jaxprs.WHILE: _rule_while,
}
jaxprs.check_walker("jlora.transform", _HANDLERS)
for _name, _entry in jaxprs.NESTED.items():
    register(_name, structural=True)(_HANDLERS[_entry.kind])
