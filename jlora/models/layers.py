"""Building blocks shared by the NNX decoders: einsum projections, RMS norms, the
embedder, RoPE and grouped-query attention.

Parameter leaf names follow tunix / bonsai: an :class:`Einsum` holds ``w``, a
:class:`RMSNorm` ``w`` (Qwen3, Llama) and a :class:`GemmaRMSNorm` ``scale``, the
:class:`Embedder` ``input_embedding``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Einsum",
    "flat_product_shapes",
    "RMSNorm",
    "GemmaRMSNorm",
    "Embedder",
    "rope_cos_sin",
    "apply_rope",
    "attend",
    "attention_masks",
]


def _dtype(name: Optional[str], default: Any = None) -> Any:
    return jnp.dtype(name) if name is not None else default


def flat_product_shapes(einsum_str: str, x_shape: Sequence[int], w_shape: Sequence[int]) -> Optional[tuple]:
    """The 2-D matrix product an einsum is, if it is one without a transpose.

    ``"BTD,DNH->BTNH"`` with ``w`` of shape ``(D, N, H)`` is ``x @ w.reshape(D, N*H)``
    reshaped to ``(B, T, N, H)``; ``"BTNH,NHD->BTD"`` is ``x.reshape(B, T, N*H) @
    w.reshape(N*H, D)``. Returns ``(x_2d_shape, w_2d_shape, out_shape)``, or ``None``
    when the contracted letters are not the trailing letters of ``x`` and the leading
    letters of ``w`` (in one order), or the output is not ``x``'s free letters then
    ``w``'s (e.g. Gemma's ``"BTD,NDH->BTNH"``).

    >>> flat_product_shapes("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5))
    ((2, 3, 8), (8, 20), (2, 3, 4, 5))
    >>> flat_product_shapes("BTD,NDH->BTNH", (2, 3, 8), (4, 8, 5)) is None
    True
    """
    inputs, out = einsum_str.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    contracted = [c for c in rhs if c in lhs and c not in out]
    k = len(contracted)
    if (k == 0 or len(set(lhs + rhs)) != len(set(lhs)) + len(set(rhs)) - k or list(rhs[:k]) != contracted
            or list(lhs[len(lhs) - k:]) != contracted or out != lhs[:len(lhs) - k] + rhs[k:]):
        return None
    size = lambda shape: int(np.prod(shape, dtype=np.int64))  # noqa: E731
    d = size(w_shape[:k])
    return (tuple(x_shape[:len(lhs) - k]) + (d,), (d, size(w_shape[k:])),
            tuple(x_shape[:len(lhs) - k]) + tuple(w_shape[k:]))


class Einsum(nnx.Module):
    """``jnp.einsum(einsum_str, x, w)`` with a parameter ``w`` of ``shape``.

    ``flat``: when the einsum is a plain matrix product (:func:`flat_product_shapes`),
    compute it as one on the ``(in, out)`` view of ``w``. The value is the same; the
    program differs: XLA:TPU copies a layer-stacked 4-D kernel (``(L, D, N, H)``, the
    ``scan_layers`` models) into another layout before the layer loop, 2.5 GiB of
    attention kernels at Llama-3-8B, and the 2-D view needs no copy. Off by default:
    qwix's LoRA intercepts the einsum on the parameter itself.

    >>> proj = Einsum("BTD,DNH->BTNH", (8, 2, 4), rngs=nnx.Rngs(0))
    >>> proj(jnp.ones((1, 3, 8))).shape
    (1, 3, 2, 4)
    """

    def __init__(
        self,
        einsum_str: str,
        shape: Sequence[int],
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        stddev: float = 0.02,
        flat: bool = False,
    ):
        self.einsum_str = einsum_str
        self.dtype = dtype
        self.flat = bool(flat)
        init = jax.nn.initializers.normal(stddev)
        self.w = nnx.Param(init(rngs.params(), tuple(shape), param_dtype))

    def __call__(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """``out_dtype``: the einsum's ``preferred_element_type`` (e.g. float32 logits
        from bfloat16 operands); default the operands' dtype."""
        w = self.w[...]
        if self.dtype is not None and w.dtype != self.dtype:
            w = w.astype(self.dtype)
        shapes = flat_product_shapes(self.einsum_str, x.shape, w.shape) if self.flat else None
        if shapes is None:
            return jnp.einsum(self.einsum_str, x, w, preferred_element_type=out_dtype)
        x_2d, w_2d, out_shape = shapes
        y = jnp.einsum("...i,io->...o", x.reshape(x_2d), w.reshape(w_2d), preferred_element_type=out_dtype)
        return y.reshape(out_shape)


