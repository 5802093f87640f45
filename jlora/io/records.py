"""The storage-independent form of an adapter: records, and conversion from and to a tree.

An adapter, whatever file it lives in, is a list of :class:`TargetRecord` (one per
adapted kernel: its factors ``A`` and ``B``, rank, scale, kernel layout, base shape and
dtype, PyTorch module name(s)), a list of :class:`ParamRecord` (leaves trained in full:
biases, ``modules_to_save``), the PEFT config dict and the PyTorch names of every kernel
module of the base. Both storage formats are peers over these records::

    LoRA tree ──adapter_from_tree──▶ Adapter ──orbax.py──▶ Orbax directory
        ▲                               │     ──peft.py───▶ adapter_config.json +
        └──────tree_from_adapter────────┘                   adapter_model.safetensors

:func:`jlora.io.placement.plan_adapter` validates an adapter against a base tree (paths
or PyTorch names, shapes, dtypes, layouts) before any array is read, and decides where
each record goes; :func:`jlora.io.placement.tree_from_adapter` builds the LoRA tree.

>>> import jax, jax.numpy as jnp, jlora
>>> lp = jlora.wrap({"dense": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=2, target_modules=["dense"]))
>>> adapter = adapter_from_tree(lp)
>>> [(t.path, t.r, t.layout, t.torch) for t in adapter.targets]
[('dense/kernel', 2, ('in', 'out'), ('dense',))]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .. import name_maps
from ..core.config import LoraConfig
from ..core.paths import path_names
from ..nodes.weight import LoraWeight, Trainable, TrainableTokens, is_lora_weight, is_trainable, is_trainable_tokens
from ..quant.array import is_quantized, quantization_summary

__all__ = [
    "TargetRecord",
    "ParamRecord",
    "TokenRecord",
    "Adapter",
    "adapter_from_tree",
    "alpha_from_scale",
    "dtype_name",
    "stack_first",
]


# --------------------------------------------------------------------------------------
# The adapter as records (shared with peft_format and the CLI)


@dataclasses.dataclass
class TargetRecord:
    """One LoRA target. ``a``/``b`` are canonical ``(*stack, *in, r)``/``(*stack, r, *out)``
    when ``layout`` is known, else flat ``(in_features, r)``/``(r, out_features)`` (conv:
    ``(*spatial, in, r)``/``(r, out)``). They may be ``jax.ShapeDtypeStruct``.

    Variants: ``magnitude`` is DoRA's ``m`` (canonical ``(*stack, *out)``, or flat
    ``(out_features,)``); ``init`` names a PiSSA/OLoRA initialisation (the base of the
    trained model is then the residual ``W − s·a0·b0``), with the initial factors
    ``a0``/``b0`` (shaped as ``a``/``b``) where the storage keeps them (Orbax); without
    them the initialisation is run again on the base when the tree is built (PEFT's files).
    """

    path: Optional[str]
    a: Any
    b: Any
    r: int
    scale: float
    alpha: Optional[float] = None
    layout: Optional[tuple[str, ...]] = None
    base_shape: Optional[tuple[int, ...]] = None
    base_dtype: Optional[str] = None
    dropout: float = 0.0
    kind: str = "linear"
    torch: Optional[tuple[str, ...]] = None
    magnitude: Any = None
    init: Optional[str] = None
    a0: Any = None
    b0: Any = None
    b_bias: Any = None
    groups: int = 1
    guessed: bool = False

    @property
    def n_params(self) -> int:
        extra = sum(int(np.prod(x.shape)) for x in (self.magnitude, self.b_bias) if x is not None)
        return int(np.prod(self.a.shape)) + int(np.prod(self.b.shape)) + extra


@dataclasses.dataclass
class ParamRecord:
    """A leaf trained in full (``Trainable``). ``torch_layout``: ``value`` is in PyTorch's
    layout (read from a PEFT file) and is converted when its Flax leaf is known."""

    path: Optional[str]
    value: Any
    torch: Optional[tuple[str, ...]] = None
    torch_layout: bool = False

    @property
    def n_params(self) -> int:
        return int(np.prod(self.value.shape))


@dataclasses.dataclass
class TokenRecord:
    """Trainable token rows of one table (:class:`jlora.TrainableTokens`): ``values``
    ``(n, d)`` (PEFT's ``trainable_tokens_delta``, the new rows), the token ``indices``
    and the table's token ``axis`` (``None`` when read from PEFT: decided by the base)."""

    path: Optional[str]
    values: Any
    indices: tuple[int, ...]
    axis: Optional[int] = None
    torch: Optional[tuple[str, ...]] = None

    @property
    def n_params(self) -> int:
        return int(np.prod(self.values.shape))


@dataclasses.dataclass
class Adapter:
    """An adapter independent of its storage: targets, fully trained leaves, the PEFT
    config dict (or ``None``) and the PyTorch names of every kernel module of the base
    (``None`` when unknown)."""

    targets: list[TargetRecord]
    params: list[ParamRecord]
    config: Optional[dict] = None
    torch_modules: Optional[list[str]] = None
    name_map: Any = None  # the name map that named it: "hf", "qwen3", ... or a FamilyMap
    base_quantization: Optional[dict] = None  # jlora.quantization.quantization_summary of a quantized base
    tokens: list[TokenRecord] = dataclasses.field(default_factory=list)

    @property
    def n_params(self) -> int:
        return (sum(t.n_params for t in self.targets) + sum(p.n_params for p in self.params)
                + sum(k.n_params for k in self.tokens))



def stack_first(shape: tuple[int, ...], layout: Sequence[str]) -> tuple[int, ...]:
    """``shape`` with its stack axes first (as the factors hold them): the name maps count
    a kernel's layers on its first axis (MaxText's ``(in, L, out)`` has them at axis 1)."""
    stack = [i for i, r in enumerate(layout) if r == "stack"]
    return tuple(shape[i] for i in stack) + tuple(s for i, s in enumerate(shape) if i not in stack)

def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraWeight, Trainable, TrainableTokens))


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _clean_number(x: float) -> Union[int, float]:
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else float(x)


