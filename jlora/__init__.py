"""jlora: LoRA fine-tuning for JAX and Flax, as pure functions over parameter pytrees.

>>> import jlora
>>> config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
>>> lp = jlora.wrap(params, config, rng=jax.random.key(0))      # doctest: +SKIP
>>> logits = jlora.lora(model.apply)({"params": lp}, x)          # doctest: +SKIP
"""

from .adapters import (
    active_adapters,
    adapter_ids,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    enable_adapter,
    get_adapter,
    load_adapter,
    set_adapter,
)
from .config import LoraConfig
from .merge import merge, merge_adapter, unmerge_adapter
from .optim import combine, nnx_trainable, optimizer, partition, trainable_labels
from .quantization import QuantConfig, QuantizedArray, dequantize, quantize, quantize_array
from .quant_io import load_quantized, save_quantized
from .transform import LoraReport, MaterializationError, MaterializationWarning, explain, lora
from .weight import KernelLayout, LoraWeight, MultiLoraWeight, Trainable
from .wrap import count_parameters, is_lora_tree, lora_leaves, print_trainable_parameters, unload, wrap

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "MultiLoraWeight",
    "Trainable",
    "KernelLayout",
    "wrap",
    "unload",
    "count_parameters",
    "print_trainable_parameters",
    "is_lora_tree",
    "lora_leaves",
    "lora",
    "explain",
    "LoraReport",
    "MaterializationWarning",
    "MaterializationError",
    "optimizer",
    "trainable_labels",
    "nnx_trainable",
    "partition",
    "combine",
    "merge",
    "merge_adapter",
    "unmerge_adapter",
    "add_adapter",
    "load_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "enable_adapter",
    "get_adapter",
    "adapter_names",
    "active_adapters",
    "adapter_ids",
    "add_weighted_adapter",
    "QuantConfig",
    "QuantizedArray",
    "quantize",
    "quantize_array",
    "dequantize",
    "save_quantized",
    "load_quantized",
]

from . import hf, name_maps
from .checkpoint import load, save
from .hf import default_target_modules
from .peft_format import load_peft, save_peft
from .qwix_interop import from_qwix, to_qwix

__all__ += ["save", "load", "save_peft", "load_peft", "hf", "name_maps", "default_target_modules"]
__all__ += ["from_qwix", "to_qwix"]
