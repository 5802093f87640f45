"""QLoRA on Whisper: LoRA on q_proj/v_proj over a 4-bit (NF4) or 8-bit frozen base.

The seeds fine-tune Whisper large-v2 with LoRA over an 8-bit base because the full model
does not fit; this is the same recipe on a small Whisper, end to end, offline:

1. A small HF Flax Whisper is created (random weights, a stand-in for a checkpoint) and
   read into PyTorch's Whisper, so both frameworks hold the same base.
2. ``jlora.quantize`` stores its linear layers as bitsandbytes does (NF4 + double
   quantization, or LLM.int8 rows); the convolutions, embeddings and norms stay as they are.
3. LoRA (r=8, q_proj and v_proj, dropout 0.05) is trained with ``jlora.lora`` on log-mel
   features of synthesised audio (tones and chirps, labelled by a "word" per kind): each
   quantized kernel is dequantized where it is used and recomputed in the backward pass,
   so the step holds the packed base, not a dequantized copy.
4. The adapter is written in PEFT's format and loaded by PEFT on the PyTorch Whisper whose
   linear weights are the dequantized base (and, for NF4, on bitsandbytes ``Linear4bit``
   layers holding jlora's bytes); the logits match jlora's.

    python examples/whisper_qlora.py                 # NF4 base
    python examples/whisper_qlora.py --quant int8    # LLM.int8 base
    python examples/whisper_qlora.py --smoke         # CI
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import jlora
from jlora.io import quant_storage

SR = 16_000
WORDS = ["low", "high", "up", "down"]  # a steady low tone, a steady high tone, a rising / falling chirp


def whisper_config(smoke: bool) -> transformers.WhisperConfig:
    width = 64 if smoke else 128  # in_features multiples of 64 (bitsandbytes' CPU kernels)
    layers = 1 if smoke else 2
    return transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=width, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
        max_source_positions=100, max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=1,
        decoder_start_token_id=2, suppress_tokens=None, begin_suppress_tokens=None, dropout=0.0,
    )


def clip(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Two seconds of audio: a tone or a chirp, at a random pitch and level, in noise."""
    t = np.arange(2 * SR) / SR
    if kind == 0:
        phase = 2 * np.pi * rng.uniform(200, 500) * t
    elif kind == 1:
        phase = 2 * np.pi * rng.uniform(2000, 3500) * t
    else:
        f0, f1 = sorted(rng.uniform(300, 3500, 2))
        if kind == 3:
            f0, f1 = f1, f0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / 4)  # linear sweep over 2 s
    audio = rng.uniform(0.2, 0.8) * np.sin(phase) + 0.05 * rng.standard_normal(t.shape)
    return audio.astype(np.float32)


def dataset(n: int, seed: int, extractor) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kinds = np.arange(n) % len(WORDS)
    feats = extractor([clip(int(k), rng) for k in kinds], sampling_rate=SR, return_tensors="np").input_features
    return feats.astype(np.float32), kinds.astype(np.int32)


