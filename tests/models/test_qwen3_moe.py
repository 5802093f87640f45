"""Qwen3-MoE (``jlora.models.Qwen3Moe``) against transformers 4.57's ``Qwen3MoeForCausalLM``
on torch CPU, random weights, and LoRA on its experts against PEFT:

- base logits, the checkpoint both ways (``state_dict``, ``save_pretrained`` read by
  transformers, ``from_pretrained``), ``config_from_hf`` / ``hf_config_dict``;
- a PEFT adapter on attention and experts (transformers 4.x names: one module per expert)
  loaded by jlora gives PEFT's logits; jlora's adapter written as PEFT files gives jlora's
  logits in PEFT;
- PEFT's ``target_parameters`` adapter on transformers 5's fused experts (a torch twin of
  the same weights, ``support.moe_models.fused_twin``) both ways;
- every expert target factored (``explain``), factored == merged (values and gradients),
  a mixed batch equal to each adapter run alone.

The max-abs logit errors are printed (``-s``) for the report.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models as jm

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

from support.lora_checks import assert_factored_equals_merged  # noqa: E402
from support.moe_models import ATTN_AND_EXPERTS, E, FUSED_PARAMS, case, fused_twin, torch_logits  # noqa: E402

TOL = 1e-4
EXPERT_PATHS = {f"layers/{i}/mlp/experts/{p}/w" for i in (0, 2) for p in ("gate_proj", "up_proj", "down_proj")}


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _report(what: str, err: float) -> None:
    print(f"\n[qwen3_moe] {what}: max |logits - reference| = {err:.3g}")


@functools.lru_cache(maxsize=None)
def forward():
    return jax.jit(jlora.lora(case().apply, on_materialize="error"))


@functools.lru_cache(maxsize=None)
def wrapped():
    """jlora's own adapter on attention and experts (non-zero factors), targets found by use."""
    c = case()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_AND_EXPERTS, init_lora_weights=False)
    lp = jlora.wrap(c.state, config, rng=jax.random.key(3), apply_fn=c.apply, example_args=(jnp.asarray(c.ids),))
    return config, lp


@functools.lru_cache(maxsize=None)
def peft_modules_adapter(tmp):
    """PEFT on the 4.57 model, targets by module name (experts: ``mlp.experts.<e>.gate_proj``)."""
    pm = peft.get_peft_model(case().fresh_torch(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ATTN_AND_EXPERTS, init_lora_weights=False))
    pm.save_pretrained(tmp)
    return tmp, torch_logits(pm, case().ids)


@functools.lru_cache(maxsize=None)
def peft_fused_adapter(tmp):
    """PEFT's ParamWrapper on the fused twin: ``target_parameters`` on gate_up_proj / down_proj."""
    pm = peft.get_peft_model(fused_twin(case().fresh_torch()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=FUSED_PARAMS,
        init_lora_weights=False))
    pm.save_pretrained(tmp)
    return tmp, torch_logits(pm, case().ids)


@pytest.fixture(scope="module")
def tmp_dirs(tmp_path_factory):
    return {k: str(tmp_path_factory.mktemp(k)) for k in ("modules", "fused")}


def test_config_both_ways():
    c = case()
    cfg = jm.config_from_hf(c.config)
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == ("qwen3_moe", E, 2, 16)
    assert cfg.norm_topk_prob and cfg.mlp_only_layers == (1,) and [cfg.is_moe_layer(i) for i in range(3)] == [
        True, False, True]
    assert jm.config_from_hf(jm.hf_config_dict(cfg)) == cfg
    assert cfg.num_params() == sum(p.numel() for p in c.torch_model.parameters())
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=E + 1)


def test_base_logits_match_transformers():
    c = case()
    ref = torch_logits(c.torch_model, c.ids)
    err = _err(c.model(jnp.asarray(c.ids)), ref)
    _report("base model vs Qwen3MoeForCausalLM", err)
    assert err <= TOL
    # the router sends tokens to several experts (the check can fail)
    tokens = c.model.layers[0].post_attention_layernorm(c.model.embedder.encode(jnp.asarray(c.ids)))
    _, experts = jm.qwen3_moe.route(c.model.layers[0].mlp.gate(tokens.reshape(-1, 32)), 2, True, jnp.float32)
    assert len(np.unique(np.asarray(experts))) == E


