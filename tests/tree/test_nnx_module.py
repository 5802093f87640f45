"""NNX first class: wrap takes an nnx.Module or nnx.State and merge/unload give back the
same kind; nnx.Optimizer with jlora.nnx_trainable holds state for the factors only and
trains as jlora.optimizer's own loop does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from support import usage_models as um
from support.lora_checks import rel_err

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = jlora.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, bias="none", init_lora_weights=False)


def call(m, ids):
    return m(ids)


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def wrapped():
    return jlora.wrap(um.tunix(), CONFIG, apply_fn=call, example_args=(um.ids(),))


def test_module_in_module_out_state_in_state_out():
    model = um.tunix()
    lm = wrapped()
    assert type(lm) is um.TunixLike and lm is not model
    merged, unloaded = jlora.merge(lm), jlora.unload(lm)
    assert type(merged) is um.TunixLike and type(unloaded) is um.TunixLike
    for m in (merged, unloaded):
        assert isinstance(m.layers[0].attn.q_proj.w, nnx.Param)
        assert isinstance(m.layers[0].attn.q_proj.w[...], jax.Array)
    # unload gives the base weights back, merge the adapted model
    for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(nnx.state(unloaded))[0],
                              jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]):
        assert np.array_equal(np.asarray(a), np.asarray(b)), p
    ids = um.ids()
    assert rel_err(jax.jit(call)(merged, ids), jax.jit(jlora.lora(call))(lm, ids)) <= 1e-5
    # an nnx.State in, nnx.State out (merge and unload too)
    graphdef, state = nnx.split(model)
    ls = jlora.wrap(state, CONFIG, apply_fn=lambda s, i: nnx.merge(graphdef, s)(i), example_args=(ids,))
    assert isinstance(ls, nnx.State)
    assert isinstance(jlora.merge(ls), nnx.State) and isinstance(jlora.unload(ls), nnx.State)
    assert {p for p, _ in jlora.lora_leaves(ls)} == {p for p, _ in jlora.lora_leaves(lm)}


def test_variable_shared_by_two_attributes_stays_shared():
    """Weight tying by reference (one nnx.Linear under two names): wrapped once, still one
    object after wrap, merge and unload; both uses factored; factored == merged."""

    class Tied(nnx.Module):
        def __init__(self):
            self.enc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.dec = self.enc

        def __call__(self, x):
            return self.dec(jnp.tanh(self.enc(x)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4), np.float32))
    lm = jlora.wrap(Tied(), jlora.LoraConfig(r=2, lora_alpha=2, target_modules=["enc"], init_lora_weights=False),
                    apply_fn=call, example_args=(x,))
    assert lm.enc is lm.dec and isinstance(lm.dec.kernel.get_value(), jlora.LoraWeight)
    assert jlora.count_parameters(lm) == (16, 36) and len(jlora.lora_leaves(lm)) == 1
    report = jlora.explain(call, lm, x)
    assert report.materialized == [] and len(report.events) == 2
    merged, unloaded = jlora.merge(lm), jlora.unload(lm)
    assert merged.enc is merged.dec and unloaded.enc is unloaded.dec
    assert rel_err(jlora.lora(call, on_materialize="error")(lm, x), merged(x)) <= 1e-5


def _nnx_optimizer_run(tx, wrt, steps: int):
    """Trains a copy of the wrapped module with nnx.Optimizer(model, tx, wrt) and nnx.jit."""
    graphdef, state = nnx.split(wrapped())
    model = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    size = _size(opt.opt_state)
    ids = um.ids()
    forward = jlora.lora(call, on_materialize="error")

    def loss(m):
        logits = forward(m, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return value

    losses = [float(step(model, opt)) for _ in range(steps)]
    return model, size, losses


def test_nnx_optimizer_with_nnx_trainable_matches_jlora_optimizer():
    """nnx.Optimizer(model, jlora.optimizer(tx), wrt=jlora.nnx_trainable): optimizer state
    of exactly jlora.optimizer's size (factors only), and after 3 steps the same factors
    as jlora.optimizer's functional loop; W bit-identical."""
    steps = 3
    model, size, losses = _nnx_optimizer_run(jlora.optimizer(optax.adam(1e-2)), jlora.nnx_trainable, steps)

    # the functional loop over the module's state
    graphdef, lp = nnx.split(wrapped())
    tx = jlora.optimizer(optax.adam(1e-2))
    state = tx.init(lp)
    ids = um.ids()
    forward = jlora.lora(lambda s, i: nnx.merge(graphdef, s)(i), on_materialize="error")

    @jax.jit
    def step(lp, state):
        value, grads = jax.value_and_grad(
            lambda s: optax.softmax_cross_entropy_with_integer_labels(forward(s, ids[:, :-1]), ids[:, 1:]).mean()
        )(lp)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, value

    ref_losses = []
    for _ in range(steps):
        lp, state, value = step(lp, state)
        ref_losses.append(float(value))

    trainable, total = jlora.count_parameters(lp)
    assert _size(state) == size  # both: Adam's count + mu and nu of the factors
    assert size == 2 * trainable + 1
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert losses[-1] < losses[0]
    got = dict(jlora.lora_leaves(model))
    base = dict(jlora.lora_leaves(wrapped()))
    for path, w in jlora.lora_leaves(lp):
        np.testing.assert_allclose(np.asarray(got[path].a), np.asarray(w.a), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got[path].b), np.asarray(w.b), rtol=1e-6, atol=1e-7)
        assert np.array_equal(np.asarray(got[path].w), np.asarray(base[path].w)), path


def test_nnx_optimizer_with_param_filter_and_plain_tx_holds_the_whole_model():
    """The trap the README documents: wrt=nnx.Param with a plain optax tx keeps moments for
    every parameter (13,474 vs 1,025 in the issue's model); jlora.optimizer does not."""
    model = wrapped()
    trainable, total = jlora.count_parameters(model)
    plain = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    assert _size(plain.opt_state) == 2 * total + 1
    ours = nnx.Optimizer(model, jlora.optimizer(optax.adam(1e-2)), wrt=nnx.Param)
    assert _size(ours.opt_state) == 2 * trainable + 1
    assert jlora.nnx_trainable((), model.layers[0].attn.q_proj.w)
    assert not jlora.nnx_trainable((), model.layers[0].input_layernorm.scale)


@pytest.mark.parametrize("bias", ["all"])
def test_nnx_trainable_selects_trainable_leaves(bias):
    """Trainable leaves (bias=, modules_to_save) are selected by the filter too, and their
    optimizer state is kept."""

    class M(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            self.norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.norm(self.proj(x))

    lm = jlora.wrap(M(), jlora.LoraConfig(r=2, target_modules=["proj"], bias=bias, modules_to_save=["norm"]))
    selected = nnx.state(lm, jlora.nnx_trainable)
    assert {"/".join(map(str, p)) for p, _ in selected.flat_state()} == {
        "proj/kernel", "proj/bias", "norm/scale", "norm/bias"
    }
    opt = nnx.Optimizer(lm, jlora.optimizer(optax.adam(1e-2)), wrt=jlora.nnx_trainable)
    trainable, _ = jlora.count_parameters(lm)
    assert _size(opt.opt_state) == 2 * trainable + 1
