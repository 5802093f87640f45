"""Several adapters over one base, checked against PEFT on PyTorch.

The reference model is a two-layer torch MLP with two PEFT adapters ("fr", "de"); the
jlora side is the same MLP as a plain JAX function over a Flax-style param dict, with
the same base weights and the same factors (A = lora_A.weightᵀ, B = lora_B.weightᵀ).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapters import named, weighted

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

MODULES = ("up", "down")


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 10)
        self.down = torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def apply(p, x):
    h = jax.nn.relu(x @ p["up"]["kernel"] + p["up"]["bias"])
    return h @ p["down"]["kernel"] + p["down"]["bias"]


def _peft_config(r, alpha):
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES), init_lora_weights=False)


@pytest.fixture(scope="module")
def setup():
    """A PEFT model with adapters fr (r=2, alpha=4), de (r=2, alpha=3), it (r=3, alpha=6), and
    the jlora tree holding the same three adapters over the same base."""
    torch.manual_seed(0)
    base = TorchMLP()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(2, 4), adapter_name="fr")
    pm.add_adapter("de", _peft_config(2, 3))
    pm.add_adapter("it", _peft_config(3, 6))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    params = {
        m: {
            "kernel": jnp.asarray(getattr(base, m).weight.detach().numpy().T),
            "bias": jnp.asarray(getattr(base, m).bias.detach().numpy()),
        }
        for m in MODULES
    }
    lp = params
    for name, (r, alpha) in {"fr": (2, 4), "de": (2, 3), "it": (3, 6)}.items():
        single = jlora.wrap(params, jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES)))
        for m in MODULES:
            layer = getattr(pm.base_model.model, m)
            a = layer.lora_A[name].weight.detach().numpy().T
            b = layer.lora_B[name].weight.detach().numpy().T
            single[m]["kernel"] = single[m]["kernel"].replace(a=jnp.asarray(a), b=jnp.asarray(b))
        lp = named._attach(lp, single, name)
    return pm, params, lp


def _peft_delta(pm, module, name):
    return getattr(pm.base_model.model, module).get_delta_weight(name).detach().numpy().T


def _jlora_delta(lp, module, name):
    p = lp[module]["kernel"].adapters[name]
    return np.asarray(p.scale * (p.a @ p.b))


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(setup, combination):
    pm, _, lp = setup
    name = f"mix_{combination}"
    pm.add_weighted_adapter(["fr", "de"], [0.7, -0.4], name, combination_type=combination)
    out = jlora.add_weighted_adapter(lp, ["fr", "de"], [0.7, -0.4], name, combination_type=combination)
    for m in MODULES:
        np.testing.assert_allclose(_jlora_delta(out, m, name), _peft_delta(pm, m, name), atol=2e-6)


def test_cat_is_exact_sum_with_different_ranks(setup):
    _, _, lp = setup
    out = jlora.add_weighted_adapter(lp, ["fr", "it"], [0.5, 2.0], "cat_ac", combination_type="cat")
    for m in MODULES:
        want = 0.5 * _jlora_delta(lp, m, "fr") + 2.0 * _jlora_delta(lp, m, "it")
        np.testing.assert_allclose(_jlora_delta(out, m, "cat_ac"), want, atol=1e-5)
        assert out[m]["kernel"].adapters["cat_ac"].rank == 5


def test_svd_truncates_to_given_rank(setup):
    _, _, lp = setup
    out = jlora.add_weighted_adapter(lp, ["fr", "it"], [1.0, 1.0], "svd1", combination_type="svd", svd_rank=1)
    for m in MODULES:
        full = _jlora_delta(lp, m, "fr") + _jlora_delta(lp, m, "it")
        u, s, vh = np.linalg.svd(full.astype(np.float64))
        best_rank1 = s[0] * np.outer(u[:, 0], vh[0])
        np.testing.assert_allclose(_jlora_delta(out, m, "svd1"), best_rank1, atol=1e-4)


def test_weight_minus_one_negates_and_opposite_copies_cancel(setup):
    _, _, lp = setup
    neg = jlora.add_weighted_adapter(lp, ["fr"], [-1.0], "neg")
    both = jlora.add_weighted_adapter(lp, ["fr", "fr"], [1.0, -1.0], "zero", combination_type="cat")
    for m in MODULES:
        np.testing.assert_allclose(_jlora_delta(neg, m, "neg"), -_jlora_delta(lp, m, "fr"), atol=1e-6)
        np.testing.assert_allclose(_jlora_delta(both, m, "zero"), 0.0, atol=1e-6)


def test_ties_and_dare_match_peft_merge_utils():
    from peft.utils import merge_utils

    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(3)]
    weights = [0.5, -1.0, 2.0]
    t_tensors = [torch.tensor(t) for t in tensors]
    t_weights = torch.tensor(weights)
    for method in ("total", "frequency"):
        want = merge_utils.ties(t_tensors, t_weights, density=0.4, majority_sign_method=method).numpy()
        got = weighted.combine_task_tensors([jnp.asarray(t) for t in tensors], weights, "ties", 0.4, method)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    want = merge_utils.magnitude_prune(t_tensors, t_weights, density=0.3).numpy()
    got = weighted.combine_task_tensors([jnp.asarray(t) for t in tensors], weights, "magnitude_prune", 0.3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)

    # DARE draws its masks at random: give torch the masks jlora draws, then compare.
    key = jax.random.key(7)
    keys = jax.random.split(key, len(tensors))
    masks = iter([np.asarray(jax.random.bernoulli(k, 0.6, t.shape), np.float32) for k, t in zip(keys, tensors)])
    real_bernoulli = torch.bernoulli
    torch.bernoulli = lambda p: torch.tensor(next(masks))
    try:
        want_lin = merge_utils.dare_linear(t_tensors, t_weights, density=0.6).numpy()
    finally:
        torch.bernoulli = real_bernoulli
    got_lin = weighted.combine_task_tensors([jnp.asarray(t) for t in tensors], weights, "dare_linear", 0.6, key=key)
    np.testing.assert_allclose(np.asarray(got_lin), want_lin, atol=1e-5)

    masks = iter([np.asarray(jax.random.bernoulli(k, 0.6, t.shape), np.float32) for k, t in zip(keys, tensors)])
    torch.bernoulli = lambda p: torch.tensor(next(masks))
    try:
        want_ties = merge_utils.dare_ties(t_tensors, t_weights, density=0.6).numpy()
    finally:
        torch.bernoulli = real_bernoulli
    got_ties = weighted.combine_task_tensors([jnp.asarray(t) for t in tensors], weights, "dare_ties", 0.6, key=key)
    np.testing.assert_allclose(np.asarray(got_ties), want_ties, atol=1e-5)


def test_ties_adapter_uses_peft_weighting(setup):
    """ties on adapters combines A's and B's separately with PEFT's √|w·s| weights."""
    pm, _, lp = setup
    pm.add_weighted_adapter(["fr", "de"], [0.6, 0.9], "ties_ab", combination_type="ties", density=0.5)
    out = jlora.add_weighted_adapter(lp, ["fr", "de"], [0.6, 0.9], "ties_ab", combination_type="ties", density=0.5)
    for m in MODULES:
        np.testing.assert_allclose(_jlora_delta(out, m, "ties_ab"), _peft_delta(pm, m, "ties_ab"), atol=2e-6)


