"""Torch twins of the tiny Flax models in ``models.py`` (same weights, copied through
jlora.name_maps.hf's name rules) and PEFT <-> jlora tensor maps, for the DoRA/PiSSA/OLoRA tests."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

import jlora
from jlora import hf
from jlora.io.peft import peft_tensors
from jlora.io.records import adapter_from_tree
from jlora.core.paths import path_names

IDS = np.random.RandomState(0).randint(3, 90, size=(2, 7))


def torch_state(params: Any) -> dict:
    """``{torch name: tensor}`` of a Flax HF tree (transformers' layout rules)."""
    import torch

    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(p)
        v = np.array(hf.param_to_torch(names, np.asarray(x)))
        bf16 = v.dtype.name == "bfloat16"
        t = torch.tensor(v.astype(np.float32) if bf16 else v)
        out[hf.torch_param_name(names)] = t.to(torch.bfloat16) if bf16 else t
    return out


def torch_twin(case) -> Any:
    """The transformers PyTorch model with the Flax case's config and weights (eval mode)."""
    import transformers

    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}[case.name]
    model = cls(case.model.config).eval()
    missing, unexpected = model.load_state_dict(torch_state(case.params), strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing  # tied to the embedding in GPT-2
    return model


def torch_logits(model, ids=IDS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@functools.lru_cache(maxsize=None)
def jitted(apply):
    return jax.jit(jlora.lora(apply, on_materialize="error"))


def peft_named(pm, what: str = "data") -> dict:
    """PEFT's adapter tensors (``.data`` or ``.grad``) under their file names
    (``...lora_A.weight``, ``...lora_magnitude_vector``) for the ``default`` adapter."""
    out = {}
    for n, p in pm.named_parameters():
        if "lora_" not in n:
            continue
        key = n.replace(".default.weight", ".weight").replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        key = key.replace(".default", "")
        x = getattr(p, what)
        out[key] = None if x is None else x.detach().numpy().copy()
    return out


def jlora_named(lp: Any) -> dict:
    """jlora's adapter tensors under PEFT's file names (via the PEFT exporter)."""
    return peft_tensors(adapter_from_tree(lp))


def perturb_magnitudes(pm) -> None:
    """Multiplies every DoRA magnitude by linspace(0.5, 1.5): otherwise DoRA is plain LoRA
    with the same A and B (m = ‖W + s·ΔW‖ at creation)."""
    import torch

    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                flat = p.view(-1)
                flat.mul_(torch.linspace(0.5, 1.5, flat.numel()))


def perturb_tree_magnitudes(lp: Any) -> Any:
    import jax.numpy as jnp

    def f(x):
        if isinstance(x, jlora.LoraWeight) and x.magnitude is not None:
            n = x.magnitude.size
            return x.replace(magnitude=x.magnitude * jnp.linspace(0.5, 1.5, n).reshape(x.magnitude.shape))
        if isinstance(x, jlora.MultiLoraWeight):
            return x.replace(adapters={k: f(v) for k, v in x.adapters.items()})
        return x

    return jax.tree_util.tree_map(f, lp, is_leaf=lambda x: isinstance(x, (jlora.LoraWeight, jlora.MultiLoraWeight,
                                                                          jlora.Trainable)))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
