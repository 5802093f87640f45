"""jlora.models: the NNX Qwen3 / Llama 3 / Gemma 3 decoders against the torch
transformers models of the same (tiny, random, float32) configs, and the loaders."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.models as jm
from support.family_models import FAMILIES, VOCAB, case, hf_config, torch_class, torch_logits

TOL = 1e-4


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_base_logits_equal_torch(family):
    c = case(family)
    ref = torch_logits(c.torch_model, c.ids)
    out = np.asarray(c.model(jnp.asarray(c.ids)))
    assert out.shape == ref.shape == (2, 10, VOCAB)
    assert np.abs(ref).max() > 1.0  # weights large enough that a mapping mistake shows
    assert _max_err(out, ref) <= TOL


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_tree_is_laid_out_like_tunix(family):
    c = case(family)
    D, N, K, H, F = 32, 4, 2, 8, 64
    shapes = {"/".join(jlora.core.paths.path_names(p)): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(c.state)[0]}
    assert shapes["embedder/input_embedding"] == (VOCAB, D)
    assert shapes["layers/1/mlp/gate_proj/kernel"] == (D, F)
    assert shapes["layers/1/mlp/down_proj/kernel"] == (F, D)
    if family == "gemma3":
        assert shapes["layers/1/attn/q_einsum/w"] == (N, D, H)
        assert shapes["layers/1/attn/kv_einsum/w"] == (2, K, D, H)
        assert shapes["layers/1/attn/attn_vec_einsum/w"] == (N, H, D)
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            assert shapes[f"layers/0/{norm}/scale"] == (D,)
        assert shapes["layers/0/attn/_query_norm/scale"] == shapes["layers/0/attn/_key_norm/scale"] == (H,)
        assert shapes["final_norm/scale"] == (D,)
    else:
        assert shapes["layers/1/attn/q_proj/w"] == (D, N, H)
        assert shapes["layers/1/attn/k_proj/w"] == shapes["layers/1/attn/v_proj/w"] == (D, K, H)
        assert shapes["layers/1/attn/o_proj/w"] == (N, H, D)
        assert ("layers/0/attn/q_norm/w" in shapes) == (family == "qwen3")
        assert shapes["layers/0/input_layernorm/w"] == (D,)
        assert shapes["final_norm/w"] == (D,)
    assert ("lm_head/w" in shapes) == (family == "qwen3")  # llama3 and gemma3 test configs tie
    assert isinstance(c.model.layers, nnx.List)
    # The parameter count is the torch model's (tied weights counted once).
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(p.numel() for p in c.torch_model.parameters())
    assert c.model.config.num_params() == sum(p.numel() for p in c.torch_model.parameters())


@pytest.mark.torch
def test_padding_mask_matches_torch():
    c = case("llama3")
    mask = np.ones_like(c.ids)
    mask[0, :3] = 0  # left padding in the first row
    ref = torch_logits(c.torch_model, c.ids, attention_mask=__import__("torch").tensor(mask))
    out = np.asarray(c.model(jnp.asarray(c.ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert _max_err(out[valid], ref[valid]) <= TOL
    assert _max_err(out[1], np.asarray(c.model(jnp.asarray(c.ids)))[1]) == 0.0


@pytest.mark.torch
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_remat_blocks_compute_the_same(family):
    c = case(family)
    m = jm.from_torch(c.torch_model, remat=True)
    assert m.layers[0].remat
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(nnx.graphdef(m), s)(x))(nnx.state(m), jnp.asarray(c.ids))
    assert any("remat" in e.primitive.name or "checkpoint" in e.primitive.name for e in jaxpr.eqns)
    np.testing.assert_array_equal(np.asarray(m(jnp.asarray(c.ids))), np.asarray(c.model(jnp.asarray(c.ids))))


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_directory_loads_without_torch_logits_equal(family, tmp_path):
    c = case(family)
    c.torch_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    m = jm.from_pretrained(tmp_path)
    assert type(m).__name__ == {"qwen3": "Qwen3", "llama3": "Llama3", "gemma3": "Gemma3"}[family]
    assert _max_err(m(jnp.asarray(c.ids)), torch_logits(c.torch_model, c.ids)) <= TOL


@pytest.mark.torch
def test_sharded_bfloat16_checkpoint(tmp_path):
    import torch

    c = case("qwen3")
    tm = torch_class("qwen3")(hf_config("qwen3"))
    tm.load_state_dict(c.base_state)
    tm = tm.to(torch.bfloat16)
    tm.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m = jm.from_pretrained(tmp_path)  # upcast to float32 parameters by default
    assert m.layers[0].attn.q_proj.w[...].dtype == jnp.float32
    ref_model = torch_class("qwen3")(hf_config("qwen3")).eval()  # the bfloat16 weights, in float32
    ref_model.load_state_dict({k: v.float() for k, v in tm.state_dict().items()})
    ref = torch_logits(ref_model, c.ids)
    assert _max_err(m(jnp.asarray(c.ids)), ref) <= TOL
    mb = jm.from_pretrained(tmp_path, param_dtype="bfloat16")
    assert mb.embedder.input_embedding[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(mb.layers[1].mlp.down_proj.kernel[...], np.float32),
        tm.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T,
    )


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_loads_into_torch(family):
    import torch

    c = case(family)
    sd = jm.state_dict(c.model)
    fresh = torch_class(family)(hf_config(family)).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: the embedding
    assert _max_err(torch_logits(fresh, c.ids), torch_logits(c.torch_model, c.ids)) == 0.0


@pytest.mark.torch
def test_loader_errors_name_the_problem(tmp_path):
    c = case("llama3")
    sd = dict(c.base_state)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        jm.from_torch(sd, c.torch_model.config)
    sd = dict(c.base_state)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :5]
    with pytest.raises(ValueError, match=r"up_proj.*shape"):
        jm.from_torch(sd, c.torch_model.config)
    with pytest.raises(ValueError, match="yarn"):
        jm.config_from_hf(dict(hf_config("qwen3").to_dict(), rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        jm.config_from_hf(dict(hf_config("llama3").to_dict(), attention_bias=True))
    with pytest.raises(ValueError, match="model_type"):
        jm.config_from_hf({"model_type": "gpt2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        jm.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        jm.from_pretrained(tmp_path / "missing")


@pytest.mark.torch
def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    c = case("llama3")
    c.torch_model.save_pretrained(tmp_path, safe_serialization=True)
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = jm.from_pretrained("meta-llama/Tiny-Test")
    assert asked["repo_id"] == "meta-llama/Tiny-Test" and "*.safetensors" in asked["allow_patterns"]
    assert _max_err(m(jnp.asarray(c.ids)), torch_logits(c.torch_model, c.ids)) <= TOL


def test_eval_shape_constructor_allocates_nothing():
    # Qwen3-0.6B's shape: 0.6 B parameters, nothing allocated.
    cfg = jm.DecoderConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, tie_embeddings=True, rope_theta=1e6)
    m = jm.abstract(cfg)
    leaves = jax.tree.leaves(nnx.state(m))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params() > 590_000_000
    assert m.layers[27].attn.o_proj.w.shape == (16, 128, 1024)


@pytest.mark.torch
def test_config_from_hf_reads_the_families():
    assert jm.config_from_hf(hf_config("qwen3")).family == "qwen3"
    g = jm.config_from_hf(hf_config("gemma3").to_dict())
    assert (g.family, g.query_pre_attn_scalar, g.sliding_window, g.final_logit_softcapping) == ("gemma3", 12.0, 4, 5.0)
    assert g.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    ll = jm.config_from_hf(hf_config("llama3"))
    assert ll.rope_type == "llama3" and ll.tie_embeddings
    # the frequencies are transformers' own
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config("llama3"), "cpu")
    np.testing.assert_array_equal(jm.rope_frequencies(8, ll.rope_theta, ll.rope_scaling), inv.numpy())


@pytest.mark.torch
def test_save_pretrained_is_an_hf_checkpoint(tmp_path):
    """A model built from a DecoderConfig alone (no torch involved) saved as config.json +
    model.safetensors: transformers' AutoModelForCausalLM reads it and computes the same."""
    import transformers

    cfg = jm.DecoderConfig(
        "gemma3", VOCAB, 32, 64, 2, 4, 2, 8, tie_embeddings=True, initializer_range=0.15,
        layer_types=("sliding_attention", "full_attention"), sliding_window=3, query_pre_attn_scalar=10.0,
        final_logit_softcapping=4.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    m = jm.build(cfg, seed=3)
    jm.save_pretrained(m, tmp_path)
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(tm).__name__ == "Gemma3ForCausalLM"
    ids = case("gemma3").ids  # the shapes the other tests ran eagerly already
    ref = torch_logits(tm, ids)
    assert np.abs(ref).max() > 1.0
    assert _max_err(m(jnp.asarray(ids)), ref) <= TOL
    assert jm.config_from_hf(tmp_path) == cfg


@pytest.mark.torch
def test_checkpoint_names_nested_or_bare():
    """A multimodal Gemma 3 checkpoint nests the text model (model.language_model.*), a bare
    Qwen3Model has no leading model.: both load."""
    c = case("gemma3")
    nested = {k.replace("model.", "model.language_model.", 1): v for k, v in c.base_state.items()}
    m = jm.from_torch(nested, c.torch_model.config)
    np.testing.assert_array_equal(np.asarray(m.layers[2].attn.kv_einsum.w[...]), np.asarray(c.model.layers[2].attn.kv_einsum.w[...]))
    q = case("qwen3")
    bare = {k[len("model."):]: v for k, v in q.base_state.items() if k.startswith("model.")}
    bare["lm_head.weight"] = q.base_state["lm_head.weight"]
    m = jm.from_torch(bare, q.torch_model.config)
    np.testing.assert_array_equal(np.asarray(m.final_norm.w[...]), np.asarray(q.model.final_norm.w[...]))
