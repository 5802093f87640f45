"""Parameter counts: `count_parameters` / `print_trainable_parameters` against PEFT.

References: the line PEFT prints for GPT-2 small with r=8 on c_attn/c_proj (quoted in
issue 2), and ``get_nb_trainable_parameters()`` of a PEFT model built inside the test
from the same transformers config. Flax params are ShapeDtypeStructs (nothing allocated).
"""

from __future__ import annotations

import jax
import pytest

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _arch(name):
    t = transformers
    if name == "llama":
        cfg = t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        return cfg, t.FlaxLlamaForCausalLM, t.LlamaForCausalLM
    if name == "bert":
        cfg = t.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=64)
        return cfg, t.FlaxBertModel, t.BertModel
    if name == "gpt2":
        cfg = t.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
        return cfg, t.FlaxGPT2LMHeadModel, t.GPT2LMHeadModel
    raise KeyError(name)


def _flax_shapes(name):
    cfg, flax_cls, _ = _arch(name)
    model = flax_cls(cfg, _do_init=False)
    return jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))


def _peft_counts(name, **kw):
    cfg, _, torch_cls = _arch(name)
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch_cls(cfg), peft.LoraConfig(**kw))
    return pm.get_nb_trainable_parameters()


def test_gpt2_small_line(capsys):
    """GPT-2 small (default GPT2Config), r=8 on c_attn/c_proj: PEFT's exact line."""
    cfg = transformers.GPT2Config()
    model = transformers.FlaxGPT2LMHeadModel(cfg, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
    lp = jlora.wrap(shapes, jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]))
    jlora.print_trainable_parameters(lp)
    out = capsys.readouterr().out
    assert out == "trainable params: 811,008 || all params: 125,250,816 || trainable%: 0.6475\n"
    assert jlora.count_parameters(lp) == (811_008, 125_250_816)


COUNT_CASES = [
    ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    ("bert", dict(r=8, lora_alpha=16, target_modules=["query", "value"])),
    ("gpt2", dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])),
    ("llama", dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                   rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 32},
                   alpha_pattern={"q_proj": 4})),
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[0, 2],
                   layers_pattern="layers")),
    ("bert", dict(r=4, target_modules=["query", "value"], layers_to_transform=[1])),
    ("llama", dict(r=4, target_modules="all-linear")),
    ("bert", dict(r=4, target_modules=["query", "value"], bias="all")),
    ("bert", dict(r=4, target_modules=["query", "value"], bias="lora_only")),
    ("gpt2", dict(r=4, target_modules=["c_attn"], bias="lora_only")),
]


@pytest.mark.parametrize("arch, kw", COUNT_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(COUNT_CASES)])
def test_counts_equal_peft(arch, kw):
    """(trainable, total) equals PEFT's ``get_nb_trainable_parameters()`` for the same config
    on the same architecture (torch model from the same transformers config)."""
    lp = jlora.wrap(_flax_shapes(arch), jlora.LoraConfig(**kw))
    assert jlora.count_parameters(lp) == _peft_counts(arch, **kw)


def test_modules_to_save_counts_vs_peft():
    """modules_to_save leaves are trainable: the trainable count equals PEFT's. PEFT's total
    also counts the frozen original it keeps beside its trainable copy; jlora's tree holds
    the module once, so its total is PEFT's minus that copy."""
    kw = dict(r=4, target_modules=["query", "value"], modules_to_save=["pooler"])
    lp = jlora.wrap(_flax_shapes("bert"), jlora.LoraConfig(**kw))
    trainable, total = jlora.count_parameters(lp)
    p_trainable, p_total = _peft_counts("bert", **kw)
    hidden = _arch("bert")[0].hidden_size
    pooler = hidden * hidden + hidden
    assert trainable == p_trainable
    assert total == p_total - pooler
    assert trainable - pooler == _peft_counts("bert", r=4, target_modules=["query", "value"])[0]


def test_base_total_equals_torch_numel():
    """Before wrapping, the Flax tree holds as many parameters as the torch model (so
    the totals above compare the same architecture)."""
    for arch in ("llama", "bert", "gpt2"):
        cfg, _, torch_cls = _arch(arch)
        n_torch = sum(p.numel() for p in torch_cls(cfg).parameters())
        assert jlora.count_parameters(_flax_shapes(arch)) == (0, n_torch), arch
