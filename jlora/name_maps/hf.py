"""Hugging Face knowledge: PEFT's default targets and the Flax ↔ PyTorch name map.

This module is knowledge, not machinery: which modules PEFT adapts by default for a
model type, and how a Flax parameter path and array layout correspond to a PyTorch
state-dict name and tensor layout. The rules are transformers' own
(``modeling_flax_pytorch_utils``), and hold for every Hugging Face Flax model whose
module tree mirrors its PyTorch twin (GPT-2, Llama, Mistral, BERT, RoBERTa, T5, OPT,
Whisper, ... are checked in the tests):

=====================================  =========================================
Flax leaf                              PyTorch
=====================================  =========================================
``a/b/kernel`` (2-D, 3-D)              ``a.b.weight``, axes reversed (``kernel.T``)
``a/b/kernel`` (4-D conv, h w in out)  ``a.b.weight`` (out in h w)
``a/b/embedding``                      ``a.b.weight``, same layout
``a/b/scale`` (norms)                  ``a.b.weight``
``a/b/bias``                           ``a.b.bias``
``a/b/mean`` / ``a/b/var``             ``a.b.running_mean`` / ``a.b.running_var``
=====================================  =========================================

Layer lists are dict keys ``"0"``, ``"1"``, ... in Flax and ``.0.``, ``.1.`` in PyTorch,
so joining the Flax path with ``.`` gives the PyTorch module name. GPT-2's ``Conv1D``
needs no special case: its PyTorch weight is (in, out) and the Flax kernel (out, in),
the same transpose. The ``base_model_prefix`` (``transformer``, ``model``, ``bert``,
...) may be present on one side and not on the other (a ``FlaxBertModel`` has no
``bert`` level, a PyTorch ``BertForSequenceClassification`` has one); readers resolve
that by adding or removing one leading name, as transformers does.

Kernels stacked by ``nn.scan`` (a leading ``"stack"`` axis) have no single PyTorch
module: their layer ``i`` is named by inserting ``i`` after the *stack container*,
the shortest path prefix under which every array has the same leading axis, e.g.
``layers/query/kernel`` of shape (3, 32, 4, 8) → ``layers.0.query`` ...
``layers.2.query``. A user ``name_map`` may instead return a name with ``{layer}``.

These rules are the ``"hf"`` map of :mod:`jlora.name_maps`, where the maps for NNX
model families (Qwen3, Llama 3, Gemma 3 laid out like tunix / bonsai) live too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

__all__ = [
    "PEFT_TARGET_MODULES",
    "default_target_modules",
    "torch_param_name",
    "kernel_to_torch",
    "kernel_from_torch",
    "param_to_torch",
    "param_from_torch",
    "module_kind",
    "NameMap",
    "TorchNames",
]

# PEFT's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (peft 0.21), by model_type.
PEFT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
}


def default_target_modules(model_type: str) -> Union[list[str], str]:
    """PEFT's default ``target_modules`` for a transformers ``model_type``.

    >>> default_target_modules("llama")
    ['q_proj', 'v_proj']
    >>> default_target_modules(model.config.model_type)   # doctest: +SKIP
    """
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a str such as 'llama', got {type(model_type).__name__}")
    if model_type not in PEFT_TARGET_MODULES:
        raise ValueError(
            f"model_type {model_type!r} has no default target_modules in PEFT; name them, e.g. "
            f"target_modules=['q_proj', 'v_proj'], or 'all-linear'. Known types: {sorted(PEFT_TARGET_MODULES)}"
        )
    value = PEFT_TARGET_MODULES[model_type]
    return list(value) if isinstance(value, list) else value


# The Flax <-> PyTorch rules live with the other name maps (jlora.name_maps); these names
# stay importable from here.
from .lookup import NameMapSpec as NameMap  # noqa: E402
from .rules import (  # noqa: E402
    HFNames as TorchNames,
    kernel_from_torch,
    kernel_to_torch,
    module_kind,
    torch_param_name,
)


def param_to_torch(names: Sequence[str], value: Any) -> np.ndarray:
    """A Flax parameter in PyTorch layout (only ``kernel`` leaves change)."""
    return kernel_to_torch(value) if tuple(names)[-1] == "kernel" else np.asarray(value)


def param_from_torch(names: Sequence[str], value: Any) -> np.ndarray:
    """A PyTorch tensor (as numpy) in the Flax layout of the leaf at ``names``."""
    return kernel_from_torch(value) if tuple(names)[-1] == "kernel" else np.asarray(value)


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.x.y`` → ``x.y`` (PEFT's wrapper prefix)."""
    return re.sub(r"^base_model\.model\.", "", key)