def word_token(kinds):
    return 10 + kinds  # the "word" tokens 10..13


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", choices=["nf4", "int8"], default="nf4")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    args = ap.parse_args(argv)
    steps = 4 if args.smoke else args.steps
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="whisper_qlora_")
    cfg = whisper_config(args.smoke)

    # 1. the same base in Flax and in PyTorch (random weights: the Flax init, jitted)
    model = transformers.FlaxWhisperForConditionalGeneration(cfg, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), model.input_shape)

    # 2. quantize the linear layers
    qconfig = jlora.QuantConfig(quant_type=args.quant, double_quant=True, compute_dtype=jnp.float32)
    base = jlora.quantize(params, qconfig)
    summary = jlora.quant.quantization_summary(base)
    dense_bytes = 4 * summary["parameters"]
    print(f"quantized {summary['quantized_kernels']} kernels ({args.quant}): {summary['bytes']:,d} bytes "
          f"vs {dense_bytes:,d} in float32 ({summary['bits_per_parameter']:.2f} bits/parameter)")

    # 3. LoRA on q_proj / v_proj, trained on synthesised audio
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    lp = jlora.wrap(base, config, rng=jax.random.key(1))
    jlora.print_trainable_parameters(lp)

    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    train_x, train_y = dataset(32 if args.smoke else 256, 0, extractor)
    test_x, test_y = dataset(8 if args.smoke else 64, 1, extractor)
    start = cfg.decoder_start_token_id
    forward = jlora.lora(lambda p, feats, dec: model(feats, dec, params=p).logits, on_materialize="error")

    def decoder_ids(kinds):
        return jnp.stack([jnp.full_like(kinds, start), word_token(kinds)], axis=1)  # [start, word]

    def loss_fn(t, frozen, feats, kinds, key):
        logits = forward(jlora.combine(t, frozen), feats, decoder_ids(kinds), lora_rng=key)
        targets = jnp.stack([word_token(kinds), jnp.full_like(kinds, cfg.eos_token_id)], axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    trainable, frozen = jlora.partition(lp)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(t, s, feats, kinds, key):
        loss, g = jax.value_and_grad(loss_fn)(t, frozen, feats, kinds, key)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s, loss

    @jax.jit
    def evaluate(t, feats, kinds):
        logits = forward(jlora.combine(t, frozen), feats, decoder_ids(kinds))
        words = jnp.argmax(logits[:, 0, 10:10 + len(WORDS)], axis=-1)
        targets = jnp.stack([word_token(kinds), jnp.full_like(kinds, cfg.eos_token_id)], axis=1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, jnp.mean(words == kinds), logits

    loss0, acc0, _ = evaluate(trainable, test_x, test_y)
    rng = np.random.default_rng(2)
    batch = 8 if args.smoke else 16
    for i in range(steps):
        idx = rng.choice(len(train_y), batch, replace=False)
        trainable, opt_state, loss = step(trainable, opt_state, train_x[idx], train_y[idx], jax.random.key(100 + i))
    loss1, acc1, ours = evaluate(trainable, test_x, test_y)
    print(f"held-out loss: {float(loss0):.4f} -> {float(loss1):.4f}; word accuracy {float(acc0):.2f} -> {float(acc1):.2f}")
    lp = jlora.combine(trainable, frozen)
    same_base = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                    zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(jlora.unload(lp))))
    print(f"quantized base bit-identical after training: {same_base}")

    # 4. the adapter in PEFT's format, loaded by PEFT on the PyTorch Whisper
    adapter_dir = os.path.join(out_dir, "adapter")
    jlora.save_peft(adapter_dir, lp, config=config)
    ours = np.asarray(ours)
    result = {"loss": (float(loss0), float(loss1)), "accuracy": (float(acc0), float(acc1))}
    result["peft_dense"] = _peft_logits(cfg, params, adapter_dir, base, test_x, decoder_ids(test_y), bnb=False)
    if args.quant == "nf4":
        result["peft_bnb"] = _peft_logits(cfg, params, adapter_dir, base, test_x, decoder_ids(test_y), bnb=True)
    for name, theirs in [(k, v) for k, v in result.items() if k.startswith("peft")]:
        diff = float(np.max(np.abs(theirs - ours)))
        scale = float(np.max(np.abs(ours)))
        what = "bitsandbytes Linear4bit" if name == "peft_bnb" else "dequantized linears"
        print(f"PEFT on torch Whisper ({what}) matches jlora: {diff <= 1e-4 * scale} (max |diff| {diff:.2e})")
        result[name] = diff / scale
    return result


def _peft_logits(cfg, params, adapter_dir, base, feats, dec_ids, bnb: bool) -> np.ndarray:
    """PEFT's logits for the adapter on the PyTorch Whisper with the Flax model's weights,
    whose quantized linears hold jlora's base: its dequantized values, or (``bnb``) its
    bytes in bitsandbytes ``Linear4bit`` layers."""
    import peft
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    tm = load_flax_weights_in_pytorch_model(transformers.WhisperForConditionalGeneration(cfg),
                                            jax.tree_util.tree_map(np.array, params))
    for path, q in jlora.quant.quantized_leaves(base):
        name = path.replace("/", ".").removesuffix(".kernel")  # model.encoder.layers.0.self_attn.q_proj
        parent_name, _, child_name = name.rpartition(".")
        parent = tm.get_submodule(parent_name)
        old = getattr(parent, child_name)
        if bnb:
            import bitsandbytes as bnb_lib

            layer = bnb_lib.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                          compute_dtype=torch.float32, quant_type=q.quant_type,
                                          compress_statistics=q.double_quant)
            stats = {k[len("weight."):]: torch.from_numpy(np.array(v)) for k, v in quant_storage.to_bnb_state_dict(q).items()
                     if k.startswith("weight.")}
            weight = np.array(quant_storage.to_bnb_state_dict(q)["weight"])
            layer.weight = bnb_lib.nn.Params4bit.from_prequantized(torch.from_numpy(weight), stats, device="cpu",
                                                                    module=layer)
            if old.bias is not None:
                layer.bias = old.bias
            setattr(parent, child_name, layer)
        else:
            with torch.no_grad():
                old.weight.copy_(torch.from_numpy(np.asarray(q.dequantize(jnp.float32)).T.copy()))
    if bnb:
        tm.is_loaded_in_4bit = True  # PEFT then wraps the bnb layers with its QLoRA layers
    pm = peft.PeftModel.from_pretrained(tm, adapter_dir).eval()  # eval: no LoRA dropout
    if bnb:
        # bitsandbytes' layers in training mode: in eval mode (without gradients) its CPU
        # kernel repacks the weights and rounds the scales to bfloat16
        for m in pm.modules():
            if isinstance(m, bnb_lib.nn.Linear4bit):
                m.train()
    with torch.no_grad():
        out = pm(input_features=torch.from_numpy(np.asarray(feats)),
                 decoder_input_ids=torch.from_numpy(np.asarray(dec_ids, np.int64)))
    return out.logits.numpy()


if __name__ == "__main__":
    main()
