"""bitsandbytes' quantization codec (0.50.2), reproduced bit for bit, on 2-D PyTorch-layout
weights: NF4 / FP4 blockwise 4-bit, double quantization of the scales, LLM.int8's
vectorwise int8.

:mod:`jlora.quant.array` builds the :class:`~jlora.QuantizedArray` node on these
functions; this module knows nothing of trees or kernel layouts. The format:

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

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_4bit_transposed",
    "lookup16",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize",
    "undo_double_quant",
    "undo_double_quant_transposed",
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

TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
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
    check_4bit(quant_type, block_size)
    flat = jnp.ravel(x).astype(jnp.float32)
    absmax, scaled = _blockwise_absmax_scaled(flat, block_size)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))
    mids, order = _sorted_bounds(TABLES[quant_type])
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
    check_4bit(quant_type, block_size)
    hi = packed >> 4
    lo = packed & 0xF
    codes = jnp.stack([hi, lo], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(TABLES[quant_type])[codes.astype(jnp.int32)]
    return _blockwise_scale(values, absmax.astype(jnp.float32), block_size).astype(dtype)


def dequantize_4bit_transposed(packed_t: jax.Array, absmax_t: jax.Array, block_size: int, quant_type: str,
                               rounded: Any, dtype: Any) -> jax.Array:
    """:func:`dequantize_4bit` of a whole ``(n_out, n_in)`` weight whose rows are whole
    blocks (``n_in % block_size == 0``), from its bytes and block scales held transposed,
    in a Flax kernel's orientation: ``packed_t (n_in/2, n_out)`` (bitsandbytes' bytes
    ``(n_out, n_in/2)``, transposed), ``absmax_t (n_in/block, n_out)`` (float32). Returns
    the weight transposed, ``(n_in, n_out)``: the same values (``table[code] · absmax`` in
    float32, rounded to ``rounded``, cast to ``dtype``).

    Written for the TPU's tiled layouts, where an array's minor axis is padded to 128
    lanes and its second-minor to 8 sublanes, and runs as fast on CPU: the bytes reshape to
    ``(n_in/block, block/2, n_out)`` for free (a split of the major axis), each block's
    scale is a broadcast along the middle axis (no flat ``i // block`` index), and the
    kernel comes out as ``(n_in/block, block, n_out)``, whose reshape to ``(n_in, n_out)``
    is free. The two nibbles of a byte are interleaved along the block by one interior
    padding (``lax.pad``: byte ``j`` at row ``2j``) and a shift of that by one row (an edge
    pad, which XLA fuses), never through a stacked axis of 2: the flat form's
    ``stack([hi, lo], -1).reshape(-1)`` made XLA:TPU lay the ``(n/2, 2)`` nibble pairs out
    in (8, 128) tiles, 64 times their size (14 GiB of temporaries for one 4096 × 14336
    kernel). XLA:TPU materialises an interior pad (a uint8 array of the kernel's shape):
    padding the high and the low nibbles separately made two of them, 56 MiB more
    temporaries for that kernel than the one pad. The table
    lookup is a select tree (:func:`lookup16`), which fuses. Nothing is transposed: a
    transpose of the bytes in here is a layout change XLA:TPU hoists out of a scan over
    layers, onto the whole stack of codes.

    >>> w = jnp.linspace(-1, 1, 8 * 128, dtype=jnp.float32).reshape(8, 128)
    >>> packed, absmax = quantize_4bit(w.reshape(-1), 64, "nf4")
    >>> flat = dequantize_4bit(packed, absmax, w.size, 64, "nf4").reshape(8, 128)
    >>> t = dequantize_4bit_transposed(packed.reshape(8, 64).T, absmax.reshape(8, 2).T, 64, "nf4",
    ...                                jnp.float32, jnp.float32)
    >>> bool((t == flat.T).all())
    True
    """
    check_4bit(quant_type, block_size)
    half = block_size // 2
    n_half, n_out = packed_t.shape
    nb = 2 * n_half // block_size
    blocks = packed_t.reshape(nb, half, n_out)
    zero = jnp.zeros((), blocks.dtype)
    # element 2j of a block is the high nibble of byte j, element 2j + 1 the low one:
    # one interior pad (XLA:TPU materialises it) and its one-row shift (an edge pad, fused)
    even = jax.lax.pad(blocks, zero, ((0, 0, 0), (0, 1, 1), (0, 0, 0)))  # byte j at row 2j, odd rows 0
    odd = jax.lax.pad(even[:, :-1], zero, ((0, 0, 0), (1, 0, 0), (0, 0, 0)))  # the same, one row down
    values = lookup16((even >> 4) | (odd & 0xF), TABLES[quant_type])
    scaled = values * absmax_t.astype(jnp.float32)[:, None, :]
    return scaled.astype(rounded).astype(dtype).reshape(2 * n_half, n_out)


def lookup16(codes: jax.Array, table: np.ndarray) -> jax.Array:
    """``table[codes]`` for 4-bit ``codes`` (any unsigned int dtype) and a 16-entry float32
    ``table``, as a binary tree of 15 selects on the code's bits: elementwise, so XLA fuses
    it with its producer and consumer (XLA:TPU rewrites a gather from a small table into
    compare chains kept as separate kernel-sized arrays, or keeps a real gather).

    >>> lookup16(jnp.array([0, 7, 15], jnp.uint8), np.arange(16, dtype=np.float32))
    Array([ 0.,  7., 15.], dtype=float32)
    """
    level = [jnp.float32(v) for v in np.asarray(table, np.float32)]
    for bit in range(4):
        on = ((codes >> bit) & 1).astype(bool)
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


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


def undo_double_quant(qabsmax: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
    """``dyn[q] · nested_absmax[i // 256] + offset``, rounded after the product and after
    the sum as bitsandbytes rounds them."""
    return _no_fma(dequantize_blockwise(qabsmax, nested, DYNAMIC_CODE, NESTED_BLOCK_SIZE)) + offset


#: Scale arrays of at least this many entries (every layer of Llama-3-8B and larger) are
#: undone by :func:`undo_double_quant_transposed`'s selects, smaller ones through a transpose.
_SELECTS_FROM = 2**16


def undo_double_quant_transposed(qabsmax_t: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
    """:func:`undo_double_quant` of block scales held transposed, ``(n_in/block, n_out)``
    (bitsandbytes' scales are ``(n_out, n_in/block)``, flat in that C order), returned in
    the same transposed orientation, bit for bit the same values.

    The nested blocks of 256 run over bitsandbytes' flat order, ``f = o·nb + i`` for the
    scale of block ``i`` of output ``o`` (``nb = n_in/block``). Rather than transposing the
    codes to that order (a layout change XLA:TPU hoists out of a scan over layers, onto the
    whole stack of scales: measured, three copies of every layer's scales per step at
    Llama-3-70B size, 880 MiB), each output ``o`` meets at most ``ceil(nb/256) + 1`` nested
    blocks, from ``g0(o) = o·nb // 256`` on; the nested scale of ``(i, o)`` is the ``k``-th
    of those, ``k = (o·nb mod 256 + i) // 256``: a few ``(n_out,)`` gathers and selects,
    elementwise. Below :data:`_SELECTS_FROM` scales (no layer of a real model) it takes the
    transpose instead: measured on v5e, a small train step's temporaries were 10.5 MiB with
    the selects and none with the transpose, which XLA:TPU keeps on chip at that size.

    >>> import numpy as np
    >>> a = jnp.asarray(np.random.default_rng(0).random(160 * 448, np.float32))   # n_out=160, nb=448: selects
    >>> q, nested, off = double_quantize(a)
    >>> ref = undo_double_quant(q, nested, off).reshape(160, 448).T
    >>> bool((undo_double_quant_transposed(q.reshape(160, 448).T, nested, off) == ref).all())
    True
    """
    nb, n_out = qabsmax_t.shape[-2:]
    if nb * n_out < _SELECTS_FROM:
        flat = undo_double_quant(jnp.swapaxes(qabsmax_t, -1, -2).reshape(-1), nested, offset)
        return jnp.swapaxes(flat.reshape(n_out, nb), -1, -2)
    values = jnp.asarray(DYNAMIC_CODE)[qabsmax_t.astype(jnp.int32)]
    start = jnp.arange(n_out, dtype=jnp.int32) * nb  # flat index of (0, o)
    g0 = start // NESTED_BLOCK_SIZE
    k = (start % NESTED_BLOCK_SIZE)[None, :] + jax.lax.broadcasted_iota(jnp.int32, (nb, n_out), 0)
    k = k // NESTED_BLOCK_SIZE
    nested = nested.astype(jnp.float32)
    last = nested.shape[-1] - 1
    scale = nested[jnp.minimum(g0, last)][None, :]
    for j in range(1, -(-nb // NESTED_BLOCK_SIZE) + 1):
        scale = jnp.where(k == j, nested[jnp.minimum(g0 + j, last)][None, :], scale)
    return _no_fma(values * scale) + offset


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


def check_4bit(quant_type: str, block_size: int) -> None:
    if quant_type not in TABLES:
        raise ValueError(f"quant_type={quant_type!r}: 4-bit types are 'nf4' and 'fp4'")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size}: valid block sizes are {BLOCK_SIZES}")


