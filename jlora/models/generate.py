"""Text generation with the NNX decoders: a prefill over the prompt, then a jitted decode
loop over a preallocated KV cache (:mod:`jlora.models.kv_cache`), with any parameter tree
jlora makes: plain or merged params, a LoRA tree (through :func:`jlora.lora`), several
adapters with one per row (``adapter_ids``), adapter slots (:mod:`jlora.adapters.slots`),
a quantized base under LoRA.

How a call runs, for prompts ``input_ids`` (B, T), left-padded (transformers' convention:
``attention_mask`` 0 on the left):

1. the prompts are left-padded further to a bucket length ``P`` (the next power of two, at
   least 16), so that prompts of nearby lengths share one compiled program;
2. **prefill** (one jitted call): positions ``cumsum(mask) - 1``, the model over the ``P``
   prompt slots with its own attention implementation, keys/values written to cache slots
   ``0 .. P-1`` of a cache of ``P + max_new_tokens`` slots, the logits of the last slot;
3. **decode** (one jitted call, a ``lax.while_loop``): each step picks a token from the
   logits (:mod:`jlora.models.sampling`: greedy, or temperature / top-k / top-p sampling
   with ``fold_in(rng, step)``), writes it to slot ``P + step``, and runs the model on that
   one token against the cache. A row that has produced ``eos_token_id`` gets
   ``pad_token_id`` from then on; the loop stops early when every row has.

The jitted functions are cached per ``(graphdef, max_new_tokens, sampling mode, top_k, eos,
pad)`` (:func:`generate_functions`) and JAX caches their compiled programs per argument
shapes and tree structure: one compile per (batch, prompt bucket, ``max_new_tokens``) and
kind of parameter tree. Temperature and top-p are traced values (changing them does not
recompile), and so are adapter slots' factors and scales (loading a new adapter into a
slot does not recompile).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.nodes import is_lora_node
from jlora.quant.array import is_quantized

from .attention import attention_inputs
from .decoder import run_layers
from .kv_cache import KVCache, decode_inputs, empty_cache
from .sampling import sample_token

__all__ = ["MIN_BUCKET", "GenerateFunctions", "bucket_length", "decode_step", "generate", "generate_functions"]

MIN_BUCKET = 16


def bucket_length(length: int, minimum: int = MIN_BUCKET) -> int:
    """The prompt length a prompt of ``length`` tokens is left-padded to: the next power of
    two, at least ``minimum``.

    >>> bucket_length(10), bucket_length(16), bucket_length(100)
    (16, 16, 128)
    """
    n = max(int(length), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a compiled generation depends on besides argument shapes (hashable)."""

    max_new_tokens: int
    greedy: bool
    top_k: Optional[int]
    top_p: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    lora: bool


class GenerateFunctions(NamedTuple):
    """The two jitted functions of a generation (cached per graphdef and options).

    ``prefill(params, ids, mask, adapter_ids) -> (logits, cache)``: ``ids``/``mask`` (B, P)
    left-padded to the bucket; ``logits`` (B, V) float32 of the last slot; ``cache`` a
    :class:`~jlora.models.kv_cache.KVCache` of ``P + max_new_tokens`` slots.

    ``decode(params, logits, cache, mask, rng, temperature, top_p, adapter_ids) -> tokens``
    (B, max_new_tokens) int32.
    """

    prefill: Any
    decode: Any


def _uses_lora(params: Any) -> bool:
    """Whether ``params`` needs :func:`jlora.lora` (LoRA nodes, adapter slots, a quantized base)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: is_lora_node(x) or is_quantized(x))
    return any(is_lora_node(x) or is_quantized(x) for x in leaves)


def _dtype_of(config: Any) -> Any:
    return jnp.dtype(config.dtype if config.dtype is not None else config.param_dtype)


def _prefill_forward(graphdef: Any, slots: int, params: Any, ids: jax.Array, mask: jax.Array):
    """The model over the prompt: (last-slot logits float32, the cache with the prompt)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B, P = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    inputs = attention_inputs(cfg.attention, B, P, positions, mask, cfg.sliding_window)
    cache = empty_cache(cfg.num_layers, B, slots, cfg.num_kv_heads, cfg.head_dim, _dtype_of(cfg))
    x = model.embedder.encode(ids)
    x, cache = run_layers(model, x, inputs, cache)
    logits = model.logits(model.final_norm(x[:, -1:]), jnp.float32)
    return logits[:, 0].astype(jnp.float32), cache


