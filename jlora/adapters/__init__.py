"""Named adapters, layer 6: several adapters over one base (:mod:`.named`: add, load, set,
delete, enable/disable, the ids of a mixed batch) and PEFT's combinations of them
(:mod:`.weighted`)."""

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
]