def test_active_adapters_add_up_like_peft(setup):
    pm, _, lp = setup
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    for names in (["fr"], ["de"], ["fr", "de"], ["fr", "de", "it"]):
        pm.base_model.set_adapter(names)
        with torch.no_grad():
            want = pm(torch.tensor(x)).numpy()
        active = jlora.set_adapter(lp, names)
        got = jlora.lora(apply, on_materialize="error")(active, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(apply(jlora.merge(active), jnp.asarray(x))), want, atol=1e-5)
    with pm.disable_adapter():
        with torch.no_grad():
            base_out = pm(torch.tensor(x)).numpy()
    off = jlora.disable_adapter(lp)
    np.testing.assert_allclose(np.asarray(jlora.lora(apply)(off, jnp.asarray(x))), base_out, atol=1e-5)
    back = jlora.enable_adapter(off)
    assert jlora.active_adapters(back) == jlora.active_adapters(lp)


def test_only_active_adapters_train(setup):
    _, _, lp = setup
    active = jlora.set_adapter(lp, "de")
    trainable, total = jlora.count_parameters(active)
    b = active["up"]["kernel"].adapters["de"]
    d = active["down"]["kernel"].adapters["de"]
    assert trainable == b.a.size + b.b.size + d.a.size + d.b.size
    labels = jlora.trainable_labels(active)
    assert labels["up"]["kernel"].adapters["de"].a == "trainable"
    assert labels["up"]["kernel"].adapters["fr"].a == "frozen"
    x = jnp.ones((3, 6))
    trainable_part, frozen_part = jlora.partition(active)
    loss = lambda t: jnp.sum(jlora.lora(apply)(jlora.combine(t, frozen_part), x) ** 2)  # noqa: E731
    grads = jax.grad(loss)(trainable_part)
    assert grads["up"]["kernel"].adapters["fr"].a is None
    assert grads["up"]["kernel"].adapters["de"].a.shape == b.a.shape
    assert float(jnp.abs(grads["up"]["kernel"].adapters["de"].b).sum()) > 0