def _step_forward(graphdef: Any, params: Any, token: jax.Array, cache: KVCache, index: jax.Array,
                  positions: jax.Array, slot_valid: jax.Array):
    """The model on one new token per row, written at slot ``index``: (logits, cache)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    inputs = decode_inputs(positions[:, None], index, slot_valid, cfg.sliding_window)
    x = model.embedder.encode(token[:, None])
    x, cache = run_layers(model, x, inputs, cache)
    logits = model.logits(model.final_norm(x), jnp.float32)
    return logits[:, 0].astype(jnp.float32), cache


def decode_step(graphdef: Any, params: Any, token: jax.Array, cache: KVCache, index: jax.Array,
                positions: jax.Array, slot_valid: jax.Array, adapter_ids: Any = None):
    """One decode step, as :func:`generate`'s loop runs it (for a serving loop of your own,
    or to time and compile it): the model on ``token`` (B,) written at cache slot ``index``
    with ``positions`` (B,), attending to the slots where ``slot_valid`` (B, S) is true.
    Returns ``(logits (B, V) float32, cache)``. ``params`` may be any tree :func:`generate`
    takes (LoRA nodes and adapter slots go through :func:`jlora.lora`).

    >>> from jlora.models import DecoderConfig, build
    >>> from jlora.models.kv_cache import empty_cache
    >>> graphdef, params = nnx.split(build(DecoderConfig("qwen3", 64, 16, 32, 2, 4, 2, 8)))
    >>> cache = empty_cache(2, 1, 4, 2, 8, jnp.float32)
    >>> logits, cache = decode_step(graphdef, params, jnp.array([3]), cache, jnp.int32(0), jnp.array([0]),
    ...                             jnp.array([[True, False, False, False]]))
    >>> logits.shape
    (1, 64)
    """
    fn = functools.partial(_step_forward, graphdef)
    if _uses_lora(params):
        return jlora.lora(fn, on_materialize="allow")(params, token, cache, index, positions, slot_valid,
                                                     adapter_ids=adapter_ids)
    return fn(params, token, cache, index, positions, slot_valid)


def _with_lora(fn: Any, spec: _Spec) -> Any:
    """``fn(params, *args)`` through :func:`jlora.lora` when the tree has LoRA nodes (with the
    rows' adapters when ``adapter_ids`` is given), else as it is."""
    if not spec.lora:
        return lambda params, *args, adapter_ids=None: fn(params, *args)
    wrapped = jlora.lora(fn, on_materialize="allow")
    return lambda params, *args, adapter_ids=None: wrapped(params, *args, adapter_ids=adapter_ids)


@functools.lru_cache(maxsize=64)
def _functions(graphdef: Any, spec: _Spec) -> GenerateFunctions:
    step_fwd = _with_lora(functools.partial(_step_forward, graphdef), spec)
    n = spec.max_new_tokens
    eos = jnp.asarray(spec.eos_token_ids, jnp.int32) if spec.eos_token_ids else None

    def prefill(params, ids, mask, adapter_ids):
        fwd = _with_lora(functools.partial(_prefill_forward, graphdef, ids.shape[1] + n), spec)
        return fwd(params, ids, mask, adapter_ids=adapter_ids)

    def pick(logits, rng, t, temperature, top_p):
        key = None if spec.greedy else jax.random.fold_in(rng, t)
        return sample_token(logits, key, greedy=spec.greedy, temperature=temperature, top_k=spec.top_k,
                            top_p=top_p if spec.top_p else None)

    def is_eos(tok):
        if eos is None:
            return jnp.zeros(tok.shape, bool)
        return jnp.any(tok[:, None] == eos[None, :], axis=-1)

    def decode(params, logits, cache, mask, rng, temperature, top_p, adapter_ids):
        B, P = mask.shape
        lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
        slot_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((B, n), bool)], axis=1)
        slot_ids = jnp.arange(P + n, dtype=jnp.int32)
        tok = pick(logits, rng, 0, temperature, top_p)
        out = jnp.full((B, n), spec.pad_token_id, jnp.int32).at[:, 0].set(tok)
        done = is_eos(tok)

        def cond(carry):
            t, _, _, _, done, _ = carry
            return (t < n) & ~jnp.all(done)

        def body(carry):
            t, tok, cache, out, done, slot_valid = carry
            slot = P + t - 1  # where the previous token goes
            slot_valid = slot_valid | (slot_ids == slot)[None, :]
            logits, cache = step_fwd(params, tok, cache, slot, lengths + t - 1, slot_valid, adapter_ids=adapter_ids)
            new = pick(logits, rng, t, temperature, top_p)
            new = jnp.where(done, spec.pad_token_id, new)
            out = jax.lax.dynamic_update_slice(out, new[:, None], (jnp.zeros((), jnp.int32), t))
            return t + 1, new, cache, out, done | is_eos(new), slot_valid

        carry = (jnp.ones((), jnp.int32), tok, cache, out, done, slot_valid)
        return jax.lax.while_loop(cond, body, carry)[3]

    return GenerateFunctions(jax.jit(prefill), jax.jit(decode))