class RMSNorm(nnx.Module):
    """Qwen3 / Llama RMSNorm: ``w · x / sqrt(mean(x²) + eps)``, the normalisation in float32
    and the product in the input dtype (as transformers does). Parameter ``w`` (ones)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = float(eps)
        self.w = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.w[...].astype(dt) * y.astype(dt)


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``(1 + scale) · x / sqrt(mean(x²) + eps)``, all in float32, cast
    to the input dtype at the end. Parameter ``scale`` (zeros)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(dt)


class Embedder(nnx.Module):
    """Token embedding ``input_embedding`` (vocab, dim). ``encode`` gathers rows (times
    ``sqrt(dim)`` for Gemma, rounded to the table's dtype as transformers does),
    ``decode`` is the tied output head ``x · input_embeddingᵀ``."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        *,
        rngs: nnx.Rngs,
        scale_by_sqrt_dim: bool = False,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        stddev: float = 0.02,
    ):
        self.scale_by_sqrt_dim = scale_by_sqrt_dim
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev)
        self.input_embedding = nnx.Param(init(rngs.params(), (vocab_size, embed_dim), param_dtype))

    def _table(self) -> jax.Array:
        t = self.input_embedding[...]
        return t.astype(self.dtype) if self.dtype is not None and t.dtype != self.dtype else t

    def encode(self, ids: jax.Array) -> jax.Array:
        table = self._table()
        x = jnp.take(table, ids, axis=0)
        if self.scale_by_sqrt_dim:
            x = x * jnp.asarray(np.sqrt(table.shape[-1]), dtype=table.dtype)
        return x

    def decode(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x, self._table(), preferred_element_type=out_dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``cos``/``sin`` of ``positions · inv_freq`` (float32), duplicated to the head
    dimension as ``[f, f]`` and cast to ``dtype``: each (batch, seq, head_dim)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of ``x`` (batch, seq, heads, head_dim) in transformers' convention:
    ``x·cos + rotate_half(x)·sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_masks(
    length: int, attention_mask: Optional[jax.Array], batch: int, sliding_window: Optional[int]
) -> tuple[jax.Array, Optional[jax.Array]]:
    """Boolean (batch, query, key) masks: causal (``key <= query``), and with
    ``sliding_window`` also ``key > query - sliding_window``; ``attention_mask`` (batch,
    key), 1 for real tokens, removes padding keys."""
    idx = jnp.arange(length)
    causal = idx[None, :] <= idx[:, None]
    full = jnp.broadcast_to(causal, (batch, length, length))
    if attention_mask is not None:
        full = full & attention_mask.astype(bool)[:, None, :]
    sliding = None
    if sliding_window is not None:
        sliding = full & (idx[None, :] > idx[:, None] - sliding_window)[None]
    return full, sliding


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: Optional[float] = None,
) -> jax.Array:
    """Grouped-query attention. ``q`` (B, T, N, H), ``k``/``v`` (B, S, K, H), ``mask``
    (B, T, S); query head ``n`` uses key/value head ``n // (N // K)`` (transformers'
    ``repeat_kv``). Softmax in float32; masked logits are the dtype's minimum (a fully
    masked row attends uniformly, as transformers' SDPA path does, instead of NaN)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k) * jnp.asarray(scale, q.dtype)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = logits.astype(jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(B, T, N, H)
