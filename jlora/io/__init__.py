"""Files, layer 5: the records of an adapter (:mod:`.records`) and their placement on a base
(:mod:`.placement`), Orbax (:mod:`.orbax`), PEFT's format (:mod:`.peft`), a quantized base's
storage (:mod:`.quant_storage`), qwix / tunix LoRA state (:mod:`.qwix_state`, :mod:`.qwix_forms`), checksums (:mod:`.integrity`), the atomic swap of a
directory (:mod:`.atomic`) and what several processes do (:mod:`.distributed`).

``AdapterSave`` / ``AdapterRestore`` are Orbax ``CheckpointArgs`` for an
``ocp.CheckpointManager`` that saves the adapter beside the optimizer state.
"""

from .orbax import AdapterCheckpointHandler, AdapterRestore, AdapterSave, load, read_adapter, read_metadata, save
from .peft import load_peft, read_peft, read_peft_config, save_peft
from .qwix_state import from_qwix, qwix_rules, to_qwix
from .quant_storage import from_bnb_state_dict, load_quantized, save_quantized, to_bnb_state_dict
from .records import Adapter, ParamRecord, TargetRecord, TokenRecord, adapter_from_tree
from .placement import tree_from_adapter

__all__ = [
    "save",
    "load",
    "save_peft",
    "load_peft",
    "read_adapter",
    "read_metadata",
    "read_peft",
    "read_peft_config",
    "AdapterSave",
    "AdapterRestore",
    "AdapterCheckpointHandler",
    "save_quantized",
    "load_quantized",
    "to_bnb_state_dict",
    "from_bnb_state_dict",
    "from_qwix",
    "to_qwix",
    "qwix_rules",
    "Adapter",
    "TargetRecord",
    "ParamRecord",
    "TokenRecord",
    "adapter_from_tree",
    "tree_from_adapter",
]