def _eos_ids(eos_token_id: Union[None, int, Sequence[int]]) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def generate_functions(
    graphdef: Any,
    params: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: int = 0,
) -> GenerateFunctions:
    """The jitted prefill and decode functions :func:`generate` calls for these options
    (cached: the same objects for the same ``graphdef`` and options), e.g. to time them or
    to check how many programs they compiled (``fns.decode._cache_size()``).

    >>> fns = generate_functions(graphdef, params, max_new_tokens=8)        # doctest: +SKIP
    >>> fns.decode._cache_size()                                            # doctest: +SKIP
    1
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
    spec = _Spec(int(max_new_tokens), float(temperature) == 0.0, None if top_k is None else int(top_k),
                 top_p is not None, _eos_ids(eos_token_id), int(pad_token_id), _uses_lora(params))
    return _functions(graphdef, spec)


def _check_prompts(ids: np.ndarray, mask: np.ndarray) -> None:
    """Left padding: each row's mask is 0s then 1s, with at least one 1."""
    real = mask.astype(bool)
    for row in range(real.shape[0]):
        r = real[row]
        if not r.any():
            raise ValueError(f"generate: row {row} of attention_mask has no token (all zeros)")
        first = int(np.argmax(r))
        if not r[first:].all():
            raise ValueError(
                f"generate: row {row} of attention_mask is not left-padded ({r.astype(int).tolist()}); prompts must "
                "be padded on the left (tokenizer(padding_side='left')), so that every prompt ends at the last column"
            )


def generate(
    graphdef: Any,
    params: Any,
    input_ids: Any,
    *,
    attention_mask: Any = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: int = 0,
    rng: Optional[jax.Array] = None,
    adapter_ids: Any = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after each prompt with a :mod:`jlora.models`
    decoder (Qwen3, Llama 3, Gemma 3, Qwen3-MoE; list or ``scan_layers`` stacks).

    Returns (B, T + max_new_tokens) int32: ``input_ids`` followed by the new tokens (after
    a row's ``eos_token_id``, ``pad_token_id``). Greedy decoding picks ``argmax`` of the
    logits at each step, exactly what the full forward pass over the generated prefix
    gives (up to float rounding); see the module docstring for the algorithm.

    Args:
      graphdef: ``nnx.split(model)[0]``.
      params: the state to run: ``nnx.split(model)[1]`` (plain or merged), a LoRA tree of it
        (``jlora.wrap`` / ``load_peft``: applied factored through :func:`jlora.lora`), a tree
        with several named adapters (the active ones, or one per row with ``adapter_ids``),
        adapter slots (:func:`jlora.adapters.adapter_slots`, with ``adapter_ids``), a
        quantized base (``jlora.quantize``) under LoRA.
      input_ids: (B, T) int prompts, left-padded.
      attention_mask: (B, T), 1 for real tokens, 0 for the left padding (default: all 1).
      max_new_tokens: how many tokens to generate.
      temperature: 0 for greedy; otherwise logits are divided by it and a token is sampled.
      top_k, top_p: sampling filters (transformers' semantics, :mod:`jlora.models.sampling`).
      eos_token_id: an id or a list of ids that end a row.
      pad_token_id: what a row gets after its end (and what pads prompts to the bucket).
      rng: a JAX key; needed when sampling. The same key gives the same tokens.
      adapter_ids: (B,) int, one adapter per row (:func:`jlora.adapter_ids` for named
        adapters, slot indices for adapter slots; -1: the base model).

    >>> from jlora.models import DecoderConfig, build
    >>> model = build(DecoderConfig("qwen3", 64, 16, 32, 2, 4, 2, 8))
    >>> graphdef, params = nnx.split(model)
    >>> out = generate(graphdef, params, jnp.array([[0, 5, 6], [7, 8, 9]]),
    ...                attention_mask=jnp.array([[0, 1, 1], [1, 1, 1]]), max_new_tokens=4)
    >>> out.shape
    (2, 7)
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: input_ids must be a (batch, length) int array, got {ids.dtype}{list(ids.shape)}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"generate: attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    _check_prompts(ids, mask)
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(...)")
    fns = generate_functions(graphdef, params, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    lora_tree = _uses_lora(params)
    if adapter_ids is not None:
        if not lora_tree:
            raise ValueError("generate: adapter_ids needs a tree with adapters (named adapters or adapter slots)")
        adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
        if adapter_ids.shape != (ids.shape[0],):
            raise ValueError(f"generate: adapter_ids must have one entry per row ({ids.shape[0]}), "
                             f"got shape {tuple(adapter_ids.shape)}")
    B, T = ids.shape
    P = bucket_length(T)
    pad = P - T
    ids_p = np.concatenate([np.full((B, pad), pad_token_id, ids.dtype), ids], axis=1).astype(np.int32)
    mask_p = np.concatenate([np.zeros((B, pad), np.int32), mask], axis=1)
    logits, cache = fns.prefill(params, jnp.asarray(ids_p), jnp.asarray(mask_p), adapter_ids)
    key = rng if rng is not None else jax.random.key(0)
    new = fns.decode(params, logits, cache, jnp.asarray(mask_p), key, jnp.float32(temperature or 1.0),
                     jnp.float32(1.0 if top_p is None else top_p), adapter_ids)
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), new], axis=1)
