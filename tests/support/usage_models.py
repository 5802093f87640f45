"""Small models whose parameter trees are laid out like the JAX LLM code people bring.

- ``TunixLike``: NNX, as tunix/bonsai's Qwen3/Llama 3: ``embedder/input_embedding
  (V, D)`` gathered by rows, an ``nnx.List`` of layers with einsum kernels under a leaf
  ``w`` (``attn/q_proj/w (D, N, H)``, ``k_proj/w (D, K, H)``, ``v_proj/w``,
  ``o_proj/w (N, H, D)``; GQA), ``nnx.Linear`` MLPs ``gate_proj/up_proj/down_proj``,
  RMSNorm, RoPE, ``lm_head/w (D, V)``; optionally each block under ``nnx.remat`` in the
  form ``nnx.remat(self.block.__func__)(self, ...)``.
- ``GemmaLike``: NNX, as the gemma library: ``attn/q_einsum/w (N, D, H)``,
  ``attn/kv_einsum/w (2, K, D, H)`` (k and v in one einsum), ``attn/attn_vec_einsum/w
  (N, H, D)``, a tied embedding (``embedder.attend``: ``x·Eᵀ``), ``nnx.remat`` on each
  block (a lambda over the block) with a policy.
- ``maxtext_like``: Linen, ``nn.scan(..., variable_axes={"params": 1})``: kernels
  ``(in, L, out)`` and ``(in, L, heads, head_dim)`` as MaxText stores them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, N, K, H, F, V, L = 16, 4, 2, 8, 24, 40, 2

# Weights are drawn with NumPy (seed 0 for every model built): building a model compiles
# nothing, and the remat and plain variants of a family have the same weights.
_RNG = np.random.default_rng(0)


def _reseed() -> None:
    global _RNG
    _RNG = np.random.default_rng(0)


def _normal(shape, scale):
    return jnp.asarray(_RNG.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _init(rngs: nnx.Rngs, shape, scale=None):
    del rngs
    return nnx.Param(_normal(shape, scale or shape[0] ** -0.5))


def _kernel_init(key, shape, dtype=jnp.float32):
    del key
    return _normal(shape, shape[0] ** -0.5).astype(dtype)


def _linear(d_in, d_out, rngs):
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=_kernel_init, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x):
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * self.scale[...]


class Einsum(nnx.Module):
    """A kernel under a leaf ``w``, applied with ``jnp.einsum`` (tunix/gemma style)."""

    def __init__(self, shape, rngs: nnx.Rngs, fan_in_axes=(0,)):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        self.w = _init(rngs, shape, fan_in**-0.5)

    def __call__(self, eqn: str, x):
        return jnp.einsum(eqn, x, self.w[...])


def rope(x, positions):
    """Rotary embedding over the last axis (``x``: (B, T, heads, H))."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10_000 ** (jnp.arange(half) / half))
    ang = positions[:, :, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)


