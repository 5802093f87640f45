"""Tiny Qwen3 / Llama 3 / Gemma 3 models shared by the NNX family tests: the torch
transformers model (random weights, float32) and the jlora.models NNX model loaded from
it. Built once per process (``functools.lru_cache``)."""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

FAMILIES = ("qwen3", "llama3", "gemma3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The NNX module names of the same seven projections.
NNX_TARGETS = {
    "qwen3": TARGETS,
    "llama3": TARGETS,
    "gemma3": ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"],
}
VOCAB = 100


def hf_config(family: str, **kw: Any):
    import transformers as tr

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    if family == "qwen3":
        return tr.Qwen3Config(**{**common, "head_dim": 8, "tie_word_embeddings": False, "rope_theta": 10000.0, **kw})
    if family == "llama3":
        # Llama 3.1's RoPE scaling with a short original context, so that every branch of
        # the frequency interpolation is exercised at head_dim 8; tied embeddings.
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
        return tr.LlamaConfig(**{**common, "rope_scaling": rope, "tie_word_embeddings": True, **kw})
    if family == "gemma3":
        return tr.Gemma3TextConfig(**{
            **common, "num_hidden_layers": 3, "head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_local_base_freq": 100.0,
            "rope_theta": 10000.0, "final_logit_softcapping": 5.0, "attn_implementation": "eager", **kw,
        })
    raise ValueError(family)


def torch_class(family: str):
    import transformers as tr

    return {"qwen3": tr.Qwen3ForCausalLM, "llama3": tr.LlamaForCausalLM, "gemma3": tr.Gemma3ForCausalLM}[family]


def randomize(model, family: str, seed: int = 0):
    """Weights large enough that every mapping mistake shows in the logits (norm weights
    away from identity too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


@dataclasses.dataclass
class FamilyCase:
    family: str
    torch_model: Any          # the base torch model (never wrapped by PEFT)
    base_state: dict          # its state dict (copy)
    model: Any                # the NNX model loaded from it
    graphdef: Any
    state: Any                # nnx.State of the model
    ids: np.ndarray
    apply: Callable           # apply(state, ids) -> logits

    def fresh_torch(self):
        m = torch_class(self.family)(hf_config(self.family))
        m.load_state_dict(self.base_state)
        return m.eval()


@functools.lru_cache(maxsize=None)
def case(family: str) -> FamilyCase:
    import torch
    from flax import nnx

    import jlora.models as jm

    torch.manual_seed(0)
    tm = randomize(torch_class(family)(hf_config(family)), family)
    model = jm.from_torch(tm)
    graphdef, state = nnx.split(model)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 10))

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    return FamilyCase(family, tm, copy.deepcopy(tm.state_dict()), model, graphdef, state, ids, apply)


def torch_logits(model, ids, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def peft_adapter(family: str) -> tuple[str, np.ndarray]:
    """A PEFT adapter with non-zero factors on all seven projections (its directory) and
    PEFT's logits on the case's ids."""
    import peft
    import torch

    c = case(family)
    torch.manual_seed(1)  # PEFT draws the factors from torch's global generator: the same adapter in any test order
    pm = peft.get_peft_model(
        c.fresh_torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    d = tempfile.mkdtemp(prefix=f"jlora-peft-{family}-")
    atexit.register(shutil.rmtree, d, True)
    pm.save_pretrained(d)
    return d, torch_logits(pm, c.ids)

