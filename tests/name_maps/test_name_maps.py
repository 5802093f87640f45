"""jlora.name_maps: recognising the families from the paths, the path <-> PyTorch-name and
layout conversions (checked against the torch models' own state dicts), and the
pluggable forms of ``name_map=`` (a shipped map's name, overrides, a FamilyMap of
your own), in the I/O functions and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import name_maps
from support.family_models import FAMILIES, case, peft_adapter

TOL = 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_family_recognised_and_every_torch_tensor_produced(family):
    c = case(family)
    leaves = name_maps.tree_leaves(c.state)
    assert name_maps.recognise("/".join(n) for n, _, _ in leaves).name == family
    tn = name_maps.for_tree(leaves)
    values = _values(c.state)
    sd = {k: v.numpy() for k, v in c.base_state.items()}
    produced = {}
    for names, shape, _ in leaves:
        for name, x in zip(tn.params(names), tn.param_to_torch(names, values[names])):
            produced[name] = x
    tied = {"lm_head.weight"} if c.torch_model.config.tie_word_embeddings else set()
    assert set(produced) == set(sd) - tied
    for name, x in produced.items():
        np.testing.assert_array_equal(x, sd[name], err_msg=name)
    # and back: the leaf from its torch tensors
    for names, shape, _ in leaves:
        back = tn.param_from_torch(names, [sd[n] for n in tn.params(names)], shape)
        np.testing.assert_array_equal(back, values[names])


def _values(state) -> dict:
    import jax

    return {jlora.core.paths.path_names(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_layouts_and_kinds_of_the_shipped_maps():
    tn = name_maps.QWEN3.bind([])
    q = ("layers", "3", "attn", "q_proj", "w")
    assert tn.layout(q, (32, 4, 8)) == ("in", "out", "out")
    assert tn.layout(("layers", "3", "attn", "o_proj", "w"), (4, 8, 32)) == ("in", "in", "out")
    assert tn.layout(("layers", "0", "mlp", "down_proj", "kernel"), (64, 32)) == ("in", "out")
    assert tn.layout(("layers", "0", "input_layernorm", "w"), (32,)) is None
    assert tn.modules(q) == ["model.layers.3.self_attn.q_proj"]
    assert tn.kind(("embedder", "input_embedding"), ("in", "out")) == "embedding"
    assert tn.torch_shapes(q, (32, 4, 8)) == [(32, 32)]
    g = name_maps.GEMMA3.bind([])
    kv = ("layers", "1", "attn", "kv_einsum", "w")
    assert g.layout(kv, (2, 2, 32, 8)) == ("stack", "out", "in", "out")
    assert g.split(kv) and g.modules(kv) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert g.layout(("layers", "1", "attn", "q_einsum", "w"), (4, 32, 8)) == ("out", "in", "out")
    assert g.params(("layers", "1", "pre_ffw_norm", "scale")) == ["model.layers.1.pre_feedforward_layernorm.weight"]
    # a prefix in the tree (e.g. {"model": state}) is allowed, and leaves no rule knows fall
    # back to transformers' rules
    tn = name_maps.for_tree([(("model", "layers", "0", "attn", "q_proj", "w"), (32, 4, 8), 0),
                             (("score", "kernel"), (32, 3), 0)])
    assert tn.name == "llama3"
    assert tn.modules(("model", "layers", "0", "attn", "q_proj", "w")) == ["model.layers.0.self_attn.q_proj"]
    assert tn.params(("score", "kernel")) == ["score.weight"]
    assert name_maps.for_tree([(("transformer", "h", "0", "attn", "c_attn", "kernel"), (32, 96), 0)]).name == "hf"


def test_rule_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"torch_axes.*must name the axes"):
        name_maps.Rule(r"a/w", "a.weight", "d n h", "(n h) x")
    with pytest.raises(ValueError, match="different order"):
        name_maps.Rule(r"a/w", "a.weight", "d h n", "(n h) d")
    with pytest.raises(ValueError, match="two torch axes"):
        name_maps.Rule(r"a/w", "a.weight", "d n h", "n h d")
    with pytest.raises(ValueError, match="shipped maps"):
        name_maps.for_tree([], "mistral")


@pytest.mark.torch
def test_wrap_layouts_from_the_family_map():
    c = case("gemma3")
    spec = name_maps.layouts(c.state)
    assert spec("layers.0.attn.kv_einsum", (2, 2, 32, 8)) == ("stack", "out", "in", "out")
    assert spec("layers.0.mlp.up_proj", (32, 64)) == ("in", "out")
    assert spec("layers.0.post_ffw_norm", (32,)) is None


@pytest.mark.torch
def test_name_map_overrides_and_custom_family(tmp_path):
    """Pluggable: overrides on top of the recognised map, and a FamilyMap of one's own
    (here: Qwen3's map with PyTorch names of a model whose decoder lives under
    ``transformer.``) passed as ``name_map=`` to save_peft and load_peft."""
    from safetensors.numpy import load_file

    c = case("qwen3")
    d, ref = peft_adapter("qwen3")
    lp = jlora.load_peft(d, c.state)

    jlora.save_peft(tmp_path / "a", lp, name_map={"layers.0.attn.q_proj": "model.layers.0.self_attn.query"})
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.query.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys

    rules = [
        name_maps.Rule(r.path, tuple(t.replace("model.", "transformer.", 1) for t in r.torch_names_template)
                       if r.is_split else r.torch.replace("model.", "transformer.", 1), r.axes, r.torch_axes, r.kind)
        for r in name_maps.QWEN3.rules
    ]
    mine = name_maps.FamilyMap("my-qwen", rules, requires=())
    jlora.save_peft(tmp_path / "b", lp, name_map=mine)
    keys = set(load_file(str(tmp_path / "b" / "adapter_model.safetensors")))
    assert "base_model.model.transformer.layers.1.mlp.down_proj.lora_B.weight" in keys
    back = jlora.load_peft(tmp_path / "b", c.state, name_map=mine)
    got = jax.jit(jlora.lora(c.apply))(back, jnp.asarray(c.ids))
    assert float(np.abs(np.asarray(got) - ref).max()) <= TOL
    with pytest.raises(ValueError, match="not in the base params"):
        jlora.load_peft(tmp_path / "b", c.state, name_map="hf")


@pytest.mark.torch
def test_cli_name_map_rederives_names(tmp_path):
    from safetensors.numpy import load_file

    from jlora import cli

    c = case("llama3")
    d, _ = peft_adapter("llama3")
    lp = jlora.load_peft(d, c.state)
    jlora.save(tmp_path / "ck", lp, name_map="hf")  # saved with the wrong (HF Flax) names
    assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert "base_model.model.layers.0.attn.q_proj.lora_A.weight" in load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "fixed"), "--name-map", "llama3"]) == 0
    fixed = load_file(str(tmp_path / "fixed" / "adapter_model.safetensors"))
    theirs = load_file(f"{d}/adapter_model.safetensors")
    assert set(fixed) == set(theirs)
    cfg = json.loads((tmp_path / "fixed" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cli.main(["convert", d, str(tmp_path / "x"), "--name-map", "llama3"]) == 1  # PEFT source: no paths
