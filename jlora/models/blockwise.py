"""Blockwise causal attention with an online softmax, in pure JAX (any backend, TPU
included), with its own backward pass: neither direction forms the (batch, heads, T, T)
logits or probabilities; the largest temporary is one (batch, heads, block, block) tile.

Forward, for each query block and each key block ``j`` (keys in order)::

    s_j   = cap·tanh(scale·q·k_jᵀ / cap)        (scale·q·k_jᵀ without a softcap), float32
    s_j   = s_j where allowed, else MIN         (causal, window, padding; MIN = float32 min)
    m'    = max(m, rowmax(s_j));  c = exp(m − m')
    l     = c·l + rowsum(exp(s_j − m'));  acc = c·acc + exp(s_j − m')·v_j;  m = m'

and ``out = acc / l``, ``lse = m + log l``. Key blocks that the causal mask (or the
window) hides entirely are skipped (``lax.cond``). A row whose every key is masked (a
padding query under left padding) gets the mean of all values, exactly as the reference
:func:`jlora.models.layers.attend` (all logits equal to MIN, a uniform softmax).

Backward (FlashAttention-2's): with ``p = exp(s − lse)`` recomputed per tile and
``D = rowsum(dout ∘ out)``::

    dv += pᵀ·dout;   dp = dout·vᵀ;   ds = p ∘ (dp − D) ∘ (1 − tanh²)·scale
    dq += ds·k;      dk += dsᵀ·q

(the ``1 − tanh²`` factor only with a softcap), plus ``dout/S`` to every value from the
fully masked rows. Only ``out`` and ``lse`` (batch, heads, T) are kept between the passes.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["blockwise_attention"]

_MIN = float(np.finfo(np.float32).min)


def _pad_to(x: jax.Array, length: int, axis: int) -> jax.Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _allowed(q_idx, k_idx, kv_mask_blk, window):
    """(B or 1, bq, bk) bool: causal, inside the window, key not padding."""
    ok = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        ok = ok & (k_idx[None, :] > q_idx[:, None] - window)
    ok = ok[None]
    if kv_mask_blk is not None:
        ok = ok & kv_mask_blk[:, None, :]
    return ok


def _skipped(i, j, block, window):
    """Whether tile (query block i, key block j) is masked entirely by causality or the window."""
    q_first, q_last = i * block, i * block + block - 1
    k_first, k_last = j * block, j * block + block - 1
    skip = k_first > q_last
    if window is not None:
        skip = skip | (k_last <= q_first - window)
    return skip


def _logits(q_blk, k_blk, scale, softcap):
    """(B, K, G, bq, bk) float32 logits of a tile, and tanh(·) of the softcap (or None)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return t * softcap, t


def _split_blocks(x: jax.Array, n: int, block: int) -> jax.Array:
    """(B, n·block, ...) -> (n, B, block, ...)."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)


def _forward(q, k, v, kv_mask, window, *, scale, softcap, block, length):
    """Padded inputs q (B, Tp, K, G, H), k/v (B, Tp, K, H), kv_mask (B, Tp) or None.
    Returns out (B, Tp, K, G, H) in q's dtype, lse and fully-masked (B, K, G, Tp)."""
    B, Tp, K, G, H = q.shape
    n = Tp // block
    idx = jnp.arange(Tp)
    real = idx < length
    k_blocks, v_blocks = _split_blocks(k, n, block), _split_blocks(v, n, block)
    m_blocks = _split_blocks(kv_mask, n, block) if kv_mask is not None else None
    real_blocks = real.reshape(n, block)

    def q_block(_, i):
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        q_idx = i * block + jnp.arange(block)

        def k_block(carry, j):
            def compute(carry):
                m, l, acc = carry
                k_blk, v_blk = k_blocks[j], v_blocks[j]
                s, _ = _logits(q_blk, k_blk, scale, softcap)
                ok = _allowed(q_idx, j * block + jnp.arange(block), m_blocks[j] if m_blocks is not None else None, window)
                s = jnp.where(ok[:, None, None], s, _MIN)
                s = jnp.where(real_blocks[j][None, None, None, None, :], s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                c = jnp.exp(m - m_new)
                l = l * c + p.sum(-1)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
                return m_new, l, acc * c[..., None] + pv

            return jax.lax.cond(_skipped(i, j, block, window), lambda c: c, compute, carry), None

        init = (
            jnp.full((B, K, G, block), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, block), jnp.float32),
            jnp.zeros((B, K, G, block, H), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(k_block, init, jnp.arange(n))
        return None, (m, l, acc)

    _, (m, l, acc) = jax.lax.scan(q_block, None, jnp.arange(n))  # each (n, B, K, G, block, ...)
    m = jnp.moveaxis(m, 0, 3).reshape(B, K, G, Tp)
    l = jnp.moveaxis(l, 0, 3).reshape(B, K, G, Tp)
    acc = jnp.moveaxis(acc, 0, 3).reshape(B, K, G, Tp, H)
    fully_masked = m <= _MIN
    mean_v = (jnp.sum(v.astype(jnp.float32) * real[None, :, None, None], axis=1) / length)  # (B, K, H)
    out = jnp.where(fully_masked[..., None], mean_v[:, :, None, None, :], acc / l[..., None])
    lse = m + jnp.log(l)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)  # (B, Tp, K, G, H)
    return out, lse, fully_masked


def _backward(q, k, v, kv_mask, window, out, lse, fully_masked, dout, *, scale, softcap, block, length):
    B, Tp, K, G, H = q.shape
    n = Tp // block
    idx = jnp.arange(Tp)
    real = idx < length
    dsum = jnp.einsum("btkgh,btkgh->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))
    q_blocks, do_blocks = _split_blocks(q, n, block), _split_blocks(dout, n, block)
    lse_blocks = jnp.moveaxis(lse.reshape(B, K, G, n, block), 3, 0)
    dsum_blocks = jnp.moveaxis(dsum.reshape(B, K, G, n, block), 3, 0)
    live_blocks = jnp.moveaxis((~fully_masked).reshape(B, K, G, n, block), 3, 0)
    k_blocks, v_blocks = _split_blocks(k, n, block), _split_blocks(v, n, block)
    m_blocks = _split_blocks(kv_mask, n, block) if kv_mask is not None else None
    real_blocks = real.reshape(n, block)

    def k_block(dq, j):
        k_blk, v_blk = k_blocks[j], v_blocks[j]
        k_idx = j * block + jnp.arange(block)

        def q_block(carry, i):
            def compute(carry):
                dk, dv = carry
                q_blk, do_blk = q_blocks[i], do_blocks[i]
                s, t = _logits(q_blk, k_blk, scale, softcap)
                ok = _allowed(i * block + jnp.arange(block), k_idx, m_blocks[j] if m_blocks is not None else None, window)
                ok = ok[:, None, None] & real_blocks[j][None, None, None, None, :] & live_blocks[i][..., None]
                p = jnp.where(ok, jnp.exp(s - lse_blocks[i][..., None]), 0.0)
                dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dout.dtype), do_blk, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
                ds = p * (dp - dsum_blocks[i][..., None])
                if t is not None:
                    ds = ds * (1.0 - t * t)
                ds = ds * scale
                dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k.dtype), k_blk, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32)
                return (dk, dv), dq_i

            def skip(carry):
                return carry, jnp.zeros((B, block, K, G, H), jnp.float32)

            return jax.lax.cond(_skipped(i, j, block, window), skip, compute, carry)

        init = (jnp.zeros((B, block, K, H), jnp.float32), jnp.zeros((B, block, K, H), jnp.float32))
        (dk, dv), dq_parts = jax.lax.scan(q_block, init, jnp.arange(n))
        return dq + dq_parts, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros((n, B, block, K, G, H), jnp.float32), jnp.arange(n))
    dq = jnp.moveaxis(dq, 0, 1).reshape(B, Tp, K, G, H)
    dk = jnp.moveaxis(dk, 0, 1).reshape(B, Tp, K, H)
    dv = jnp.moveaxis(dv, 0, 1).reshape(B, Tp, K, H)
    # fully masked rows attend uniformly to the `length` real keys: dv += Σ_rows dout / length
    dead = jnp.einsum("btkgh,bkgt->bkh", dout.astype(jnp.float32), fully_masked.astype(jnp.float32)) / length
    dv = dv + dead[:, None] * real[None, :, None, None]
    return dq, dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, kv_mask, window, scale, softcap, block, length):
    return _forward(q, k, v, kv_mask, window, scale=scale, softcap=softcap, block=block, length=length)[0]


