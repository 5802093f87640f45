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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

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


_RENAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_param_name(names: Sequence[str]) -> str:
    """The PyTorch state-dict name of a Flax parameter path.

    >>> torch_param_name(("transformer", "h", "0", "attn", "c_attn", "kernel"))
    'transformer.h.0.attn.c_attn.weight'
    """
    names = tuple(names)
    if not names:
        raise ValueError("empty parameter path")
    return ".".join(names[:-1] + (_RENAME.get(names[-1], names[-1]),))


def kernel_to_torch(kernel: Any) -> np.ndarray:
    """A Flax ``kernel`` in PyTorch's ``weight`` layout: (h, w, in, out) → (out, in, h, w)
    for 4-D convolutions, all axes reversed otherwise ((in, out) → (out, in); GPT-2's
    (out, in) → (in, out); 1-D conv (k, in, out) → (out, in, k))."""
    x = np.asarray(kernel)
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T


def kernel_from_torch(weight: Any) -> np.ndarray:
    """Inverse of :func:`kernel_to_torch`."""
    x = np.asarray(weight)
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T


def param_to_torch(names: Sequence[str], value: Any) -> np.ndarray:
    """A Flax parameter in PyTorch layout (only ``kernel`` leaves change)."""
    return kernel_to_torch(value) if tuple(names)[-1] == "kernel" else np.asarray(value)


def param_from_torch(names: Sequence[str], value: Any) -> np.ndarray:
    """A PyTorch tensor (as numpy) in the Flax layout of the leaf at ``names``."""
    return kernel_from_torch(value) if tuple(names)[-1] == "kernel" else np.asarray(value)


def module_kind(names: Sequence[str], layout: Sequence[str]) -> str:
    """Which PEFT LoRA layer a Flax kernel corresponds to: ``"embedding"``
    (``lora_embedding_A/B``), ``"conv"`` (``nn.ConvNd``: a kernel (*spatial, in, out) in a
    module whose name contains ``conv``, with 3+ non-stack axes) or ``"linear"``
    (``nn.Linear``/``Conv1D``; multi-axis DenseGeneral kernels flatten their in and out
    axes in row-major order)."""
    names = tuple(names)
    roles = tuple(r for r in layout if r != "stack")
    if names[-1] == "embedding":
        return "embedding"
    module = names[-2] if len(names) >= 2 else ""
    if len(roles) >= 3 and "conv" in module.lower() and roles == ("in",) * (len(roles) - 1) + ("out",):
        return "conv"
    return "linear"


NameMap = Union[None, Mapping[str, str], Callable[[str], Optional[str]]]


def _shape(x: Any) -> Optional[tuple[int, ...]]:
    s = getattr(x, "shape", None)
    return tuple(int(d) for d in s) if s is not None else None


class TorchNames:
    """PyTorch names for the leaves of one parameter tree.

    Built from ``[(names, shape, n_stack)]`` for every array leaf of the tree (``n_stack``
    is the number of leading stack axes of a LoRA kernel, 0 otherwise) so that stacked
    kernels can be split into per-layer modules (see the module docstring).

    Args:
      leaves: every array leaf of the tree as ``(names, shape, n_stack)``.
      name_map: ``{flax module path: torch module path}`` (``.``-joined, e.g.
        ``"encoder.layers.query"``) or a function returning the torch module path or
        ``None`` for the default rule. For stacked kernels the result must hold
        ``{layer}``.
      prefix: a module path prepended to every torch name (e.g. ``"bert"`` to address a
        ``BertForSequenceClassification`` from ``FlaxBertModel`` parameters).
    """

    def __init__(
        self,
        leaves: Sequence[tuple[tuple[str, ...], Optional[tuple[int, ...]], int]],
        name_map: NameMap = None,
        prefix: Optional[str] = None,
    ):
        if name_map is not None and not (callable(name_map) or isinstance(name_map, Mapping)):
            raise TypeError(f"name_map must be a dict or a function, got {type(name_map).__name__}")
        self.name_map = name_map
        self.prefix = (prefix or "").strip(".")
        self._leaves = [(tuple(n), s) for n, s, _ in leaves]
        # Stack containers: {prefix names: stack size}
        self.containers: dict[tuple[str, ...], int] = {}
        for names, shape, n_stack in leaves:
            if n_stack:
                if n_stack != 1:
                    raise ValueError(
                        f"{'/'.join(names)}: {n_stack} stack axes; only one leading stack axis maps to PyTorch layers"
                    )
                self.containers[self._container(tuple(names), shape[0])] = shape[0]

    def _container(self, names: tuple[str, ...], size: int) -> tuple[str, ...]:
        for j in range(1, len(names)):
            prefix = names[:j]
            under = [s for n, s in self._leaves if n[:j] == prefix]
            if under and all(s is not None and len(s) >= 1 and s[0] == size for s in under):
                return prefix
        return names[:-1]

    def stack_of(self, names: Sequence[str]) -> Optional[tuple[tuple[str, ...], int]]:
        """``(container, size)`` when the leaf at ``names`` lives in a stacked container."""
        names = tuple(names)
        best = None
        for c, size in self.containers.items():
            if names[: len(c)] == c and (best is None or len(c) < len(best[0])):
                best = (c, size)
        return best

    def _mapped(self, module: str) -> Optional[str]:
        if self.name_map is None:
            return None
        if isinstance(self.name_map, Mapping):
            return self.name_map.get(module)
        out = self.name_map(module)
        if out is not None and not isinstance(out, str):
            raise TypeError(f"name_map({module!r}) returned {out!r}; expected a str or None")
        return out

    def _join(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def modules(self, names: Sequence[str]) -> list[str]:
        """Torch module name(s) of the module holding the leaf at ``names``: one name, or
        one per layer for a leaf in a stacked container."""
        names = tuple(names)
        module = ".".join(names[:-1])
        mapped = self._mapped(module)
        stack = self.stack_of(names)
        if stack is None:
            if mapped is not None and "{layer}" in mapped:
                raise ValueError(f"name_map({module!r}) = {mapped!r} has {{layer}} but the leaf is not stacked")
            base = mapped if mapped is not None else module
            return [self._join(base)]
        container, size = stack
        if mapped is not None:
            if "{layer}" not in mapped:
                raise ValueError(
                    f"{'/'.join(names)} is stacked ({size} layers): name_map({module!r}) must return a name "
                    f"with '{{layer}}', e.g. 'model.layers.{{layer}}.q_proj'; got {mapped!r}"
                )
            return [self._join(mapped.format(layer=i)) for i in range(size)]
        k = len(container)
        return [self._join(".".join(names[:k] + (str(i),) + names[k:-1])) for i in range(size)]

    def params(self, names: Sequence[str]) -> list[str]:
        """Torch state-dict name(s) of the leaf at ``names`` (one per layer if stacked)."""
        names = tuple(names)
        leaf = torch_param_name(names).rsplit(".", 1)[-1]
        return [f"{m}.{leaf}" if m else leaf for m in self.modules(names)]


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.x.y`` → ``x.y`` (PEFT's wrapper prefix)."""
    return re.sub(r"^base_model\.model\.", "", key)
