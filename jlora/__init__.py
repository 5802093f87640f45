"""jlora: LoRA fine-tuning for JAX and Flax, as pure functions over parameter pytrees.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> lp = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["dense"]), rng=jax.random.key(0))
>>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(lp, jnp.ones((1, 4)))
>>> jnp.allclose(y, jnp.ones((1, 4)) @ jlora.merge(lp)["dense"]["kernel"]).item()
True

The package is layered; imports only point down (DESIGN.md, "The layers"):

=================  =====================================================================
``core``           ``LoraConfig``, tree paths, the nested-jaxpr table both walkers share
``quant``          the bitsandbytes codec, ``QuantizedArray``, lazy dequantization
``layouts``        kernel layouts from the tree and from use
``name_maps``      path ↔ PyTorch names per model family
``nodes``          ``LoraWeight``, ``MultiLoraWeight``, ``Trainable``; DoRA, PiSSA/OLoRA math
``tree``           ``wrap``, ``quantize``, ``unload``, counts, ``optimizer``, ``merge``
``io``             records, Orbax, PEFT files, quantized-base storage, integrity
``adapters``       named adapters, mixed-batch ids, ``add_weighted_adapter``, adapter slots
``transform``      ``lora(fn)``, ``explain``: the interpreter and its rules
=================  =====================================================================
"""

from . import name_maps
from .adapters import (
    active_adapters,
    adapter_ids,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    adapter_slots,
    clear_slot,
    delete_adapter,
    disable_adapter,
    enable_adapter,
    get_adapter,
    load_adapter,
    load_slot,
    set_adapter,
)
from .core.config import LoraConfig
from .io import from_qwix, load, load_peft, load_quantized, save, save_peft, save_quantized, to_qwix
from .layouts.kernel import KernelLayout
from .name_maps import hf
from .name_maps.hf import default_target_modules
from .nodes.slots import AdapterSlots
from .nodes.weight import LoraWeight, MultiLoraWeight, Trainable, TrainableTokens
from .quant.array import QuantConfig, QuantizedArray, dequantize, quantize_array
from .transform import LoraReport, MaterializationError, MaterializationWarning, explain, lora
from .tree import (
    combine,
    count_parameters,
    is_lora_tree,
    lora_leaves,
    merge,
    merge_adapter,
    nnx_trainable,
    optimizer,
    partition,
    print_trainable_parameters,
    quantize,
    trainable_labels,
    unload,
    unmerge_adapter,
    wrap,
)

__version__ = "0.2.0"

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "MultiLoraWeight",
    "AdapterSlots",
    "adapter_slots",
    "load_slot",
    "clear_slot",
    "Trainable",
    "TrainableTokens",
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
    "save",
    "load",
    "save_peft",
    "load_peft",
    "hf",
    "name_maps",
    "default_target_modules",
    "from_qwix",
    "to_qwix",
]
