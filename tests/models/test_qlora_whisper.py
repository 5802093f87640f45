"""The seeds' case: LoRA on Whisper large-v2 over an 8-bit base.

``print_trainable_parameters`` over the quantized base counts parameters, not bytes, and
prints the line PEFT prints for the same ``LoraConfig`` (computed here on a meta-device
torch ``WhisperForConditionalGeneration``: nothing is allocated on either side; the JAX
tree is ``jax.eval_shape`` of HF Flax Whisper's init, quantized and wrapped abstractly).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import jax
import jax.numpy as jnp
import pytest

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

# openai/whisper-large-v2's architecture (config.json), written out: nothing is downloaded
LARGE_V2 = dict(
    vocab_size=51865, num_mel_bins=80, d_model=1280, encoder_layers=32, decoder_layers=32,
    encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
    max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
    eos_token_id=50257, decoder_start_token_id=50258,
)
LORA = dict(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none")


def test_whisper_large_v2_int8_trainable_parameters_line_is_peft_s():
    cfg = transformers.WhisperConfig(**LARGE_V2)
    with torch.device("meta"):
        torch_model = transformers.WhisperForConditionalGeneration(cfg)
    peft_out = io.StringIO()
    with contextlib.redirect_stdout(peft_out):
        peft.get_peft_model(torch_model, peft.LoraConfig(**LORA)).print_trainable_parameters()

    flax_model = transformers.FlaxWhisperForConditionalGeneration(cfg, _do_init=False)
    shapes = jax.eval_shape(lambda key: flax_model.init_weights(key, flax_model.input_shape), jax.random.key(0))
    q = jlora.quantize(shapes, jlora.QuantConfig(quant_type="int8", compute_dtype=jnp.float16))
    kernels = jlora.quant.quantized_leaves(q)
    # the 64 layers' attention and MLP linears (not the convolutions, embeddings or head)
    assert len(kernels) == 32 * 6 + 32 * 10
    assert all(isinstance(k.codes, jax.ShapeDtypeStruct) for _, k in kernels)
    lp = jlora.wrap(q, jlora.LoraConfig(**LORA))
    ours = io.StringIO()
    with contextlib.redirect_stdout(ours):
        jlora.print_trainable_parameters(lp)
    assert ours.getvalue() == peft_out.getvalue()
