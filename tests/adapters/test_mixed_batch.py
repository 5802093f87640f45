"""Mixed batches: one adapter per example (``jlora.lora(fn)(lp, x, adapter_ids=...)``).

References, never jlora against itself in the same code path:

- each adapter run on its own examples alone (a tree with that one adapter active, no
  ``adapter_ids``), and the base model on the ``"__base__"`` examples;
- Hugging Face PEFT on torch: the same three adapters created in PEFT (non-zero B),
  written by ``save_pretrained`` and read back with ``jlora.load_adapter``, and PEFT's
  own mixed-batch forward ``peft_model(ids, adapter_names=[...])``.

Models: tiny random GPT-2 (``FlaxConv1D`` kernels, fused ``c_attn``) and Llama (GQA),
each built once in torch and loaded in Flax with ``from_pretrained(from_pt=True)``, so
both frameworks hold the same base weights. The three adapters differ in rank, alpha
and targets (one of them leaves some layers without any adapter).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

# One adapter per example; "__base__" is the base model alone. Every adapter appears
# twice, in non-contiguous positions.
NAMES = ["fr", "de", "__base__", "it", "de", "fr", "it", "__base__"]
IDS = np.random.default_rng(0).integers(1, 100, (len(NAMES), 8)).astype(np.int32)

# name -> (r, alpha, targets) per model; different ranks, alphas and targets
ADAPTERS = {
    "gpt2": {
        "fr": (2, 4, ["c_attn", "c_proj"]),  # c_proj: attn.c_proj and mlp.c_proj
        "de": (4, 4, ["c_attn"]),
        "it": (3, 9, ["c_fc"]),
    },
    "llama": {
        "fr": (2, 4, ["q_proj", "v_proj"]),
        "de": (4, 4, ["q_proj", "k_proj", "o_proj"]),
        "it": (3, 9, ["gate_proj", "down_proj"]),
    },
}


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _configs(name: str):
    T = transformers
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
        return cfg, T.GPT2LMHeadModel, T.FlaxGPT2LMHeadModel
    cfg = T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32,
    )
    return cfg, T.LlamaForCausalLM, T.FlaxLlamaForCausalLM


class Case:
    """A torch model with three PEFT adapters, their directories, and the Flax side."""

    def __init__(self, name: str, root):
        cfg, tcls, fcls = _configs(name)
        torch.manual_seed(0)
        base_dir = root / f"{name}-base"
        tcls(cfg).eval().save_pretrained(base_dir, safe_serialization=True)
        fm = fcls.from_pretrained(base_dir, from_pt=True)
        self.name = name
        self.params = fm.params
        self.apply = lambda p, ids: fm(ids, params=p).logits  # noqa: E731

        torch.manual_seed(1)
        pm = None
        for adapter, (r, alpha, targets) in ADAPTERS[name].items():
            pcfg = peft.LoraConfig(
                r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                lora_dropout=0.0, fan_in_fan_out=(name == "gpt2"),
            )
            if pm is None:
                pm = peft.get_peft_model(tcls.from_pretrained(base_dir).eval(), pcfg, adapter_name=adapter)
            else:
                pm.add_adapter(adapter, pcfg)
        self.peft_model = pm.eval()
        adapters_dir = root / f"{name}-adapters"
        pm.save_pretrained(adapters_dir)  # one directory per adapter: adapters_dir/<name>/
        self.adapter_dirs = {a: adapters_dir / a for a in ADAPTERS[name]}

        lp = self.params
        for adapter, d in self.adapter_dirs.items():
            lp = jlora.load_adapter(lp, d, adapter)
        self.lp = lp

    def peft_mixed(self, ids, names) -> np.ndarray:
        with torch.no_grad():
            return self.peft_model(input_ids=torch.tensor(np.asarray(ids, np.int64)), adapter_names=list(names)).logits.numpy()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return functools.lru_cache(maxsize=None)(lambda name: Case(name, root))


def mixed_jit(apply, names):
    """The jitted mixed-batch forward as a user writes it: ids from the user's tree,
    computed outside ``jit``."""
    f = jax.jit(jlora.lora(apply, on_materialize="error"))
    return lambda lp, x: f(lp, x, adapter_ids=jlora.adapter_ids(lp, names))


def _one_by_one(case, lp, x, names) -> np.ndarray:
    """Each adapter alone on its own examples (one active adapter, no adapter_ids), the
    base model on the "__base__" examples, put back in batch order."""
    f = jax.jit(jlora.lora(case.apply, on_materialize="error"))
    out = None
    for adapter in dict.fromkeys(names):
        idx = np.array([i for i, n in enumerate(names) if n == adapter])
        if adapter == "__base__":
            y = jax.jit(case.apply)(case.params, x[idx])
        else:
            y = f(jlora.set_adapter(lp, adapter), x[idx])
        if out is None:
            out = np.zeros((len(names),) + y.shape[1:], np.float32)
        out[idx] = np.asarray(y)
    return out


# ----------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_mixed_batch_equals_each_adapter_alone(cases, name):
    case = cases(name)
    lp, x = case.lp, jnp.asarray(IDS)
    assert sorted(jlora.adapter_names(lp)) == sorted(ADAPTERS[name])
    assert jlora.explain(case.apply, lp, x, adapter_ids=jlora.adapter_ids(lp, NAMES)).materialized == []
    out = mixed_jit(case.apply, NAMES)(lp, x)
    ref = _one_by_one(case, lp, x, NAMES)
    assert rel_err(out, ref) <= 1e-5
    # and the adapters do change the output (the check is not vacuous)
    base = np.asarray(case.apply(case.params, x))
    for i, n in enumerate(NAMES):
        if n == "__base__":
            assert rel_err(out[i], base[i]) <= 1e-6
        else:
            assert rel_err(out[i], base[i]) > 1e-3, n
    # eager (no jit) gives the same
    eager = jlora.lora(case.apply)(lp, x, adapter_ids=jlora.adapter_ids(lp, NAMES))
    assert rel_err(eager, out) <= 1e-6


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_mixed_batch_equals_peft_adapter_names(cases, name):
    case = cases(name)
    x = jnp.asarray(IDS)
    out = np.asarray(mixed_jit(case.apply, NAMES)(case.lp, x))
    ref = case.peft_mixed(IDS, NAMES)
    assert np.abs(out - ref).max() <= 1e-4
    # PEFT's mixed forward is PEFT's per-adapter forward (its own sanity), and the
    # adapters differ from one another in the output
    with torch.no_grad():
        case.peft_model.set_adapter("de")
        alone = case.peft_model(input_ids=torch.tensor(IDS[[1, 4]].astype(np.int64))).logits.numpy()
        case.peft_model.set_adapter("fr")
    assert np.abs(ref[[1, 4]] - alone).max() <= 1e-5
    assert np.abs(out[1] - out[5]).max() > 1e-3 or not np.array_equal(IDS[1], IDS[5])


def test_all_examples_one_adapter_and_all_base(cases):
    case = cases("gpt2")
    x = jnp.asarray(IDS)
    for names in (["it"] * len(NAMES), ["__base__"] * len(NAMES)):
        out = np.asarray(mixed_jit(case.apply, names)(case.lp, x))
        assert np.abs(out - case.peft_mixed(IDS, names)).max() <= 1e-4


def test_load_adapter_orbax_equals_add_and_copy(cases, tmp_path):
    """An Orbax adapter (``jlora.save(path, single_tree, config=cfg)``) loaded with
    ``load_adapter`` is the same adapter as ``add_adapter`` + copying its factors."""
    case = cases("gpt2")
    cfg = jlora.LoraConfig(r=5, lora_alpha=7, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    donor = jlora.add_adapter(case.params, "es", cfg, rng=jax.random.key(7))
    single = jlora.get_adapter(donor, "es")
    jlora.save(tmp_path / "es", single, config=cfg)

    loaded = jlora.load_adapter(case.lp, tmp_path / "es", "es")
    # reference: add with another key, then copy the saved factors in
    added = jlora.add_adapter(case.lp, "es", cfg, rng=jax.random.key(99))
    factors = {p: lw for p, lw in jlora.lora_leaves(single)}

    def copy(path, x):
        if isinstance(x, jlora.MultiLoraWeight) and "es" in x.adapters:
            key = "/".join(jlora.core.paths.path_names(path))
            src = factors[key]
            adapters = dict(x.adapters)
            adapters["es"] = adapters["es"].replace(a=src.a, b=src.b)
            return x.replace(adapters=adapters)
        return x

    added = jax.tree_util.tree_map_with_path(copy, added, is_leaf=lambda x: isinstance(x, jlora.MultiLoraWeight))
    assert jlora.adapter_names(loaded) == jlora.adapter_names(added)
    assert sorted(jlora.adapter_names(loaded)) == ["de", "es", "fr", "it"]
    n_es = 0
    for (pa, la), (pb, lb) in zip(
        jax.tree_util.tree_flatten_with_path(loaded, is_leaf=lambda x: isinstance(x, jlora.MultiLoraWeight))[0],
        jax.tree_util.tree_flatten_with_path(added, is_leaf=lambda x: isinstance(x, jlora.MultiLoraWeight))[0],
    ):
        assert pa == pb
        if isinstance(la, jlora.MultiLoraWeight):
            assert list(la.adapters) == list(lb.adapters)
            for n in la.adapters:
                qa, qb = la.adapters[n], lb.adapters[n]
                assert (qa.scale, qa.layout, qa.dropout) == (qb.scale, qb.layout, qb.dropout)
                np.testing.assert_array_equal(np.asarray(qa.a), np.asarray(qb.a))
                np.testing.assert_array_equal(np.asarray(qa.b), np.asarray(qb.b))
                n_es += n == "es"
    assert n_es == 2 * 2  # c_attn and mlp.c_fc in each of the 2 layers

    names = ["es", "fr", "__base__", "es", "it", "de", "es", "fr"]
    x = jnp.asarray(IDS)
    out_loaded = mixed_jit(case.apply, names)(loaded, x)
    out_added = mixed_jit(case.apply, names)(added, x)
    np.testing.assert_array_equal(np.asarray(out_loaded), np.asarray(out_added))
    # and "es" in the mixed batch is "es" alone
    assert rel_err(out_loaded, _one_by_one(case, loaded, x, names)) <= 1e-5


# ----------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradients_flow_to_each_adapter_from_its_own_examples_only(cases, name):
    case = cases(name)
    names = ["fr", "de", "__base__", "fr", "de", "__base__"]  # no "it"
    x = jnp.asarray(IDS[: len(names)])
    f = jlora.lora(case.apply, on_materialize="error")
    ct = jax.random.normal(jax.random.key(3), (len(names), x.shape[1], 100))

    def loss(lp, x, ct, ids):
        return jnp.sum(ct * f(lp, x, adapter_ids=ids))

    g = jax.jit(jax.grad(loss))(case.lp, x, ct, jlora.adapter_ids(case.lp, names))

    def adapter_grads(tree, adapter):
        return [
            (m.adapters[adapter].a, m.adapters[adapter].b)
            for m in jax.tree_util.tree_leaves(tree, is_leaf=lambda v: isinstance(v, jlora.MultiLoraWeight))
            if isinstance(m, jlora.MultiLoraWeight) and adapter in m.adapters
        ]

    # no example uses "it": its gradients are exactly zero
    it = adapter_grads(g, "it")
    assert it and all(not np.any(np.asarray(a)) and not np.any(np.asarray(b)) for a, b in it)
    # fr / de: the gradient of the same loss restricted to their own examples, run alone
    for adapter in ("fr", "de"):
        idx = np.array([i for i, n in enumerate(names) if n == adapter])
        alone = jlora.set_adapter(case.lp, adapter)
        g_ref = jax.grad(lambda lp: jnp.sum(ct[idx] * f(lp, x[idx])))(alone)
        got, ref = adapter_grads(g, adapter), adapter_grads(g_ref, adapter)
        assert len(got) == len(ref) > 0
        for (ga, gb), (ra, rb) in zip(got, ref):
            assert np.any(np.asarray(ra)) and np.any(np.asarray(rb))
            assert rel_err(ga, ra) <= 1e-4 and rel_err(gb, rb) <= 1e-4, adapter
    # the frozen base gets no gradient
    for m in jax.tree_util.tree_leaves(g, is_leaf=lambda v: isinstance(v, jlora.MultiLoraWeight)):
        if isinstance(m, jlora.MultiLoraWeight):
            assert not np.any(np.asarray(m.w))


# ----------------------------------------------------------------------------------
# The index <-> name map under jit
# ----------------------------------------------------------------------------------


def test_adapter_ids_from_the_users_tree_under_jit(cases):
    """The index <-> name map survives flattening: a ``MultiLoraWeight`` keeps its adapters'
    insertion order (not the sorted order JAX gives dict children) through ``tree_map`` and
    ``jit``, so ids computed on the user's tree select the same adapters inside ``jit``."""
    case = cases("gpt2")
    x = jnp.asarray(IDS)
    # loaded fr, de, it: insertion order is not sorted order
    assert jlora.adapter_names(case.lp) == ["fr", "de", "it"]
    assert jlora.adapter_names(jax.tree_util.tree_map(lambda v: v, case.lp)) == ["fr", "de", "it"]
    f = jlora.lora(case.apply)
    ids = jlora.adapter_ids(case.lp, NAMES)  # what a user writes: ids from their tree, outside jit
    eager = f(case.lp, x, adapter_ids=ids)
    jitted = jax.jit(f)(case.lp, x, adapter_ids=ids)
    assert rel_err(jitted, eager) <= 1e-6


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------


def test_bad_input(cases):
    case = cases("gpt2")
    lp, x = case.lp, jnp.asarray(IDS)
    f = jlora.lora(case.apply)
    ids = jlora.adapter_ids(lp, NAMES)
    with pytest.raises(ValueError, match=r"adapter_ids has 5 entries.*leading axis of size 8"):
        f(lp, x, adapter_ids=ids[:5])
    with pytest.raises(ValueError, match=r"adapter_ids has 8 entries.*leading axis of size 4"):
        f(lp, x[:4], adapter_ids=ids)
    with pytest.raises(ValueError, match=r"1-D integer array.*float32\[8\]"):
        f(lp, x, adapter_ids=ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"1-D integer array.*int32\[2, 4\]"):
        f(lp, x, adapter_ids=ids.reshape(2, 4))
    with pytest.raises(ValueError, match=r"1-D integer array.*bool"):
        f(lp, x, adapter_ids=ids > 0)
    with pytest.raises(ValueError, match=r"unknown adapter 'es'; existing adapters: \['fr', 'de', 'it'\]"):
        jlora.adapter_ids(lp, ["fr", "es"])
    with pytest.raises(ValueError, match=r"unknown adapter 'base'.*'__base__'"):
        jlora.adapter_ids(lp, ["base"])
