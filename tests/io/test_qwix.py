"""qwix (tunix, MaxText) LoRA state both ways: ``jlora.from_qwix`` / ``jlora.to_qwix``.

The reference is qwix itself: qwix 0.1.8's LoRA on jlora.models' Qwen3 / Llama 3 / Gemma 3
(float32, random non-zero factors) computes logits; the converted jlora adapter must compute
the same through ``jlora.lora`` (≤ 1e-5), and PEFT on the transformers torch model of the
same weights the same again (qwix → jlora → PEFT files, and PEFT files → jlora → qwix).
tunix's own Qwen3 model code too, where google-tunix is installed (its module is loaded
without tunix's package ``__init__``, which imports tunix's whole training stack).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models as jm
from jlora.io import qwix_state

qwix = pytest.importorskip("qwix")
from flax import nnx  # noqa: E402

FAMILIES = ("qwen3", "llama3", "gemma3")
# The seven projections, by the NNX module names (qwix matches module paths with re.fullmatch).
REGEX = {
    "qwen3": r".*/(q|k|v|o|gate|up|down)_proj",
    "llama3": r".*/(q|k|v|o|gate|up|down)_proj",
    "gemma3": r".*/(q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)",
}
N_MODULES = {"qwen3": 7, "llama3": 7, "gemma3": 6}
TOL_QWIX = 1e-5   # the qwix model against jlora on the converted tree (issue 24)
TOL_PEFT = 1e-4   # PEFT on torch against either (as tests/test_nnx_family_lora.py)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _config(family: str) -> jm.DecoderConfig:
    kw = dict(vocab_size=64, embed_dim=32, hidden_dim=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    if family == "gemma3":
        kw.update(tie_embeddings=True, layer_types=("sliding_attention", "full_attention"), sliding_window=4,
                  query_pre_attn_scalar=12, final_logit_softcapping=5.0)
    if family == "llama3":
        kw.update(tie_embeddings=True)
    return jm.DecoderConfig(family, **kw)


def _randomize_factors(qmodel, seed: int, scale: float = 0.2) -> None:
    """qwix initialises B = 0; give every factor random values (as training would)."""
    lora = nnx.state(qmodel, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(qmodel, jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def _qwix_model(model, provider, ids, seed: int = 0, randomize: bool = True):
    qmodel = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(seed))
    if randomize:
        _randomize_factors(qmodel, seed + 100)
    return qmodel


def _lora_values(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@functools.lru_cache(maxsize=None)
def built(family: str):
    """A jlora.models model with random weights, its qwix-LoRA twin (random factors on the
    seven projections, rank 4, alpha 8), qwix's logits, and jlora's adapter of it."""
    model = jm.build(_config(family), rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    provider = qwix.LoraProvider(module_path=REGEX[family], rank=4, alpha=8.0)
    qmodel = _qwix_model(model, provider, ids)
    ref = np.asarray(qmodel(ids))
    lp = jlora.from_qwix(nnx.state(qmodel), provider)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    return types.SimpleNamespace(model=model, graphdef=graphdef, state=state, ids=ids, provider=provider,
                                 qmodel=qmodel, ref=ref, lp=lp, apply=apply)


@functools.lru_cache(maxsize=None)
def forward(family: str):
    """The factored forward, jitted; any materialised target is an error."""
    return jax.jit(jlora.lora(built(family).apply, on_materialize="error"))


# --------------------------------------------------------------------------------------
# qwix -> jlora on the three families


@pytest.mark.parametrize("family", FAMILIES)
def test_from_qwix_equals_qwix(family):
    b = built(family)
    leaves = dict(jlora.lora_leaves(b.lp))
    assert len(leaves) == N_MODULES[family] * 2
    for w in leaves.values():
        assert w.scale == 2.0 and w.rank == 4 and w.dropout == 0.0
    if family == "gemma3":
        kv = leaves["layers/0/attn/kv_einsum/w"]          # BSD,CKDH->CBSKH: A_q (D, r), B_q (r, 2, K, H)
        assert kv.layout == ("out", "out", "in", "out") and kv.a.shape == (32, 4) and kv.b.shape == (4, 2, 2, 8)
        assert leaves["layers/0/attn/q_einsum/w"].layout == ("out", "in", "out")
        assert leaves["layers/0/attn/attn_vec_einsum/w"].layout == ("in", "in", "out")
    else:
        assert leaves["layers/0/attn/q_proj/w"].layout == ("in", "out", "out")
        assert leaves["layers/0/attn/o_proj/w"].layout == ("in", "in", "out")
    assert leaves["layers/1/mlp/down_proj/kernel"].layout == ("in", "out")
    # the tree is the base model's state, kernels and all other leaves unchanged
    assert jax.tree.structure(jlora.unload(b.lp)) == jax.tree.structure(b.state)
    for x, y in zip(jax.tree.leaves(jlora.unload(b.lp)), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    base = np.asarray(b.model(b.ids))
    assert _max_err(b.ref, base) > 0.05  # the adapter changes the logits
    got = forward(family)(b.lp, b.ids)
    assert _max_err(got, b.ref) <= TOL_QWIX
    # the merged kernels compute it too
    assert _max_err(jax.jit(b.apply)(jlora.merge(b.lp), b.ids), b.ref) <= TOL_QWIX


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_from_qwix_on_the_module(family):
    """A qwix module in, a module of the original class out (qwix's interception, factor
    Variables and attributes gone), with qwix's outputs."""
    b = built(family)
    lmodel = jlora.from_qwix(b.qmodel, b.provider)
    assert type(lmodel) is type(b.model)
    assert not hasattr(lmodel.layers[0].attn, "qwix_path")
    assert jax.tree.structure(nnx.state(lmodel)) == jax.tree.structure(b.lp)
    got = jlora.lora(lambda m, x: m(x))(lmodel, b.ids)
    assert _max_err(got, b.ref) <= TOL_QWIX
    # the qwix model itself is untouched
    assert _max_err(b.qmodel(b.ids), b.ref) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_to_qwix_round_trip(family):
    """to_qwix(from_qwix(s)) gives back qwix's factors exactly; nnx.update puts them into a
    fresh qwix model (other random factors), which then computes the same logits."""
    b = built(family)
    want = _lora_values(nnx.state(b.qmodel, nnx.LoRAParam))
    back = jlora.to_qwix(b.lp, b.qmodel, provider=b.provider)
    assert isinstance(back, nnx.State)
    got = _lora_values(back)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # without the qwix model too (no stack axes here: the einsum / nnx.Linear forms)
    for k, v in _lora_values(jlora.to_qwix(b.lp)).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    fresh = _qwix_model(b.model, b.provider, b.ids, seed=5)
    assert _max_err(fresh(b.ids), b.ref) > 0.05
    nnx.update(fresh, back)
    assert _max_err(fresh(b.ids), b.ref) <= TOL_QWIX
    rules = qwix_state.qwix_rules(b.lp, b.qmodel)
    assert len(rules) == 1 and rules[0]["rank"] == 4 and rules[0]["alpha"] == 8.0
    provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])
    again = _qwix_model(b.model, provider, b.ids, seed=6, randomize=False)
    assert set(_lora_values(nnx.state(again, nnx.LoRAParam))) == set(want)  # the rules adapt exactly these


