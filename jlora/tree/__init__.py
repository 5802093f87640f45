"""Verbs on trees, layer 4: choosing targets (:mod:`.targets`), :func:`~jlora.wrap`,
:func:`~jlora.unload` and counts (:mod:`.wrap`), :func:`~jlora.quantize` (:mod:`.quantize`),
the optimizer and partition/combine (:mod:`.optim`), and the merge family (:mod:`.merge`)."""

from .merge import merge, merge_adapter, unmerge_adapter
from .optim import combine, nnx_trainable, optimizer, partition, trainable_labels
from .quantize import quantize
from .wrap import count_parameters, factor_sharding, is_lora_tree, lora_leaves, print_trainable_parameters, unload, wrap

__all__ = [
    "wrap",
    "unload",
    "count_parameters",
    "print_trainable_parameters",
    "is_lora_tree",
    "lora_leaves",
    "factor_sharding",
    "quantize",
    "optimizer",
    "trainable_labels",
    "nnx_trainable",
    "partition",
    "combine",
    "merge",
    "merge_adapter",
    "unmerge_adapter",
]
