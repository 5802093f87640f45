"""The causal LM loss of the NNX decoders, computed chunk by chunk over the sequence so
that the (batch, seq, vocab) float32 logits never exist at once, forward or backward.

With ``h = model.hidden_states(ids)`` (the final norm's output) and labels ``y_t =
ids_{t+1}``, for each chunk ``c`` of ``chunk_size`` positions::

    z_c = model.logits(h_c)  (float32: the head's matmul accumulates in float32; Gemma's
                              final softcap included)
    ℓ_t = logsumexp(z_t) − z_t[y_t]

and the loss is ``Σ_t w_t ℓ_t / Σ_t w_t`` (``w`` from ``loss_mask``; the last position has
no label). The chunks run under ``lax.scan`` with each chunk's body under
``jax.checkpoint``: the backward pass recomputes one chunk's logits at a time instead of
keeping all of them, so the largest temporary is (batch, chunk_size, vocab) float32.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["causal_lm_loss", "causal_lm_loss_fn", "chunked_cross_entropy"]


def chunked_cross_entropy(
    head: Callable[..., jax.Array],
    hidden: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """``(Σ w·CE, Σ w)``: the weighted sum of cross-entropies of ``head(hidden)`` against
    integer ``labels`` over the sequence axis in chunks, and the sum of the weights.

    Args:
      head: ``head(h, out_dtype) -> logits`` for ``h`` (B, c, D) (e.g. ``model.logits``).
      hidden: (B, T, D). labels: (B, T) int. weights: (B, T), 0 where a position does not count.
      chunk_size: positions per chunk (T is padded up to a multiple, with weight 0).

    >>> head = lambda h, out_dtype=None: h @ jnp.eye(4)
    >>> total, n = chunked_cross_entropy(head, jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), int), jnp.ones((1, 3)), 2)
    >>> round(float(total / n), 4)  # log(4)
    1.3863
    """
    B, T, D = hidden.shape
    c = max(1, min(int(chunk_size), T))
    n = -(-T // c)
    pad = n * c - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    weights = weights.astype(jnp.float32)

    def chunks(x):
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    def one_chunk(total, xs):
        h, y, w = xs
        logits = head(h, jnp.float32).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        # The label's logit by a select, not a gather: its transpose is a select that fuses
        # with the softmax's, where a gather's is a scatter into a second (B, c, V) buffer.
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == y[..., None].astype(jnp.int32)
        picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return total + jnp.sum((lse - picked) * w), None

    one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(labels), chunks(weights)))
    return total, jnp.sum(weights)


def causal_lm_loss(
    model: nnx.Module,
    input_ids: jax.Array,
    *,
    loss_mask: Optional[jax.Array] = None,
    attention_mask: Optional[jax.Array] = None,
    positions: Optional[jax.Array] = None,
    chunk_size: int = 512,
) -> jax.Array:
    """Mean next-token cross-entropy of a :mod:`jlora.models` decoder on ``input_ids``
    (B, T), without (B, T, vocab) float32 logits (see the module docstring).

    Equal to ``optax.softmax_cross_entropy_with_integer_labels(model(ids)[:, :-1],
    ids[:, 1:])`` averaged over the counted positions.

    Args:
      model: a Qwen3 / Llama 3 / Gemma 3 model (anything with ``hidden_states(ids,
        positions, attention_mask)`` and ``logits(h, out_dtype)``).
      input_ids: (B, T) token ids; position ``t`` predicts token ``t + 1``.
      loss_mask: (B, T), aligned with ``input_ids``: which tokens are targets (e.g. 1 on
        the response of an SFT example, 0 on the prompt and padding). Token 0 never is.
        Default: every token from the second on.
      attention_mask: (B, T), 0 on padding keys (passed to the model).
      positions: (B, T) RoPE positions (passed to the model).
      chunk_size: sequence positions per chunk of logits.

    Under ``jlora.lora`` (LoRA weights in the state), merge the model inside the function::

        loss_fn = jlora.lora(lambda p, ids: causal_lm_loss(nnx.merge(graphdef, p), ids))
        loss, grads = jax.value_and_grad(loss_fn)(lp, ids)

    (or ``jlora.lora(causal_lm_loss_fn(graphdef))``).

    >>> from jlora.models import DecoderConfig, build
    >>> model = build(DecoderConfig("llama3", 64, 16, 32, 2, 4, 2, 8))
    >>> float(causal_lm_loss(model, jnp.ones((2, 8), jnp.int32), chunk_size=4)) > 0
    True
    """
    B, T = input_ids.shape
    hidden = model.hidden_states(input_ids, positions, attention_mask)
    labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros((B, 1), input_ids.dtype)], axis=1)
    weights = jnp.concatenate([jnp.ones((B, T - 1), jnp.float32), jnp.zeros((B, 1), jnp.float32)], axis=1)
    if loss_mask is not None:
        if tuple(loss_mask.shape) != (B, T):
            raise ValueError(f"causal_lm_loss: loss_mask has shape {tuple(loss_mask.shape)}, input_ids {(B, T)}")
        shifted = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((B, 1), loss_mask.dtype)], axis=1)
        weights = weights * shifted.astype(jnp.float32)
    total, count = chunked_cross_entropy(model.logits, hidden, labels, weights, chunk_size)
    return total / jnp.maximum(count, 1.0)


def causal_lm_loss_fn(graphdef: Any, **defaults: Any) -> Callable[..., jax.Array]:
    """``fn(state, input_ids, **kwargs) = causal_lm_loss(nnx.merge(graphdef, state),
    input_ids, **defaults, **kwargs)``: a pure function of the parameters, for
    ``jlora.lora`` and ``jax.grad``.

    >>> graphdef, state = nnx.split(model)                                  # doctest: +SKIP
    >>> loss_fn = jlora.lora(causal_lm_loss_fn(graphdef, chunk_size=1024))   # doctest: +SKIP
    >>> loss, grads = jax.value_and_grad(loss_fn)(lp, ids)                   # doctest: +SKIP
    """

    def fn(state: Any, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        return causal_lm_loss(nnx.merge(graphdef, state), input_ids, **{**defaults, **kwargs})

    return fn
