"""The layer stack of the NNX decoders: a Python list of layers, or one layer module whose
parameters carry a leading layer axis and run under ``jax.lax.scan``; and activation
checkpointing (remat) around each layer.

With ``DecoderConfig(scan_layers=True)`` the layers are built by ``nnx.vmap`` (one
random stream per layer), so every parameter of ``layers`` is stacked::

    layers/attn/q_proj/w        (L, D, N, H)      layer i is [i]
    layers/input_layernorm/w    (L, D)

and the forward is one ``lax.scan`` over the split state: the program (and its compile
time) does not grow with depth. Layers differ only in data: Gemma 3's local/global
interleave (and Qwen3's sliding layers) is a per-layer boolean scanned with the weights,
selecting the window, the mask and the RoPE table inside the one scanned body.

Remat modes (``DecoderConfig.remat``), each layer's body under ``jax.checkpoint``:

=========  ===========================================================================
``"none"`` no checkpointing: the backward pass keeps every activation of every layer
``"full"`` keep only each layer's input; everything inside is recomputed in the backward
``"dots"`` also keep the outputs of matmuls without batch dimensions (the projections:
           ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), recompute the
           rest (norms, activations, attention)
=========  ===========================================================================

``True`` and ``False`` are accepted as ``"full"`` and ``"none"``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .kv_cache import LayerCache

__all__ = ["REMAT_MODES", "remat_mode", "remat_policy", "stacked_layers", "scan_layers", "constrain_activations"]

REMAT_MODES = ("none", "full", "dots")


def remat_mode(remat: Any) -> str:
    """``remat`` as one of :data:`REMAT_MODES` (``True`` → ``"full"``, ``False``/``None`` → ``"none"``)."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if isinstance(remat, str) and remat in REMAT_MODES:
        return remat
    raise ValueError(f"DecoderConfig.remat={remat!r}; valid: {REMAT_MODES} (or True / False)")


def remat_policy(mode: str) -> Optional[Callable[..., bool]]:
    """The ``jax.checkpoint`` policy of a remat mode (``None``: save nothing but the inputs).

    >>> remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    True
    """
    if mode == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if mode in ("full", "none"):
        return None
    raise ValueError(f"remat mode {mode!r}; valid: {REMAT_MODES}")


def stacked_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """One module of ``make_layer``'s type whose parameters have a leading axis of
    ``num_layers`` (``nnx.vmap`` over split random streams)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> nnx.Module:
        return make_layer(r)

    return make(rngs)


def constrain_activations(x: jax.Array, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    """``x`` (batch, seq, embed_dim) constrained to ``sharding``
    (``jax.lax.with_sharding_constraint``); unchanged for ``None``.

    With FSDP every kernel is sharded along one of its axes, often the hidden one, and
    XLA's propagation then shards the residual stream along the hidden axis too, where
    FSDP wants each chip to keep its own rows (``P("fsdp", None, None)``).

    >>> constrain_activations(jnp.ones((2, 3, 4)), None).shape
    (2, 3, 4)
    """
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    inputs: Any,
    sliding: Any,
    remat: str = "none",
    cache: Any = None,
    activation_sharding: Optional[jax.sharding.Sharding] = None,
) -> Any:
    """``x`` through every layer of a stacked ``layers`` module, in order, under one
    ``jax.lax.scan`` over its split state. ``sliding``: a Python bool (every layer alike)
    or a (L,) bool array (a flag per layer, scanned with the weights). ``inputs`` (the
    :class:`jlora.models.attention.AttentionInputs`) is the same for every layer.

    ``cache``: a :class:`jlora.models.kv_cache.KVCache` (``k``, ``v`` (L, B, S, K, H)),
    carried through the scan whole (each layer writes its slice in place, at the scan's
    counter) and returned: ``(x, cache)``. No remat then (nothing is differentiated).

    ``activation_sharding``: each layer's input ``x`` is constrained to it
    (:func:`constrain_activations`)."""
    graphdef, state = nnx.split(layers)
    per_layer = not isinstance(sliding, bool)
    if cache is not None:
        return _scan_cached(graphdef, state, x, inputs, sliding, per_layer, cache)

    def body(h, xs):
        layer_state, flag = xs
        layer = nnx.merge(graphdef, layer_state)
        h = constrain_activations(h, activation_sharding)
        return layer.block(h, inputs, flag if per_layer else sliding), None

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    flags = jnp.asarray(sliding, bool) if per_layer else None
    x, _ = jax.lax.scan(body, x, (state, flags))
    return x


def _scan_cached(graphdef: Any, state: Any, x: jax.Array, inputs: Any, sliding: Any, per_layer: bool,
                 cache: Any) -> tuple[jax.Array, Any]:
    """:func:`scan_layers` with a KV cache in the carry; the layer index is scanned."""
    num_layers = cache.k.shape[0]

    def body(carry, xs):
        h, k, v = carry
        layer_state, flag, index = xs
        layer = nnx.merge(graphdef, layer_state)
        h, (k, v, _) = layer.block(h, inputs, flag if per_layer else sliding, LayerCache(k, v, index))
        return (h, k, v), None

    flags = jnp.asarray(sliding, bool) if per_layer else None
    (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (state, flags, jnp.arange(num_layers, dtype=jnp.int32)))
    return x, type(cache)(k, v)
