"""LoRA weights stay factored through jax.checkpoint / nn.remat / nnx.remat (any policy,
prevent_cse either way, module state going in and out of the remat body), forward and
backward."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from support import usage_models as um
from support.lora_checks import assert_all_factored, assert_factored_equals_merged

POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


@pytest.mark.parametrize(("policy", "prevent_cse"), [("none", True), ("dots_saveable", False), ("nothing_saveable", True)])
def test_jax_checkpoint_returning_the_weights(policy, prevent_cse):
    """A checkpointed block that returns its weights (as nnx.remat returns module state),
    and a second block that uses the returned weights: all factored."""
    rng = np.random.default_rng(0)
    p = {name: {"kernel": jnp.asarray(rng.standard_normal((8, 8), np.float32) * 0.3)} for name in ("up", "down")}
    x = jnp.asarray(rng.standard_normal((3, 8), np.float32))

    def block(p, h):
        return p, jnp.tanh(h @ p["up"]["kernel"]) @ p["down"]["kernel"]

    def f(p, x):
        ckpt = jax.checkpoint(block, policy=POLICIES[policy], prevent_cse=prevent_cse)
        p, h = ckpt(p, x)
        return ckpt(p, h)[1]

    lp = jlora.wrap(p, jlora.LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"], init_lora_weights=False))
    report = assert_all_factored(f, lp, x)
    assert len(report.events) == 4
    assert_factored_equals_merged(f, lp, x)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name="down")(jnp.tanh(nn.Dense(16, name="up")(x)))


class _LinenRemat(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(_Block, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False)(name=f"b{i}")(x)
        return x


def test_linen_remat():
    model = _LinenRemat()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8), np.float32))
    params = model.init(jax.random.key(0), x)["params"]
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    lp = jlora.wrap(params, jlora.LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"], init_lora_weights=False))
    assert_all_factored(f, lp, x)
    assert_factored_equals_merged(f, lp, x)


def call(m, ids):
    return m(ids)


@functools.lru_cache(maxsize=None)
def _wrapped_tunix_remat():
    config = jlora.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False)
    return jlora.wrap(um.tunix(remat=True), config, apply_fn=call, example_args=(um.ids(),))


def test_nnx_remat_of_self_block_func():
    """tunix's form: nnx.remat(self.block.__func__)(self, layer, x, ...): the whole
    module's state goes into each remat body and comes back out; the next layer reads
    the returned state. Every target stays factored, on_materialize="error" passes."""
    lp = _wrapped_tunix_remat()
    assert len(jlora.lora_leaves(lp)) == 7 * um.L
    assert_all_factored(call, lp, um.ids())
    assert_factored_equals_merged(call, lp, um.ids())


def _train_step(forward, tx, ids):
    @jax.jit
    def step(lp, opt_state):
        loss, grads = jax.value_and_grad(lambda s: jnp.mean(forward(s, ids) ** 2))(lp)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    return step


def test_nnx_remat_training_keeps_w():
    """Training through nnx.remat (gemma blocks under a lambda, dots_saveable,
    prevent_cse=False; its factored == merged check is in test_usage.py): W is
    bit-identical after the steps, the factors moved, the loss went down."""
    config = jlora.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights=False)
    ids = um.ids()
    lm = jlora.wrap(um.gemma(remat=True), config, apply_fn=call, example_args=(ids,))
    graphdef, lp = nnx.split(lm)
    forward = jlora.lora(lambda s, i: nnx.merge(graphdef, s)(i), on_materialize="error")
    tx = jlora.optimizer(optax.adam(1e-2))
    step = _train_step(forward, tx, ids)
    opt_state, new, losses = tx.init(lp), lp, []
    for _ in range(3):
        new, opt_state, loss = step(new, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for (path, w0), (_, w1) in zip(jlora.lora_leaves(lp), jlora.lora_leaves(new)):
        assert np.array_equal(np.asarray(w0.w), np.asarray(w1.w)), path
        assert not np.array_equal(np.asarray(w0.a), np.asarray(w1.a)), path
