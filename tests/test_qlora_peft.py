"""QLoRA interoperability with PEFT + bitsandbytes on CPU, both directions.

A tiny Llama (every in_features a multiple of 64, where bitsandbytes' CPU matmul is
right) is built once in torch; its decoder ``nn.Linear`` layers are replaced by
``bnb.nn.Linear4bit`` (nf4, double quantization, fp32 compute) holding the same
weights, and the model marked ``is_loaded_in_4bit`` so that PEFT wraps them with its
QLoRA layers (reference §9.7). The Flax side is the same checkpoint through
``FlaxLlamaForCausalLM.from_pretrained(from_pt=True)``, quantized by ``jlora.quantize``.

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
from jlora import quant_io

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
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=double_quant,
                                          quant_type="nf4")
                    q.load_state_dict(child.state_dict())
                    setattr(parent, name, q.to("cpu"))  # quantized here
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches on it
    return model


class Case:
    def __init__(self, root, double_quant: bool):
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                       max_position_embeddings=32)
        torch.manual_seed(0)
        base_dir = root / "base"
        transformers.LlamaForCausalLM(cfg).eval().save_pretrained(base_dir, safe_serialization=True)
        fm = transformers.FlaxLlamaForCausalLM.from_pretrained(base_dir, from_pt=True)
        self.base_dir, self.double_quant = base_dir, double_quant
        self.apply = lambda p, ids: fm(ids, params=p).logits  # noqa: E731
        self.qconfig = jlora.QuantConfig(quant_type="nf4", double_quant=double_quant, compute_dtype=jnp.float32)
        self.q = jlora.quantize(fm.params, self.qconfig)

    def bnb_model(self):
        return _to_4bit(transformers.LlamaForCausalLM.from_pretrained(self.base_dir).eval(), self.double_quant)

    def peft_logits(self, model) -> np.ndarray:
        """The model's logits, run in training mode (no dropout anywhere here): in eval
        mode without gradients, bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks each 4-bit
        weight for its CPU kernel and rounds the scales to bfloat16 (quant_state.dtype
        becomes bfloat16), so it no longer computes x·dequantize_4bit(W)ᵀ."""
        model.train()
        with torch.no_grad():
            return model(input_ids=torch.tensor(IDS.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module", params=[True, False], ids=["nf4_dq", "nf4"])
def case(request, tmp_path_factory):
    return Case(tmp_path_factory.mktemp("qlora_peft"), request.param)


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
    got = jax.jit(jlora.lora(case.apply, on_materialize="error"))(lp, IDS)
    # the same codes; with double quantization the offset (a float32 mean) can differ by
    # an ulp between torch and XLA, moving a rare absmax code (see test_quantization.py)
    assert rel_err(got, ref) < (1e-3 if case.double_quant else 2e-5)

    # bitsandbytes' own bytes loaded into jlora: the exact base PEFT saw
    bnb_q = jax.tree_util.tree_map(lambda x: x, case.q)  # new containers, same arrays
    layers = pm.base_model.model.model.layers
    for i, layer in enumerate(layers):
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                mod = getattr(getattr(layer, group), n)
                base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
                qa = quant_io.from_bnb_state_dict(base.state_dict(), compute_dtype=jnp.float32)
                bnb_q["model"]["layers"][str(i)][group][n]["kernel"] = qa
    lp_exact = jlora.load_peft(tmp_path / "peft", bnb_q)
    exact = jax.jit(jlora.lora(case.apply, on_materialize="error"))(lp_exact, IDS)
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
    got = np.asarray(jax.jit(forward)(lp, IDS))
    jlora.save_peft(tmp_path / "jlora", lp, config=config)
    pm = peft.PeftModel.from_pretrained(case.bnb_model(), tmp_path / "jlora")
    assert isinstance(pm.base_model.model.model.layers[1].mlp.down_proj, peft.tuners.lora.bnb.Linear4bit)
    assert rel_err(got, case.peft_logits(pm)) < (1e-3 if case.double_quant else 2e-5)

    if not case.double_quant:
        return
    # PEFT's merge into the 4-bit base re-quantizes; jlora's requantize=True does the same
    with pytest.warns(UserWarning):
        merged_q = jlora.merge(lp, requantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_pm = pm.merge_and_unload()
    theirs = merged_pm.model.layers[0].self_attn.q_proj.weight.data.reshape(-1).numpy()
    ours = np.asarray(merged_q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].codes)
    assert np.mean(ours == theirs) > 0.999
