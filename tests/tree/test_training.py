"""Training through `jlora.optimizer` and through `partition` / `combine`.

References: the loss before training (it must fall), the parameters before training
(frozen leaves must come out bit-identical, trainable ones must move) and the list of
trainable leaves of the wrapped tree (the optimizer state must hold exactly those).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pytest

import jlora
from support.models import ALL, gpt2, nnx_mlp


def _trainable_leaves(lp):
    """The arrays that should train: A and B of every LoraWeight, the value of every Trainable."""
    out = []
    for x in jax.tree_util.tree_leaves(lp, is_leaf=lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable))):
        if isinstance(x, jlora.LoraWeight):
            out += [x.a, x.b]
        elif isinstance(x, jlora.Trainable):
            out += jax.tree_util.tree_leaves(x.value)
    return out


def _adam_states(state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_adam) if is_adam(x)]


def test_adamw_through_optimizer_trains_only_adapters():
    """20 AdamW steps on a small GPT-2 (LoRA on c_attn/c_proj, their biases trainable, the
    final LayerNorm in modules_to_save, LoRA dropout on): the loss falls; every frozen leaf
    is bit-identical afterwards; every trainable leaf moved; the Adam moments exist for the
    trainable leaves only."""
    case = gpt2()
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], bias="lora_only",
                           modules_to_save=["ln_f"], lora_dropout=0.1)
    lp0 = jlora.wrap(case.params, cfg, rng=jax.random.key(0))
    ids = case.inputs
    forward = jlora.lora(case.apply)

    def loss_fn(lp, key):
        logits = forward(lp, ids[:, :-1], lora_rng=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.01))
    state = tx.init(lp0)

    trainable = _trainable_leaves(lp0)
    n_lora = len(jlora.lora_leaves(lp0))
    # A, B and the bias of each c_attn/c_proj, and ln_f's scale and bias
    assert len(trainable) == 2 * n_lora + n_lora + 2
    assert isinstance(lp0["transformer"]["ln_f"]["scale"], jlora.Trainable)
    (adam,) = _adam_states(state)
    mu, nu = jax.tree_util.tree_leaves(adam.mu), jax.tree_util.tree_leaves(adam.nu)
    assert len(mu) == len(nu) == len(trainable)
    assert sorted(x.shape for x in mu) == sorted(x.shape for x in trainable)
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    assert state_bytes <= 2 * sum(x.nbytes for x in trainable) + 1024

    @jax.jit
    def step(lp, state, key):
        loss, grads = jax.value_and_grad(loss_fn)(lp, key)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    lp = lp0
    losses = []
    for i in range(20):
        lp, state, loss = step(lp, state, jax.random.key(100 + i))
        losses.append(float(loss))
    final = float(loss_fn(lp, None))
    assert final < 0.95 * losses[0], (losses[0], final)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses

    assert jax.tree_util.tree_structure(lp) == jax.tree_util.tree_structure(lp0)
    _, frozen0 = jlora.partition(lp0)
    _, frozen1 = jlora.partition(lp)
    for x, y in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(frozen1)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    for x, y in zip(trainable, _trainable_leaves(lp)):
        assert not np.array_equal(np.asarray(x), np.asarray(y))


def test_partition_combine_loop_trains_trainable_part_only():
    """An NNX MLP with LoRA on ``up``, bias='all' and ``down`` in modules_to_save, trained by
    differentiating only the trainable half of ``partition``: the loss falls, frozen leaves
    are untouched, trainable leaves (A, B, biases, the saved module) move, and the count of
    trainable parameters is the sum written out from the layer sizes."""
    case = nnx_mlp()
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up"], bias="all", modules_to_save=["down"])
    lp0 = jlora.wrap(case.params, cfg, rng=jax.random.key(0))
    # up: Linear(16, 32) with LoRA r=4; down: Linear(32, 8) in full; both biases
    trainable_n = 16 * 4 + 4 * 32 + 32 + 32 * 8 + 8
    assert jlora.count_parameters(lp0) == (trainable_n, trainable_n + 16 * 32)

    trainable, frozen = jlora.partition(lp0)
    rebuilt = jlora.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(lp0)
    assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(lp0)))
    # A, B, up.bias, down.kernel, down.bias
    assert len(jax.tree_util.tree_leaves(trainable)) == len(_trainable_leaves(lp0)) == 5

    x = case.inputs
    target = jnp.sin(jnp.arange(x.shape[0] * 8, dtype=jnp.float32).reshape(x.shape[0], 8))
    forward = jlora.lora(case.apply)

    def loss_fn(t, f):
        return jnp.mean((forward(jlora.combine(t, f), x) - target) ** 2)

    opt = optax.adamw(3e-2)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t, frozen)
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    t = trainable
    first = float(loss_fn(t, frozen))
    for _ in range(20):
        t, opt_state, _ = step(t, opt_state)
    assert float(loss_fn(t, frozen)) < 0.5 * first

    lp = jlora.combine(t, frozen)
    _, frozen1 = jlora.partition(lp)
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen1)):
        assert a is b
    for a, b in zip(_trainable_leaves(lp0), _trainable_leaves(lp)):
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    # the trained, merged model computes what the LoRA model computes
    np.testing.assert_allclose(case.apply(jlora.merge(lp), x), forward(lp, x), rtol=1e-5, atol=1e-6)


def test_optimizer_labels_cover_exactly_the_trainable_leaves():
    """``trainable_labels`` marks A, B and Trainable values 'trainable', everything else
    (base kernels, norms, embeddings) 'frozen': the count of 'trainable' labels equals the
    number of trainable leaves and their sizes add up to ``count_parameters``'s first value."""
    case = gpt2()
    lp = jlora.wrap(case.params, jlora.LoraConfig(r=2, target_modules=["c_fc"], bias="all"))
    labels = jax.tree_util.tree_leaves(jlora.trainable_labels(lp))
    leaves = jax.tree_util.tree_leaves(lp)
    assert len(labels) == len(leaves)
    sizes = [x.size for lab, x in zip(labels, leaves) if lab == "trainable"]
    assert len(sizes) == len(_trainable_leaves(lp))
    assert sum(sizes) == jlora.count_parameters(lp)[0]
    assert set(labels) == {"trainable", "frozen"}


@pytest.mark.parametrize("name", ["linen_scan", "nnx_mlp"])
def test_gradients_equal_gradients_through_the_merged_model(name):
    """d loss / d(A, B, biases) through the factored ``lora(f)`` equals the gradient through
    the plain model run on ``merge(lp)`` (W + s·A·B materialised; jax differentiates it)."""
    case = ALL[name]()
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False, bias="all")
    lp = jlora.wrap(case.params, cfg, rng=jax.random.key(0))
    forward = jlora.lora(case.apply)
    factored = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(forward(t, case.inputs)))))(lp)
    merged = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(case.apply(jlora.merge(t), case.inputs)))))(lp)
    got, want = jlora.partition(factored)[0], jlora.partition(merged)[0]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)
