"""The LoRA nodes, layer 3: :class:`~jlora.LoraWeight`, :class:`~jlora.MultiLoraWeight` and
:class:`~jlora.Trainable`, :class:`~jlora.TrainableTokens` (:mod:`.weight`), the factor arithmetic and PEFT's initialisation
(:mod:`.factors`), DoRA's math (:mod:`.dora`) and PiSSA/OLoRA's (:mod:`.inits`), and
:class:`AdapterSlots` (:mod:`.slots`: a fixed-shape pool of adapters per kernel, for serving)."""

from .factors import add_delta, delta, init_factors
from .slots import AdapterSlots, is_adapter_slots
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
    "AdapterSlots",
    "is_adapter_slots",
    "DEFAULT_ADAPTER",
    "is_lora_node",
    "is_lora_weight",
    "is_trainable",
    "delta",
    "add_delta",
    "init_factors",
]
