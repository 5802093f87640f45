"""Qwen3 and Llama 3 decoders in Flax NNX, laid out as tunix / bonsai lay them out.

Parameters (``nnx.State`` paths; D model width, N query heads, K key/value heads,
H head dim, F MLP width, V vocabulary)::

    embedder/input_embedding                 (V, D)
    layers/<i>/input_layernorm/w             (D,)
    layers/<i>/attn/q_proj/w                 (D, N, H)    einsum BTD,DNH->BTNH
    layers/<i>/attn/k_proj/w                 (D, K, H)    einsum BSD,DKH->BSKH
    layers/<i>/attn/v_proj/w                 (D, K, H)
    layers/<i>/attn/o_proj/w                 (N, H, D)    einsum BTNH,NHD->BTD
    layers/<i>/attn/q_norm/w, k_norm/w       (H,)         Qwen3 only
    layers/<i>/post_attention_layernorm/w    (D,)
    layers/<i>/mlp/gate_proj/kernel          (D, F)       nnx.Linear, no bias
    layers/<i>/mlp/up_proj/kernel            (D, F)
    layers/<i>/mlp/down_proj/kernel          (F, D)
    final_norm/w                             (D,)
    lm_head/w                                (D, V)       absent when embeddings are tied

``layers`` is an ``nnx.List``. With ``config.remat`` (``"full"``, ``"dots"``) each block runs
under ``nnx.remat(type(self).block, policy=...)(self, ...)``, as tunix does.

With ``config.scan_layers`` ``layers`` is one :class:`DecoderLayer` whose parameters have
a leading layer axis (``layers/attn/q_proj/w`` (L, D, N, H), ``layers/input_layernorm/w``
(L, D), ...), run under ``jax.lax.scan`` (:mod:`jlora.models.stack`).

``model.hidden_states(ids)`` is the final norm's output (batch, seq, D) and
``model.logits(h)`` the output head: ``model(ids) == model.logits(model.hidden_states(ids))``
(what :func:`jlora.models.causal_lm_loss` uses to compute the loss chunk by chunk).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionInputs, attention, attention_inputs
from .config import DecoderConfig, rope_frequencies
from .kv_cache import LayerCache, cached_attention
from .layers import Einsum, Embedder, RMSNorm, apply_rope, rope_cos_sin
from .stack import constrain_activations, remat_policy, scan_layers, stacked_layers

__all__ = ["Attention", "MLP", "DecoderLayer", "Decoder", "Qwen3", "Llama3", "run_layers", "sliding_flags"]


def _dtypes(config: DecoderConfig):
    param_dtype = jnp.dtype(config.param_dtype)
    dtype = jnp.dtype(config.dtype) if config.dtype is not None else None
    return param_dtype, dtype


def _layer_flag(sliding: Optional[bool], given: Any) -> Any:
    """A layer's sliding flag: its own (a built-in type) or the one given per call (scanned)."""
    if given is not None:
        return given
    if sliding is None:
        raise ValueError("a layer of a stacked (scan_layers) model needs its sliding flag per call")
    return sliding


