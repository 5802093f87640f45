"""QLoRA interoperability with PEFT + bitsandbytes on CPU, both directions.

A tiny Llama (every in_features a multiple of 64, where bitsandbytes' CPU matmul is
right) is built once (HF Flax init, copied into torch); its decoder ``nn.Linear`` layers are replaced by
``bnb.nn.Linear4bit`` (nf4, double quantization, fp32 compute) holding the same
weights, and the model marked ``is_loaded_in_4bit`` so that PEFT wraps them with its
QLoRA layers (reference §9.7). The Flax side holds the same weights, quantized by
``jlora.quantize``.

References: PEFT's logits on the bitsandbytes model (PEFT-trained adapter loaded in jlora;
jlora-trained adapter loaded in PEFT), and PEFT's ``merge_and_unload`` re-quantized
weight for ``jlora.merge(requantize=True)``.
"""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.io import quant_storage

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = np.random.default_rng(0).integers(1, 100, (2, 8)).astype(np.int32)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _to_4bit(model, double_quant: bool):
    """Every decoder nn.Linear replaced by a bnb Linear4bit holding the same weight."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=double_quant,
                                          quant_type="nf4")
                    q.load_state_dict(child.state_dict())
                    setattr(parent, name, q.to("cpu"))  # quantized here
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches on it
    return model


class Case:
    def __init__(self, double_quant: bool):
        self.cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            max_position_embeddings=32)
        fm = transformers.FlaxLlamaForCausalLM(self.cfg, _do_init=False)
        params = jax.jit(fm.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
        from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

        torch_model = transformers.LlamaForCausalLM(self.cfg)
        torch_model = load_flax_weights_in_pytorch_model(torch_model, jax.tree_util.tree_map(np.array, params))
        self.torch_state = {k: v.clone() for k, v in torch_model.state_dict().items()}
        self.double_quant = double_quant
        self.apply = lambda p, ids: fm(ids, params=p).logits  # noqa: E731
        self.forward = jax.jit(jlora.lora(self.apply, on_materialize="error"))
        self.qconfig = jlora.QuantConfig(quant_type="nf4", double_quant=double_quant, compute_dtype=jnp.float32)
        self.q = jlora.quantize(params, self.qconfig)

    def bnb_model(self):
        model = transformers.LlamaForCausalLM(self.cfg)
        model.load_state_dict(self.torch_state)
        return _to_4bit(model.eval(), self.double_quant)

    def peft_logits(self, model) -> np.ndarray:
        """The model's logits, run in training mode (no dropout anywhere here): in eval
        mode without gradients, bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks each 4-bit
        weight for its CPU kernel and rounds the scales to bfloat16 (quant_state.dtype
        becomes bfloat16), so it no longer computes x·dequantize_4bit(W)ᵀ."""
        model.train()
        with torch.no_grad():
            return model(input_ids=torch.tensor(IDS.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def case():
    return Case(double_quant=True)


def _decoder_linears(model):
    """``(layer index, "self_attn" | "mlp", name, module)`` of every decoder linear."""
    for i, layer in enumerate(model.model.layers):
        for group in ("self_attn", "mlp"):
            for name, child in getattr(layer, group).named_children():
                if isinstance(child, (torch.nn.Linear, bnb.nn.Linear4bit)) or hasattr(child, "get_base_layer"):
                    yield i, group, name, child


def _with_jlora_bytes(model, q):
    """The bnb model's 4-bit layers holding jlora's quantized kernels, byte for byte."""
    for i, group, name, mod in _decoder_linears(model):
        sd = quant_storage.to_bnb_state_dict(q["model"]["layers"][str(i)][group][name]["kernel"])
        stats = {k[len("weight."):]: torch.from_numpy(np.array(v)) for k, v in sd.items() if k.startswith("weight.")}
        mod.weight = bnb.nn.Params4bit.from_prequantized(torch.from_numpy(np.array(sd["weight"])), stats,
                                                          device="cpu", module=mod)
    return model


def test_peft_trained_qlora_adapter_loads_in_jlora(case, tmp_path):
    torch.manual_seed(1)
    pm = peft.get_peft_model(case.bnb_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               lora_dropout=0.0, init_lora_weights=False))
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(IDS.astype(np.int64))
    for _ in range(2):  # PEFT trains the adapter over the 4-bit base
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    ref = case.peft_logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    lp = jlora.load_peft(tmp_path / "peft", case.q)
    assert isinstance(jlora.lora_leaves(lp)[0][1].w, jlora.QuantizedArray)
    got = case.forward(lp, IDS)
    # the same codes; with double quantization the offset (a float32 mean) can differ by
    # an ulp between torch and XLA, and bnb's native CPU blockwise kernel now and then picks
    # the second-nearest absmax code (see test_quantization.py): a rare block differs
    assert rel_err(got, ref) < 1e-3

    # bitsandbytes' own bytes loaded into jlora: the exact base PEFT saw
    bnb_q = jax.tree_util.tree_map(lambda x: x, case.q)  # new containers, same arrays
    for i, group, name, mod in _decoder_linears(pm.base_model.model):
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        bnb_q["model"]["layers"][str(i)][group][name]["kernel"] = quant_storage.from_bnb_state_dict(
            base.state_dict(), compute_dtype=jnp.float32)
    lp_exact = jlora.load_peft(tmp_path / "peft", bnb_q)
    exact = case.forward(lp_exact, IDS)
    assert rel_err(exact, ref) < 2e-5


def test_jlora_trained_qlora_adapter_loads_in_peft(case, tmp_path):
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    lp = jlora.wrap(case.q, config, rng=jax.random.key(3))
    forward = jlora.lora(case.apply, on_materialize="error")

    def loss_fn(t, frozen):
        logits = forward(jlora.combine(t, frozen), IDS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

    trainable, frozen = jlora.partition(lp)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    @jax.jit
    def step(t, s):
        updates, s = tx.update(jax.grad(loss_fn)(t, frozen), s, t)
        return optax.apply_updates(t, updates), s

    for _ in range(3):
        trainable, state = step(trainable, state)
    lp = jlora.combine(trainable, frozen)
    got = np.asarray(case.forward(lp, IDS))
    jlora.save_peft(tmp_path / "jlora", lp, config=config)
    # PEFT on the bnb model quantized by bitsandbytes itself (the same codes but for a
    # rare double-quantization absmax code), and on bnb layers holding jlora's bytes
    pm = peft.PeftModel.from_pretrained(case.bnb_model(), tmp_path / "jlora")
    assert isinstance(pm.base_model.model.model.layers[1].mlp.down_proj, peft.tuners.lora.bnb.Linear4bit)
    assert rel_err(got, case.peft_logits(pm)) < 1e-3
    exact = peft.PeftModel.from_pretrained(_with_jlora_bytes(case.bnb_model(), case.q), tmp_path / "jlora")
    assert rel_err(got, case.peft_logits(exact)) < 2e-5

    # PEFT's merge into the 4-bit base re-quantizes; jlora's requantize=True does the same
    with pytest.warns(UserWarning):
        merged_q = jlora.merge(lp, requantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_pm = pm.merge_and_unload()
    theirs = merged_pm.model.layers[0].self_attn.q_proj.weight.data.reshape(-1).numpy()
    ours = np.asarray(merged_q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].codes).reshape(-1)
    assert np.mean(ours == theirs) > 0.999
