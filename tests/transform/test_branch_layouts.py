"""The LoRA branch ``lora_branch`` emits (flattened 2-D products where the contraction
allows, the general ``dot_general`` form elsewhere) against the merged kernel
``W + s·A·B``: forward and gradients of x, A and B, for every way a product can meet a
LoRA kernel -- kernel on the right or on the left, contraction over its input axes or its
output axes (tied embeddings), contracted axes trailing or not in ``x`` and in another
order than the kernel's, stacked layers as batch dimensions (vmap) or all applied to one
input; and, on XLA:CPU, that the backward pass of a Dense layer has no activation-sized
transposed copy (what the flattened form is for)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

S = 1.5  # not a power of two: where the scale is applied shows in the rounding


def _lw(w, layout, r=3, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    sizes = dict(zip(layout, [None] * len(layout)))
    del sizes
    stack = [n for n, role in zip(w.shape, layout) if role == "stack"]
    ins = [n for n, role in zip(w.shape, layout) if role == "in"]
    outs = [n for n, role in zip(w.shape, layout) if role == "out"]
    a = jax.random.normal(ka, (*stack, *ins, r)) * 0.3
    b = jax.random.normal(kb, (*stack, r, *outs)) * 0.3
    return jlora.LoraWeight(w=w, a=a, b=b, scale=S, layout=layout)


CASES = {
    # name: (kernel shape, layout, x shape, f(x, w))
    "dense, kernel on the right": ((6, 5), ("in", "out"), (2, 3, 6), lambda x, w: x @ w),
    "Conv1D layout, x·Wᵀ": ((5, 6), ("out", "in"), (2, 3, 6), lambda x, w: x @ w.T),
    "kernel on the left": (
        (6, 5), ("in", "out"), (2, 3, 6),
        lambda x, w: jax.lax.dot_general(w, x, (((0,), (2,)), ((), ()))),
    ),
    "tied embedding, over the output axes": ((7, 5), ("in", "out"), (2, 3, 5), lambda x, w: x @ w.T),
    "two input axes, contracted in another order": (
        (3, 4, 5), ("in", "in", "out"), (2, 4, 3), lambda x, w: jnp.einsum("bji,ijo->bo", x, w),
    ),
    "two output axes": ((6, 2, 3), ("in", "out", "out"), (2, 3, 6), lambda x, w: jnp.einsum("btd,dnh->btnh", x, w)),
    "contracted axis first in x": ((4, 5), ("in", "out"), (4, 3), lambda x, w: jax.lax.dot_general(x, w, (((0,), (0,)), ((), ())))),
    "stacked layers, vmapped": (
        (3, 6, 5), ("stack", "in", "out"), (3, 2, 6), lambda x, w: jax.vmap(lambda xi, wi: xi @ wi)(x, w),
    ),
    "stacked layers on one input": ((3, 6, 5), ("stack", "in", "out"), (2, 6), lambda x, w: jnp.einsum("bi,lio->lbo", x, w)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_branch_equals_merged(name):
    shape, layout, x_shape, f = CASES[name]
    kw, kx, kc = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(kw, shape)
    x = jax.random.normal(kx, x_shape)
    lw = _lw(w, layout)
    factored = jlora.lora(lambda p, x: f(x, p["k"]), on_materialize="error")
    y = factored({"k": lw}, x)
    y_ref = f(x, jlora.merge({"k": lw})["k"])
    c = jax.random.normal(kc, y_ref.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))

    def loss(x, a, b, merged):
        lw2 = lw.replace(a=a, b=b)
        out = f(x, jlora.merge({"k": lw2})["k"]) if merged else factored({"k": lw2}, x)
        return jnp.sum(jnp.sin(out) * c)

    g = jax.grad(loss, argnums=(0, 1, 2))(x, lw.a, lw.b, False)
    g_ref = jax.grad(loss, argnums=(0, 1, 2))(x, lw.a, lw.b, True)
    for got, want, what in zip(g, g_ref, ("x", "A", "B")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                                   atol=1e-4 * float(jnp.abs(want).max()), err_msg=f"gradient of {what}")


def _activation_sized_copies(hlo: str, min_elems: int) -> list[str]:
    """ENTRY instructions that are copies/transposes (or fusions containing one) with a
    result of at least ``min_elems`` elements."""
    import re

    lines = hlo.splitlines()
    bodies, cur = {}, None
    for line in lines:
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[cur] = []
        elif cur is not None:
            bodies[cur].append(line)
    entry = next(k for k in bodies if any(line.startswith("ENTRY") and k in line for line in lines))
    found = []
    for line in bodies[entry]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = [a-z0-9]+\[([0-9,]*)\]\S* ([a-z\-]+)\(", line)
        if not m:
            continue
        name, dims, op = m.groups()
        n = int(np.prod([int(d) for d in dims.split(",") if d] or [0]))
        calls = re.search(r"calls=%([\w.\-]+)", line)
        ops = {op} | {re.sub(r".* ([a-z\-]+)\(.*", r"\1", b) for b in bodies.get(calls.group(1), [])} if calls else {op}
        if n >= min_elems and ops & {"copy", "transpose"}:
            found.append(name)
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout question is XLA:CPU's")
def test_dense_backward_has_no_activation_sized_transpose():
    tokens, d_in, d_out, r = (4, 32), 48, 96, 4
    kw, kx, kc = jax.random.split(jax.random.key(2), 3)
    w = jax.random.normal(kw, (d_out, d_in)) * 0.1  # FlaxConv1D layout: (out, in), applied as x·Wᵀ
    x = jax.random.normal(kx, (*tokens, d_in))
    c = jax.random.normal(kc, (*tokens, d_out))
    lw = _lw(w, ("out", "in"), r=r)
    factored = jlora.lora(lambda p, x: x @ p["k"].T, on_materialize="error")

    def loss(x, a, b, c):
        return jnp.sum(jnp.tanh(factored({"k": lw.replace(a=a, b=b)}, x)) * c)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, lw.a, lw.b, c).compile().as_text()
    # the cotangent dy is tokens x d_out; before issue 14 XLA:CPU transposed it to form dB
    assert _activation_sized_copies(hlo, tokens[0] * tokens[1] * d_in) == []
