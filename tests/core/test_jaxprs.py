"""One table of the primitives that carry nested jaxprs, shared by the usage tracer and the
transform: every such primitive JAX emits for the constructs below is in the table, both
walkers handle every kind in it, and a kernel used inside each construct is found by use
*and* stays factored, equal to the merged model (value and gradient).

References: the merged kernel's forward and gradient (``W + s·A·B`` formed explicitly),
and the layout the einsum implies (``("in", "out")``), never jlora against itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.core import jaxprs
from jlora.layouts import from_use
from jlora.layouts.from_use import find_kernel_uses
from jlora.transform import interpreter

D_IN, D_OUT = 6, 5


def _custom_jvp(f):
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: jax.jvp(f, primals, tangents))
    return g


def _custom_vjp(f):
    g = jax.custom_vjp(f)
    g.defvjp(lambda *a: jax.vjp(f, *a), lambda vjp, ct: vjp(ct))
    return g


def _use(w, x):
    return jnp.tanh(x @ w)


# Each construct applies the kernel inside a nested body, the way models do.
CONSTRUCTS = {
    "jit": lambda w, x: jax.jit(_use)(w, x),
    "custom_jvp": lambda w, x: _custom_jvp(_use)(w, x),
    "custom_vjp": lambda w, x: _custom_vjp(_use)(w, x),
    "checkpoint": lambda w, x: jax.checkpoint(_use)(w, x),
    "checkpoint_policy": lambda w, x: jax.checkpoint(_use, policy=jax.checkpoint_policies.dots_saveable)(w, x),
    "scan_const": lambda w, x: jax.lax.scan(lambda c, _: (_use(w, c) @ jnp.ones((D_OUT, D_IN)) / D_OUT, None),
                                            x, None, length=2)[0],
    "cond": lambda w, x: jax.lax.cond(x.sum() > -1e9, _use, lambda w, x: -_use(w, x), w, x),
    "switch": lambda w, x: jax.lax.switch(1, [lambda w, x: _use(w, x), lambda w, x: 2 * _use(w, x)], w, x),
    "fori_loop": lambda w, x: jax.lax.fori_loop(0, 2, lambda i, c: c + _use(w, x), jnp.zeros((x.shape[0], D_OUT))),
    "while_loop": lambda w, x: jax.lax.while_loop(lambda s: s[0] < 2, lambda s: (s[0] + 1, s[1] + _use(w, x)),
                                                  (0, jnp.zeros((x.shape[0], D_OUT))))[1],
    "nested": lambda w, x: jax.jit(lambda w, x: jax.checkpoint(lambda w, x: jax.lax.cond(
        True, _use, _use, w, x))(w, x))(w, x),
    "nnx_remat": lambda w, x: nnx.remat(_use)(w, x),
}
# Constructs over a stacked kernel (2, D_IN, D_OUT): its layers scanned over.
STACKED = {
    "scan_stacked": lambda w, x: jax.lax.scan(lambda c, wi: (_use(wi, c) @ jnp.ones((D_OUT, D_IN)) / D_OUT, None),
                                              x, w)[0],
    "nnx_scan": lambda w, x: nnx.scan(lambda c, wi: (_use(wi, c) @ jnp.ones((D_OUT, D_IN)) / D_OUT, None),
                                      in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, w)[0],
}
NOT_DIFFERENTIABLE = {"while_loop"}  # reverse mode does not go through lax.while_loop


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from _eqns(jaxprs.open_jaxpr(sub)[0])


@pytest.mark.parametrize("name", sorted(CONSTRUCTS) + sorted(STACKED))
def test_every_nested_primitive_is_in_the_table(name):
    fn = CONSTRUCTS.get(name) or STACKED[name]
    w = jnp.ones((2, D_IN, D_OUT) if name in STACKED else (D_IN, D_OUT))
    x = jnp.ones((3, D_IN))
    loss = lambda w: fn(w, x).sum()  # noqa: E731
    closed = jax.make_jaxpr(loss if name in NOT_DIFFERENTIABLE else jax.value_and_grad(loss))(w)
    unknown = sorted({e.primitive.name for e in _eqns(closed.jaxpr) if jaxprs.unknown_nested(e)})
    assert not unknown, f"primitives carrying jaxprs that neither walker enters: {unknown}"


def test_both_walkers_handle_every_primitive_of_the_table():
    for name, entry in jaxprs.NESTED.items():
        assert entry.kind in jaxprs.KINDS
        assert entry.kind in from_use._NESTED_HANDLERS, (name, entry.kind)
        assert name in interpreter.RULES and getattr(interpreter.RULES[name], "structural", False), name


def test_a_walker_missing_a_kind_fails_at_import():
    with pytest.raises(ImportError, match="'scan'.*both the usage tracer and the transform"):
        jaxprs.check_walker("a walker", [k for k in jaxprs.KINDS if k != jaxprs.SCAN])


@pytest.mark.parametrize("name", sorted(CONSTRUCTS) + sorted(STACKED))
def test_found_by_use_and_factored_inside(name):
    fn = CONSTRUCTS.get(name) or STACKED[name]
    stacked = name in STACKED
    key = jax.random.split(jax.random.key(0), 2)
    params = {"proj": jax.random.normal(key[0], (2, D_IN, D_OUT) if stacked else (D_IN, D_OUT))}
    x = jax.random.normal(key[1], (3, D_IN))
    apply = lambda p, x: fn(p["proj"], x)  # noqa: E731

    uses = find_kernel_uses(apply, params, (x,))
    assert uses[0].layout() == (("stack",) if stacked else ()) + ("in", "out")

    config = jlora.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False)
    lp = jlora.wrap(params, config, rng=jax.random.key(1), apply_fn=apply, example_args=(x,))
    lw = lp["proj"]
    merged = lw.w + lw.scale * jnp.matmul(lw.a, lw.b)  # the reference kernel, formed here (per layer)

    forward = jlora.lora(apply, on_materialize="error")
    report = jlora.explain(apply, lp, x)
    assert report.factored == ["proj"] and not report.materialized, str(report)
    np.testing.assert_allclose(forward(lp, x), apply({"proj": merged}, x), rtol=1e-5, atol=1e-5)

    if name in NOT_DIFFERENTIABLE:
        return
    g = jax.grad(lambda t: forward(t, x).sum())(lp)["proj"]
    g_ref = jax.grad(lambda ab: apply({"proj": lw.w + lw.scale * jnp.matmul(ab[0], ab[1])}, x).sum())((lw.a, lw.b))
    np.testing.assert_allclose(g.a, g_ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.b, g_ref[1], rtol=1e-4, atol=1e-5)


def test_a_primitive_outside_the_table_is_seen_by_both_walkers_as_closed():
    """``shard_map`` carries a jaxpr but is not in the table: the usage tracer reports no
    kernel use inside it and the transform forms ``W + s·A·B`` there, saying so (correct,
    never a silent gap)."""
    mesh = jax.make_mesh((1,), ("d",))
    spec = jax.sharding.PartitionSpec()
    fn = jax.shard_map(_use, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    params = {"proj": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}
    x = jax.random.normal(jax.random.key(1), (3, D_IN))
    apply = lambda p, x: fn(p["proj"], x)  # noqa: E731
    eqn = jax.make_jaxpr(apply)(params, x).jaxpr.eqns[0]
    assert jaxprs.unknown_nested(eqn), eqn.primitive.name
    use = find_kernel_uses(apply, params, (x,))[0]
    assert not use.contracted and [u.primitive for u in use.uses] == [eqn.primitive.name]  # seen, not entered
    lp = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False),
                    layouts={"proj": ("in", "out")})
    report = jlora.explain(apply, lp, x)
    assert report.materialized == ["proj"] and report.events[0].primitive == eqn.primitive.name
    lw = lp["proj"]
    np.testing.assert_allclose(jlora.lora(apply, on_materialize="allow")(lp, x),
                               apply({"proj": lw.w + lw.scale * lw.a @ lw.b}, x), rtol=1e-5, atol=1e-5)
