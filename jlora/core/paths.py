"""Tree-path helpers: pytree key paths as names, one leaf with its path, the leaf names
that say what a leaf is.

Every layer above names leaves the same way: the ``/``-joined names of a key path
(``layers/0/attn/q_proj/w``), NNX's ``.value`` dropped. A *module path* is that path
without the final leaf name when the name is a parameter name (:data:`PARAM_LEAF_NAMES`),
``.``-joined as PEFT joins PyTorch module names (``layers.0.attn.q_proj``); a leaf with
another name (a *bare* leaf) is its own module.

>>> import jax
>>> flat = jax.tree_util.tree_flatten_with_path({"dense": {"kernel": 0}})[0]
>>> path_names(flat[0][0])
('dense', 'kernel')
>>> LeafEntry(0, ("layers", "0", "q_proj", "w"), None).module
'layers.0.q_proj'
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

__all__ = [
    "LeafEntry",
    "path_names",
    "is_array_like",
    "list_match",
    "stacklevel_outside_jlora",
    "KERNEL_LEAF_NAMES",
    "EXTRA_KERNEL_NAMES",
    "PARAM_LEAF_NAMES",
    "OUTPUT_HEAD_NAMES",
    "SEQ_CLS_HEAD_NAMES",
]

KERNEL_LEAF_NAMES = ("kernel", "embedding")
# Leaf names that may hold a kernel without apply_fn (haiku / tunix / gemma ``w``, torch-
# and equinox-style ``weight``), where the tree alone tells their layout.
EXTRA_KERNEL_NAMES = ("w", "weight", "embeddings")
# Names of a module's parameter, not of a module: a leaf with another name is "bare",
# its own module (its module path is its whole path).
PARAM_LEAF_NAMES = ("kernel", "w", "weight", "embedding", "embeddings", "bias", "b", "scale", "offset")
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_projection", "proj_out", "head", "logits_dense")
# PEFT also leaves these out of "all-linear" when task_type is SEQ_CLS.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Turns a ``jax.tree_util`` key path into plain names, dropping NNX's ``.value``."""
    names: list[str] = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue  # NNX Variable / jlora.Trainable payload
            names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def is_array_like(x: Any) -> bool:
    """Whether ``x`` has a shape and a dtype (an array, a tracer, a ``ShapeDtypeStruct``,
    a ``jlora.QuantizedArray``)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def list_match(key: str, names: Sequence[str]) -> bool:
    """PEFT's list matching: ``key`` equals a name or ends in ``.name``.

    >>> list_match("layers.0.attn.q_proj", ["q_proj"]), list_match("layers.0.attn.xq_proj", ["q_proj"])
    (True, False)
    """
    return any(key == n or key.endswith("." + n) for n in names)


@dataclasses.dataclass(frozen=True)
class LeafEntry:
    """One leaf of a flattened tree: its index, path names, value and whether it is a
    parameter (False for the value of an NNX Variable that is not an ``nnx.Param``)."""

    index: int
    names: tuple[str, ...]
    leaf: Any
    param: bool = True

    @property
    def bare(self) -> bool:
        """A leaf that is its own module (its name is not a parameter name)."""
        return bool(self.names) and self.names[-1] not in PARAM_LEAF_NAMES

    @property
    def module_names(self) -> tuple[str, ...]:
        return self.names if self.bare else self.names[:-1]

    @property
    def module(self) -> str:
        return ".".join(self.module_names)

    @property
    def name(self) -> str:
        return self.names[-1] if self.names else ""

    @property
    def path(self) -> str:
        return "/".join(self.names)


def stacklevel_outside_jlora() -> int:
    """``stacklevel`` for ``warnings.warn`` from inside jlora that points at the caller's
    frame (the first one outside the package), however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
