"""Blockwise causal attention with an online softmax, in pure JAX (any backend, TPU
included), with its own backward pass: neither direction forms the (batch, heads, T, T)
logits or probabilities; the largest temporary is one (batch, heads, block, block) tile.

Forward, for each query block and each key block ``j`` (keys in order)::

    s_j   = cap·tanh(scale·q·k_jᵀ / cap)        (scale·q·k_jᵀ without a softcap), float32
    s_j   = s_j where allowed, else MIN         (causal, window, padding; MIN = float32 min)
    m'    = max(m, rowmax(s_j));  c = exp(m − m')
    l     = c·l + rowsum(exp(s_j − m'));  acc = c·acc + exp(s_j − m')·v_j;  m = m'

and ``out = acc / l``, ``lse = m + log l``. Only the tiles that the causal mask (or a
static window) does not hide entirely are visited: one ``lax.scan`` over a static list of
(query block, key block) pairs, the row statistics updated in place (no branches, so
autodiff around it, e.g. a scan over layers, keeps nothing of the loop). A row whose every key is masked (a
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


def _tile_pairs(n: int, block: int, window: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """The (query block i, key block j) tiles not hidden entirely by the causal mask (j ≤ i)
    or a static window (some key of tile j within ``window`` of some query of tile i),
    row by row: a static list, so the loops are one ``lax.scan`` without branches."""
    pairs = [
        (i, j) for i in range(n) for j in range(i + 1)
        if window is None or j * block + block - 1 > i * block - window
    ]
    return np.asarray([i for i, _ in pairs], np.int32), np.asarray([j for _, j in pairs], np.int32)


def _allowed(q_idx, k_idx, kv_mask_blk, window):
    """(B or 1, bq, bk) bool: causal, inside the window, key not padding."""
    ok = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        ok = ok & (k_idx[None, :] > q_idx[:, None] - window)
    ok = ok[None]
    if kv_mask_blk is not None:
        ok = ok & kv_mask_blk[:, None, :]
    return ok


def _logits(q_blk, k_blk, scale, softcap):
    """(B, K, G, bq, bk) float32 logits of a tile, and tanh(·) of the softcap (or None)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return t * softcap, t


def _slice(x, i, block, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _update(x, part, i, block, axis):
    return jax.lax.dynamic_update_slice_in_dim(x, part, i * block, axis=axis)


def _tile(q, k, kv_mask, window, i, j, *, scale, softcap, block, length):
    """A tile's logits (masked: MIN where not allowed, -inf beyond the real keys), tanh of
    the softcap, and where it is allowed."""
    q_blk, k_blk = _slice(q, i, block, 1), _slice(k, j, block, 1)
    s, t = _logits(q_blk, k_blk, scale, softcap)
    k_idx = j * block + jnp.arange(block)
    ok = _allowed(i * block + jnp.arange(block), k_idx, _slice(kv_mask, j, block, 1) if kv_mask is not None else None,
                  window)[:, None, None]
    s = jnp.where(ok, s, _MIN)
    real = (k_idx < length)[None, None, None, None, :]
    return jnp.where(real, s, -jnp.inf), t, ok & real


def _no_residuals(step):
    """A tile step under ``jax.checkpoint`` (saving nothing): when a transformation around
    the attention (autodiff of a scan over layers) partially evaluates these loops, the
    per-tile masks and logits are recomputed, never stacked over the tiles as residuals."""
    return jax.checkpoint(step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)


def _forward(q, k, v, kv_mask, window, *, scale, softcap, block, length, static_window):
    """Padded inputs q (B, Tp, K, G, H), k/v (B, Tp, K, H), kv_mask (B, Tp) or None.
    Returns out (B, Tp, K, G, H) in q's dtype, lse and fully-masked (B, K, G, Tp)."""
    B, Tp, K, G, H = q.shape
    rows, cols = _tile_pairs(Tp // block, block, static_window)

    def step(carry, ij):
        m_all, l_all, acc_all = carry
        i, j = ij
        s, _, _ = _tile(q, k, kv_mask, window, i, j, scale=scale, softcap=softcap, block=block, length=length)
        m, l, acc = _slice(m_all, i, block, 3), _slice(l_all, i, block, 3), _slice(acc_all, i, block, 3)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        c = jnp.exp(m - m_new)
        l = l * c + p.sum(-1)
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), _slice(v, j, block, 1),
                        preferred_element_type=jnp.float32)
        acc = acc * c[..., None] + pv
        return (_update(m_all, m_new, i, block, 3), _update(l_all, l, i, block, 3), _update(acc_all, acc, i, block, 3)), None

    init = (
        jnp.full((B, K, G, Tp), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, Tp), jnp.float32),
        jnp.zeros((B, K, G, Tp, H), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(_no_residuals(step), init, (jnp.asarray(rows), jnp.asarray(cols)))
    real = jnp.arange(Tp) < length
    fully_masked = m <= _MIN
    mean_v = jnp.sum(v.astype(jnp.float32) * real[None, :, None, None], axis=1) / length  # (B, K, H)
    out = jnp.where(fully_masked[..., None], mean_v[:, :, None, None, :], acc / l[..., None])
    lse = m + jnp.log(l)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)  # (B, Tp, K, G, H)
    return out, lse, fully_masked


