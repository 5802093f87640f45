"""Gemma 3 (text) in Flax NNX, laid out as tunix / bonsai lay it out.

Parameters (``nnx.State`` paths; D model width, N query heads, K key/value heads,
H head dim, F MLP width, V vocabulary)::

    embedder/input_embedding                 (V, D)       encode: rows · sqrt(D); tied output head
    layers/<i>/pre_attention_norm/scale      (D,)
    layers/<i>/attn/q_einsum/w               (N, D, H)    einsum BTD,NDH->BTNH
    layers/<i>/attn/kv_einsum/w              (2, K, D, H) einsum BSD,CKDH->CBSKH (k and v stacked)
    layers/<i>/attn/attn_vec_einsum/w        (N, H, D)    einsum BTNH,NHD->BTD
    layers/<i>/attn/_query_norm/scale        (H,)
    layers/<i>/attn/_key_norm/scale          (H,)
    layers/<i>/post_attention_norm/scale     (D,)
    layers/<i>/pre_ffw_norm/scale            (D,)
    layers/<i>/mlp/gate_proj/kernel          (D, F)       nnx.Linear, no bias; gelu(tanh) gating
    layers/<i>/mlp/up_proj/kernel            (D, F)
    layers/<i>/mlp/down_proj/kernel          (F, D)
    layers/<i>/post_ffw_norm/scale           (D,)
    final_norm/scale                         (D,)

With ``config.scan_layers`` every ``layers/...`` leaf has a leading layer axis (e.g.
``layers/attn/kv_einsum/w`` (L, 2, K, D, H)) and the layers run under one ``lax.scan``; the
local/global interleave is a per-layer flag scanned with the weights, which selects the
sliding-window mask and the local RoPE table (:mod:`jlora.models.stack`).

Norms are Gemma's ``(1 + scale)`` RMSNorm. Sliding (local) layers use
``rope_local_base_freq`` without scaling and a sliding-window mask; global layers use
``rope_theta`` with ``rope_scaling``. Attention logits are scaled by
``query_pre_attn_scalar**-0.5``; final logits are soft-capped when
``final_logit_softcapping`` is set.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionInputs, attention, attention_inputs
from .config import DecoderConfig, rope_frequencies
from .decoder import MLP, _dtypes, _layer_flag, _remat_call, run_layers
from .kv_cache import LayerCache, cached_attention
from .layers import Einsum, Embedder, GemmaRMSNorm, apply_rope, rope_cos_sin
from .stack import stacked_layers

__all__ = ["Gemma3Attention", "Gemma3Block", "Gemma3"]


class Gemma3Attention(nnx.Module):
    """Gemma 3 attention: separate q and stacked kv einsums, q/k norms, local or global RoPE."""

    def __init__(self, config: DecoderConfig, layer_type: Optional[str], *, rngs: nnx.Rngs):
        pd, dt = _dtypes(config)
        D, N, K, H = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(rngs=rngs, param_dtype=pd, dtype=dt, stddev=config.initializer_range,
                  flat=config.scan_layers)
        self.q_einsum = Einsum("BTD,NDH->BTNH", (N, D, H), **kw)
        self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, K, D, H), **kw)
        self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (N, H, D), **kw)
        self._query_norm = GemmaRMSNorm(H, eps=config.rms_norm_eps, param_dtype=pd)
        self._key_norm = GemmaRMSNorm(H, eps=config.rms_norm_eps, param_dtype=pd)
        self.sliding = None if layer_type is None else layer_type == "sliding_attention"
        self.inv_freq_local = tuple(float(f) for f in rope_frequencies(H, config.rope_local_base_freq, None))
        self.inv_freq_global = tuple(float(f) for f in rope_frequencies(H, config.rope_theta, config.rope_scaling))
        self.inv_freq = self.inv_freq_local if self.sliding else self.inv_freq_global
        scalar = config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else H
        self.scale = float(scalar) ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.window = config.sliding_window
        self.implementation = config.attention
        self.block_size = config.attention_block_size

    def __call__(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
                 cache: Optional[LayerCache] = None) -> Any:
        """The attention output; with ``cache`` also the updated cache: ``(out, cache)``."""
        q = self.q_einsum(x)
        k, v = self.kv_einsum(x)
        q = self._query_norm(q)
        k = self._key_norm(k)
        flag = _layer_flag(self.sliding, sliding)
        if isinstance(flag, bool):
            cos, sin = rope_cos_sin(inputs.positions, jnp.asarray(self.inv_freq, jnp.float32), q.dtype)
        else:  # a scanned layer: local or global RoPE by its flag
            inv_freq = jnp.where(flag, jnp.asarray(self.inv_freq_local, jnp.float32),
                                 jnp.asarray(self.inv_freq_global, jnp.float32))
            cos, sin = rope_cos_sin(inputs.positions, inv_freq, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw = dict(sliding=flag, window=self.window, scale=self.scale, softcap=self.softcap,
                  implementation=self.implementation, block_size=self.block_size)
        if cache is not None:
            out, cache = cached_attention(q, k, v, cache, inputs, **kw)
            return self.attn_vec_einsum(out), cache
        return self.attn_vec_einsum(attention(q, k, v, inputs, **kw))


class Gemma3Block(nnx.Module):
    """``x + post_attention_norm(attn(pre_attention_norm(x)))``, then the same around the MLP."""

    def __init__(self, config: DecoderConfig, layer_type: Optional[str], *, rngs: nnx.Rngs):
        pd, _ = _dtypes(config)
        D, eps = config.embed_dim, config.rms_norm_eps
        self.pre_attention_norm = GemmaRMSNorm(D, eps=eps, param_dtype=pd)
        self.attn = Gemma3Attention(config, layer_type, rngs=rngs)
        self.post_attention_norm = GemmaRMSNorm(D, eps=eps, param_dtype=pd)
        self.pre_ffw_norm = GemmaRMSNorm(D, eps=eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs, activation=partial(jax.nn.gelu, approximate=True))
        self.post_ffw_norm = GemmaRMSNorm(D, eps=eps, param_dtype=pd)
        self.remat = "none" if config.scan_layers else config.remat

    def block(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
              cache: Optional[LayerCache] = None) -> Any:
        """The block's output; with ``cache``, ``(output, cache)``."""
        if cache is not None:
            a, cache = self.attn(self.pre_attention_norm(x), inputs, sliding, cache)
            x = x + self.post_attention_norm(a)
            return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x))), cache
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), inputs, sliding))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))

    def __call__(self, x: jax.Array, inputs: AttentionInputs, sliding: Any = None,
                 cache: Optional[LayerCache] = None) -> Any:
        return _remat_call(self, x, inputs, sliding, cache)


