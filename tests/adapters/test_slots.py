"""Adapter slots (jlora.adapters.slots): a pool built from named adapters computes what the
named adapters compute in a mixed batch (list and scanned layers, Gemma's stacked k/v
kernel, MoE experts through ragged_dot); loading, clearing and taking out slots; a
training step on a pool equals one on the named adapters and keeps the padding zero;
errors name what is wrong."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.models as jm

ROWS = jnp.array([0, 1, -1, 1])


def _model(family: str, **kw):
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True) \
        if family == "qwen3_moe" else {}
    if family == "gemma3":
        extra = dict(tie_embeddings=True, sliding_window=3, layer_types=("sliding_attention", "full_attention"))
    cfg = jm.DecoderConfig(family, vocab_size=48, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, initializer_range=0.3, **extra, **kw)
    return nnx.split(jm.build(cfg))


TARGETS = {"qwen3": ["q_proj", "v_proj", "down_proj"], "gemma3": ["q_einsum", "kv_einsum", "down_proj"],
           "qwen3_moe": ["q_proj", "gate_proj", "down_proj"]}


@functools.cache
def named_tree(family: str, scan: bool = False):
    """Two named adapters of different ranks and alphas ("default": r=2 on every target,
    "b": r=4 on the first two) over a small random model."""
    graphdef, state = _model(family, scan_layers=scan)
    x = jnp.asarray(np.random.RandomState(0).randint(1, 48, (4, 6)))
    kw = dict(apply_fn=lambda p, t: nnx.merge(graphdef, p)(t), example_args=(x,))
    tm = TARGETS[family]
    lp = jlora.wrap(state, jlora.LoraConfig(r=2, lora_alpha=4, target_modules=tm, init_lora_weights=False),
                    rng=jax.random.key(0), **kw)
    lp = jlora.add_adapter(lp, "b", jlora.LoraConfig(r=4, lora_alpha=3, target_modules=tm[:2],
                                                     init_lora_weights=False), rng=jax.random.key(1), **kw)
    return graphdef, state, lp, x


@pytest.mark.parametrize("family,scan", [("qwen3", False), ("qwen3", True), ("gemma3", False), ("qwen3_moe", False)],
                         ids=["qwen3-list", "qwen3-scan", "gemma3", "qwen3_moe"])
def test_slots_equal_named_adapters_in_a_mixed_batch(family, scan):
    graphdef, state, lp, x = named_tree(family, scan)
    apply = jlora.lora(lambda p, t: nnx.merge(graphdef, p)(t))
    ref = apply(lp, x, adapter_ids=ROWS)
    pool = jlora.adapter_slots(lp, num_slots=6, max_rank=8)
    np.testing.assert_allclose(np.asarray(apply(pool, x, adapter_ids=ROWS)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # empty slots are the base model; the base differs from the adapters (the test can fail)
    base = nnx.merge(graphdef, state)(x)
    np.testing.assert_allclose(np.asarray(apply(pool, x, adapter_ids=jnp.array([2, 5, -1, 3]))), np.asarray(base),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ref - base).max()) > 1e-2


def test_load_clear_get_slot():
    graphdef, state, lp, x = named_tree("qwen3")
    apply = jlora.lora(lambda p, t: nnx.merge(graphdef, p)(t))
    pool = jlora.adapter_slots(lp, num_slots=3, max_rank=4, fill=False)
    assert all(float(jnp.abs(s).max()) == 0 for s in jlora.adapters.slot_scales(pool).values())
    pool = jlora.load_slot(pool, 2, lp, name="b")
    pool = jlora.load_slot(pool, 0, jlora.get_adapter(lp, "default"))
    ids = jnp.array([2, 0, 1, 2])
    ref = apply(lp, x, adapter_ids=jnp.array([1, 0, -1, 1]))
    np.testing.assert_allclose(np.asarray(apply(pool, x, adapter_ids=ids)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # a slot taken out is the single adapter (as a LoraWeight tree, padded to the pool's rank)
    one = jlora.adapters.get_slot(pool, 2)
    np.testing.assert_allclose(np.asarray(apply(one, x)), np.asarray(apply(jlora.set_adapter(lp, "b"), x)),
                               rtol=1e-5, atol=1e-5)
    cleared = jlora.clear_slot(pool, 2)
    base = nnx.merge(graphdef, state)(x)
    np.testing.assert_allclose(np.asarray(apply(cleared, x, adapter_ids=jnp.array([2, 2, 2, 2]))), np.asarray(base),
                               rtol=1e-5, atol=1e-5)
    # structure, shapes and dtypes never change
    shapes = lambda t: (jax.tree_util.tree_structure(t), [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(t)])  # noqa: E731
    assert shapes(cleared) == shapes(pool)
    base_tree = jlora.adapters.slots_base(pool)
    assert jax.tree_util.tree_structure(base_tree) == jax.tree_util.tree_structure(state)


def test_slot_errors_name_the_problem():
    graphdef, state, lp, x = named_tree("qwen3")
    apply = jlora.lora(lambda p, t: nnx.merge(graphdef, p)(t))
    pool = jlora.adapter_slots(lp, num_slots=2, max_rank=2, fill=False)
    with pytest.raises(ValueError, match="rank 4 > the slots' max_rank 2"):
        jlora.load_slot(pool, 0, lp, name="b")
    with pytest.raises(ValueError, match="slot must be an int in 0..1"):
        jlora.load_slot(pool, 2, lp, name="default")
    with pytest.raises(ValueError, match="adapter_ids"):
        apply(pool, x)
    with pytest.raises(ValueError, match="do not fit in 1 slots"):
        jlora.adapter_slots(lp, num_slots=1)
    other = jlora.wrap(state, jlora.LoraConfig(r=2, target_modules=["k_proj"]), rng=jax.random.key(3),
                       apply_fn=lambda p, t: nnx.merge(graphdef, p)(t), example_args=(x,))
    with pytest.raises(ValueError, match="no adapter slots"):
        jlora.load_slot(pool, 0, other)
    dora = jlora.wrap(state, jlora.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), rng=jax.random.key(3),
                      apply_fn=lambda p, t: nnx.merge(graphdef, p)(t), example_args=(x,))
    with pytest.raises(ValueError, match="DoRA"):
        jlora.load_slot(pool, 0, dora)


def _lora_nodes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda t: isinstance(t, jlora.LoraWeight))[0]
    return {jax.tree_util.keystr(p): x for p, x in flat if isinstance(x, jlora.LoraWeight)}


def test_training_a_pool_equals_training_the_named_adapters():
    """One adamw step through jlora.optimizer: the pool's slots move as the named adapters
    do (their padding stays zero, the base and the scales stay frozen)."""
    graphdef, _, lp, x = named_tree("qwen3")
    apply = jlora.lora(lambda p, t: nnx.merge(graphdef, p)(t))
    y = jnp.asarray(np.random.RandomState(1).randint(0, 48, x.shape))

    def loss(p):
        logits = apply(p, x, adapter_ids=ROWS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = jlora.optimizer(optax.adamw(1e-2))
    lp_all = jlora.set_adapter(lp, ["default", "b"])  # both trained (the mixed batch uses both)
    new_lp = optax.apply_updates(lp_all, tx.update(jax.grad(loss)(lp_all), tx.init(lp_all), lp_all)[0])
    pool = jlora.adapter_slots(lp, num_slots=3, max_rank=6)
    new_pool = optax.apply_updates(pool, tx.update(jax.grad(loss)(pool), tx.init(pool), pool)[0])
    for name, slot in (("default", 0), ("b", 1)):
        want = _lora_nodes(jlora.get_adapter(new_lp, name))
        got = _lora_nodes(jlora.adapters.get_slot(new_pool, slot))
        for path, g in got.items():
            if path not in want:  # a kernel this adapter does not target: its slot stays empty
                assert float(jnp.abs(g.a).max()) == 0 and float(jnp.abs(g.b).max()) == 0, path
                continue
            w, r = want[path], want[path].rank
            np.testing.assert_allclose(np.asarray(g.a[..., :r]), np.asarray(w.a), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(g.b[:r]), np.asarray(w.b), rtol=1e-5, atol=1e-6)  # no stack axes
            assert g.scale == pytest.approx(w.scale)
    moved, before = _lora_nodes(jlora.adapters.get_slot(new_pool, 1)), _lora_nodes(jlora.adapters.get_slot(pool, 1))
    q = next(p for p in moved if "q_proj" in p)
    a_new, a_old = moved[q].a, before[q].a
    assert float(jnp.abs(a_new[..., :4] - a_old[..., :4]).max()) > 0  # trained
    assert float(jnp.abs(a_new[..., 4:]).max()) == 0  # the padding stays zero
    untouched = jlora.adapters.get_slot(new_pool, 2)  # slot 2 is used by no row: no gradient, adamw keeps it zero
    assert all(float(jnp.abs(w.a).max()) == 0 for w in jax.tree_util.tree_leaves(
        untouched, is_leaf=lambda t: isinstance(t, jlora.LoraWeight)) if isinstance(w, jlora.LoraWeight))
    for p, s in jlora.adapters.slot_scales(new_pool).items():
        np.testing.assert_array_equal(np.asarray(s), np.asarray(jlora.adapters.slot_scales(pool)[p]))


def test_merging_a_pool_is_refused_and_a_slot_merges():
    graphdef, _, lp, x = named_tree("qwen3")
    pool = jlora.adapter_slots(lp, num_slots=2)
    with pytest.raises(ValueError, match="get_slot"):
        jlora.merge(pool)
    merged = jlora.merge(jlora.adapters.get_slot(pool, 1))
    ref = jlora.lora(lambda p, t: nnx.merge(graphdef, p)(t))(jlora.set_adapter(lp, "b"), x)
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, merged)(x)), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_slots_over_a_quantized_base():
    """A pool over an NF4 base computes what the named adapters compute over it."""
    graphdef, state = _model("llama3")
    x = jnp.asarray(np.random.RandomState(0).randint(1, 48, (4, 6)))
    kw = dict(apply_fn=lambda p, t: nnx.merge(graphdef, p)(t), example_args=(x,))
    q = jlora.quantize(state, jlora.QuantConfig(quant_type="nf4", block_size=32), **kw)
    lp = jlora.wrap(q, jlora.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
                    rng=jax.random.key(0), **kw)
    lp = jlora.add_adapter(lp, "b", jlora.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"],
                                                     init_lora_weights=False), rng=jax.random.key(1), **kw)
    apply = jlora.lora(kw["apply_fn"])
    ref = apply(lp, x, adapter_ids=ROWS)
    out = apply(jlora.adapter_slots(lp, num_slots=3, max_rank=4), x, adapter_ids=ROWS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ref - apply(lp, x, adapter_ids=-jnp.ones(4, jnp.int32))).max()) > 1e-3
