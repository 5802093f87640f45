"""``QuantConfig`` and ``QuantizedArray``: a quantized frozen kernel as a pytree node, its
dequantization, and how its packed arrays follow the kernel's sharding.

A quantized kernel is just another kind of frozen ``W``: :func:`jlora.quantize` replaces
kernels by :class:`QuantizedArray` nodes, :func:`jlora.wrap` accepts them as the base of a
``LoraWeight``, and :func:`jlora.lora` dequantizes each one at its use
(:mod:`jlora.quant.forward`).

* **Layout.** A Flax kernel ``K`` is quantized as the PyTorch ``Linear`` weight it
  stands for, ``W = Kᵀ`` of shape ``(out, in)``: the output axes of the kernel (C order)
  make the rows, its input axes (C order) the columns, and ``W`` is flattened in C
  order. Leading ``"stack"`` axes (scanned layers) are quantized one layer at a time, as
  separate ``Linear`` layers would be. So ``dequantize(quantize(K)) ==
  bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(W))ᵀ`` exactly
  (the codec: :mod:`jlora.quant.codec`).

>>> import jax.numpy as jnp
>>> q = quantize_array(jnp.ones((64, 32)), QuantConfig(quant_type="nf4"))
>>> q.shape, q.dequantize().shape
((64, 32), (64, 32))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..core.paths import path_names
from .codec import (
    BLOCK_SIZES,
    NESTED_BLOCK_SIZE,
    QUANT_TYPES,
    dequantize_4bit,
    dequantize_4bit_transposed,
    double_quantize,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
    undo_double_quant,
    undo_double_quant_transposed,
)

__all__ = [
    "QuantConfig",
    "QuantizedArray",
    "quantize_array",
    "dequantize",
    "is_quantized",
    "quantized_leaves",
    "quantization_summary",
    "dense_for_compute",
    "packed_specs",
    "packed_transposed",
    "as_packed_transposed",
    "bnb_order",
]


# ----------------------------------------------------------------------------------
# QuantConfig
# ----------------------------------------------------------------------------------


def _names(field: str, value: Any) -> Union[None, str, tuple[str, ...]]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"QuantConfig.{field} must be None, a regex string or a list of module names, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize` stores a frozen base (bitsandbytes' ``BitsAndBytesConfig``).

    Args:
      quant_type: ``"nf4"`` (NormalFloat4, QLoRA's), ``"fp4"`` or ``"int8"`` (LLM.int8's
        row-wise weights).
      block_size: elements per 4-bit block (bitsandbytes: 64; 32 … 4096).
      double_quant: quantize the 4-bit blocks' absmax again (8-bit codes in blocks of 256
        plus an offset); bitsandbytes' ``bnb_4bit_use_double_quant``. Ignored for int8.
      compute_dtype: dtype the kernels are dequantized to where the model uses them
        (``bnb_4bit_compute_dtype``); also the dtype of :func:`jlora.merge`'s output.
      target_modules: which modules' kernels to quantize, matched as in ``LoraConfig``
        (a list of names, a path equals or ends in one; a string is a full regex). Default:
        every kernel of rank >= 2 except embeddings, convolutions and the output head
        (``lm_head``, ``proj_out``, ...), as transformers + bitsandbytes quantize only the
        linear layers and keep the head.
      skip_modules: modules never quantized (``llm_int8_skip_modules``), same matching.

    >>> QuantConfig(quant_type="nf4", double_quant=True).bits_per_parameter(4096)
    4.126953125
    """

    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: Any = jnp.bfloat16
    target_modules: Union[None, str, Sequence[str]] = None
    skip_modules: Union[None, str, Sequence[str]] = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type={self.quant_type!r}: valid types are {QUANT_TYPES}")
        if self.quant_type != "int8" and self.block_size not in BLOCK_SIZES:
            raise ValueError(f"QuantConfig.block_size={self.block_size}: valid block sizes are {BLOCK_SIZES}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"QuantConfig.double_quant must be a bool, got {self.double_quant!r}")
        try:
            dtype = np.dtype(self.compute_dtype)
        except TypeError:
            raise TypeError(f"QuantConfig.compute_dtype={self.compute_dtype!r} is not a dtype") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"QuantConfig.compute_dtype={dtype}: must be a float dtype (bfloat16, float16, float32)")
        object.__setattr__(self, "compute_dtype", dtype)
        object.__setattr__(self, "target_modules", _names("target_modules", self.target_modules))
        object.__setattr__(self, "skip_modules", _names("skip_modules", self.skip_modules))

    @property
    def uses_double_quant(self) -> bool:
        return self.double_quant and self.quant_type != "int8"

    def bits_per_parameter(self, in_features: int = 4096) -> float:
        """Storage bits per parameter: ``4 + 32/block`` (4-bit), ``4 + 8/block +
        32/(block·256)`` (with double quantization), ``8 + 32/in_features`` (int8)."""
        if self.quant_type == "int8":
            return 8 + 32 / in_features
        if self.uses_double_quant:
            return 4 + 8 / self.block_size + 32 / (self.block_size * NESTED_BLOCK_SIZE)
        return 4 + 32 / self.block_size

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``BitsAndBytesConfig`` keys (what a quantized model's
        ``config.json`` records as ``quantization_config``), plus ``bnb_4bit_blocksize``."""
        four = self.quant_type != "int8"
        out: dict[str, Any] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.uses_double_quant,
            "bnb_4bit_compute_dtype": str(self.compute_dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_blocksize": self.block_size,
            "llm_int8_skip_modules": _jsonable(self.skip_modules),
        }
        if self.target_modules is not None:
            out["target_modules"] = _jsonable(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; also reads a transformers ``quantization_config``."""
        if data.get("load_in_8bit"):
            qt = "int8"
        elif data.get("load_in_4bit", True):
            qt = data.get("bnb_4bit_quant_type", "fp4")
        else:
            raise ValueError(f"quantization config {data!r} is neither load_in_4bit nor load_in_8bit")
        return cls(
            quant_type=qt,
            block_size=int(data.get("bnb_4bit_blocksize", 64)),
            double_quant=bool(data.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=np.dtype(data.get("bnb_4bit_compute_dtype") or "float32"),
            target_modules=data.get("target_modules"),
            skip_modules=data.get("llm_int8_skip_modules"),
        )


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------
# QuantizedArray
# ----------------------------------------------------------------------------------

_CHILDREN = ("codes", "absmax", "nested_absmax", "offset")


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized kernel; a pytree node (``jlora.QuantizedArray``).

    Children (arrays; leading ``*stack`` axes are a stacked kernel's layer axes, each layer
    quantized on its own):

    - ``codes``: nf4/fp4 ``uint8 (*stack, ceil(n/2))``, two 4-bit codes a byte (high
      nibble first) over the PyTorch ``(out, in)`` flattening of each layer (``n`` its
      size); int8 ``int8 (*stack, out, in)`` (bitsandbytes' ``CB``).
    - ``absmax``: per block, ``float32 (*stack, n_blocks)``; with double quantization
      ``uint8 (*stack, n_blocks)`` codes of the dynamic map; int8: ``SCB float32 (*stack, out)``.
    - Where each row of the PyTorch weight is whole blocks (``in % block_size == 0``, every
      real model), the same bytes and scales are held transposed, in the Flax kernel's
      orientation (:func:`packed_transposed`): ``codes (*stack, in/2, out)`` and ``absmax
      (*stack, in/block_size, out)``. A layer then dequantizes with no transpose and no
      relayout (``jlora.quant.codec.dequantize_4bit_transposed``): on a TPU, a flat
      ``uint8 (layers, n/2)`` stack was tiled across its layer axis and a scan over the
      layers copied the whole stack on every step of the loop, and a transpose of the bytes
      was hoisted onto the whole stack. bitsandbytes' flat arrays are their transpose,
      flattened (``jlora.io.to_bnb_state_dict``, :func:`bnb_order`).
    - ``nested_absmax``: ``float32 (*stack, ceil(n_blocks/256))`` (double quantization), else None.
    - ``offset``: ``float32 (*stack,)`` (double quantization), else None.

    Static: ``item_shape`` (one layer's kernel shape, in the Flax kernel's axis order),
    ``roles`` (``"in"``/``"out"`` per item axis), ``dtype`` (the original dtype),
    ``quant_type``, ``block_size``, ``double_quant`` and ``compute_dtype``.

    ``shape``/``ndim``/``size`` are the kernel's; ``layout`` its roles with the stack axes;
    ``nbytes`` the storage; ``dequantize()`` the values.

    >>> q = quantize_array(jnp.ones((128, 64)), QuantConfig())
    >>> q.shape, q.codes.shape, q.absmax.dtype   # (in/2, out): bitsandbytes' bytes, transposed
    ((128, 64), (64, 64), dtype('uint8'))
    """

    codes: Any
    absmax: Any
    nested_absmax: Any = None
    offset: Any = None
    item_shape: tuple[int, ...] = ()
    roles: tuple[str, ...] = ()
    dtype: Any = np.dtype(np.float32)
    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: Any = np.dtype(jnp.bfloat16)

    # -- pytree -------------------------------------------------------------------
    def _aux(self) -> tuple:
        return (self.item_shape, self.roles, self.dtype, self.quant_type, self.block_size, self.double_quant,
                self.compute_dtype)

    def tree_flatten_with_keys(self):
        return tuple((jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in _CHILDREN), self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in _CHILDREN), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for n, c in zip(_CHILDREN, children):
            object.__setattr__(obj, n, c)
        for n, a in zip(("item_shape", "roles", "dtype", "quant_type", "block_size", "double_quant",
                         "compute_dtype"), aux):
            object.__setattr__(obj, n, a)
        return obj

    # -- array-like ---------------------------------------------------------------
    @property
    def stack_shape(self) -> tuple[int, ...]:
        n_item = 2 if packed_transposed(self.item_shape, self.roles, self.quant_type, self.block_size) else 1
        return tuple(int(s) for s in self.absmax.shape[:len(self.absmax.shape) - n_item])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + tuple(self.item_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def layout(self) -> tuple[str, ...]:
        return ("stack",) * len(self.stack_shape) + tuple(self.roles)

    @property
    def nbytes(self) -> int:
        """Bytes held by the children (codes and scales)."""
        return sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for x in (self.codes, self.absmax, self.nested_absmax, self.offset) if x is not None
        )

    @property
    def config(self) -> QuantConfig:
        """The :class:`QuantConfig` this kernel was quantized with (module filters unset)."""
        return QuantConfig(self.quant_type, self.block_size, self.double_quant, self.compute_dtype)

    def __repr__(self) -> str:
        dq = "+dq" if self.double_quant and self.quant_type != "int8" else ""
        if not hasattr(self.absmax, "shape"):  # children replaced by a tree_map
            kids = ", ".join(f"{n}={getattr(self, n)!r}" for n in _CHILDREN)
            return f"QuantizedArray({self.quant_type}{dq}, item_shape={self.item_shape}, {kids})"
        return (f"QuantizedArray({self.quant_type}{dq}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
                f"layout={self.layout}, compute_dtype={np.dtype(self.compute_dtype).name})")

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel's values in ``dtype`` (default: the original dtype, as bitsandbytes'
        ``dequantize_4bit``); computed in float32, rounded to the original dtype, then cast."""
        return _dequantize_stacked(self, np.dtype(dtype) if dtype is not None else None)

    def replace(self, **changes: Any) -> "QuantizedArray":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_pytree_with_keys(
    QuantizedArray, lambda x: x.tree_flatten_with_keys(), QuantizedArray.tree_unflatten, lambda x: x.tree_flatten()
)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (an ``is_leaf`` for quantized trees)."""
    return isinstance(x, QuantizedArray)


# ----------------------------------------------------------------------------------
# Kernel <-> PyTorch (out, in) layout
# ----------------------------------------------------------------------------------


def _torch_perm(roles: Sequence[str]) -> tuple[list[int], list[int]]:
    outs = [i for i, r in enumerate(roles) if r == "out"]
    ins = [i for i, r in enumerate(roles) if r == "in"]
    return outs, ins


def _to_torch_2d(k: jax.Array, roles: Sequence[str]) -> jax.Array:
    outs, ins = _torch_perm(roles)
    n_out = int(np.prod([k.shape[i] for i in outs]))
    n_in = int(np.prod([k.shape[i] for i in ins]))
    return jnp.transpose(k, outs + ins).reshape(n_out, n_in)


def _from_torch_2d(w: jax.Array, item_shape: Sequence[int], roles: Sequence[str],
                   transposed: bool = False) -> jax.Array:
    """The kernel from its PyTorch ``(out, in)`` matrix ``w`` (``transposed``: from its
    ``(in, out)`` matrix)."""
    outs, ins = _torch_perm(roles)
    perm = ins + outs if transposed else outs + ins
    t = w.reshape([item_shape[i] for i in perm])
    return jnp.transpose(t, [perm.index(i) for i in range(len(roles))])


def packed_transposed(item_shape: Sequence[int], roles: Sequence[str], quant_type: str, block_size: int) -> bool:
    """Whether a 4-bit kernel's codes and block scales are held transposed, in the
    kernel's orientation (``codes (in/2, out)``, ``absmax (in/block_size, out)`` per
    layer): where every row of the PyTorch ``(out, in)`` weight is whole blocks. int8 is
    held as bitsandbytes holds it (``CB (out, in)``)."""
    if quant_type == "int8":
        return False
    _, ins = _torch_perm(roles)
    return int(np.prod([item_shape[i] for i in ins])) % block_size == 0


def _n_out_in(q: "QuantizedArray") -> tuple[int, int]:
    outs, ins = _torch_perm(q.roles)
    return int(np.prod([q.item_shape[i] for i in outs])), int(np.prod([q.item_shape[i] for i in ins]))


def as_packed_transposed(q: "QuantizedArray") -> "QuantizedArray":
    """``q`` with bitsandbytes' flat per-layer ``codes (*stack, n/2)`` and ``absmax
    (*stack, n_blocks)`` held transposed where :func:`packed_transposed` says so;
    unchanged otherwise or when they already are."""
    if not packed_transposed(q.item_shape, q.roles, q.quant_type, q.block_size):
        return q
    n_out, n_in = _n_out_in(q)
    if q.codes.ndim >= 2 and tuple(q.codes.shape[-2:]) == (n_in // 2, n_out):
        return q
    stack = tuple(q.codes.shape[:-1])
    t = lambda x, n: jnp.swapaxes(jnp.reshape(x, stack + (n_out, n)), -1, -2)  # noqa: E731
    return q.replace(codes=t(q.codes, n_in // 2), absmax=t(q.absmax, n_in // q.block_size))


def bnb_order(q: "QuantizedArray") -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)`` of an unstacked 4-bit ``q`` as bitsandbytes holds them: flat,
    in the PyTorch ``(out, in)`` weight's order (numpy)."""
    codes, absmax = np.asarray(jax.device_get(q.codes)), np.asarray(jax.device_get(q.absmax))
    if packed_transposed(q.item_shape, q.roles, q.quant_type, q.block_size):
        codes, absmax = np.swapaxes(codes, -1, -2), np.swapaxes(absmax, -1, -2)
    return codes.reshape(-1), absmax.reshape(-1)


def _check_roles(shape: tuple[int, ...], layout: Sequence[str], what: str) -> tuple[int, tuple[str, ...]]:
    layout = tuple(layout)
    if len(layout) != len(shape):
        raise ValueError(f"{what}: kernel of shape {shape} does not fit layout {layout} (one role per axis)")
    n_stack = 0
    while n_stack < len(layout) and layout[n_stack] == "stack":
        n_stack += 1
    roles = layout[n_stack:]
    if set(roles) - {"in", "out"} or "in" not in roles or "out" not in roles:
        raise ValueError(
            f"{what}: layout {layout} needs leading 'stack' axes (optional) then at least one 'in' and one "
            "'out' axis"
        )
    return n_stack, roles


def _replicated(x: Any) -> Any:
    """``x`` resharded to replicated where it lives on a mesh with ``Explicit`` axes (where
    shardings are types and the codec's flat reshapes of a sharded axis are errors);
    unchanged otherwise (``Auto`` axes: XLA propagates shardings itself)."""
    if x is None:
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return x
    if all(e is None for e in getattr(sharding, "spec", ())):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _vmap_n(f, n: int):
    for _ in range(n):
        f = jax.vmap(f)
    return f


@functools.partial(jax.jit, static_argnames=("layout", "qt", "bs", "dq"))
def _quantize_kernel(w: jax.Array, layout: tuple[str, ...], qt: str, bs: int, dq: bool):
    n_stack = layout.count("stack")
    roles = layout[n_stack:]
    w = _replicated(w)

    def item(k):
        w2d = _to_torch_2d(k, roles)
        if qt == "int8":
            cb, scb = int8_vectorwise_quant(w2d)
            return cb, scb, None, None
        packed, absmax = quantize_4bit(w2d, bs, qt)
        nested = offset = None
        if dq:
            absmax, nested, offset = double_quantize(absmax)
        if packed_transposed(k.shape, roles, qt, bs):  # the same bytes, in the kernel's orientation
            n_out, n_in = w2d.shape
            packed, absmax = packed.reshape(n_out, n_in // 2).T, absmax.reshape(n_out, n_in // bs).T
        return packed, absmax, nested, offset

    return _vmap_n(item, n_stack)(w)


def quantize_array(w: Any, config: QuantConfig = QuantConfig(), layout: Sequence[str] = ("in", "out"),
                   *, path: str = "kernel") -> QuantizedArray:
    """Quantizes one kernel ``w`` (axis roles ``layout``, Flax ``Dense``: ``("in", "out")``)
    as bitsandbytes quantizes the PyTorch weight ``W = Kᵀ`` (see the module docstring).

    Works on arrays, tracers (inside ``jit``) and ``jax.ShapeDtypeStruct`` (then returns a
    ``QuantizedArray`` of ``ShapeDtypeStruct``). A concrete ``w`` with a ``NamedSharding``
    gets its codes and scales sharded like it (see :func:`quantize`).

    >>> q = quantize_array(jnp.ones((64, 32)), QuantConfig(quant_type="int8"))
    >>> q.codes.shape, q.absmax.shape    # CB (out, in), SCB (out,)
    ((32, 64), (32,))
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a jlora.QuantConfig, got {type(config).__name__}")
    shape = tuple(int(s) for s in w.shape)
    n_stack, roles = _check_roles(shape, layout, path)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{path}: only float kernels can be quantized, got {w.dtype}{list(shape)}")
    layout = tuple(layout)
    args = (layout, config.quant_type, config.block_size, config.uses_double_quant)
    if isinstance(w, jax.ShapeDtypeStruct):
        static = dict(zip(("layout", "qt", "bs", "dq"), args))
        children = jax.eval_shape(functools.partial(_quantize_kernel, **static), w)
    else:
        children = _quantize_kernel(w, *args)
    q = QuantizedArray(
        *children, item_shape=shape[n_stack:], roles=roles, dtype=np.dtype(w.dtype), quant_type=config.quant_type,
        block_size=config.block_size, double_quant=config.uses_double_quant, compute_dtype=config.compute_dtype,
    )
    return _shard_like(q, w)


def _item_dense(q: QuantizedArray, codes, absmax, nested, offset, dtype: Optional[np.dtype] = None) -> jax.Array:
    """One layer's kernel, rounded to its original dtype (float32 math, bitsandbytes'
    rounding), then cast to ``dtype`` (default: kept in the original dtype)."""
    n_out, n_in = _n_out_in(q)
    final = np.dtype(q.dtype if dtype is None else dtype)
    if q.quant_type == "int8":
        w2d = int8_vectorwise_dequant(codes, absmax).astype(q.dtype).astype(final)
        return _from_torch_2d(w2d, q.item_shape, q.roles)
    if packed_transposed(q.item_shape, q.roles, q.quant_type, q.block_size):
        if q.double_quant:
            absmax = undo_double_quant_transposed(absmax, nested, offset)
        w_t = dequantize_4bit_transposed(codes, absmax, q.block_size, q.quant_type, q.dtype, final)
        return _from_torch_2d(w_t, q.item_shape, q.roles, transposed=True)
    if q.double_quant:
        absmax = undo_double_quant(absmax, nested, offset)
    w2d = dequantize_4bit(codes, absmax, n_out * n_in, q.block_size, q.quant_type, jnp.float32)
    return _from_torch_2d(w2d.astype(q.dtype).astype(final).reshape(n_out, n_in), q.item_shape, q.roles)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_stacked(q: QuantizedArray, dtype: Optional[np.dtype]) -> jax.Array:
    n_stack = len(q.stack_shape)
    f = _vmap_n(functools.partial(_item_dense, q, dtype=dtype), n_stack)
    return f(*(_replicated(getattr(q, n)) for n in _CHILDREN))


def dense_for_compute(q: QuantizedArray) -> jax.Array:
    """The kernel as ``jlora.lora(fn)`` uses it: dequantized, in ``q.compute_dtype``."""
    return q.dequantize(q.compute_dtype)


# ----------------------------------------------------------------------------------
# Sharding: codes and scales follow the kernel
# ----------------------------------------------------------------------------------


def packed_specs(q: QuantizedArray, spec: Sequence[Any]) -> dict[str, tuple]:
    """PartitionSpec entries for each child of ``q`` given the kernel's ``spec`` (one
    entry per kernel axis): stack axes keep theirs; a kernel sharded along its first output
    axis only (column parallel) shards the output axis of 4-bit codes and absmax held in
    the kernel's orientation (``(in/2, out)``, ``(in/block, out)``) or int8's ``CB``/``SCB``
    rows; a kernel sharded along one input axis (row parallel) shards int8's ``CB``
    columns. Everything else is replicated within a layer."""
    ns = len(q.stack_shape)
    spec = tuple(spec) + (None,) * (q.ndim - len(spec))
    stack, item = list(spec[:ns]), spec[ns:]
    outs, ins = _torch_perm(q.roles)
    out_entries = [item[i] for i in outs]
    in_entries = [item[i] for i in ins]
    row = out_entries[0] if out_entries and all(e is None for e in out_entries[1:]) else None
    col = None
    if sum(e is not None for e in in_entries) == 1:
        col = next(e for e in in_entries if e is not None)
        if in_entries.index(col) != 0 and q.quant_type == "int8":
            col = None
    rows_only = all(e is None for e in in_entries)
    specs: dict[str, tuple] = {}
    if q.quant_type == "int8":
        specs["codes"] = tuple(stack) + (row, col)
        specs["absmax"] = tuple(stack) + (row,)
        return specs
    if packed_transposed(q.item_shape, q.roles, q.quant_type, q.block_size):  # (in/2, out), (in/block, out)
        specs["codes"] = tuple(stack) + (None, row if rows_only else None)
        specs["absmax"] = tuple(stack) + (None, row if rows_only else None)
    else:
        specs["codes"] = tuple(stack) + (None,)
        specs["absmax"] = tuple(stack) + (None,)
    if q.double_quant:
        specs["nested_absmax"] = tuple(stack) + (None,)
        specs["offset"] = tuple(stack)
    return specs


def _shard_like(q: QuantizedArray, w: Any) -> QuantizedArray:
    sharding = getattr(w, "sharding", None) if isinstance(w, jax.Array) else None
    if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(w, jax.core.Tracer):
        return q
    specs = packed_specs(q, tuple(sharding.spec))
    changes = {}
    for name, entries in specs.items():
        x = getattr(q, name)
        entries = _divisible(entries, x.shape, sharding.mesh)
        target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*entries))
        changes[name] = jax.device_put(x, target)
    return q.replace(**changes)


def _divisible(entries: Sequence[Any], shape: Sequence[int], mesh: Any) -> tuple:
    out = []
    for e, s in zip(entries, shape):
        if e is None:
            out.append(None)
            continue
        names = e if isinstance(e, tuple) else (e,)
        size = int(np.prod([mesh.shape[n] for n in names]))
        out.append(e if s % size == 0 else None)
    return tuple(out)


# ----------------------------------------------------------------------------------
# Trees of quantized kernels
# ----------------------------------------------------------------------------------


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """Every :class:`QuantizedArray` of ``tree`` replaced by its values (in ``dtype``,
    default each kernel's original dtype); other leaves and nodes unchanged (a LoRA tree
    keeps its factors, over a dense base).

    >>> plain = dequantize(quantize(params))   # doctest: +SKIP
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def quantized_leaves(tree: Any) -> list[tuple[str, QuantizedArray]]:
    """``[(path, QuantizedArray), ...]`` of ``tree`` (also inside LoRA weights), ``/``-joined paths."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return [("/".join(path_names(p)), x) for p, x in flat if is_quantized(x)]


def quantization_summary(tree: Any) -> Optional[dict[str, Any]]:
    """What a tree's quantized base is: ``None`` if it has no :class:`QuantizedArray`,
    else ``{"quantization_config": QuantConfig.to_dict(), "quantized_kernels": n,
    "parameters": ..., "bytes": ..., "bits_per_parameter": ...}`` (the first kernel's
    config; ``"mixed": True`` when kernels differ)."""
    leaves = quantized_leaves(tree)
    if not leaves:
        return None
    configs = {q.config for _, q in leaves}
    params = sum(q.size for _, q in leaves)
    nbytes = sum(q.nbytes for _, q in leaves)
    out = {
        "quantization_config": leaves[0][1].config.to_dict(),
        "quantized_kernels": len(leaves),
        "parameters": params,
        "bytes": nbytes,
        "bits_per_parameter": 8 * nbytes / params if params else 0.0,
    }
    if len(configs) > 1:
        out["mixed"] = True
    return out

