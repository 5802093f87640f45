"""Qwen3-MoE in Flax NNX: Qwen3's attention, and a mixture of experts in place of the MLP.

Parameters (``nnx.State`` paths; D model width, N/K/H heads as in Qwen3, E experts, F the
experts' width ``moe_intermediate_size``)::

    embedder/input_embedding                 (V, D)
    layers/<i>/input_layernorm/w             (D,)
    layers/<i>/attn/{q,k,v,o}_proj/w, q_norm/w, k_norm/w    as Qwen3 (jlora.models.decoder)
    layers/<i>/post_attention_layernorm/w    (D,)
    layers/<i>/mlp/gate/w                    (D, E)       the router: einsum TD,DE->TE
    layers/<i>/mlp/experts/gate_proj/w       (E, D, F)    ragged_dot over tokens sorted by expert
    layers/<i>/mlp/experts/up_proj/w         (E, D, F)
    layers/<i>/mlp/experts/down_proj/w       (E, F, D)
    layers/<i>/mlp/{gate,up,down}_proj/kernel             a dense MLP (width hidden_dim) in the
                                                          layers that are not sparse (mlp_only_layers,
                                                          decoder_sparse_step)
    final_norm/w                             (D,)
    lm_head/w                                (D, V)       absent when embeddings are tied

The sparse block computes what transformers 4.57's ``Qwen3MoeSparseMoeBlock`` computes:
``p = softmax(x·G)`` in float32, the ``k = num_experts_per_tok`` largest ``p`` per token
(renormalised to sum 1 when ``norm_topk_prob``) cast to the activations' dtype, and
``Σ_k p_k · expert_k(x)`` with ``expert(x) = down(silu(gate(x)) · up(x))``. The ``T·k``
token copies are sorted by expert (a stable ``argsort``) and each expert kernel is applied
with one ``jax.lax.ragged_dot`` (group sizes = tokens per expert), so no expert sees a
token it was not routed to, and LoRA on the experts stays factored
(``ragged_dot(x, W) + s·ragged_dot(ragged_dot(x, A), B)``, :mod:`jlora.transform.ragged`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DecoderConfig
from .decoder import MLP, Attention, Decoder, DecoderLayer, _dtypes
from .layers import Einsum, RMSNorm

__all__ = ["ExpertKernel", "SparseMoeBlock", "Qwen3MoeLayer", "Qwen3Moe", "route"]


class ExpertKernel(nnx.Module):
    """A stack of expert kernels ``w`` (E, in, out), applied to tokens sorted by expert:
    ``ragged_dot(x, w, group_sizes)``."""

    def __init__(self, shape: tuple[int, int, int], *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 stddev: float = 0.02):
        self.dtype = dtype
        self.w = nnx.Param(jax.nn.initializers.normal(stddev)(rngs.params(), tuple(shape), param_dtype))

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        w = self.w[...]
        if self.dtype is not None and w.dtype != self.dtype:
            w = w.astype(self.dtype)
        return jax.lax.ragged_dot(x, w, group_sizes)


class Experts(nnx.Module):
    """The E experts of one layer: ``down(silu(gate(x)) · up(x))`` per group of rows."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        pd, dt = _dtypes(config)
        E, D, F = config.num_experts, config.embed_dim, config.moe_intermediate_size
        kw = dict(rngs=rngs, param_dtype=pd, dtype=dt, stddev=config.initializer_range)
        self.gate_proj = ExpertKernel((E, D, F), **kw)
        self.up_proj = ExpertKernel((E, D, F), **kw)
        self.down_proj = ExpertKernel((E, F, D), **kw)

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x, group_sizes)) * self.up_proj(x, group_sizes)
        return self.down_proj(h, group_sizes)


def route(logits: jax.Array, k: int, normalize: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)`` of each token (both ``(T, k)``), as transformers routes:
    softmax over the experts in float32, the ``k`` largest, renormalised if ``normalize``,
    the weights cast to ``dtype``.

    >>> w, e = route(jnp.array([[0.0, 2.0, 1.0]]), 2, True, jnp.float32)
    >>> e.tolist(), [round(float(v), 4) for v in w[0]]
    ([[1, 2]], [0.7311, 0.2689])
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(dtype), experts


class SparseMoeBlock(nnx.Module):
    """Top-k routing and the experts (transformers' ``Qwen3MoeSparseMoeBlock``)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        pd, dt = _dtypes(config)
        E, D = config.num_experts, config.embed_dim
        self.gate = Einsum("TD,DE->TE", (D, E), rngs=rngs, param_dtype=pd, dtype=dt, stddev=config.initializer_range)
        self.experts = Experts(config, rngs=rngs)
        self.num_experts = E
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, experts = route(self.gate(tokens), self.top_k, self.norm_topk_prob, tokens.dtype)
        flat = experts.reshape(-1)  # token t's j-th expert at t·k + j
        order = jnp.argsort(flat, stable=True)  # the copies sorted by expert
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        out = self.experts(tokens[order // self.top_k], sizes)
        out = jnp.zeros_like(out).at[order].set(out).reshape(tokens.shape[0], self.top_k, -1)
        return jnp.einsum("TKD,TK->TD", out, weights).reshape(shape)


class Qwen3MoeLayer(DecoderLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a sparse or dense
    MLP; ``block``, ``remat`` and ``layer_type`` are :class:`jlora.models.decoder.DecoderLayer`'s."""

    def __init__(self, config: DecoderConfig, index: int, layer_type: Optional[str], *, rngs: nnx.Rngs):
        pd, _ = _dtypes(config)
        self.input_layernorm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)
        self.attn = Attention(config, layer_type, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, eps=config.rms_norm_eps, param_dtype=pd)
        self.mlp = SparseMoeBlock(config, rngs=rngs) if config.is_moe_layer(index) else MLP(config, rngs=rngs)
        self.remat = "none" if config.scan_layers else config.remat


class Qwen3Moe(Decoder):
    """A Qwen3-MoE causal LM (``Qwen3MoeForCausalLM``): ``model(input_ids) -> logits``.

    Arguments of ``__call__``, ``hidden_states`` / ``logits`` and the memory settings
    (``scan_layers``, ``remat``, ``attention``) as :class:`jlora.models.Qwen3`'s; stacked
    layers need every layer sparse (no ``mlp_only_layers``, ``decoder_sparse_step=1``).

    >>> from jlora.models import DecoderConfig, Qwen3Moe
    >>> cfg = DecoderConfig("qwen3_moe", vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=2, num_heads=4,
    ...                     num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    ...                     moe_intermediate_size=8)
    >>> model = Qwen3Moe(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 5), jnp.int32)).shape, model.layers[0].mlp.experts.gate_proj.w.shape
    ((1, 5, 64), (4, 16, 8))
    """

    family = "qwen3_moe"

    def make_layer(self, config: DecoderConfig, index: Optional[int], layer_type: Optional[str],
                   rngs: nnx.Rngs) -> nnx.Module:
        if index is None:  # one layer of a stacked model: every layer must be alike
            dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
            if dense:
                raise ValueError(
                    f"Qwen3Moe: scan_layers=True stacks identical layers, but layers {dense} are dense "
                    "(mlp_only_layers / decoder_sparse_step); use scan_layers=False for this checkpoint"
                )
            index = 0
        return Qwen3MoeLayer(config, index, layer_type, rngs=rngs)
