"""Quantized frozen bases (QLoRA): ``QuantConfig``, ``QuantizedArray``, ``quantize``,
``dequantize``, with bitsandbytes' numbers.

A quantized kernel is just another kind of frozen ``W``: ``jlora.quantize(params)``
replaces kernels by :class:`QuantizedArray` nodes, ``jlora.wrap`` accepts them as the
base of a ``LoraWeight``, and ``jlora.lora(fn)`` dequantizes each one at its use.

The codec is bitsandbytes' (0.50.2), reproduced exactly:

* **Layout.** A Flax kernel ``K`` is quantized as the PyTorch ``Linear`` weight it
  stands for, ``W = Kᵀ`` of shape ``(out, in)``: the output axes of the kernel (C order)
  make the rows, its input axes (C order) the columns, and ``W`` is flattened in C
  order. Leading ``"stack"`` axes (scanned layers) are quantized one layer at a time, as
  separate ``Linear`` layers would be. So ``dequantize(quantize(K)) ==
  bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(W))ᵀ`` exactly.
* **4-bit (nf4 / fp4).** Blocks of ``block_size`` (64) consecutive elements, ``absmax =
  max|x|`` per block in float32, ``scaled = clip(x · fp32(1/absmax), -1, 1)`` (a trailing
  partial block: ``x / absmax``), ``code = #{midpoints < scaled}`` (nearest code value,
  ties to the lower one), two codes a byte, the first in the high nibble, an odd element
  count padded with the code of 0.0 (7 for nf4). Dequantization is
  ``table[code] · absmax`` in float32, cast to the original dtype.
* **Double quantization** (``double_quant=True``, bitsandbytes' ``compress_statistics``):
  ``offset = mean(absmax)``, and ``absmax - offset`` is quantized with bitsandbytes'
  256-value dynamic map in blocks of 256 (8-bit codes plus a float32 absmax per 256
  blocks): ``absmax ≈ dyn[q] · nested_absmax[i // 256] + offset``.
* **int8** (LLM.int8's weight format, ``int8_vectorwise_quant``): per output row,
  ``SCB = max|W[row]|`` and ``CB = round(W · (fp32(1/SCB) · 127))`` (half to even);
  dequantization ``(CB · SCB) · fp32(1/127)``.

Storage per parameter: nf4/fp4 + double quantization 4 + 8/64 + 32/(64·256) ≈ 4.127 bits,
without 4.5 bits; int8 8 + 32/in bits.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QuantConfig",
    "QuantizedArray",
    "quantize",
    "quantize_array",
    "dequantize",
    "is_quantized",
    "quantized_leaves",
    "quantization_summary",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "NF4_CODE",
    "FP4_CODE",
    "DYNAMIC_CODE",
]

# ----------------------------------------------------------------------------------
# Code tables (bitsandbytes' exact float32 values)
# ----------------------------------------------------------------------------------


def _from_hex(text: str) -> np.ndarray:
    return np.array([int(text[i:i + 8], 16) for i in range(0, len(text), 8)], np.uint32).view(np.float32)


#: NF4, in code order (sorted ascending; QLoRA Appendix E, bitsandbytes ``get_4bit_type("nf4")``).
NF4_CODE = _from_hex(
    "bf800000bf3239b1bf066b30beca32a0be91a24dbe3d353fbdba787100000000"
    "3da2faff3e24cae33e7c04dd3ead033a3ee1a4b83f1007ab3f3913b33f800000"
)
NF4_CODE.setflags(write=False)

#: FP4 (1 sign, 2 exponent, 1 mantissa bit), in code order, normalised by its largest value 12.
FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12))
FP4_CODE.setflags(write=False)

#: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), sorted:
#: the second level of double quantization.
DYNAMIC_CODE = _from_hex(
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)
DYNAMIC_CODE.setflags(write=False)

_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256
_TINY = np.float32(1e-38)  # bitsandbytes clamps absmax to this before taking 1/absmax
_INV127 = np.float32(7.874015718698502e-3)


def _sorted_bounds(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of the sorted code values (float32) and the code index of each sorted
    position (ties kept in index order, as torch's ``argsort`` orders the two zeros of fp4)."""
    order = np.argsort(code, kind="stable")
    srt = code[order]
    mids = ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)
    return mids, order.astype(np.uint8)