def test_checkpoint_both_ways(tmp_path):
    c = case()
    sd = jm.state_dict(c.model)
    ref = c.torch_model.state_dict()
    assert set(sd) == set(ref)
    assert max(_err(sd[k], ref[k].numpy()) for k in sd) == 0.0
    jm.save_pretrained(c.model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    assert _err(torch_logits(back, c.ids), torch_logits(c.torch_model, c.ids)) == 0.0
    again = jm.from_pretrained(tmp_path)
    assert _err(again(jnp.asarray(c.ids)), c.model(jnp.asarray(c.ids))) == 0.0


def test_peft_adapter_on_attention_and_experts_loads(tmp_dirs):
    c = case()
    d, ref = peft_modules_adapter(tmp_dirs["modules"])
    lp = jlora.load_peft(d, c.state)
    leaves = dict(jlora.lora_leaves(lp))
    gate = leaves["layers/0/mlp/experts/gate_proj/w"]
    assert gate.layout == ("stack", "in", "out") and gate.a.shape == (E, 32, 4) and gate.b.shape == (E, 4, 16)
    assert EXPERT_PATHS <= set(leaves)
    assert _err(ref, torch_logits(c.torch_model, c.ids)) > 0.05  # the adapter changes the logits
    err = _err(forward()(lp, jnp.asarray(c.ids)), ref)
    _report("PEFT adapter (attention + experts) loaded in jlora vs PEFT", err)
    assert err <= TOL


def test_save_peft_loads_in_peft(tmp_path):
    c = case()
    config, lp = wrapped()
    mine = forward()(lp, jnp.asarray(c.ids))
    jlora.save_peft(tmp_path, lp, config=config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(ATTN_AND_EXPERTS)
    pm = peft.PeftModel.from_pretrained(case().fresh_torch(), tmp_path)
    err = _err(torch_logits(pm, c.ids), mine)
    _report("jlora adapter saved as PEFT files, PEFT vs jlora", err)
    assert _err(mine, torch_logits(c.torch_model, c.ids)) > 0.05
    assert err <= TOL


def test_fused_experts_peft_target_parameters_load(tmp_dirs):
    """PEFT's ParamWrapper adapter of transformers 5's fused experts, read by jlora; written
    back with fused_experts=True it is the same file (shared A: rank r)."""
    from safetensors.numpy import load_file

    c = case()
    d, ref = peft_fused_adapter(tmp_dirs["fused"])
    lp = jlora.load_peft(d, c.state)
    leaves = dict(jlora.lora_leaves(lp))
    assert EXPERT_PATHS <= set(leaves)
    err = _err(forward()(lp, jnp.asarray(c.ids)), ref)
    _report("PEFT target_parameters (fused experts) adapter loaded in jlora vs PEFT", err)
    assert err <= TOL
    out = tmp_dirs["fused"] + "-again"
    jlora.save_peft(out, lp, fused_experts=True)
    mine, theirs = load_file(f"{out}/adapter_model.safetensors"), load_file(f"{d}/adapter_model.safetensors")
    assert set(mine) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


def test_save_peft_fused_experts_loads_in_peft(tmp_path):
    """jlora's gate and up have their own A: the fused gate_up_proj adapter has rank 2r."""
    c = case()
    config, lp = wrapped()
    mine = forward()(lp, jnp.asarray(c.ids))
    jlora.save_peft(tmp_path, lp, config=config, fused_experts=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == sorted(FUSED_PARAMS)
    assert set(cfg["rank_pattern"].values()) == {8}
    with pytest.warns(RuntimeWarning, match="(rank|alpha)_pattern keys did not match"):  # PEFT 0.21.2 checks modules only
        pm = peft.PeftModel.from_pretrained(fused_twin(case().fresh_torch()), tmp_path)
    err = _err(torch_logits(pm, c.ids), mine)
    _report("jlora adapter saved with fused_experts=True, PEFT (target_parameters) vs jlora", err)
    assert err <= TOL
    assert _err(forward()(jlora.load_peft(tmp_path, c.state), jnp.asarray(c.ids)), mine) <= 1e-5


def test_every_expert_target_factored_and_equals_merged():
    c = case()
    _, lp = wrapped()
    ids = jnp.asarray(c.ids)
    report = jlora.explain(c.apply, lp, ids)
    assert report.materialized == []
    assert EXPERT_PATHS <= set(report.factored)
    assert {e.primitive for e in report.events if "experts" in e.path} == {"ragged_dot_general"}
    assert set(report.factored) == {p for p, _ in jlora.lora_leaves(lp)}
    assert_factored_equals_merged(c.apply, lp, ids, rtol=1e-4)


def test_mixed_batch_on_the_model():
    """Three examples, three adapters (one the base): each row as its adapter alone."""
    c = case()
    config, lp = wrapped()
    other = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj"], init_lora_weights=False)
    lp = jlora.add_adapter(lp, "other", other, rng=jax.random.key(9), apply_fn=c.apply,
                           example_args=(jnp.asarray(c.ids),))
    names = ["other", "__base__", "default"]
    got = jax.jit(jlora.lora(c.apply, on_materialize="error"))(lp, jnp.asarray(c.ids),
                                                              adapter_ids=jlora.adapter_ids(lp, names))
    for i, name in enumerate(names):
        tree = c.state if name == "__base__" else jlora.merge(jlora.get_adapter(lp, name))
        assert _err(got[i], c.apply(tree, jnp.asarray(c.ids[i:i + 1]))[0]) <= TOL, name