def alpha_from_scale(scale: float, r: int, use_rslora: bool = False) -> Union[int, float]:
    """``lora_alpha`` that gives ``scale`` at rank ``r`` (``scale·r``, or ``scale·√r``)."""
    return _clean_number(scale * (math.sqrt(r) if use_rslora else r))


def adapter_from_tree(
    lp: Any,
    config: Optional[LoraConfig] = None,
    *,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
) -> Adapter:
    """The records of a LoRA tree (trained leaves only, with PyTorch names).

    ``LoraWeight.w`` may be a ``jax.ShapeDtypeStruct``: only its shape and dtype are used.
    """
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig or None, got {type(config).__name__}")
    # a quantized kernel (jlora.QuantizedArray) is one leaf of the kernel's shape
    flat = jax.tree_util.tree_flatten_with_path(lp, is_leaf=lambda x: _is_node(x) or is_quantized(x))[0]
    leaves: list[tuple[tuple[str, ...], Any]] = []
    for keypath, x in flat:
        names = path_names(keypath)
        if type(x).__name__ == "MultiLoraWeight":
            raise ValueError(
                f"{'/'.join(names)}: the tree holds several named adapters; save one at a time: "
                "jlora.save(path, jlora.get_adapter(lp, name))"
            )
        if is_trainable(x):
            sub = jax.tree_util.tree_flatten_with_path(x.value)[0]
            for sk, v in sub:
                leaves.append((names + path_names(sk), Trainable(v)))
        else:
            leaves.append((names, x))
    if not any(_is_node(x) for _, x in leaves):
        raise ValueError(
            "the tree holds no LoraWeight, Trainable or TrainableTokens leaf: nothing to save; pass the tree "
            "returned by jlora.wrap (or jlora.load / jlora.load_peft)"
        )
    shapes = []
    for names, x in leaves:
        if is_lora_weight(x):
            shapes.append((names, stack_first(tuple(x.w.shape), x.layout), x.layout.count("stack")))
        elif is_trainable(x):
            shapes.append((names, tuple(np.shape(x.value)), 0))
        elif is_trainable_tokens(x):
            shapes.append((names, tuple(x.w.shape), 0))
        elif hasattr(x, "shape"):
            shapes.append((names, tuple(x.shape), 0))
    tn = name_maps.for_tree(shapes, name_map, prefix)
    rslora = bool(config.use_rslora) if config is not None else False
    targets: list[TargetRecord] = []
    params: list[ParamRecord] = []
    tokens: list[TokenRecord] = []
    torch_modules: list[str] = []
    for names, x in leaves:
        if is_lora_weight(x):
            path = "/".join(names)
            if x.merged:
                raise ValueError(
                    f"{path}: the adapter is merged into W (jlora.merge_adapter); call jlora.unmerge_adapter first"
                )
            r = int(x.a.shape[-1])
            kind = tn.kind(names, x.layout)
            targets.append(
                TargetRecord(
                    path=path, a=x.a, b=x.b, r=r, scale=float(x.scale), alpha=alpha_from_scale(x.scale, r, rslora),
                    layout=tuple(x.layout), base_shape=tuple(int(s) for s in x.w.shape),
                    base_dtype=dtype_name(x.w.dtype), dropout=float(x.dropout), kind=kind,
                    torch=tuple(tn.modules(names)), magnitude=x.magnitude, init=x.init, a0=x.a0, b0=x.b0,
                    b_bias=x.b_bias, groups=int(x.groups), guessed=bool(x.guessed),
                )
            )
        elif is_trainable(x):
            params.append(ParamRecord(path="/".join(names), value=x.value, torch=tuple(tn.params(names))))
        elif is_trainable_tokens(x):
            tokens.append(TokenRecord(path="/".join(names), values=x.values, indices=tuple(int(i) for i in x.indices),
                                      axis=int(x.axis), torch=tuple(tn.modules(names))))
        if names and not is_trainable(x):
            shape = getattr(x.w if (is_lora_weight(x) or is_trainable_tokens(x)) else x, "shape", None)
            if shape is not None and len(shape) >= 2 and tn.is_kernel(names, tuple(shape)):
                torch_modules.extend(tn.modules(names))
    source = name_map if isinstance(name_map, name_maps.FamilyMap) else tn.name
    return Adapter(
        targets, params, config.to_dict() if config is not None else None, sorted(set(torch_modules)), source,
        base_quantization=quantization_summary(lp), tokens=tokens,
    )