def sliding_flags(config: DecoderConfig) -> Any:
    """What :func:`jlora.models.stack.scan_layers` needs: one bool if every layer has the
    same type, else a (L,) bool array (per-layer flag, scanned)."""
    flags = [t == "sliding_attention" for t in config.layer_types]
    if all(f == flags[0] for f in flags):
        return flags[0]
    return jnp.asarray(flags)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (and per-head q/k RMSNorm for Qwen3).

    ``layer_type`` ``None`` (a layer of a stacked model): sliding or not is given per call."""

    def __init__(self, config: DecoderConfig, layer_type: Optional[str], *, rngs: nnx.Rngs):
        pd, dt = _dtypes(config)
        D, N, K, H = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(rngs=rngs, param_dtype=pd, dtype=dt, stddev=config.initializer_range,
                  flat=config.scan_layers)
        self.q_proj = Einsum("BTD,DNH->BTNH", (D, N, H), **kw)
        self.k_proj = Einsum("BSD,DKH->BSKH", (D, K, H), **kw)
        self.v_proj = Einsum("BSD,DKH->BSKH", (D, K, H), **kw)
        self.o_proj = Einsum("BTNH,NHD->BTD", (N, H, D), **kw)
        if config.qk_norm:
            self.q_norm = RMSNorm(H, eps=config.rms_norm_eps, param_dtype=pd)
            self.k_norm = RMSNorm(H, eps=config.rms_norm_eps, param_dtype=pd)
        self.qk_norm = config.qk_norm
        self.scale = float(H) ** -0.5
        self.sliding = None if layer_type is None else layer_type == "sliding_attention"
        self.window = config.sliding_window
        self.implementation = config.attention
        self.block_size = config.attention_block_size
        self.inv_freq = tuple(float(f) for f in rope_frequencies(H, config.rope_theta, config.rope_scaling))

    def __call__(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
                 cache: Optional[LayerCache] = None) -> Any:
        """The attention output; with ``cache`` (:mod:`jlora.models.kv_cache`) also the
        updated cache: ``(out, cache)``."""
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        cos, sin = rope_cos_sin(inputs.positions, jnp.asarray(self.inv_freq, jnp.float32), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw = dict(sliding=_layer_flag(self.sliding, sliding), window=self.window, scale=self.scale,
                  implementation=self.implementation, block_size=self.block_size)
        if cache is not None:
            out, cache = cached_attention(q, k, v, cache, inputs, **kw)
            return self.o_proj(out), cache
        return self.o_proj(attention(q, k, v, inputs, **kw))


class MLP(nnx.Module):
    """``down_proj(silu(gate_proj(x)) · up_proj(x))`` with bias-free ``nnx.Linear`` layers."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, activation=jax.nn.silu):
        pd, dt = _dtypes(config)
        D, F = config.embed_dim, config.hidden_dim
        init = jax.nn.initializers.normal(config.initializer_range)
        kw = dict(use_bias=False, dtype=dt, param_dtype=pd, kernel_init=init, rngs=rngs)
        self.gate_proj = nnx.Linear(D, F, **kw)
        self.up_proj = nnx.Linear(D, F, **kw)
        self.down_proj = nnx.Linear(F, D, **kw)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def _remat_call(layer: nnx.Module, x: jax.Array, inputs: AttentionInputs, sliding: Any,
                cache: Optional[LayerCache] = None) -> Any:
    """``layer.block`` under ``nnx.remat`` with the layer's policy (or plainly, remat "none",
    and with a KV cache: generation keeps no activations for a backward pass)."""
    if cache is not None:
        return layer.block(x, inputs, sliding, cache)
    if layer.remat == "none":
        return layer.block(x, inputs, sliding)
    return nnx.remat(type(layer).block, policy=remat_policy(layer.remat))(layer, x, inputs, sliding)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    ``remat`` (a :data:`jlora.models.stack.REMAT_MODES` name): the layer runs its block under
    ``nnx.remat`` itself; a stacked model's layers are checkpointed by the scan instead."""

    def __init__(self, config: DecoderConfig, layer_type: Optional[str], *, rngs: nnx.Rngs):
        pd, _ = _dtypes(config)
        self.input_layernorm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)
        self.attn = Attention(config, layer_type, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs)
        self.remat = "none" if config.scan_layers else config.remat

    def block(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
              cache: Optional[LayerCache] = None) -> Any:
        """The layer's output; with ``cache``, ``(output, cache)``."""
        if cache is not None:
            a, cache = self.attn(self.input_layernorm(x), inputs, sliding, cache)
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x)), cache
        x = x + self.attn(self.input_layernorm(x), inputs, sliding)
        return x + self.mlp(self.post_attention_layernorm(x))

    def __call__(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
                 cache: Optional[LayerCache] = None) -> Any:
        return _remat_call(self, x, inputs, sliding, cache)


