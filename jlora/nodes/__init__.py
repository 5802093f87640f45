"""The LoRA nodes, layer 3: :class:`~jlora.LoraWeight`, :class:`~jlora.MultiLoraWeight` and
:class:`~jlora.Trainable`, :class:`~jlora.TrainableTokens` (:mod:`.weight`), the factor arithmetic and PEFT's initialisation
(:mod:`.factors`), DoRA's math (:mod:`.dora`) and PiSSA/OLoRA's (:mod:`.inits`)."""

from .factors import add_delta, delta, init_factors
from .weight import (
    DEFAULT_ADAPTER,
    LoraWeight,
    MultiLoraWeight,
    Trainable,
    TrainableTokens,
    is_lora_node,
    is_lora_weight,
    is_trainable,
)

__all__ = [
    "LoraWeight",
    "MultiLoraWeight",
    "Trainable",
    "TrainableTokens",
    "DEFAULT_ADAPTER",
    "is_lora_node",
    "is_lora_weight",
    "is_trainable",
    "delta",
    "add_delta",
    "init_factors",
]
