"""LoraConfig: validation, immutability, JSON round trip with PEFT's keys.

The reference is PEFT's own ``LoraConfig`` (the ``peft`` package): its field names, its
``adapter_config.json`` and the values it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import jlora

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(r=0), ValueError, "r=0"),
        (dict(r=-3), ValueError, "r=-3"),
        (dict(r=2.5), ValueError, "r=2.5"),
        (dict(r=True), ValueError, "r=True"),
        (dict(lora_alpha=-1), ValueError, "lora_alpha=-1"),
        (dict(lora_alpha=0), ValueError, "lora_alpha=0"),
        (dict(lora_alpha=math.nan), ValueError, "lora_alpha=nan"),
        (dict(lora_alpha="16"), TypeError, "lora_alpha='16'"),
        (dict(bias="x"), ValueError, "bias='x'"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout=1.0"),
        (dict(lora_dropout=1.5), ValueError, "lora_dropout=1.5"),
        (dict(lora_dropout=-0.1), ValueError, "lora_dropout=-0.1"),
        (dict(use_dora="yes"), TypeError, "use_dora"),
        (dict(init_lora_weights="pissa_niter_0"), ValueError, "init_lora_weights='pissa_niter_0'"),
        (dict(init_lora_weights="loftq"), ValueError, "init_lora_weights='loftq'"),
        (dict(target_modules=[]), ValueError, "target_modules"),
        (dict(target_modules="(unclosed"), ValueError, "regular expression"),
        (dict(target_modules=["q", 3]), TypeError, "target_modules"),
        (dict(rank_pattern={"q": 0}), ValueError, "rank_pattern"),
        (dict(alpha_pattern={"q": -2}), ValueError, "alpha_pattern"),
        (dict(layers_to_transform=[-1]), ValueError, "layers_to_transform"),
        (dict(layers_pattern="layers"), ValueError, "layers_to_transform"),
        # PEFT refuses layer selection with a regex target (the regex selects the layers)
        (dict(target_modules=r".*\.q", layers_to_transform=[0]), ValueError, "layers_to_transform"),
        (dict(target_modules=r".*\.q", layers_to_transform=[0], layers_pattern="h"), ValueError, "str"),
    ],
)
def test_invalid_values_raise_with_the_field_named(kwargs, exc, words):
    """Each bad value raises at construction and the message names the field and value."""
    with pytest.raises(exc) as info:
        jlora.LoraConfig(target_modules=kwargs.pop("target_modules", ["q"]), **kwargs)
    assert words in str(info.value)


def test_valid_edge_values_are_accepted_as_by_peft():
    """Values PEFT accepts (dropout 0, fractional alpha, an int layer index) are accepted."""
    kw = dict(r=1, lora_alpha=0.5, lora_dropout=0.0, target_modules=["q"], layers_to_transform=1)
    cfg = jlora.LoraConfig(**kw)
    peft.LoraConfig(**kw)  # the reference accepts the same values
    assert cfg.layers_to_transform == (1,)
    assert cfg.scale_for(1, 0.5) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=r".*\.q", layers_to_transform=[0]),
        dict(target_modules=r".*\.q", layers_to_transform=[0], layers_pattern="h"),
        dict(target_modules=["q"], layers_pattern="h"),
    ],
)
def test_rejected_like_peft(kwargs):
    """Combinations PEFT's own LoraConfig refuses are refused by jlora as well."""
    with pytest.raises(ValueError):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ValueError):
        jlora.LoraConfig(**kwargs)


def test_config_is_immutable():
    """Fields cannot be reassigned, mapping fields cannot be mutated, and mutating the list
    the config was built from does not change the config."""
    targets = ["q_proj", "v_proj"]
    ranks = {"q_proj": 4}
    cfg = jlora.LoraConfig(r=8, target_modules=targets, rank_pattern=ranks)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.rank_pattern["v_proj"] = 2  # type: ignore[index]
    targets.append("o_proj")
    ranks["k_proj"] = 2
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert dict(cfg.rank_pattern) == {"q_proj": 4}
    assert hash(cfg) == hash(jlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4}))


def test_replace_revalidates():
    """``replace`` returns a new, validated config and leaves the original as it was."""
    cfg = jlora.LoraConfig(r=8, target_modules=["q"])
    assert cfg.replace(r=4).r == 4 and cfg.r == 8
    with pytest.raises(ValueError):
        cfg.replace(r=0)