def _bucketize(x: jax.Array, mids: np.ndarray) -> jax.Array:
    """``torch.bucketize(x, mids, right=False)``: how many midpoints are strictly below
    ``x`` (a value on a midpoint goes to the lower code)."""
    return jnp.sum(x[..., None] > jnp.asarray(mids), axis=-1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------
# bitsandbytes' functional API on flat (C-order) data
# ----------------------------------------------------------------------------------


def _blockwise_absmax_scaled(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-block ``absmax`` and ``clip(x / absmax, -1, 1)`` of a flat float32 ``x``, as
    bitsandbytes computes them: full blocks multiply by the float32 reciprocal of
    ``max(absmax, 1e-38)``, a trailing partial block divides."""
    n = x.shape[0]
    rem = n % block_size
    full = n - rem
    parts_a, parts_s = [], []
    if full:
        blocks = x[:full].reshape(-1, block_size)
        am = jnp.max(jnp.abs(blocks), axis=1)
        inv = jnp.where(am > 0, 1.0 / jnp.maximum(am, _TINY), jnp.float32(0))
        parts_a.append(am)
        parts_s.append(jnp.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1))
    if rem:
        tail = x[full:]
        am = _clamp_tiny(jnp.max(jnp.abs(tail)))  # stored clamped, as bitsandbytes does
        parts_a.append(am[None])
        parts_s.append(jnp.clip(_exact_div(tail, am), -1.0, 1.0))
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)  # noqa: E731
    return cat(parts_a), cat(parts_s)


def _clamp_tiny(am: jax.Array) -> jax.Array:
    """``max(am, 1e-38)`` for ``am >= 0``, on the bit patterns: 1e-38 is subnormal, and XLA
    flushes subnormal operands of float arithmetic to zero."""
    bits = jax.lax.bitcast_convert_type(am, jnp.uint32)
    tiny = np.float32(_TINY).view(np.uint32)
    return jax.lax.bitcast_convert_type(jnp.maximum(bits, tiny), jnp.float32)


def _exact_div(x: jax.Array, s: jax.Array) -> jax.Array:
    """``x / s`` for a scalar ``s``, correctly rounded: XLA rewrites a division by a
    broadcast scalar into a multiplication by its reciprocal (two roundings), so the
    divisor is given as an elementwise select rather than a broadcast. Zeros stay zeros
    whatever ``s`` is (XLA treats the subnormal 1e-38 that bitsandbytes clamps to as 0)."""
    return jnp.where(x == 0, x, x / jnp.where(x != x, x, s))


def _blockwise_scale(values: jax.Array, absmax: jax.Array, block_size: int) -> jax.Array:
    """``values[i] · absmax[i // block_size]`` in float32 (flat)."""
    n = values.shape[0]
    rem = n % block_size
    full = n - rem
    parts = []
    if full:
        parts.append((values[:full].reshape(-1, block_size) * absmax[: full // block_size, None]).reshape(-1))
    if rem:
        parts.append(values[full:] * absmax[full // block_size])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def quantize_4bit(x: jax.Array, block_size: int = 64, quant_type: str = "nf4") -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' ``quantize_4bit`` (without double quantization) on ``x`` flattened in
    C order: ``(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/block_size),))``.

    ``absmax_b = max_{i∈b} |x_i|``, ``code_i = #{m ∈ midpoints : m < clip(x_i/absmax_b, -1, 1)}``
    (remapped to fp4's code order for fp4), ``byte_k = code_{2k} << 4 | code_{2k+1}``.

    >>> packed, absmax = quantize_4bit(jnp.array([-1.0, 1.0]), 64, "nf4")
    >>> hex(int(packed[0])), float(absmax[0])
    ('0xf', 1.0)
    """
    _check_4bit(quant_type, block_size)
    flat = jnp.ravel(x).astype(jnp.float32)
    absmax, scaled = _blockwise_absmax_scaled(flat, block_size)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))
    mids, order = _sorted_bounds(_TABLES[quant_type])
    codes = _bucketize(scaled, mids)
    if quant_type != "nf4":
        codes = jnp.asarray(order)[codes]
    codes = codes.astype(jnp.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_4bit(packed: jax.Array, absmax: jax.Array, n: int, block_size: int = 64, quant_type: str = "nf4",
                    dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_4bit`: ``table[code_i] · absmax[i // block_size]`` in
    float32, cast to ``dtype``; flat, ``n`` elements (bitsandbytes' pure-torch
    ``_dequantize_4bit_compute``)."""
    _check_4bit(quant_type, block_size)
    hi = packed >> 4
    lo = packed & 0xF
    codes = jnp.stack([hi, lo], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(_TABLES[quant_type])[codes.astype(jnp.int32)]
    return _blockwise_scale(values, absmax.astype(jnp.float32), block_size).astype(dtype)


def quantize_blockwise(x: jax.Array, code: np.ndarray = DYNAMIC_CODE,
                       block_size: int = 4096) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' 8-bit ``quantize_blockwise`` on ``x`` flattened: ``(uint8 codes (n,),
    absmax float32 (ceil(n/block_size),))`` over the sorted 256-value ``code``, nearest
    value with ties to the lower one."""
    flat = jnp.ravel(x).astype(jnp.float32)
    absmax, scaled = _blockwise_absmax_scaled(flat, block_size)
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    return _bucketize(scaled, mids).astype(jnp.uint8), absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, code: np.ndarray = DYNAMIC_CODE,
                         block_size: int = 4096) -> jax.Array:
    """``code[codes_i] · absmax[i // block_size]`` in float32 (flat)."""
    values = jnp.asarray(code)[jnp.ravel(codes).astype(jnp.int32)]
    return _blockwise_scale(values, absmax.astype(jnp.float32), block_size)


def double_quantize(absmax: jax.Array, offset: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bitsandbytes' ``compress_statistics``: ``offset = mean(absmax)`` (float32) and
    ``absmax - offset`` quantized with the dynamic map in blocks of 256. Returns
    ``(qabsmax uint8, nested_absmax float32, offset float32 ())``.

    ``offset`` may be given (e.g. bitsandbytes' own, which torch's float32 ``mean`` can put
    one ulp away from XLA's): with the same offset every code is the same.
    """
    absmax = absmax.astype(jnp.float32)
    if offset is None:
        offset = jnp.mean(absmax)
    offset = jnp.asarray(offset, jnp.float32)
    q, nested = quantize_blockwise(absmax - offset, DYNAMIC_CODE, NESTED_BLOCK_SIZE)
    return q, nested, offset


def _undo_double_quant(qabsmax: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
    """``dyn[q] · nested_absmax[i // 256] + offset``, rounded after the product and after
    the sum as bitsandbytes rounds them."""
    return _no_fma(dequantize_blockwise(qabsmax, nested, DYNAMIC_CODE, NESTED_BLOCK_SIZE)) + offset


def _no_fma(p: jax.Array) -> jax.Array:
    """``p`` itself, as a value the compiler cannot contract with a following addition:
    XLA (CPU, GPU) turns ``a·b + c`` into one fused multiply-add, rounded once, where
    bitsandbytes rounds the product first. A select between the product and a NaN
    constant (taken only where ``p`` is NaN) keeps the product a separate rounding step;
    an ``optimization_barrier`` does not (it is removed before code generation)."""
    return jnp.where(p != p, jnp.asarray(np.nan, p.dtype), p)


def int8_vectorwise_quant(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LLM.int8's weight format (bitsandbytes ``int8_vectorwise_quant``, threshold 0) of a
    2-D ``w`` (rows = output features): ``SCB = max_j |w[i, j]|`` (float32) and
    ``CB = round(w · fp32(fp32(1/SCB) · 127))`` (half to even) as int8: torch evaluates
    ``127.0 / SCB`` as a reciprocal times 127. A row of zeros gets codes 0.

    >>> cb, scb = int8_vectorwise_quant(jnp.array([[0.5, -1.0]]))
    >>> cb.tolist(), scb.tolist()
    ([[64, -127]], [1.0])
    """
    if w.ndim != 2:
        raise ValueError(f"int8_vectorwise_quant: expected a 2-D (out, in) array, got shape {tuple(w.shape)}")
    scb = jnp.max(jnp.abs(w), axis=1).astype(jnp.float32)
    factor = jnp.where(scb > 0, (1.0 / jnp.where(scb > 0, scb, 1)) * np.float32(127.0), 0)
    cb = jnp.round(w.astype(jnp.float32) * factor[:, None]).astype(jnp.int8)
    return cb, scb


def int8_vectorwise_dequant(cb: jax.Array, scb: jax.Array) -> jax.Array:
    """``(CB · SCB) · fp32(1/127)`` in float32 (bitsandbytes ``int8_vectorwise_dequant``)."""
    return (cb.astype(jnp.float32) * scb.astype(jnp.float32)[:, None]) * _INV127


def _check_4bit(quant_type: str, block_size: int) -> None:
    if quant_type not in _TABLES:
        raise ValueError(f"quant_type={quant_type!r}: 4-bit types are 'nf4' and 'fp4'")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size}: valid block sizes are {BLOCK_SIZES}")


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
    - ``nested_absmax``: ``float32 (*stack, ceil(n_blocks/256))`` (double quantization), else None.
    - ``offset``: ``float32 (*stack,)`` (double quantization), else None.

    Static: ``item_shape`` (one layer's kernel shape, in the Flax kernel's axis order),
    ``roles`` (``"in"``/``"out"`` per item axis), ``dtype`` (the original dtype),
    ``quant_type``, ``block_size``, ``double_quant`` and ``compute_dtype``.

    ``shape``/``ndim``/``size`` are the kernel's; ``layout`` its roles with the stack axes;
    ``nbytes`` the storage; ``dequantize()`` the values.

    >>> q = quantize_array(jnp.ones((128, 64)), QuantConfig())
    >>> q.shape, q.codes.shape, q.absmax.dtype
    ((128, 64), (4096,), dtype('uint8'))
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
        return tuple(int(s) for s in self.absmax.shape[:-1])

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


def _from_torch_2d(w: jax.Array, item_shape: Sequence[int], roles: Sequence[str]) -> jax.Array:
    outs, ins = _torch_perm(roles)
    perm = outs + ins
    t = w.reshape([item_shape[i] for i in perm])
    return jnp.transpose(t, [perm.index(i) for i in range(len(roles))])


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
        if not dq:
            return packed, absmax, None, None
        q, nested, offset = double_quantize(absmax)
        return packed, q, nested, offset

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


def _item_dense(q: QuantizedArray, codes, absmax, nested, offset) -> jax.Array:
    """One layer's kernel in its original dtype (float32 math, bitsandbytes' rounding)."""
    if q.quant_type == "int8":
        w2d = int8_vectorwise_dequant(codes, absmax)
    else:
        if q.double_quant:
            absmax = _undo_double_quant(absmax, nested, offset)
        n = int(np.prod(q.item_shape))
        w2d = dequantize_4bit(codes, absmax, n, q.block_size, q.quant_type, jnp.float32)
    outs, ins = _torch_perm(q.roles)
    n_out = int(np.prod([q.item_shape[i] for i in outs]))
    w2d = w2d.astype(q.dtype).reshape(n_out, -1)
    return _from_torch_2d(w2d, q.item_shape, q.roles)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_stacked(q: QuantizedArray, dtype: Optional[np.dtype]) -> jax.Array:
    n_stack = len(q.stack_shape)
    f = _vmap_n(functools.partial(_item_dense, q), n_stack)
    out = f(*(_replicated(getattr(q, n)) for n in _CHILDREN))
    return out if dtype is None else out.astype(dtype)


def dense_for_compute(q: QuantizedArray) -> jax.Array:
    """The kernel as ``jlora.lora(fn)`` uses it: dequantized, in ``q.compute_dtype``."""
    return q.dequantize(q.compute_dtype)


# ----------------------------------------------------------------------------------
# Sharding: codes and scales follow the kernel
# ----------------------------------------------------------------------------------


def packed_specs(q: QuantizedArray, spec: Sequence[Any]) -> dict[str, tuple]:
    """PartitionSpec entries for each child of ``q`` given the kernel's ``spec`` (one
    entry per kernel axis): stack axes keep theirs; a kernel sharded along its first output
    axis only (column parallel) shards the rows of the PyTorch layout, i.e. the flat codes
    and absmax (where whole rows and blocks fall on each shard) or int8's ``CB``/``SCB``
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
    n_in = int(np.prod([q.item_shape[i] for i in ins]))
    whole_rows = rows_only and row is not None and n_in % q.block_size == 0 and n_in % 2 == 0
    flat = row if whole_rows else None
    specs["codes"] = tuple(stack) + (flat,)
    specs["absmax"] = tuple(stack) + (flat,)
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
# Trees
# ----------------------------------------------------------------------------------

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
    kernel are sharded like it (:func:`packed_specs`).

    Example:
      >>> q = quantize(params, QuantConfig(quant_type="nf4", double_quant=True))   # doctest: +SKIP
      >>> lp = jlora.wrap(q, jlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    """
    from .targets import TreeFacts, infer_layout, path_names, user_layout, LeafEntry
    from .weight import is_lora_node

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
        from .usage import find_kernel_uses

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
    from .targets import path_names

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

