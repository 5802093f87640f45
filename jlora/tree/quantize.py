"""``jlora.quantize(params)``: choose the kernels of a tree, as :func:`jlora.wrap` chooses
targets, and replace each by a :class:`~jlora.QuantizedArray` (QLoRA's frozen base).

>>> import jax.numpy as jnp, jlora
>>> q = jlora.quantize({"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}})
>>> type(q["dense"]["kernel"]).__name__, type(q["dense"]["bias"]).__name__
('QuantizedArray', 'ArrayImpl')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp

from ..core.paths import LeafEntry, path_names
from ..layouts.from_tree import TreeFacts, infer_layout, user_layout
from ..layouts.from_use import find_kernel_uses
from ..nodes.weight import is_lora_node
from ..quant.array import QuantConfig, is_quantized, quantize_array

__all__ = ["quantize"]

_HEAD_NAMES = ("lm_head", "embed_out", "output_projection", "proj_out", "head")
_GPT2_CONV1D = ("c_attn", "c_proj", "c_fc", "q_attn")


def _module_matches(spec: Union[str, Sequence[str]], module: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == n or module.endswith("." + n) or f".{n}." in f".{module}." for n in spec)


def _default_selected(names: tuple[str, ...], leaf: Any) -> bool:
    if not names or names[-1] != "kernel" or len(leaf.shape) < 2:
        return False
    module = names[-2] if len(names) >= 2 else ""
    if module in _HEAD_NAMES:
        return False
    if "conv" in module.lower() and module not in _GPT2_CONV1D:
        return False  # bitsandbytes quantizes linear layers only
    return True


def quantize(params: Any, config: QuantConfig = QuantConfig(), *, layouts: Any = None,
             apply_fn: Any = None, example_args: Sequence[Any] = ()) -> Any:
    """Replaces the kernels of ``params`` by :class:`QuantizedArray` nodes; pure.

    Which kernels: ``config.target_modules`` if given (any float leaf of rank >= 2 of a
    named module), else every ``kernel`` of rank >= 2 except the output head and
    convolutions; never ``config.skip_modules``. With ``apply_fn`` (as in
    :func:`jlora.wrap`: ``apply_fn(params, *example_args)`` is traced abstractly) every
    leaf the model contracts in a ``dot_general`` is a kernel whatever its name (NNX
    einsum kernels ``w``), with the layout of its use; otherwise each kernel's axis roles
    come from the same inference as ``wrap`` (``layouts=`` overrides both, with ``wrap``'s
    format). A kernel is quantized as bitsandbytes quantizes the PyTorch weight it stands
    for (``W = Kᵀ``, blocks along the input axes of each output feature)::

        K ≈ dequantize(quantize(K))        nf4: 16 values × absmax per 64-block

    Works under ``jit`` and ``jax.eval_shape`` (a tree of ``ShapeDtypeStruct`` gives a
    tree of ``QuantizedArray`` of ``ShapeDtypeStruct``); the codes and scales of a sharded
    kernel are sharded like it (:func:`jlora.quant.array.packed_specs`).

    Example:
      >>> q = quantize(params, QuantConfig(quant_type="nf4", double_quant=True))   # doctest: +SKIP
      >>> lp = jlora.wrap(q, jlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a jlora.QuantConfig, got {type(config).__name__}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_quantized(x) or is_lora_node(x))
    entries = [LeafEntry(i, path_names(p), leaf) for i, (p, leaf) in enumerate(flat)]
    for e in entries:
        if is_lora_node(e.leaf):
            raise ValueError(f"{e.path}: quantize the base before jlora.wrap (the tree already carries LoRA)")
    facts = TreeFacts([e for e in entries if not is_quantized(e.leaf)])
    uses = {}
    if apply_fn is not None:
        uses = find_kernel_uses(apply_fn, params, tuple(example_args),
                                is_leaf=lambda x: is_quantized(x) or is_lora_node(x))
    leaves = []
    matched = 0
    for e in entries:
        leaf = e.leaf
        if is_quantized(leaf) or not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaves.append(leaf)
            continue
        module = e.module
        if config.target_modules is not None:
            chosen = (
                len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
                and _module_matches(config.target_modules, module) and e.name != "bias"
            )
        elif apply_fn is not None:
            use = uses.get(e.index)
            module_name = e.names[-2] if len(e.names) >= 2 else ""
            chosen = use is not None and use.kind == "linear" and module_name not in _HEAD_NAMES
        else:
            chosen = _default_selected(e.names, leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
        if chosen and config.skip_modules is not None and _module_matches(config.skip_modules, module):
            chosen = False
        if not chosen:
            leaves.append(leaf)
            continue
        layout = user_layout(layouts, e) or (uses[e.index].layout() if e.index in uses
                                             else infer_layout(e, facts))
        leaves.append(quantize_array(leaf, config, layout, path=e.path))
        matched += 1
    if config.target_modules is not None and not matched:
        modules = sorted({e.module for e in entries if hasattr(e.leaf, "shape") and len(e.leaf.shape) >= 2})
        raise ValueError(
            f"QuantConfig.target_modules={config.target_modules!r} matched no kernel; modules with kernels: "
            f"{', '.join(modules[:40])}"
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)