def _backward(q, k, v, kv_mask, window, out, lse, fully_masked, dout, *, scale, softcap, block, length, static_window):
    B, Tp, K, G, H = q.shape
    rows, cols = _tile_pairs(Tp // block, block, static_window)
    dsum = jnp.einsum("btkgh,btkgh->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))
    live = ~fully_masked

    def step(carry, ij):
        dq_all, dk_all, dv_all = carry
        i, j = ij
        s, t, ok = _tile(q, k, kv_mask, window, i, j, scale=scale, softcap=softcap, block=block, length=length)
        ok = ok & _slice(live, i, block, 3)[..., None]
        p = jnp.where(ok, jnp.exp(s - _slice(lse, i, block, 3)[..., None]), 0.0)
        q_blk, do_blk = _slice(q, i, block, 1), _slice(dout, i, block, 1)
        k_blk, v_blk = _slice(k, j, block, 1), _slice(v, j, block, 1)
        dv = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dout.dtype), do_blk, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - _slice(dsum, i, block, 3)[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dq = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k.dtype), k_blk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32)
        return (
            _update(dq_all, _slice(dq_all, i, block, 1) + dq, i, block, 1),
            _update(dk_all, _slice(dk_all, j, block, 1) + dk, j, block, 1),
            _update(dv_all, _slice(dv_all, j, block, 1) + dv, j, block, 1),
        ), None

    init = (
        jnp.zeros((B, Tp, K, G, H), jnp.float32),
        jnp.zeros((B, Tp, K, H), jnp.float32),
        jnp.zeros((B, Tp, K, H), jnp.float32),
    )
    (dq, dk, dv), _ = jax.lax.scan(_no_residuals(step), init, (jnp.asarray(rows), jnp.asarray(cols)))
    # fully masked rows attend uniformly to the `length` real keys: dv += Σ_rows dout / length
    real = jnp.arange(Tp) < length
    dead = jnp.einsum("btkgh,bkgt->bkh", dout.astype(jnp.float32), fully_masked.astype(jnp.float32)) / length
    dv = dv + dead[:, None] * real[None, :, None, None]
    return dq, dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, kv_mask, window, scale, softcap, block, length, static_window):
    return _forward(q, k, v, kv_mask, window, scale=scale, softcap=softcap, block=block, length=length,
                    static_window=static_window)[0]


def _attention_fwd(q, k, v, kv_mask, window, scale, softcap, block, length, static_window):
    out, lse, fully_masked = _forward(q, k, v, kv_mask, window, scale=scale, softcap=softcap, block=block,
                                      length=length, static_window=static_window)
    return out, (q, k, v, kv_mask, window, out, lse, fully_masked)


def _zero_cotangent(x: Any) -> Any:
    if x is None:
        return None
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _attention_bwd(scale, softcap, block, length, static_window, res, dout):
    q, k, v, kv_mask, window, out, lse, fully_masked = res
    dq, dk, dv = _backward(
        q, k, v, kv_mask, window, out, lse, fully_masked, dout, scale=scale, softcap=softcap, block=block,
        length=length, static_window=static_window,
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
    static_window = None
    if window is not None:
        if isinstance(window, (int, np.integer)):
            static_window = int(window)  # tiles outside it are skipped; a traced window only masks
        window = jnp.asarray(window, jnp.int32)
    out = _attention(qg, kp, vp, mask, window, float(scale), None if softcap is None else float(softcap), block, T,
                     static_window)
    return out[:, :T].reshape(B, T, N, H)