def test_scale_matches_peft_formula():
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA (PEFT's ``LoraLayer.update_layer``)."""
    assert jlora.LoraConfig(target_modules=["q"]).scale_for(8, 16) == 2.0
    assert jlora.LoraConfig(target_modules=["q"], use_rslora=True).scale_for(16, 16) == 4.0


def _full_config(**over):
    kw = dict(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
        lora_dropout=0.05, bias="lora_only", modules_to_save=["score"], layers_to_transform=[0, 2],
        layers_pattern="layers", rank_pattern={"v_proj": 4}, alpha_pattern={r".*\.q_proj": 8},
        use_rslora=True, init_lora_weights="gaussian", fan_in_fan_out=False, task_type="CAUSAL_LM",
        base_model_name_or_path="some/model", inference_mode=False,
    )
    kw.update(over)
    return kw


def test_json_round_trip_keys_are_peft_keys():
    """to_dict → JSON → from_dict gives an equal config; every key is a PEFT field name."""
    cfg = jlora.LoraConfig(**_full_config())
    d = json.loads(cfg.to_json())
    assert jlora.LoraConfig.from_dict(d) == cfg
    assert jlora.LoraConfig.from_json(cfg.to_json()) == cfg
    assert d["peft_type"] == "LORA"
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(d) <= peft_fields, set(d) - peft_fields
    # the round trip keeps values exactly, including the regex target form
    regex = jlora.LoraConfig(target_modules=r".*\.(q|v)_proj", r=4)
    assert jlora.LoraConfig.from_json(regex.to_json()).target_modules == r".*\.(q|v)_proj"


def _compare_with_peft(jcfg, pcfg):
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "init_lora_weights",
                 "task_type", "base_model_name_or_path", "fan_in_fan_out"):
        assert getattr(jcfg, name) == getattr(pcfg, name), name
    as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731  (PEFT takes a str or a list)
    assert as_list(jcfg.layers_pattern) == as_list(pcfg.layers_pattern)
    assert set(jcfg.target_modules) == set(pcfg.target_modules)
    assert set(jcfg.exclude_modules) == set(pcfg.exclude_modules)
    assert list(jcfg.modules_to_save) == list(pcfg.modules_to_save)
    assert list(jcfg.layers_to_transform) == list(pcfg.layers_to_transform)
    assert dict(jcfg.rank_pattern) == dict(pcfg.rank_pattern)
    assert dict(jcfg.alpha_pattern) == dict(pcfg.alpha_pattern)


def test_peft_adapter_config_json_loads(tmp_path):
    """A config saved by PEFT (its ``adapter_config.json``) loads into jlora with the same values."""
    pcfg = peft.LoraConfig(**_full_config())
    pcfg.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    jcfg = jlora.LoraConfig.from_dict(data)
    _compare_with_peft(jcfg, pcfg)


def test_jlora_dict_loads_in_peft():
    """jlora's to_dict (minus ``peft_type``) is accepted by ``peft.LoraConfig(**d)`` with the same values."""
    jcfg = jlora.LoraConfig(**_full_config())
    d = json.loads(jcfg.to_json())
    d.pop("peft_type")
    pcfg = peft.LoraConfig(**d)
    _compare_with_peft(jcfg, pcfg)


@pytest.mark.parametrize("key, value", [("use_qalora", True), ("layer_replication", [[0, 1]]), ("peft_type", "IA3")])
def test_from_dict_rejects_features_jlora_lacks(key, value):
    """A PEFT config that switches on an unimplemented feature is refused, naming the key."""
    d = peft.LoraConfig(r=4, target_modules=["q"]).to_dict()
    d = json.loads(json.dumps(d, default=sorted))
    d[key] = value
    with pytest.raises(ValueError, match=key):
        jlora.LoraConfig.from_dict(d)


def test_lora_bias_trainable_tokens_and_mica_keys():
    """``lora_bias``, ``trainable_token_indices`` (list or dict) and ``init_lora_weights="mica"``
    from PEFT's own ``adapter_config.json`` load with PEFT's values and round-trip; PEFT's
    rule lora_bias + DoRA is refused, and so are bad token ids."""
    for extra in (dict(lora_bias=True), dict(trainable_token_indices=[3, 7]),
                  dict(trainable_token_indices={"embed_tokens": [0, 2]}), dict(init_lora_weights="mica")):
        pcfg = peft.LoraConfig(r=4, target_modules=["q"], **extra)
        data = json.loads(json.dumps(pcfg.to_dict(), default=sorted))
        jcfg = jlora.LoraConfig.from_dict(data)
        key, value = next(iter(extra.items()))
        got = getattr(jcfg, key)
        got = {k: list(v) for k, v in got.items()} if isinstance(value, dict) else list(got) if isinstance(
            value, list) else got
        assert got == value == getattr(pcfg, key), key
        assert jlora.LoraConfig.from_json(jcfg.to_json()) == jcfg
    with pytest.raises(ValueError, match="lora_bias=True, use_dora=True"):
        jlora.LoraConfig(target_modules=["q"], lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="distinct"):
        jlora.LoraConfig(target_modules=["q"], trainable_token_indices=[1, 1])
    with pytest.raises(ValueError, match="integers >= 0"):
        jlora.LoraConfig(target_modules=["q"], trainable_token_indices={"emb": [-1]})
    with pytest.raises(ValueError, match="cannot initialise"):
        jlora.wrap({"q": {"kernel": jax_ones((4, 4))}}, jlora.LoraConfig(target_modules=["q"], init_lora_weights="mica"))


@pytest.mark.parametrize("key, value, name", [
    ("kasa_config", {"eps": 1e-4}, "KaSA"), ("velora_config", {"num_groups": 2}, "VeLoRA"),
    ("monteclora_config", {"num_samples": 2}, "MonteCLoRA"), ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
])
def test_lora_variants_refused_by_name(key, value, name):
    """PEFT's LoRA variants with their own math are refused with the variant's name."""
    d = json.loads(json.dumps(peft.LoraConfig(r=4, target_modules=["q"]).to_dict(), default=sorted))
    d[key] = value
    with pytest.raises(ValueError, match=name):
        jlora.LoraConfig.from_dict(d)


def jax_ones(shape):
    import jax.numpy as jnp

    return jnp.ones(shape)
