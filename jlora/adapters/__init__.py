"""Named adapters, layer 6: several adapters over one base (:mod:`.named`: add, load, set,
delete, enable/disable, the ids of a mixed batch) and PEFT's combinations of them
(:mod:`.weighted`), and adapter slots for serving (:mod:`.slots`: a fixed-shape pool of
adapters per kernel, loaded and swapped without recompiling)."""

from .named import (
    BASE_ADAPTER,
    DEFAULT_ADAPTER,
    active_adapters,
    adapter_ids,
    adapter_names,
    add_adapter,
    check_adapter_ids,
    delete_adapter,
    disable_adapter,
    enable_adapter,
    get_adapter,
    load_adapter,
    set_adapter,
)
from .slots import adapter_slots, clear_slot, get_slot, load_slot, slot_scales, slots_base
from .weighted import add_weighted_adapter

__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_ADAPTER",
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
    "check_adapter_ids",
    "add_weighted_adapter",
    "adapter_slots",
    "load_slot",
    "clear_slot",
    "get_slot",
    "slots_base",
    "slot_scales",
]