def attention(q, k, v):
    """Causal GQA: q (B, T, N, H), k/v (B, T, K, H)."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(q.shape[-1])
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, -1e9)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.gate_proj = _linear(D, F, rngs)
        self.up_proj = _linear(D, F, rngs)
        self.down_proj = _linear(F, D, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TunixAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = Einsum((D, N, H), rngs)
        self.k_proj = Einsum((D, K, H), rngs)
        self.v_proj = Einsum((D, K, H), rngs)
        self.o_proj = Einsum((N, H, D), rngs, fan_in_axes=(0, 1))

    def __call__(self, x, positions):
        q = rope(self.q_proj("BTD,DNH->BTNH", x), positions)
        k = rope(self.k_proj("BSD,DKH->BSKH", x), positions)
        v = self.v_proj("BSD,DKH->BSKH", x)
        return self.o_proj("BTNH,NHD->BTD", attention(q, k, v))


class TunixBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(D)
        self.attn = TunixAttention(rngs)
        self.post_attention_layernorm = RMSNorm(D)
        self.mlp = MLP(rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.input_embedding = nnx.Param(_normal((V, D), 1.0))

    def encode(self, ids):
        return self.input_embedding[...][ids]

    def attend(self, x):
        return jnp.dot(x, self.input_embedding[...].T)


class TunixLike(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, remat: bool = False):
        self.remat = remat
        self.embedder = Embedder(rngs)
        self.layers = nnx.List([TunixBlock(rngs) for _ in range(L)])
        self.final_norm = RMSNorm(D)
        self.lm_head = Einsum((D, V), rngs)

    def block(self, layer, x, positions):
        return layer(x, positions)

    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape).astype(jnp.float32)
        x = self.embedder.encode(ids)
        for layer in self.layers:
            if self.remat:
                # the tunix form: the module itself goes in (and its state comes back out)
                x = nnx.remat(self.block.__func__)(self, layer, x, positions)
            else:
                x = layer(x, positions)
        return self.lm_head("BTD,DV->BTV", self.final_norm(x))


class GemmaAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = Einsum((N, D, H), rngs, fan_in_axes=(1,))
        self.kv_einsum = Einsum((2, K, D, H), rngs, fan_in_axes=(2,))
        self.attn_vec_einsum = Einsum((N, H, D), rngs, fan_in_axes=(0, 1))

    def __call__(self, x, positions):
        q = rope(self.q_einsum("BTD,NDH->BTNH", x), positions)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        return self.attn_vec_einsum("BTNH,NHD->BTD", attention(q, rope(k, positions), v))


class GemmaBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.pre_attention_norm = RMSNorm(D)
        self.attn = GemmaAttention(rngs)
        self.pre_ffw_norm = RMSNorm(D)
        self.mlp = MLP(rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.pre_attention_norm(x), positions)
        return x + self.mlp(self.pre_ffw_norm(x))


class GemmaLike(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, remat: bool = True):
        self.remat = remat
        self.embedder = Embedder(rngs)
        self.layers = nnx.List([GemmaBlock(rngs) for _ in range(L)])
        self.final_norm = RMSNorm(D)

    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape).astype(jnp.float32)
        x = self.embedder.encode(ids) * jnp.sqrt(D)
        for layer in self.layers:
            if self.remat:
                x = nnx.remat(lambda blk, h: blk(h, positions), policy=jax.checkpoint_policies.dots_saveable,
                              prevent_cse=False)(layer, x)
            else:
                x = layer(x, positions)
        return self.embedder.attend(self.final_norm(x))


class _MaxTextBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.RMSNorm(name="pre_norm")(x)
        q = nn.DenseGeneral((N, H), name="query")(h)  # (D, N, H) per layer: (D, L, N, H) stacked
        k = nn.DenseGeneral((N, H), name="key")(h)
        v = nn.DenseGeneral((N, H), name="value")(h)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(H)
        a = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(a)  # (N, H, D): (N, L, H, D) stacked
        h = nn.RMSNorm(name="post_norm")(x)
        h = nn.Dense(F, name="wi")(h)  # (D, F): (D, L, F) stacked
        return x + nn.Dense(D, name="wo")(jax.nn.gelu(h)), None


class MaxTextLike(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="token_embedder")(ids)
        stack = nn.scan(
            _MaxTextBlock, variable_axes={"params": 1}, split_rngs={"params": True}, length=L,
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(V, name="logits_dense")(nn.RMSNorm(name="final_norm")(x))


def ids(batch: int = 2, length: int = 6, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def tunix(remat: bool = False):
    _reseed()
    return TunixLike(nnx.Rngs(0), remat=remat)


@functools.lru_cache(maxsize=None)
def gemma(remat: bool = True):
    _reseed()
    return GemmaLike(nnx.Rngs(0), remat=remat)


@functools.lru_cache(maxsize=None)
def maxtext():
    """The Linen model and its params (shapes from ``jax.eval_shape(model.init)``, values
    drawn with NumPy: nothing compiled)."""
    _reseed()
    model = MaxTextLike()
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids())["params"]

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        if name == "bias":
            return _normal(s.shape, 0.1)
        return _normal(s.shape, 1.0 if name == "embedding" else s.shape[0] ** -0.5)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)