def test_delete_adapter_and_get_adapter(setup):
    _, params, lp = setup
    fewer = jlora.delete_adapter(jlora.set_adapter(lp, "fr"), "de")
    assert jlora.adapter_names(fewer) == ["fr", "it"]
    single = jlora.get_adapter(lp, "it")
    assert isinstance(single["up"]["kernel"], jlora.LoraWeight)
    x = jnp.ones((2, 6))
    want = jlora.lora(apply)(jlora.set_adapter(lp, "it"), x)
    np.testing.assert_allclose(np.asarray(jlora.lora(apply)(single, x)), np.asarray(want), atol=1e-6)
    base = jlora.unload(lp)
    assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(params)


def test_add_adapter_adds_only_factor_bytes():
    """Live device buffers grow by exactly the new factors' bytes; the base is shared."""
    import gc

    params = {f"l{i}": {"kernel": jnp.ones((256, 256)) * i} for i in range(4)}
    lp = jlora.wrap(params, jlora.LoraConfig(r=4, target_modules=["l0", "l1", "l2", "l3"]))
    gc.collect()
    before = sum(b.nbytes for b in jax.live_arrays())
    lp2 = jlora.add_adapter(lp, "second", jlora.LoraConfig(r=8, target_modules=["l0", "l1", "l2", "l3"]),
                            rng=jax.random.key(1))
    gc.collect()
    after = sum(b.nbytes for b in jax.live_arrays())
    factor_bytes = sum(
        p.a.nbytes + p.b.nbytes for x in jax.tree_util.tree_leaves(lp2, is_leaf=lambda n: isinstance(n, jlora.MultiLoraWeight))
        if isinstance(x, jlora.MultiLoraWeight) for n, p in x.adapters.items() if n == "second"
    )
    assert factor_bytes == 4 * (256 * 8 + 8 * 256) * 4
    assert after - before == factor_bytes
    for m in params:
        assert lp2[m]["kernel"].w is params[m]["kernel"]


def test_bad_input(setup):
    _, _, lp = setup
    with pytest.raises(ValueError, match=r"unknown adapter 'zz'.*\['fr', 'de', 'it'\]"):
        jlora.set_adapter(lp, "zz")
    with pytest.raises(ValueError, match="2 adapters.*1 weights"):
        jlora.add_weighted_adapter(lp, ["fr", "de"], [1.0], "w")
    with pytest.raises(ValueError, match="equal ranks"):
        jlora.add_weighted_adapter(lp, ["fr", "it"], [1.0, 1.0], "w", combination_type="linear")
    with pytest.raises(ValueError, match="last active adapter"):
        jlora.delete_adapter(jlora.set_adapter(lp, "fr"), "fr")
    with pytest.raises(ValueError, match="already exists"):
        jlora.add_adapter(lp, "fr", jlora.LoraConfig(r=2, target_modules=["up"]))
    # different targets: linear family cannot combine A's and B's across them
    only_up = jlora.add_adapter(lp, "u", jlora.LoraConfig(r=2, target_modules=["up"]), rng=jax.random.key(3))
    with pytest.raises(ValueError, match="different kernels"):
        jlora.add_weighted_adapter(only_up, ["fr", "u"], [1.0, 1.0], "w", combination_type="linear")
    mixed = jlora.add_weighted_adapter(only_up, ["fr", "u"], [1.0, 1.0], "w", combination_type="cat")
    np.testing.assert_allclose(_jlora_delta(mixed, "down", "w"), _jlora_delta(lp, "down", "fr"), atol=1e-6)
    with pytest.raises(ValueError, match="unknown adapter"):
        jlora.adapter_ids(lp, ["fr", "nope"])
