"""The notebooks in the pinned environment (transformers 4.57, torch, PEFT), against PyTorch.

quickstart_tpu.ipynb runs its *online* path here: ``MODEL`` is a small Qwen3 checkpoint
that this test writes with ``save_pretrained`` from a randomly initialised
``Qwen3ForCausalLM`` (plus a ``tokenizer.json`` trained with the tokenizers library), so
the notebook loads real safetensors through ``jlora.models.from_pretrained`` and its
tokenizer as it would ``Qwen/Qwen3-0.6B``. Its base logits must equal torch's, and the
PEFT adapter it writes must load in PEFT on the torch model and give jlora's logits.
(The offline path, a random model over bytes, runs in the transformers-5 environment:
tests/test_notebooks_tf5.py.) lora_explained.ipynb runs as a user runs it; its parameter
table must agree with PEFT's count on the PyTorch Qwen3-0.6B.
"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.models as jm
from support.notebook_checks import check_lora_explained, check_quickstart, count_row, run_notebook

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A random Qwen3ForCausalLM saved with save_pretrained, and a BPE tokenizer.json."""
    import tokenizers
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("tiny-qwen3")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:200], trainer)
    tok.save(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=eos, bos_token_id=eos,
    )
    tm = transformers.Qwen3ForCausalLM(cfg).eval()
    tm.save_pretrained(path, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    return path, tm, ids


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def test_loader_matches_torch(tiny_qwen3):
    path, tm, ids = tiny_qwen3
    model = jm.from_pretrained(path)
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - _torch_logits(tm, ids)).max() <= 1e-4


def test_quickstart_online_path(tiny_qwen3, tmp_path):
    path, tm, ids = tiny_qwen3
    out = run_notebook("quickstart_tpu.ipynb", sys.executable,
                       {"MODEL = None": f"MODEL = {str(path)!r}", "OUT_DIR = \"runs/quickstart\"": f"OUT_DIR = {str(tmp_path)!r}"})
    text = check_quickstart(out, learns=False)  # a random base, LoRA only, 20 steps
    assert f"Qwen3: 2 layers, width 64, vocab {tm.config.vocab_size:,}" in text
    assert "PEFT on torch" in text and "== jlora: True" in text  # the notebook's own PyTorch check
    # and ours: the files it wrote, in PEFT on the torch model of the same checkpoint
    adapter = tmp_path / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(path) and sorted(cfg["target_modules"]) == sorted(PROJECTIONS)
    graphdef, state = nnx.split(jm.from_pretrained(path))
    lp = jlora.load_peft(adapter, state)
    assert len(jlora.lora_leaves(lp)) == 7 * 2
    assert all(float(jnp.abs(w.b).max()) > 0 for _, w in jlora.lora_leaves(lp))  # trained
    ours = np.asarray(jlora.lora(lambda s, i: nnx.merge(graphdef, s)(i))(lp, jnp.asarray(ids)))
    pm = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(path), adapter).eval()
    assert np.abs(ours - _torch_logits(pm, ids)).max() <= 1e-4


def test_lora_explained():
    out = run_notebook("lora_explained.ipynb", sys.executable)
    text = check_lora_explained(out)
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=True, max_position_embeddings=40960)
    with torch.device("meta"):
        tm = transformers.Qwen3ForCausalLM(cfg)
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS))
    assert count_row(text, 8) == tuple(pm.get_nb_trainable_parameters())
