"""Stack axes at any position of a kernel: MaxText's nn.scan(variable_axes={"params": 1})
stacks (in, L, out) and (in, L, heads, head_dim), factored through the scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from support import usage_models as um
from jlora import KernelLayout
from jlora.nodes.factors import delta
from jlora.tree.wrap import factor_sharding
from support.lora_checks import assert_all_factored, assert_factored_equals_merged

MAXTEXT_LAYOUTS = {
    "layers/query/kernel": ("in", "stack", "out", "out"),
    "layers/key/kernel": ("in", "stack", "out", "out"),
    "layers/value/kernel": ("in", "stack", "out", "out"),
    "layers/out/kernel": ("in", "stack", "in", "out"),
    "layers/wi/kernel": ("in", "stack", "out"),
    "layers/wo/kernel": ("in", "stack", "out"),
}


def test_layout_with_a_middle_stack_axis():
    """(in, L, heads, head_dim): factors canonical (L, in, r) / (L, r, heads, head_dim);
    ΔW[:, l] = A[l]·B[l] (NumPy reference)."""
    layout = ("in", "stack", "out", "out")
    kl = KernelLayout(layout)
    assert kl.stack_axes == (1,) and kl.in_axes == (0,) and kl.out_axes == (2, 3)
    assert kl.factor_shapes((6, 3, 2, 4), 5) == ((3, 6, 5), (3, 5, 2, 4))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 6, 5), np.float32), rng.standard_normal((3, 5, 2, 4), np.float32)
    d = np.asarray(delta(jnp.asarray(a), jnp.asarray(b), layout))
    assert d.shape == (6, 3, 2, 4)
    for layer in range(3):
        np.testing.assert_allclose(d[:, layer], np.einsum("ir,rnh->inh", a[layer], b[layer]), rtol=1e-5, atol=1e-5)


def test_factor_sharding_follows_a_middle_stack_axis():
    mesh = jax.make_mesh((1,), ("layers",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "layers", None))
    w = jax.device_put(jnp.zeros((6, 3, 4)), sharding)
    a_sh, b_sh = factor_sharding(w, ("in", "stack", "out"))
    assert tuple(a_sh.spec) == ("layers", None, None) and tuple(b_sh.spec) == ("layers", None, None)


def call(p, ids):
    model, _ = um.maxtext()
    return model.apply({"params": p}, ids)


@functools.lru_cache(maxsize=None)
def wrapped(by_use: bool):
    _, params = um.maxtext()
    config = jlora.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False)
    extra = dict(apply_fn=call, example_args=(um.ids(),)) if by_use else {}
    return jlora.wrap(params, config, **extra)


@pytest.mark.parametrize("by_use", [True, False])
def test_maxtext_scan_over_param_axis_1_layouts(by_use):
    """Found by use, and inferred from the (width, L) norm scales without apply_fn."""
    lp = wrapped(by_use)
    assert {p: w.layout for p, w in jlora.lora_leaves(lp)} == MAXTEXT_LAYOUTS
    q = dict(jlora.lora_leaves(lp))["layers/query/kernel"]
    assert q.a.shape == (um.L, um.D, 2) and q.b.shape == (um.L, 2, um.N, um.H)


def test_maxtext_scan_stays_factored_and_trains():
    """Every use factored through the transpose nn.scan inserts and the scan itself;
    factored == merged forward and backward; W bit-identical after training steps."""
    lp = wrapped(True)
    ids = um.ids()
    assert_all_factored(call, lp, ids)
    assert_factored_equals_merged(call, lp, ids)

    forward = jlora.lora(call, on_materialize="error")
    tx = jlora.optimizer(optax.adam(1e-2))

    @jax.jit
    def step(lp, state):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, ids[:, :-1]), ids[:, 1:]).mean()
        )(lp)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    state = tx.init(lp)
    new, losses = lp, []
    for _ in range(3):
        new, state, loss = step(new, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for (path, w0), (_, w1) in zip(jlora.lora_leaves(lp), jlora.lora_leaves(new)):
        assert np.array_equal(np.asarray(w0.w), np.asarray(w1.w)), path
        assert not np.array_equal(np.asarray(w0.a), np.asarray(w1.a)), path


def test_maxtext_adapter_round_trips_orbax_and_peft(tmp_path):
    """Both formats keep a middle stack axis: canonical factors in Orbax, one PyTorch
    module per layer in PEFT files, and back onto the base bit for bit."""
    lp = wrapped(False)
    _, params = um.maxtext()
    jlora.save(tmp_path / "orbax", lp)
    jlora.save_peft(tmp_path / "peft", lp)
    for back in (jlora.load(tmp_path / "orbax", params), jlora.load_peft(tmp_path / "peft", params)):
        got = dict(jlora.lora_leaves(back))
        for path, w in jlora.lora_leaves(lp):
            assert got[path].layout == w.layout, path
            np.testing.assert_array_equal(np.asarray(got[path].a), np.asarray(w.a), err_msg=path)
            np.testing.assert_array_equal(np.asarray(got[path].b), np.asarray(w.b), err_msg=path)