def test_rank_and_alpha_patterns_become_several_rules():
    """A jlora adapter with per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern,
    rsLoRA) is one qwix provider of several rules: qwix_rules gives them, a qwix model built
    with them takes to_qwix's state and computes jlora's logits; a one-rule provider is
    refused, naming the rule each kernel needs."""
    b = built("qwen3")
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                              rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False)
    lp = jlora.wrap(b.state, config, rng=jax.random.key(4), apply_fn=b.apply, example_args=(b.ids,))
    rules = qwix_state.qwix_rules(lp)
    assert sorted((r["rank"], r["alpha"]) for r in rules) == [(2, 8.0), (4, 3.0), (4, 8.0)]
    provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])
    qmodel = _qwix_model(b.model, provider, b.ids, randomize=False)
    with pytest.raises(ValueError, match=r"layers/0/attn/o_proj/w: the rule for 'layers/0/attn/o_proj' has rank 4, "
                                         r"alpha 8 \(scale 2\); this adapter needs rank 4, alpha 3 \(scale 0.75\)"):
        jlora.to_qwix(lp, qmodel, provider=qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0))
    nnx.update(qmodel, jlora.to_qwix(lp, qmodel, provider=provider))
    want = jax.jit(jlora.lora(b.apply))(lp, b.ids)
    assert _max_err(want, b.model(b.ids)) > 0.01
    assert _max_err(qmodel(b.ids), want) <= TOL_QWIX
    back = jlora.from_qwix(qmodel, provider)
    assert sorted({(w.rank, w.scale) for _, w in jlora.lora_leaves(back)}) == [(2, 4.0), (4, 0.75), (4, 2.0)]


