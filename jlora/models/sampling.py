"""Choosing the next token from the logits: greedy, or temperature, top-k and top-p
sampling with transformers' semantics (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, applied in that order), reproducible from a JAX key.

With logits ``z`` (B, V) of the last position:

* greedy (``temperature == 0``): ``argmax z`` (the first index among ties, as torch);
* ``z / temperature``; then top-k keeps the ``k`` largest logits (every logit equal to
  the k-th largest stays, as transformers' ``scores < kth`` test keeps ties); then top-p
  keeps the smallest set of most probable tokens whose probabilities sum to more than
  ``p``: sorted ascending, a token is removed when the cumulative probability up to and
  including it is ``<= 1 - p`` (the most probable token always stays);
* the token is drawn from ``softmax`` of what is left (``jax.random.categorical``).

Removed logits are ``-inf``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["sample_token", "top_k_filter", "top_p_filter"]


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """``logits`` (..., V) with every value below the ``k``-th largest of its row set to
    ``-inf`` (transformers' ``TopKLogitsWarper``; ``k`` is clipped to ``[1, V]``).

    >>> top_k_filter(jnp.array([[1.0, 3.0, 2.0, 3.0]]), 2).tolist()
    [[-inf, 3.0, -inf, 3.0]]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """``logits`` (..., V) with the tokens outside the top-``p`` nucleus set to ``-inf``
    (transformers' ``TopPLogitsWarper``: sorted ascending, a token is removed where the
    cumulative probability up to it is ``<= 1 - p``; the most probable token stays).

    >>> z = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> bool(jnp.isinf(top_p_filter(z, 0.7)).tolist()[0][2]), bool(jnp.isinf(top_p_filter(z, 0.9)).tolist()[0][2])
    (True, False)
    """
    order = jnp.argsort(logits, axis=-1)  # ascending; stable, as torch.sort's order on ties is not promised
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - jnp.asarray(p, jnp.float32)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def sample_token(
    logits: jax.Array,
    key: Optional[jax.Array],
    *,
    greedy: bool,
    temperature: jax.Array | float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[jax.Array | float] = None,
) -> jax.Array:
    """The next token of each row of ``logits`` (B, V): ``argmax`` when ``greedy``, else a
    draw from ``softmax(filter(logits / temperature))`` with ``key`` (top-k, then top-p,
    as transformers orders them). Returns (B,) int32.

    >>> z = jnp.array([[0.0, 5.0, 1.0]])
    >>> sample_token(z, None, greedy=True).tolist()
    [1]
    >>> sample_token(z, jax.random.key(0), greedy=False, top_k=1).tolist()
    [1]
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling (temperature > 0) needs a key: rng=jax.random.key(...)")
    z = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None:
        z = top_k_filter(z, top_k)
    if top_p is not None:
        z = top_p_filter(z, top_p)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
