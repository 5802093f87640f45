"""The key/value cache of the NNX decoders: one preallocated buffer for every layer, and
the cached attention that writes to it and reads from it.

The cache holds keys and values after RoPE and the key norm, as the attention computed
them, in the key/value heads' own shape (grouped-query attention: ``K`` heads, not the
``N`` query heads)::

    KVCache.k, KVCache.v    (L, B, S, K, H)     L layers, S slots

A generation with prompts left-padded to ``P`` tokens and ``n`` new tokens has ``S = P +
n`` slots: the prompt fills slots ``0 .. P-1`` (its padding slots are masked), new token
``i`` goes to slot ``P + i``. Every row writes the same slot at each step (left padding
aligns the ends of the prompts), so a step writes one ``dynamic_update_slice`` per layer
and the buffers are updated in place inside the decode loop.

A layer's attention is given a :class:`LayerCache` (the whole cache and the layer's index:
a Python int for a list of layers, the scan's counter for stacked layers) and returns it
updated. Two kinds of inputs:

* prefill (:class:`~jlora.models.attention.AttentionInputs`): the prompt attends to
  itself with the model's own attention implementation (``"xla"``, ``"dot_product"``,
  ``"blockwise"``) and its keys/values are written to slots ``index ..``;
* decode (:class:`DecodeInputs`): the new tokens' keys/values are written at
  ``inputs.index`` and the queries attend to every slot through ``(B, T, S)`` masks
  (padding and future slots out; Gemma 3's sliding layers also keys older than the
  window; under ``scan_layers`` a traced per-layer flag picks the mask).

Slots of a row are contiguous in positions (left padding, then the generated tokens), so a
window in positions is a window in slots: a key in slot ``j`` is within the window of the
query in slot ``q`` when ``q - window < j <= q``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from .attention import AttentionInputs, attention
from .layers import attend

__all__ = ["DecodeInputs", "KVCache", "LayerCache", "cached_attention", "decode_inputs", "empty_cache"]

Flag = Union[bool, jax.Array]


class KVCache(NamedTuple):
    """Keys and values of every layer: ``k``, ``v`` (L, B, S, K, H)."""

    k: jax.Array
    v: jax.Array


class LayerCache(NamedTuple):
    """What one layer's attention reads and writes: the whole cache and the layer's index."""

    k: jax.Array
    v: jax.Array
    layer: Any  # int, or a traced int32 scalar (scanned layers)


class DecodeInputs(NamedTuple):
    """The attention inputs of a decode step over the cache (a pytree).

    positions: (B, T) RoPE positions of the T new tokens. index: () int32, the slot of the
    first new token. full / sliding: (B, T, S) bool: the keys each query may read (causal,
    padding out), and the same within the sliding window (None without a window).
    """

    positions: jax.Array
    index: jax.Array
    full: jax.Array
    sliding: Optional[jax.Array]


def empty_cache(num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype: Any) -> KVCache:
    """A zero cache of ``slots`` positions for every layer.

    >>> empty_cache(2, 1, 8, 2, 4, jnp.float32).k.shape
    (2, 1, 8, 2, 4)
    """
    shape = (num_layers, batch, slots, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def decode_inputs(
    positions: jax.Array,
    index: jax.Array,
    slot_valid: jax.Array,
    sliding_window: Optional[int],
) -> DecodeInputs:
    """The :class:`DecodeInputs` of ``T`` new tokens written at slots ``index .. index+T-1``.

    ``slot_valid`` (B, S) bool says which slots hold a real token once the new ones are
    written (the prompt's mask, then the generated slots up to ``index + T - 1``). A query
    in slot ``q`` reads the valid slots ``j <= q`` (and ``j > q - window`` for sliding
    layers).

    >>> valid = jnp.array([[False, True, True, False]])
    >>> decode_inputs(jnp.array([[1]]), jnp.int32(2), valid, None).full.astype(int).tolist()
    [[[0, 1, 1, 0]]]
    """
    B, T = positions.shape
    S = slot_valid.shape[1]
    q_slot = index + jnp.arange(T, dtype=jnp.int32)  # (T,)
    k_slot = jnp.arange(S, dtype=jnp.int32)  # (S,)
    causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    full = causal[None] & slot_valid[:, None, :]
    sliding = None
    if sliding_window is not None:
        sliding = full & (k_slot[None, :] > q_slot[:, None] - sliding_window)[None]
    return DecodeInputs(positions, jnp.asarray(index, jnp.int32), full, sliding)


def _select(flag: Flag, if_true: Any, if_false: Any) -> Any:
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return jnp.where(flag, if_true, if_false)


def _write(buffer: jax.Array, new: jax.Array, layer: Any, index: Any) -> jax.Array:
    """``buffer[layer, :, index:index+T] = new`` (new: (B, T, K, H)), in place in a loop."""
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
    return jax.lax.dynamic_update_slice(buffer, new[None].astype(buffer.dtype), start)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: LayerCache,
    inputs: Union[AttentionInputs, DecodeInputs],
    *,
    sliding: Flag,
    window: Optional[int],
    scale: float,
    softcap: Optional[float] = None,
    implementation: str = "xla",
    block_size: int = 512,
) -> tuple[jax.Array, LayerCache]:
    """Attention of ``q`` (B, T, N, H) with the cache: ``k``, ``v`` (B, T, K, H) of the same
    tokens are written into the layer's slots, and the output (B, T, N, H) comes with the
    updated cache.

    Prefill (``inputs`` an :class:`~jlora.models.attention.AttentionInputs`): the tokens
    attend to each other with ``implementation`` (the cache's earlier slots are empty) and
    are written from slot 0. Decode (:class:`DecodeInputs`): written at ``inputs.index``,
    the queries attend to the layer's whole cache through the masks of ``inputs``
    (:func:`jlora.models.layers.attend`, grouped-query: query head ``n`` reads key/value
    head ``n // (N // K)``).

    >>> cache = empty_cache(1, 1, 4, 1, 8, jnp.float32)
    >>> q = jnp.ones((1, 1, 2, 8)); k = v = jnp.ones((1, 1, 1, 8))
    >>> inputs = decode_inputs(jnp.array([[0]]), jnp.int32(0), jnp.array([[True, False, False, False]]), None)
    >>> out, c = cached_attention(q, k, v, LayerCache(cache.k, cache.v, 0), inputs, sliding=False, window=None,
    ...                           scale=0.35)
    >>> out.shape, float(c.k[0, 0, 0, 0, 0]), float(c.k[0, 0, 1, 0, 0])
    ((1, 1, 2, 8), 1.0, 0.0)
    """
    if isinstance(inputs, AttentionInputs):  # prefill: the prompt attends to itself
        out = attention(q, k, v, inputs, sliding=sliding, window=window, scale=scale, softcap=softcap,
                        implementation=implementation, block_size=block_size)
        return out, LayerCache(_write(cache.k, k, cache.layer, 0), _write(cache.v, v, cache.layer, 0), cache.layer)
    if not isinstance(inputs, DecodeInputs):
        raise TypeError(f"cached_attention: inputs must be AttentionInputs (prefill) or DecodeInputs, got "
                        f"{type(inputs).__name__}")
    ck = _write(cache.k, k, cache.layer, inputs.index)
    cv = _write(cache.v, v, cache.layer, inputs.index)
    layer_k = jax.lax.dynamic_index_in_dim(ck, cache.layer, 0, keepdims=False)  # (B, S, K, H)
    layer_v = jax.lax.dynamic_index_in_dim(cv, cache.layer, 0, keepdims=False)
    mask = inputs.full
    if window is not None and inputs.sliding is not None:
        mask = _select(sliding, inputs.sliding, inputs.full)
    out = attend(q, layer_k.astype(q.dtype), layer_v.astype(v.dtype), mask, scale, softcap)
    return out, LayerCache(ck, cv, cache.layer)