def test_abstract_state_converts_without_allocating():
    b = built("qwen3")
    abstract = jax.eval_shape(lambda: nnx.state(b.qmodel))
    lp = jlora.from_qwix(abstract, b.provider)
    w = dict(jlora.lora_leaves(lp))["layers/0/attn/o_proj/w"]
    assert isinstance(w.a, jax.ShapeDtypeStruct) and w.a.shape == (4, 8, 4) and w.b.shape == (4, 32)
    back = jlora.to_qwix(lp, abstract)
    shapes = {"/".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(back)}
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in nnx.to_flat_state(back))
    assert shapes == {k: v.shape for k, v in _lora_values(nnx.state(b.qmodel, nnx.LoRAParam)).items()}


# --------------------------------------------------------------------------------------
# PEFT on torch


@functools.lru_cache(maxsize=None)
def torch_built(family: str):
    """qwix on the NNX model of tests/support/family_models.py's torch model (same weights)."""
    from support.family_models import case

    c = case(family)
    ids = jnp.asarray(c.ids)
    provider = qwix.LoraProvider(module_path=REGEX[family], rank=4, alpha=8.0)
    qmodel = _qwix_model(c.model, provider, ids, seed=11, randomize=False)
    _randomize_factors(qmodel, 12, scale=0.1)
    return c, provider, qmodel, np.asarray(qmodel(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_qwix_adapter_as_peft_files_on_torch(family, tmp_path):
    """qwix → jlora → PEFT files → PeftModel on the torch model of the same weights."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from support.family_models import torch_logits

    c, provider, qmodel, ref = torch_built(family)
    lp = jlora.from_qwix(nnx.state(qmodel), provider)
    got = jax.jit(jlora.lora(c.apply))(lp, jnp.asarray(c.ids))
    assert _max_err(got, ref) <= TOL_QWIX
    jlora.save_peft(tmp_path, lp)
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    theirs = torch_logits(pm, c.ids)
    assert _max_err(theirs, torch_logits(c.torch_model, c.ids)) > 0.05
    assert _max_err(theirs, got) <= TOL_PEFT
    assert _max_err(theirs, ref) <= TOL_PEFT


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_files_into_qwix(family):
    """PEFT files (written by PEFT on torch) → jlora.load_peft → to_qwix → a qwix model
    built with qwix_rules' provider computes PEFT's logits. Gemma's kv_einsum holds PEFT's
    k_proj and v_proj adapters (each its own A): qwix shares one A over it, so it takes
    them at rank 2r, side by side, and a provider of rank r for it is refused."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from support.family_models import case, peft_adapter

    c = case(family)
    ids = jnp.asarray(c.ids)
    d, ref = peft_adapter(family)
    lp = jlora.load_peft(d, c.state)
    plain = qwix.LoraProvider(module_path=REGEX[family], rank=4, alpha=8.0)
    probe = _qwix_model(c.model, plain, ids, randomize=False)
    if family == "gemma3":
        with pytest.raises(ValueError, match=r"kv_einsum.*rank 8 = 2 × 4.*alpha 16"):
            jlora.to_qwix(lp, probe, provider=plain)
    rules = qwix_state.qwix_rules(lp, probe)
    want = {(4, 8.0)} | ({(8, 16.0)} if family == "gemma3" else set())
    assert {(r["rank"], r["alpha"]) for r in rules} == want
    provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])
    qmodel = _qwix_model(c.model, provider, ids, seed=3)
    nnx.update(qmodel, jlora.to_qwix(lp, qmodel, provider=provider))
    out = qmodel(ids)
    assert _max_err(out, ref) <= TOL_PEFT
    assert _max_err(out, jax.jit(jlora.lora(c.apply))(lp, ids)) <= TOL_QWIX
    # and back: qwix → jlora gives PEFT's logits again (Gemma: kv_einsum at rank 8)
    lp2 = jlora.from_qwix(qmodel, provider)
    assert _max_err(jlora.lora(lambda m, x: m(x))(lp2, ids), ref) <= TOL_PEFT


# --------------------------------------------------------------------------------------
# tunix's own Qwen3


