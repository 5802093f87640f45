"""LoRA on stacked expert kernels: ``jax.lax.ragged_dot`` and a dense dispatch einsum.

References, never the value under test itself:
- the same function run on ``jlora.merge(lp)`` (every expert's ``W_e + s·A_e·B_e`` formed)
  for outputs and for the gradients of A and B (``support.lora_checks``);
- for mixed batches, each adapter run alone on its own examples (a tree with that one
  adapter, no ``adapter_ids``) and the base model on the ``"__base__"`` examples;
- for dropout, the mean over many keys of the dropped output, which inverted dropout
  keeps equal to the output without dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from support.lora_checks import assert_all_factored, assert_factored_equals_merged, rel_err

E, D, F, B, S, K = 4, 8, 6, 3, 5, 2


def _params(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "router": {"w": jax.random.normal(k[0], (D, E))},
        "experts": {"gate": jax.random.normal(k[1], (E, D, F)) / np.sqrt(D),
                    "down": jax.random.normal(k[2], (E, F, D)) / np.sqrt(F)},
    }


def sorted_moe(p, h):
    """Top-k routing, tokens sorted by expert, both expert kernels through ragged_dot."""
    xf = h.reshape(-1, h.shape[-1])
    weights, experts = jax.lax.top_k(jax.nn.softmax(xf @ p["router"]["w"]), K)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = xf[order // K]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    mid = jax.nn.silu(jax.lax.ragged_dot(xs, p["experts"]["gate"], sizes))
    ys = jax.lax.ragged_dot(mid, p["experts"]["down"], sizes)
    back = jnp.zeros_like(ys).at[order].set(ys).reshape(-1, K, ys.shape[-1])
    return jnp.einsum("tkd,tk->td", back, weights).reshape(h.shape)


def plain_ragged(p, x, sizes):
    return jax.lax.ragged_dot(x, p["experts"]["gate"], sizes)


def dense_moe(p, h):
    """A dense dispatch: every expert sees every token, weighted by a one-hot top-1 mask."""
    xf = h.reshape(-1, h.shape[-1])
    probs = jax.nn.softmax(xf @ p["router"]["w"])
    mask = jax.nn.one_hot(jnp.argmax(probs, -1), E) * probs
    xe = jnp.einsum("te,td->etd", mask, xf)
    mid = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, p["experts"]["gate"]))
    ye = jnp.einsum("etf,efd->etd", mid, p["experts"]["down"])
    return ye.sum(0).reshape(h.shape)


def _wrap(fn, args, config, params=None, seed=1):
    return jlora.wrap(params or _params(), config, rng=jax.random.key(seed), apply_fn=fn, example_args=args)


H = jax.random.normal(jax.random.key(7), (B, S, D))
CONFIG = jlora.LoraConfig(r=2, lora_alpha=2, target_modules=["gate", "down"], init_lora_weights=False)


@pytest.mark.parametrize("fn", [sorted_moe, dense_moe], ids=["ragged_dot", "dense_einsum"])
def test_layout_found_by_use_and_factored_equals_merged(fn):
    lp = _wrap(fn, (H,), CONFIG)
    assert lp["experts"]["gate"].layout == ("stack", "in", "out")
    assert lp["experts"]["down"].layout == ("stack", "in", "out")
    assert lp["experts"]["gate"].a.shape == (E, D, 2) and lp["experts"]["gate"].b.shape == (E, 2, F)
    report = assert_all_factored(fn, lp, H)
    prim = "ragged_dot_general" if fn is sorted_moe else "dot_general"
    assert {e.primitive for e in report.events} == {prim}
    assert_factored_equals_merged(fn, lp, H, rtol=2e-5)


@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 10, 0, 0], [2, 0, 3, 0]], ids=["empty", "one", "short"])
def test_group_sizes_with_empty_experts(sizes):
    """Empty experts, one expert taking every row, and rows past the last group (no output)."""
    x = jax.random.normal(jax.random.key(3), (10, D))
    sizes = jnp.asarray(sizes, jnp.int32)
    lp = _wrap(plain_ragged, (x, sizes), jlora.LoraConfig(r=3, lora_alpha=3, target_modules=["gate"],
                                                          init_lora_weights=False))
    assert_all_factored(plain_ragged, lp, x, sizes)
    assert_factored_equals_merged(plain_ragged, lp, x, sizes, rtol=2e-5)
    y = jlora.lora(plain_ragged, on_materialize="error")(lp, x, sizes)
    if int(sizes.sum()) < 10:
        assert float(jnp.abs(y[int(sizes.sum()):]).max()) == 0.0


def test_several_active_adapters():
    lp = _wrap(sorted_moe, (H,), CONFIG)
    other = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=["gate"], init_lora_weights=False)
    lp = jlora.add_adapter(lp, "other", other, rng=jax.random.key(5), apply_fn=sorted_moe, example_args=(H,))
    lp = jlora.set_adapter(lp, ["default", "other"])
    forward = jlora.lora(sorted_moe, on_materialize="error")
    # reference: both deltas formed and added, adapter by adapter
    p = _params()
    for name in ("default", "other"):
        single = jlora.get_adapter(lp, name)
        merged = jlora.merge(single)
        p = jax.tree.map(lambda acc, m, base: acc + (m - base), p, merged, jlora.unload(single))
    assert rel_err(forward(lp, H), sorted_moe(p, H)) <= 2e-5


def test_dropout_is_unbiased_and_keyed():
    config = jlora.LoraConfig(r=2, lora_alpha=2, target_modules=["gate"], lora_dropout=0.3, init_lora_weights=False)
    x = jax.random.normal(jax.random.key(3), (10, D))
    sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)
    lp = _wrap(plain_ragged, (x, sizes), config)
    forward = jax.jit(jlora.lora(plain_ragged, on_materialize="error"))
    clean = forward(lp, x, sizes)
    base = plain_ragged(jlora.unload(lp), x, sizes)
    one = forward(lp, x, sizes, lora_rng=jax.random.key(0))
    assert float(jnp.abs(one - clean).max()) > 1e-3  # dropout changed the branch
    np.testing.assert_array_equal(one, forward(lp, x, sizes, lora_rng=jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), 2000)
    mean = jax.lax.map(lambda k: forward(lp, x, sizes, lora_rng=k), keys).mean(0)  # (ragged_dot has no vmap rule)
    # the branch's mean over masks is the branch without dropout (inverted dropout)
    assert rel_err(mean - base, clean - base) < 0.05


def test_mixed_batch_sorted_dispatch():
    """Rows sorted by expert are traced back to their examples: each example gets its adapter."""
    lp = _wrap(sorted_moe, (H,), CONFIG)
    other = jlora.LoraConfig(r=3, lora_alpha=3, target_modules=["gate", "down"], init_lora_weights=False)
    lp = jlora.add_adapter(lp, "other", other, rng=jax.random.key(5), apply_fn=sorted_moe, example_args=(H,))
    names = ["other", "__base__", "default"]
    ids = jlora.adapter_ids(lp, names)
    forward = jlora.lora(sorted_moe, on_materialize="error")
    got = jax.jit(forward)(lp, H, adapter_ids=ids)
    for i, name in enumerate(names):
        params = _params() if name == "__base__" else jlora.merge(jlora.get_adapter(lp, name))
        want = sorted_moe(params, H[i:i + 1])
        assert rel_err(got[i:i + 1], want) <= 2e-5, name
    assert jlora.explain(sorted_moe, lp, H, adapter_ids=ids).materialized == []
    # gradients: each adapter's factors get the gradient of its own examples' loss alone
    grads = jax.jit(jax.grad(lambda lp: jnp.sin(forward(lp, H, adapter_ids=ids)).sum()))(lp)
    for i, name in enumerate(names):
        if name == "__base__":
            continue
        single = jlora.get_adapter(lp, name)
        want = jax.grad(lambda t, h=H[i:i + 1]: jnp.sin(forward(t, h)).sum())(single)
        for kernel in ("gate", "down"):
            got_pair, want_pair = grads["experts"][kernel].adapters[name], want["experts"][kernel]
            for f in ("a", "b"):
                assert float(jnp.abs(getattr(want_pair, f)).max()) > 0
                assert rel_err(getattr(got_pair, f), getattr(want_pair, f)) <= 1e-4, (name, kernel, f)


def test_mixed_batch_errors_name_the_problem():
    lp = _wrap(dense_moe, (H,), CONFIG)
    lp = jlora.add_adapter(lp, "other", CONFIG, rng=jax.random.key(5), apply_fn=dense_moe, example_args=(H,))
    ids = jlora.adapter_ids(lp, ["other", "default", "__base__"])
    with pytest.raises(ValueError, match="dense dispatch"):
        jlora.lora(dense_moe)(lp, H, adapter_ids=ids)

    def scattered(p, h):  # rows placed by a scatter: not traceable to examples
        xf = h.reshape(-1, D)
        order = jnp.argsort(xf[:, 0])
        xs = jnp.zeros_like(xf).at[order].set(xf)
        return jax.lax.ragged_dot(xs, p["experts"]["gate"], jnp.asarray([B * S, 0, 0, 0], jnp.int32))

    lp = _wrap(scattered, (H,), jlora.LoraConfig(r=2, target_modules=["gate"]))
    lp = jlora.add_adapter(lp, "other", jlora.LoraConfig(r=2, target_modules=["gate"]), rng=jax.random.key(2),
                           apply_fn=scattered, example_args=(H,))
    with pytest.raises(ValueError, match=r"experts/gate.*scatter"):
        jlora.lora(scattered)(lp, H, adapter_ids=jlora.adapter_ids(lp, ["other", "default", "__base__"]))


def test_dora_on_ragged_experts_is_refused():
    config = jlora.LoraConfig(r=2, target_modules=["gate"], use_dora=True)
    lp = _wrap(sorted_moe, (H,), config)
    with pytest.raises(ValueError, match="DoRA.*ragged_dot"):
        jlora.lora(sorted_moe)(lp, H)


def test_dora_on_dense_dispatch_equals_merged():
    """DoRA through the dense einsum (a dot_general with the expert axis batched) is factored."""
    config = jlora.LoraConfig(r=2, target_modules=["gate", "down"], use_dora=True, init_lora_weights=False)
    lp = _wrap(dense_moe, (H,), config)
    assert_all_factored(dense_moe, lp, H)
    got = jlora.lora(dense_moe, on_materialize="error")(lp, H)
    assert rel_err(got, dense_moe(jlora.merge(lp), H)) <= 2e-5


def test_on_materialize_error_where_the_kernel_is_not_an_expert_stack():
    """A ragged dot whose group axis is not the kernel's stack axis cannot stay factored."""
    x = jax.random.normal(jax.random.key(3), (10, D))
    sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)
    lp = _wrap(plain_ragged, (x, sizes), jlora.LoraConfig(r=2, target_modules=["gate"]))

    def elementwise(p, x, sizes):
        return jax.lax.ragged_dot(x, p["experts"]["gate"] * 2.0, sizes)

    with pytest.raises(jlora.MaterializationError, match="experts/gate"):
        jlora.lora(elementwise, on_materialize="error")(lp, x, sizes)