def _attention_fwd(q, k, v, kv_mask, window, scale, softcap, block, length):
    out, lse, fully_masked = _forward(q, k, v, kv_mask, window, scale=scale, softcap=softcap, block=block, length=length)
    return out, (q, k, v, kv_mask, window, out, lse, fully_masked)


def _zero_cotangent(x: Any) -> Any:
    if x is None:
        return None
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _attention_bwd(scale, softcap, block, length, res, dout):
    q, k, v, kv_mask, window, out, lse, fully_masked = res
    dq, dk, dv = _backward(
        q, k, v, kv_mask, window, out, lse, fully_masked, dout, scale=scale, softcap=softcap, block=block, length=length
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), _zero_cotangent(kv_mask), _zero_cotangent(window)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    kv_mask: Optional[jax.Array] = None,
    window: Any = None,
    softcap: Optional[float] = None,
    block_size: int = 512,
) -> jax.Array:
    """Causal grouped-query attention computed tile by tile (see the module docstring).

    Args:
      q: (B, T, N, H) queries; k, v: (B, T, K, H) keys and values, ``N % K == 0`` (query
        head ``n`` uses key/value head ``n // (N // K)``).
      scale: logits are ``scale · q·kᵀ``.
      kv_mask: (B, T), true for real keys (padding keys masked), or None.
      window: None (full causal) or the sliding window ``w``: a key attends to the query's
        last ``w`` positions, itself included. An int or an int32 scalar array (a traced
        per-layer window under a scan).
      softcap: ``cap·tanh(logits / cap)`` before masking (Gemma), or None.
      block_size: tile size along the sequence (T is padded up to a multiple of it).

    Returns (B, T, N, H) in q's dtype, equal to :func:`jlora.models.layers.attend` with
    the causal / window / padding mask (float32 softmax).

    >>> q = jnp.ones((1, 8, 4, 2)); k = v = jnp.ones((1, 8, 2, 2))
    >>> blockwise_attention(q, k, v, scale=0.5, block_size=4).shape
    (1, 8, 4, 2)
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if k.shape != (B, T, K, H) or v.shape != k.shape or N % K:
        raise ValueError(f"blockwise_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected (B, T, N, H) and "
                         "(B, T, K, H) with N a multiple of K")
    block = max(1, min(int(block_size), T))
    Tp = -(-T // block) * block
    qg = _pad_to(q.reshape(B, T, K, N // K, H), Tp, 1)
    kp, vp = _pad_to(k, Tp, 1), _pad_to(v, Tp, 1)
    mask = _pad_to(kv_mask.astype(bool), Tp, 1) if kv_mask is not None else None
    if window is not None:
        window = jnp.asarray(window, jnp.int32)
    out = _attention(qg, kp, vp, mask, window, float(scale), None if softcap is None else float(softcap), block, T)
    return out[:, :T].reshape(B, T, N, H)