def _tunix_qwen3_module():
    """tunix.models.qwen3.model, imported without running tunix/__init__.py (which imports
    the trainers, grain, metrax, ...): a bare package module stands in for it."""
    spec = importlib.util.find_spec("tunix")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("google-tunix is not installed")
    pytest.importorskip("jaxtyping")
    if "tunix" not in sys.modules:
        package = types.ModuleType("tunix")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = package
    return importlib.import_module("tunix.models.qwen3.model")


def test_tunix_qwen3(tmp_path):
    """tunix's Qwen3 (its own model code) with qwix LoRA: jlora's adapter of it computes
    qwix's logits, PEFT on torch's Qwen3 of the same weights too, and to_qwix gives qwix's
    factors back. tunix 0.1.7's Qwen3 applies RoPE with theta 1e6 whatever its config says,
    so the torch twin uses 1e6."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    tq = _tunix_qwen3_module()
    from support.family_models import hf_config, randomize, torch_class, torch_logits

    tmodel = randomize(torch_class("qwen3")(hf_config("qwen3", rope_theta=1_000_000.0)), "qwen3", seed=5)
    hc = tmodel.config
    cfg = tq.ModelConfig(num_layers=hc.num_hidden_layers, vocab_size=hc.vocab_size, embed_dim=hc.hidden_size,
                         hidden_dim=hc.intermediate_size, num_heads=hc.num_attention_heads, head_dim=hc.head_dim,
                         num_kv_heads=hc.num_key_value_heads, rope_theta=1_000_000, norm_eps=hc.rms_norm_eps,
                         use_tied_embedding=False)
    model = tq.Qwen3(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(jm.from_torch(tmodel)))  # tunix's tree is jlora.models' tree
    ids = jnp.asarray(np.random.RandomState(1).randint(0, hc.vocab_size, (2, 10)))
    B, T = ids.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    assert _max_err(model(ids, pos, None, mask)[0], torch_logits(tmodel, ids)) <= TOL_PEFT

    provider = qwix.LoraProvider(module_path=REGEX["qwen3"], rank=4, alpha=8.0)
    qmodel = qwix.apply_lora_to_model(model, provider, ids, pos, None, mask, rngs=nnx.Rngs(0))
    _randomize_factors(qmodel, 21, scale=0.1)
    ref = qmodel(ids, pos, None, mask)[0]
    graphdef = nnx.graphdef(model)
    lp = jlora.from_qwix(nnx.state(qmodel), provider)
    assert len(jlora.lora_leaves(lp)) == 7 * hc.num_hidden_layers
    got = jax.jit(jlora.lora(lambda s, x: nnx.merge(graphdef, s)(x, pos, None, mask)[0]))(lp, ids)
    assert _max_err(got, ref) <= TOL_QWIX

    jlora.save_peft(tmp_path, lp)  # the qwen3 name map recognises tunix's paths
    pm = peft.PeftModel.from_pretrained(tmodel, str(tmp_path))
    assert _max_err(torch_logits(pm, ids), got) <= TOL_PEFT

    want = _lora_values(nnx.state(qmodel, nnx.LoRAParam))
    got_back = _lora_values(jlora.to_qwix(lp, qmodel, provider=provider))
    assert set(got_back) == set(want)
    for k in want:
        np.testing.assert_array_equal(got_back[k], want[k], err_msg=k)


# --------------------------------------------------------------------------------------
# other kernels: nnx.LinearGeneral (dot_general, flattened factors), an einsum batch axis,
# nnx.Conv, a Linen model


class _Mixed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.gen = nnx.LinearGeneral((4, 6), (3, 5), axis=(-2, -1), rngs=rngs)   # kernel (4, 6, 3, 5)
        self.moe = nnx.Einsum("BTED,EDF->BTEF", (3, 15, 7), rngs=rngs)           # E: a batch axis
        self.conv = nnx.Conv(7, 9, kernel_size=(3,), rngs=rngs)
        self.sq = nnx.Linear(9, 9, rngs=rngs)

    def __call__(self, x):
        h = self.gen(x)
        h = h.reshape(h.shape[:2] + (15,))
        h = self.moe(jnp.broadcast_to(h[:, :, None, :], h.shape[:2] + (3, 15))).sum(2)
        return self.sq(self.conv(h))


def test_linear_general_einsum_batch_conv():
    model = _Mixed(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 6))
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=3.0)
    qmodel = _qwix_model(model, provider, x)
    ref = qmodel(x)
    shapes = {k: v.shape for k, v in _lora_values(nnx.state(qmodel, nnx.LoRAParam)).items()}
    assert shapes["gen/kernel_lora_a"] == (24, 2) and shapes["gen/kernel_lora_b"] == (2, 15)  # flattened
    assert shapes["moe/kernel_lora_b"] == (2, 7)                                             # no E in B
    call = lambda m, x: m(x)  # noqa: E731
    for kw, moe_layout in ((dict(), ("in", "in", "out")),
                           (dict(apply_fn=call, example_args=(x,)), ("stack", "in", "out"))):
        lmodel = jlora.from_qwix(qmodel, provider, **kw)
        leaves = dict(jlora.lora_leaves(lmodel))
        assert leaves["gen/kernel"].layout == ("in", "in", "out", "out") and leaves["gen/kernel"].a.shape == (4, 6, 2)
        assert leaves["moe/kernel"].layout == moe_layout
        assert leaves["conv/kernel"].layout == ("in", "in", "out")
        with pytest.warns(jlora.MaterializationWarning) if moe_layout[0] == "in" else _nothing():
            got = jlora.lora(call)(lmodel, x)
        assert _max_err(got, ref) <= TOL_QWIX * float(np.abs(np.asarray(ref)).max())
        back = _lora_values(jlora.to_qwix(lmodel, qmodel, provider=provider))
        for k, v in _lora_values(nnx.state(qmodel, nnx.LoRAParam)).items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_linen_params():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(12, name="up")(x)
            h = nn.DenseGeneral((2, 6), name="heads")(h)           # kernel (12, 2, 6): B_q (r, 12)
            return nn.DenseGeneral(7, axis=(-2, -1), name="out")(h)  # kernel (2, 6, 7): A_q (12, r)

    net, x = Net(), jax.random.normal(jax.random.key(1), (2, 3, 8))
    qnet = qwix.apply_lora_to_model(net, qwix.LoraProvider(module_path=".*", rank=2, alpha=4.0))
    params = jax.jit(qnet.init)(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.3 * jax.random.normal(jax.random.key(len(str(p))), v.shape) if "lora" in str(p) else v, params)
    ref = qnet.apply({"params": params}, x)
    lp = jlora.from_qwix(params, alpha=4.0)
    assert isinstance(lp, dict) and set(lp["heads"]) == {"kernel", "bias"}
    assert lp["heads"]["kernel"].layout == ("in", "out", "out") and lp["out"]["kernel"].layout == ("in", "in", "out")
    got = jlora.lora(net.apply)({"params": lp}, x)
    assert _max_err(got, ref) <= TOL_QWIX * float(np.abs(np.asarray(ref)).max())
    assert _max_err(net.apply({"params": jlora.unload(lp)}, x), ref) > 0.05
    back = jlora.to_qwix(lp, params)
    for m in ("up", "heads", "out"):
        for n in ("kernel_lora_a", "kernel_lora_b"):
            np.testing.assert_array_equal(np.asarray(back[m][n]), np.asarray(params[m][n]))


@pytest.mark.parametrize("case", ["kv_einsum", "einsum_batch"])
def test_stack_axis_that_qwix_shares(case):
    """A jlora "stack" axis along which qwix keeps one factor: Gemma's kv_einsum with k and
    v as two adapters (qwix: one A_q (D, r), B_q (r, 2, K, H)), and an einsum batch axis
    (qwix: A_q (E, D, r), one B_q (r, F)). Equal slices go in at rank r; different ones at
    rank n·r, side by side; ΔW against the einsum qwix computes it with."""
    from jlora.io.qwix_forms import QwixForm, canonical_to_qwix, qwix_to_canonical, required_rank
    from jlora.nodes.factors import delta

    k1, k2 = jax.random.split(jax.random.key(0))
    if case == "kv_einsum":
        shape, layout = (2, 3, 8, 4), ("stack", "out", "in", "out")
        form = QwixForm((), ((2,),), ((0,), (1,), (3,)))
        a, b = jax.random.normal(k1, (2, 8, 2)), jax.random.normal(k2, (2, 2, 3, 4))
        qwix_delta = lambda aq, bq: jnp.einsum("dr,rckh->ckdh", aq, bq)  # noqa: E731
        share = lambda: (jnp.broadcast_to(a[:1], a.shape), b)  # noqa: E731
    else:
        shape, layout = (3, 8, 5), ("stack", "in", "out")
        form = QwixForm((), ((0,), (1,)), ((2,),))
        a, b = jax.random.normal(k1, (3, 8, 2)), jax.random.normal(k2, (3, 2, 5))
        qwix_delta = lambda aq, bq: jnp.einsum("edr,rf->edf", aq, bq)  # noqa: E731
        share = lambda: (a, jnp.broadcast_to(b[:1], b.shape))  # noqa: E731
    n = 2 if case == "kv_einsum" else 3
    lw = jlora.LoraWeight(jnp.zeros(shape), a, b, scale=1.0, layout=layout)
    assert required_rank(lw, form) == 2 * n
    with pytest.raises(ValueError, match=rf"rank {2 * n} = {n} × 2"):
        canonical_to_qwix(lw, form, 2, "k")
    aq, bq = canonical_to_qwix(lw, form, 2 * n, "k")
    np.testing.assert_allclose(qwix_delta(aq, bq), delta(a, b, layout), rtol=1e-6, atol=1e-6)
    # back to jlora (broadcast along the shared axis): the same ΔW, at rank n·r
    a2, b2 = qwix_to_canonical(aq, bq, shape, form, layout)
    np.testing.assert_allclose(delta(a2, b2, layout), delta(a, b, layout), rtol=1e-6, atol=1e-6)
    # equal slices: rank r, exactly the slice
    sa, sb = share()
    lw = lw.replace(a=sa, b=sb)
    assert required_rank(lw, form) == 2
    aq, bq = canonical_to_qwix(lw, form, 2, "k")
    np.testing.assert_allclose(qwix_delta(aq, bq), delta(sa, sb, layout), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# what cannot be mapped: clear errors


class _SquareW(nnx.Module):
    """A square einsum kernel ``w`` contracted on its second axis (``x · wᵀ``)."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), (8, 8)))

    def __call__(self, x):
        return jnp.einsum("btd,ed->bte", x, self.w[...])