class Gemma3(nnx.Module):
    """A Gemma 3 text causal LM (``Gemma3ForCausalLM``): ``model(input_ids) -> logits``.

    Arguments of ``__call__`` as :class:`jlora.models.Qwen3`'s. The output head is the
    input embedding (Gemma ties them).

    >>> from jlora.models import DecoderConfig, Gemma3
    >>> cfg = DecoderConfig("gemma3", vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=2,
    ...                     num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
    ...                     layer_types=("sliding_attention", "full_attention"), sliding_window=4)
    >>> Gemma3(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 64)
    """

    family = "gemma3"

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        if config.family != "gemma3":
            raise ValueError(f"Gemma3 needs a config with family='gemma3', got {config.family!r}")
        if not config.tie_embeddings:
            raise ValueError("Gemma3: the output head is the input embedding; set tie_embeddings=True")
        pd, dt = _dtypes(config)
        self.config = config
        self.embedder = Embedder(
            config.vocab_size, config.embed_dim, rngs=rngs, scale_by_sqrt_dim=True, param_dtype=pd, dtype=dt,
            stddev=config.initializer_range,
        )
        if config.scan_layers:
            self.layers = stacked_layers(lambda r: Gemma3Block(config, None, rngs=r), config.num_layers, rngs)
        else:
            self.layers = nnx.List([Gemma3Block(config, t, rngs=rngs) for t in config.layer_types])
        self.final_norm = GemmaRMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)

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
        """The (tied) output head on hidden states ``x``, soft-capped by
        ``final_logit_softcapping``; ``out_dtype`` is the matmul's result type."""
        logits = self.embedder.decode(x, out_dtype)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(
        self,
        input_ids: jax.Array,
        positions: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, attention_mask))
