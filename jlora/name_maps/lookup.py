"""Choosing the name map of a tree: a shipped family recognised from the paths, one named,
a :class:`~jlora.name_maps.FamilyMap` of the user's, or module-path overrides over
transformers' rules; and the map's layouts as a ``layouts=`` argument of :func:`jlora.wrap`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import numpy as np

from ..core.paths import path_names
from .families import FAMILY_MAPS
from .rules import FamilyMap, HFNames, Leaves, ModuleOverrides, TreeNames, kernel_to_torch

__all__ = ["NameMapSpec", "get", "recognise", "for_tree", "family_of", "record_param_to_torch", "tree_leaves",
           "layouts"]

_BY_NAME = {m.name: m for m in FAMILY_MAPS}

NameMapSpec = Union[None, str, FamilyMap, ModuleOverrides, Any]


def get(name: str) -> Optional[FamilyMap]:
    """A shipped map by name: ``"qwen3"``, ``"llama3"``, ``"gemma3"``, ``"qwen3_moe"``; ``"hf"`` is ``None``
    (the Hugging Face rules, which need no table)."""
    if name == "hf":
        return None
    if name not in _BY_NAME:
        raise ValueError(f"name_map={name!r}: shipped maps are {['hf', *_BY_NAME]} (or 'auto')")
    return _BY_NAME[name]


def recognise(paths: Iterable[str]) -> Optional[FamilyMap]:
    """The shipped family whose layout these ``/``-joined leaf paths have, or ``None``
    (then the Hugging Face rules apply).

    >>> recognise(["embedder/input_embedding", "layers/0/attn/q_proj/w", "layers/0/attn/q_norm/w"]).name
    'qwen3'
    """
    paths = list(paths)
    for m in FAMILY_MAPS:
        if m.recognises(paths):
            return m
    return None


def for_tree(leaves: Leaves, name_map: NameMapSpec = None, prefix: Optional[str] = None) -> TreeNames:
    """The name map for one tree, bound to its leaves.

    Args:
      leaves: every array leaf as ``(names, shape, n_stack)`` (``n_stack``: leading stack
        axes of a LoRA kernel, else 0).
      name_map: ``None``/``"auto"`` (recognise a shipped family from the paths, else the
        Hugging Face rules), a shipped map's name, a :class:`FamilyMap`, an object with
        ``bind(leaves, prefix=None)``, or module-path overrides (a dict or a function)
        applied on top of the recognised map.
      prefix: a PyTorch module path prepended to every name (e.g. ``"bert"``).

    >>> tn = for_tree([(("layers", "0", "attn", "q_proj", "w"), (8, 2, 4), 0)])
    >>> tn.name, tn.modules(("layers", "0", "attn", "q_proj", "w"))
    ('llama3', ['model.layers.0.self_attn.q_proj'])
    """
    leaves = [(tuple(n), tuple(int(d) for d in s) if s is not None else None, int(k)) for n, s, k in leaves]
    overrides: Optional[ModuleOverrides] = None
    family: Optional[FamilyMap] = None
    if name_map is None or name_map == "auto":
        family = recognise("/".join(n) for n, _, _ in leaves)
    elif isinstance(name_map, str):
        family = get(name_map)
        if family is None:
            return HFNames(leaves, prefix=prefix)
    elif isinstance(name_map, FamilyMap):
        family = name_map
    elif hasattr(name_map, "bind") and callable(name_map.bind):
        return name_map.bind(leaves, prefix=prefix)
    elif isinstance(name_map, Mapping) or callable(name_map):
        overrides = name_map
        family = recognise("/".join(n) for n, _, _ in leaves)
    else:
        raise TypeError(
            f"name_map must be None, a shipped map's name ({['hf', *_BY_NAME]}), a FamilyMap, a dict or a "
            f"function of the module path; got {type(name_map).__name__}"
        )
    if family is None:
        return HFNames(leaves, name_map=overrides, prefix=prefix)
    return family.bind(leaves, prefix=prefix, overrides=overrides)


def family_of(source: Any) -> Optional[FamilyMap]:
    """The :class:`FamilyMap` an adapter's ``name_map`` record names (``"qwen3"``, a
    ``FamilyMap``), or ``None`` (Hugging Face rules, or a map that cannot be rebuilt
    without its tree)."""
    if isinstance(source, FamilyMap):
        return source
    if isinstance(source, str) and source in _BY_NAME:
        return _BY_NAME[source]
    return None


def record_param_to_torch(names: Sequence[str], value: Any, n: int, source: Any = None) -> list[np.ndarray]:
    """A fully trained leaf's value (JAX layout) as its ``n`` PyTorch tensors, without the
    tree: the rule of the family ``source`` names if one matches the path, else
    transformers' rules (a stacked leaf's slices one by one)."""
    family = family_of(source)
    if family is not None:
        hit = family.rule_for("/".join(names))
        if hit is not None:
            return hit[0].to_torch(value)
    v = np.asarray(value)
    conv = kernel_to_torch if tuple(names)[-1] == "kernel" else np.asarray
    return [conv(v[i] if n > 1 else v) for i in range(n)]


def tree_leaves(params: Any) -> list[tuple[tuple[str, ...], tuple[int, ...], int]]:
    """``[(names, shape, 0)]`` for every array leaf of ``params`` (a dict, an ``nnx.State``
    or ``nnx.Module``, a LoRA tree: a ``LoraWeight`` counts as its kernel, with its stack
    axes), the input of :func:`for_tree`."""
    def node(x: Any) -> bool:
        return type(x).__name__ in ("LoraWeight", "MultiLoraWeight", "Trainable")

    out = []
    for keypath, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=node)[0]:
        n_stack = 0
        if type(x).__name__ in ("LoraWeight", "MultiLoraWeight"):
            n_stack = tuple(x.layout).count("stack")
            x = x.w
        elif type(x).__name__ == "Trainable":
            x = x.value
        shape = getattr(x, "shape", None)
        if shape is not None:
            out.append((path_names(keypath), tuple(int(d) for d in shape), n_stack))
    return out


def layouts(params: Any, name_map: NameMapSpec = None) -> Callable[[str, tuple[int, ...]], Optional[tuple[str, ...]]]:
    """The kernel layouts a name map knows for the leaves of ``params``, as a ``layouts=``
    argument of :func:`jlora.wrap` (``None`` for kernels it does not know, which are then
    inferred as usual).

    Use it to wrap a tree so that its adapter is exactly PEFT's: Gemma 3's ``kv_einsum``
    (2, K, D, H) gets ``("stack", "out", "in", "out")``, i.e. separate factors for k and v
    (PEFT's ``k_proj`` and ``v_proj``), where a layout found from its einsum alone would
    be ``("out", "out", "in", "out")`` (one adapter shared by k and v).

    >>> lp = jlora.wrap(state, config, layouts=jlora.name_maps.layouts(state))  # doctest: +SKIP
    """
    leaves = tree_leaves(params)
    tn = for_tree([(n, s, 0) for n, s, _ in leaves], name_map)
    table: dict[str, tuple[str, ...]] = {}
    for names, shape, _ in leaves:
        lay = tn.layout(names, shape)
        if lay is not None:
            table[".".join(names[:-1])] = lay

    def spec(module: str, shape: tuple[int, ...]) -> Optional[tuple[str, ...]]:
        lay = table.get(module)
        return lay if lay is not None and len(lay) == len(tuple(shape)) else None

    return spec