class _Holder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = _SquareW(rngs)

    def __call__(self, x):
        return self.proj(x)


def test_square_einsum_kernel_needs_its_use():
    model = _Holder(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    qmodel = _qwix_model(model, provider, x)
    ref = qmodel(x)
    with pytest.raises(ValueError, match=r"proj/w \(shape \(8, 8\).*several kernel layouts.*apply_fn="):
        jlora.from_qwix(qmodel, provider)
    call = lambda m, x: m(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"layouts= gives \('in', 'out'\) and apply_fn's use \('out', 'in'\)"):
        jlora.from_qwix(qmodel, provider, layouts={"proj": ("in", "out")}, apply_fn=call, example_args=(x,))
    lmodel = jlora.from_qwix(qmodel, provider, apply_fn=call, example_args=(x,))
    assert dict(jlora.lora_leaves(lmodel))["proj/w"].layout == ("out", "in")
    assert _max_err(jlora.lora(call)(lmodel, x), ref) <= TOL_QWIX
    lmodel = jlora.from_qwix(qmodel, provider, layouts={"proj": ("out", "in")})
    assert _max_err(jlora.lora(call)(lmodel, x), ref) <= TOL_QWIX


def test_tied_embedding_is_refused():
    """Llama (tied): a rule matching every module also adapts the embedder's output einsum;
    qwix leaves its row lookup alone, jlora would not: refused, with or without the use."""
    b = built("llama3")
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    qmodel = _qwix_model(b.model, provider, b.ids)
    assert "embedder/input_embedding_lora_a" in _lora_values(nnx.state(qmodel, nnx.LoRAParam))
    with pytest.raises(ValueError, match=r"embedder/input_embedding .*embedding table.*row lookup"):
        jlora.from_qwix(qmodel, provider)
    with pytest.raises(ValueError, match=r"embedder/input_embedding .*by \['gather'\].*row lookup"):
        jlora.from_qwix(qmodel, provider, apply_fn=lambda m, x: m(x), example_args=(b.ids,))


def test_bad_inputs_name_what_is_wrong():
    b = built("qwen3")
    state = nnx.state(b.qmodel)
    with pytest.raises(ValueError, match="needs the qwix.LoraProvider"):
        jlora.from_qwix(state)
    with pytest.raises(ValueError, match=r"layers/0/attn/k_proj/w .*rule .*rank 8, the factors rank 4"):
        jlora.from_qwix(state, qwix.LoraProvider(module_path=".*", rank=8, alpha=16.0))
    with pytest.raises(ValueError, match=r"no rule of the provider matches its module path 'layers/0/attn/k_proj'"):
        jlora.from_qwix(state, qwix.LoraProvider(module_path=".*q_proj", rank=4, alpha=8.0))
    with pytest.raises(ValueError, match="no qwix LoRA factors"):
        jlora.from_qwix(b.state, alpha=8.0)
    with pytest.raises(TypeError, match="qwix_model must be"):
        jlora.from_qwix(3, alpha=8.0)
    flat = [(k, v) for k, v in nnx.to_flat_state(state) if "/".join(map(str, k)) != "layers/1/mlp/up_proj/kernel_lora_b"]
    with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel_lora_a: .*kernel_lora_b is missing"):
        jlora.from_qwix(nnx.from_flat_state(flat), b.provider)
    # a quantized qwix base (QLoRA): the kernel is a subtree of qvalue and scale
    qlora = qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0, weight_qtype="int8")
    qq = qwix.apply_lora_to_model(nnx.Linear(16, 16, rngs=nnx.Rngs(0)), qlora, jnp.ones((2, 16)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel_lora_a / kernel_lora_b: no kernel kernel beside them .*QLoRA"):
        jlora.from_qwix(qq, qlora)
    # alpha= gives every kernel the same scale, with the rank read from the factors
    lp = jlora.from_qwix(state, alpha=2.0)
    assert {w.scale for _, w in jlora.lora_leaves(lp)} == {0.5}

    # to_qwix: a provider of another alpha, a qwix model adapting other kernels, DoRA
    with pytest.raises(ValueError, match=r"has rank 4, alpha 4 \(scale 1\); this adapter needs rank 4, alpha 8"):
        jlora.to_qwix(b.lp, b.qmodel, provider=qwix.LoraProvider(module_path=".*", rank=4, alpha=4.0))
    wider = _qwix_model(b.model, qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0), b.ids, randomize=False)
    with pytest.raises(ValueError, match=r"adapts 1 kernels this adapter does not: \['lm_head/w'\]"):
        jlora.to_qwix(b.lp, wider)
    dora = jlora.wrap(b.state, jlora.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
                      apply_fn=b.apply, example_args=(b.ids,))
    with pytest.raises(ValueError, match="DoRA"):
        jlora.to_qwix(dora)


def _measured_errors() -> list[tuple[str, float, float, float]]:
    """Per family: max |qwix − jlora| on the converted tree, max |PEFT − jlora| (qwix →
    jlora → PEFT files) and max |qwix − PEFT| (PEFT files → jlora → qwix), float32."""
    import tempfile

    import peft
    from support.family_models import case, peft_adapter, torch_logits

    rows = []
    for family in FAMILIES:
        c, provider, qmodel, ref = torch_built(family)
        lp = jlora.from_qwix(nnx.state(qmodel), provider)
        got = np.asarray(jax.jit(jlora.lora(c.apply))(lp, jnp.asarray(c.ids)))
        with tempfile.TemporaryDirectory() as d:
            jlora.save_peft(d, lp)
            theirs = torch_logits(peft.PeftModel.from_pretrained(c.fresh_torch(), d), c.ids)
        d, peft_ref = peft_adapter(family)
        lp2 = jlora.load_peft(d, case(family).state)
        ids = jnp.asarray(c.ids)
        probe = _qwix_model(c.model, qwix.LoraProvider(module_path=REGEX[family], rank=4, alpha=8.0), ids,
                            randomize=False)
        rules = qwix_state.qwix_rules(lp2, probe)
        provider2 = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])
        qmodel2 = _qwix_model(c.model, provider2, ids, seed=3)
        nnx.update(qmodel2, jlora.to_qwix(lp2, qmodel2, provider=provider2))
        rows.append((family, _max_err(got, ref), _max_err(theirs, got), _max_err(qmodel2(ids), peft_ref)))
    return rows


if __name__ == "__main__":  # python tests/io/test_qwix.py: the errors the README quotes
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    print("| family | qwix vs jlora | PEFT vs jlora (qwix → PEFT files) | qwix vs PEFT (PEFT files → qwix) |")
    print("|---|---|---|---|")
    for fam, e1, e2, e3 in _measured_errors():
        print(f"| {fam} | {e1:.1e} | {e2:.1e} | {e3:.1e} |")