def run_layers(model: nnx.Module, x: jax.Array, inputs: AttentionInputs, cache: Any = None) -> Any:
    """``x`` through the model's layers: a loop over the list, or one scan over the stack.

    With ``cache`` (a :class:`jlora.models.kv_cache.KVCache` of every layer) each layer
    reads and writes its slice of it, and ``(x, cache)`` is returned."""
    config = model.config
    sharding = config.activation_sharding
    if config.scan_layers:
        return scan_layers(model.layers, x, inputs, sliding_flags(config), config.remat, cache=cache,
                           activation_sharding=sharding)
    if cache is not None:
        k, v = cache
        for i, layer in enumerate(model.layers):
            x, (k, v, _) = layer(x, inputs, cache=LayerCache(k, v, i))
        return x, type(cache)(k, v)
    for layer in model.layers:
        x = layer(constrain_activations(x, sharding), inputs)
    return x


class Decoder(nnx.Module):
    """A Qwen3 / Llama 3 causal LM: ``model(input_ids) -> logits`` (batch, seq, vocab).

    Args of ``__call__``:
      input_ids: (batch, seq) int token ids.
      positions: (batch, seq) RoPE positions (default ``0 .. seq-1``).
      attention_mask: (batch, seq), 1 for real tokens and 0 for padding keys.

    >>> from jlora.models import DecoderConfig, Qwen3
    >>> cfg = DecoderConfig("qwen3", vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=2,
    ...                     num_heads=4, num_kv_heads=2, head_dim=8)
    >>> model = Qwen3(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 64)
    """

    family: str = ""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        if self.family and config.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a config with family={self.family!r}, got {config.family!r}")
        pd, dt = _dtypes(config)
        self.config = config
        self.embedder = Embedder(
            config.vocab_size, config.embed_dim, rngs=rngs, param_dtype=pd, dtype=dt, stddev=config.initializer_range
        )
        if config.scan_layers:
            self.layers = stacked_layers(lambda r: self.make_layer(config, None, None, r), config.num_layers, rngs)
        else:
            self.layers = nnx.List([self.make_layer(config, i, t, rngs) for i, t in enumerate(config.layer_types)])
        self.final_norm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)
        if not config.tie_embeddings:
            self.lm_head = Einsum(
                "BTD,DV->BTV", (config.embed_dim, config.vocab_size), rngs=rngs, param_dtype=pd, dtype=dt,
                stddev=config.initializer_range,
            )

    def make_layer(self, config: DecoderConfig, index: Optional[int], layer_type: Optional[str],
                   rngs: nnx.Rngs) -> nnx.Module:
        """Layer ``index`` of type ``layer_type``; ``None``, ``None``: one layer of the stack."""
        return DecoderLayer(config, layer_type, rngs=rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        """The final norm's output (batch, seq, embed_dim): everything but the output head."""
        B, T = input_ids.shape
        inputs = attention_inputs(self.config.attention, B, T, positions, attention_mask, self.config.sliding_window)
        x = self.embedder.encode(input_ids)
        x = run_layers(self, x, inputs)
        return self.final_norm(x)

    def logits(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """The output head on hidden states ``x`` (..., embed_dim) -> (..., vocab);
        ``out_dtype`` is the matmul's result type (e.g. float32 from bfloat16)."""
        if self.config.tie_embeddings:
            return self.embedder.decode(x, out_dtype)
        return self.lm_head(x, out_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, attention_mask))


class Qwen3(Decoder):
    """Qwen3 (``Qwen3ForCausalLM``): the decoder with per-head q/k RMSNorm."""

    family = "qwen3"


class Llama3(Decoder):
    """Llama 3 (``LlamaForCausalLM``), with Llama 3.1's RoPE scaling when configured."""

    family = "llama3"
