"""The TPU rule of the fused LoRA product (``jlora.transform.fused``), run here on CPU by
adding "cpu" to its platforms: loss and gradients against the merged model. (What it saves
on a TPU is checked in tests/benchmarks/test_tpu_compile.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.transform.fused
from support.jaxpr_walk import all_eqns, primitive_names


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _lora_cases():
    k = jax.random.split(jax.random.key(0), 8)
    d, n, h, f = 32, 4, 8, 64
    x = jax.random.normal(k[0], (2, 5, d))
    params = {
        "q": {"w": jax.random.normal(k[1], (d, n, h)) * 0.2},  # einsum, two output axes
        "o": {"w": jax.random.normal(k[2], (n, h, d)) * 0.2},  # two contracted axes
        "up": {"kernel": jax.random.normal(k[3], (d, f)) * 0.2},  # wider output
        "down": {"kernel": jax.random.normal(k[4], (f, d)) * 0.2},  # narrower output
    }

    def mlp(p, x):
        q = jnp.einsum("btd,dnh->btnh", x, p["q"]["w"])
        h_ = x + jnp.einsum("btnh,nhd->btd", jnp.tanh(q), p["o"]["w"])
        return h_ + jax.nn.silu(h_ @ p["up"]["kernel"]) @ p["down"]["kernel"]

    stacked = {"layers": {"kernel": jax.random.normal(k[5], (3, d, d)) * 0.2}}

    def vmapped(p, x):
        return jax.vmap(lambda w, x: jnp.tanh(x @ w))(p["layers"]["kernel"], x)

    return [
        ("model", params, mlp, x, ["q", "o", "up", "down"]),
        ("vmapped layers", stacked, vmapped, jnp.broadcast_to(x[None, 0], (3, 5, d)), ["layers"]),
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case, several_devices", [(0, False), (0, True), (1, False)])
def test_fused_rule_against_merged_model(monkeypatch, case, several_devices, dtype):
    """The TPU rule of jlora.transform.fused, run here on CPU: loss and gradients of A, B and x
    against the merged model W + s·A·B (float32: tight; bfloat16: t and B meet x as
    bfloat16, as on a TPU, so within bfloat16 rounding). ``several_devices``: the forms the
    rule takes for kernels on a mesh of several devices (``[W | A]`` for the narrower
    ``down``), forced here on one."""
    name, params, fn, x, targets = _lora_cases()[case]
    monkeypatch.setattr(jlora.transform.fused, "_on_several_devices", lambda v: several_devices)
    params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
    x = x.astype(dtype)
    lp = jlora.wrap(params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), rng=jax.random.key(1),
                    apply_fn=fn, example_args=(x,))
    lp = jlora.add_adapter(lp, "second", jlora.LoraConfig(r=2, lora_alpha=4, target_modules=targets[:1]),
                           rng=jax.random.key(3), apply_fn=fn, example_args=(x,)) if case == 0 else lp
    lp = jlora.set_adapter(lp, ["default", "second"]) if case == 0 else lp
    # non-zero B, so the branch shows in the output
    lp = jax.tree_util.tree_map(
        lambda v: v * 0 + jax.random.normal(jax.random.key(v.size), v.shape, v.dtype) * 0.1 if v.ndim else v, lp)
    trainable, frozen = jlora.partition(lp)
    monkeypatch.setattr(jlora.transform.fused, "FUSED_PLATFORMS", ("tpu", "cpu"))
    forward = jlora.lora(fn, on_materialize="error")

    def loss(t, x):
        return jnp.sum(jnp.sin(forward(jlora.combine(t, frozen), x).astype(jnp.float32)))

    def ref_loss(t, x):
        return jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(t, frozen)), x).astype(jnp.float32)))

    (got, (gt, gx)) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(trainable, x)
    (ref, (rt, rx)) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(trainable, x)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert abs(float(got) - float(ref)) <= tol * max(1.0, abs(float(ref))) * (1 if dtype == jnp.float32 else 10)
    for a, b in zip(jax.tree_util.tree_leaves(gt), jax.tree_util.tree_leaves(rt)):
        assert _rel(a, b) <= tol, (name, _rel(a, b))
    assert _rel(gx, rx) <= tol, (name, _rel(gx, rx))


def test_lora_fused_false_uses_the_plain_rule(monkeypatch):
    """``jlora.lora(fn, fused=False)``: the plain rule even where the fused one is enabled
    (here: CPU added to its platforms): no ``[W | A]`` / ``[x | t]`` concatenation in the
    differentiated program, and the same gradients as the fused rule and the merged model."""
    name, params, fn, x, targets = _lora_cases()[0]
    lp = jlora.wrap(params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), rng=jax.random.key(1),
                    apply_fn=fn, example_args=(x,))
    lp = jax.tree_util.tree_map(
        lambda v: v * 0 + jax.random.normal(jax.random.key(v.size), v.shape, v.dtype) * 0.1 if v.ndim else v, lp)
    trainable, frozen = jlora.partition(lp)
    monkeypatch.setattr(jlora.transform.fused, "FUSED_PLATFORMS", ("tpu", "cpu"))

    def grads(forward):
        return jax.grad(lambda t: jnp.sum(jnp.sin(forward(jlora.combine(t, frozen), x))))

    fused, plain = grads(jlora.lora(fn, on_materialize="error")), grads(jlora.lora(fn, on_materialize="error",
                                                                                     fused=False))
    assert "concatenate" in primitive_names(jax.make_jaxpr(fused)(trainable).jaxpr)
    assert "concatenate" not in primitive_names(jax.make_jaxpr(plain)(trainable).jaxpr)
    ref = jax.grad(lambda t: jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(t, frozen)), x))))(trainable)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (jax.jit(plain)(trainable), jax.jit(fused)(trainable),
                                                                  ref))):
        assert _rel(a, c) <= 1e-5 and _rel(b, c) <= 1e-5


def _concatenated_shapes(fn, *args) -> set:
    return {tuple(e.outvars[0].aval.shape) for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if e.primitive.name == "concatenate"}


@pytest.mark.parametrize("several_devices", [False, True])
def test_fused_rule_extends_a_narrowing_kernel_by_b_on_one_device(monkeypatch, several_devices):
    """Which axis of ``W`` the TPU rule's forward product extends, for a kernel whose output
    is narrower than its input (``down``, 64 -> 32, r = 4): on one device by ``B`` along the
    contracted axis, ``[W ; B]`` (64 + 4, 32) (XLA:TPU copies ``W`` into the transposed
    layout to append ``A`` along its output axis, the minor one); on several devices by
    ``A`` along the output axis, ``[W | A]`` (64, 32 + 4) (FSDP shards the contracted,
    larger axis: appending ``B`` along it made XLA's partitioner gather the activations).
    The tangent's ``ẋ·[W | A]`` is there both ways. For the wider ``up`` (32 -> 64),
    ``[W ; B]`` forward and in the tangent (``[ẋ | ṫ]·[W ; B]``), never ``[W | A]``."""
    name, params, fn, x, targets = _lora_cases()[0]
    lp = jlora.wrap(params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), rng=jax.random.key(1),
                    apply_fn=fn, example_args=(x,))
    trainable, frozen = jlora.partition(lp)
    monkeypatch.setattr(jlora.transform.fused, "FUSED_PLATFORMS", ("tpu", "cpu"))
    monkeypatch.setattr(jlora.transform.fused, "_on_several_devices", lambda v: several_devices)
    forward = jlora.lora(fn, on_materialize="error")
    shapes = _concatenated_shapes(
        jax.grad(lambda t, x: jnp.sum(jnp.sin(forward(jlora.combine(t, frozen), x))), argnums=(0, 1)), trainable, x)
    assert ((68, 32) in shapes) != several_devices and (64, 36) in shapes, shapes  # down
    assert (36, 64) in shapes and (32, 68) not in shapes, shapes  # up


def test_on_several_devices_reads_the_mesh():
    """``_on_several_devices``: False for a value traced without shardings, True under
    ``jit`` with an input sharded on a mesh of two (abstract) devices."""
    seen = []

    def f(v):
        seen.append(jlora.transform.fused._on_several_devices(v))
        return v

    jax.make_jaxpr(f)(jnp.zeros((4, 4)))
    mesh = jax.sharding.AbstractMesh((2,), ("d",))
    with jax.sharding.use_abstract_mesh(mesh):
        jax.make_jaxpr(f)(jnp.zeros((4, 4)))
    assert seen == [False, True]
