"""Attention implementations of the NNX decoders, selected by ``DecoderConfig.attention``.

All three compute the same thing: causal grouped-query attention with an optional
sliding window, padding mask and logit softcap, the softmax in float32.

===============  =========================================================================
``"xla"``        :func:`jlora.models.layers.attend` over precomputed (B, T, T) boolean
                 masks: the reference; forms (B, heads, T, T) float32 logits.
``"dot_product"`` ``jax.nn.dot_product_attention``: cuDNN's flash attention on GPU (for
                 bfloat16 / float16 inputs), XLA's implementation elsewhere (which forms the
                 (B, heads, T, T) logits). No softcap.
``"blockwise"``  :func:`jlora.models.blockwise.blockwise_attention`: an online softmax over
                 (block × block) tiles with its own backward pass, pure JAX (TPU included);
                 never forms the (B, heads, T, T) logits.
===============  =========================================================================

The layers receive an :class:`AttentionInputs` (positions, the padding mask, and the
(B, T, T) masks only for ``"xla"``) and whether they are sliding: a Python bool, or under
``scan_layers`` a traced per-layer flag (one program for Gemma 3's local and global
layers: the flag selects the window, the mask and the RoPE table).

LoRA never sits inside these functions: their inputs are activations (q, k, v), the
projections around them are where the adapted kernels are.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from .blockwise import blockwise_attention
from .layers import attend, attention_masks

__all__ = ["IMPLEMENTATIONS", "AttentionInputs", "attention_inputs", "attention"]

IMPLEMENTATIONS = ("xla", "dot_product", "blockwise")

Flag = Union[bool, jax.Array]


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides its activations (a pytree).

    positions: (B, T) RoPE positions. kv_mask: (B, T) bool, true for real tokens, or None.
    full / sliding: (B, T, T) bool masks of the ``"xla"`` implementation (else None).
    """

    positions: jax.Array
    kv_mask: Optional[jax.Array]
    full: Optional[jax.Array]
    sliding: Optional[jax.Array]


def attention_inputs(
    implementation: str,
    batch: int,
    length: int,
    positions: Optional[jax.Array],
    attention_mask: Optional[jax.Array],
    sliding_window: Optional[int],
) -> AttentionInputs:
    """The :class:`AttentionInputs` of a (batch, length) call: default positions
    ``0 .. length-1``, and the (B, T, T) masks only where ``implementation == "xla"``."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    kv_mask = attention_mask.astype(bool) if attention_mask is not None else None
    full = sliding = None
    if implementation == "xla":
        full, sliding = attention_masks(length, attention_mask, batch, sliding_window)
    return AttentionInputs(positions, kv_mask, full, sliding)


def _select(flag: Flag, if_true: Any, if_false: Any) -> Any:
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return jnp.where(flag, if_true, if_false)


def _dot_product(q, k, v, kv_mask, window: Optional[int], scale: float) -> jax.Array:
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    mask = kv_mask[:, None, None, :] if kv_mask is not None else None
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=True,
        local_window_size=(int(window) - 1, 0) if window is not None else None, implementation=impl,
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    *,
    sliding: Flag,
    window: Optional[int],
    scale: float,
    softcap: Optional[float] = None,
    implementation: str = "xla",
    block_size: int = 512,
) -> jax.Array:
    """Causal attention of q (B, T, N, H) over k, v (B, T, K, H) -> (B, T, N, H).

    ``sliding`` (a bool or a traced bool scalar) restricts each query to its last
    ``window`` keys. ``implementation`` is one of :data:`IMPLEMENTATIONS`.

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 2, 8)); k = v = jnp.ones((1, 4, 1, 8))
    >>> inputs = attention_inputs("blockwise", 1, 4, None, None, None)
    >>> attention(q, k, v, inputs, sliding=False, window=None, scale=0.35, implementation="blockwise").shape
    (1, 4, 2, 8)
    """
    if implementation == "xla":
        if inputs.full is None:
            raise ValueError("attention(implementation='xla') needs the (B, T, T) masks of attention_inputs('xla', ...)")
        mask = _select(sliding, inputs.sliding, inputs.full) if window is not None else inputs.full
        return attend(q, k, v, mask, scale, softcap)
    if implementation == "blockwise":
        w = None
        if window is not None and not (isinstance(sliding, bool) and not sliding):
            w = window if isinstance(sliding, bool) else jnp.where(sliding, window, q.shape[1] + 1)
        return blockwise_attention(q, k, v, scale=scale, kv_mask=inputs.kv_mask, window=w, softcap=softcap,
                                   block_size=block_size)
    if implementation == "dot_product":
        if softcap is not None:
            raise ValueError("attention='dot_product' (jax.nn.dot_product_attention) has no logit softcap; "
                             "use attention='blockwise' or 'xla'")
        if window is None or (isinstance(sliding, bool) and not sliding):
            return _dot_product(q, k, v, inputs.kv_mask, None, scale)
        if isinstance(sliding, bool):
            return _dot_product(q, k, v, inputs.kv_mask, window, scale)
        return jax.lax.cond(
            sliding,
            lambda q, k, v, m: _dot_product(q, k, v, m, window, scale),
            lambda q, k, v, m: _dot_product(q, k, v, m, None, scale),
            q, k, v, inputs.kv_mask,
        )
    raise ValueError(f"attention implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
