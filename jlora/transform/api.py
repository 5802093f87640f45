"""``jlora.lora(fn)`` and ``jlora.explain``: trace ``fn`` with plain arrays standing in for
the LoRA nodes of its arguments, then evaluate its jaxpr with the interpreter, each LoRA
node a :class:`~jlora.transform.values.LoraValue`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..adapters.named import check_adapter_ids
from ..core.paths import path_names
from ..nodes.dora import magnitude_scale
from ..nodes.slots import AdapterSlots
from ..nodes.weight import DEFAULT_ADAPTER, LoraWeight, MultiLoraWeight, Trainable, TrainableTokens, is_lora_node
from ..quant import forward as qforward
from ..quant.array import is_quantized
from .interpreter import eval_jaxpr
from .values import (
    Context,
    LoraEvent,
    LoraReport,
    LoraValue,
    OnMaterialize,
    Pair,
    roles_to_axes,
)

__all__ = ["lora", "explain"]


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


def _adapter_names(leaves: Sequence[Any]) -> list[str]:
    """All adapter names, in order of first appearance (as ``jlora.adapter_names``)."""
    names: list[str] = []
    for x in leaves:
        if isinstance(x, LoraWeight):
            found = [DEFAULT_ADAPTER]
        elif isinstance(x, MultiLoraWeight):
            found = list(x.adapters)
        else:
            continue
        names += [n for n in found if n not in names]
    return names


def _lora_value(leaf: Any, path: str, names: list[str], mixed: bool) -> Any:
    """The interpreter's value for a LoRA node: a ``LoraValue``, or a plain kernel when no
    adapter applies (merged, disabled, none active)."""
    w = qforward.as_value(leaf.w) if is_quantized(leaf.w) else jax.lax.stop_gradient(leaf.w)
    if isinstance(leaf, LoraWeight):
        if leaf.merged:
            if mixed:
                raise ValueError(f"jlora: {path!r} is merged (merge_adapter); unmerge it to use adapter_ids")
            return leaf.w
        named = [(DEFAULT_ADAPTER, leaf)]
    else:
        if not leaf.enabled:
            return w
        chosen = list(leaf.adapters) if mixed else [n for n in leaf.active if n in leaf.adapters]
        named = [(n, leaf.adapters[n]) for n in chosen]
    if not named:
        return w
    layout = named[0][1].layout
    axes, n_stack = roles_to_axes(layout)
    pairs = tuple(
        Pair(a=x.a, b=x.b, scale=x.scale, dropout=x.dropout, gid=names.index(n) if mixed else -2,
             k=_dora_k(leaf.w, x, n_stack), groups=x.groups,
             bias=None if x.b_bias is None else jnp.expand_dims(x.b_bias, n_stack)) for n, x in named
    )
    guessed = any(x.guessed for _, x in named)
    return LoraValue(w=w, pairs=pairs, axes=axes, n_stack=n_stack, path=path, guessed=guessed,
                     kernel_layout=tuple(layout))


def _tokens_value(leaf: TrainableTokens, path: str) -> LoraValue:
    """Trainable token rows as a rank-``n`` LoRA value: ``W' = W + P·(V − W[ids])`` with
    ``P`` the one-hot ``(vocab, n)`` matrix of the ids (frozen) and ``V`` the trained rows,
    so a lookup and a tied output layer ``x·Wᵀ`` stay factored."""
    w = jax.lax.stop_gradient(leaf.w)
    idx = jnp.asarray(leaf.indices, jnp.int32)
    vocab = int(w.shape[leaf.axis])
    dtype = jnp.promote_types(leaf.values.dtype, jnp.float32)
    onehot = jax.nn.one_hot(idx, vocab, dtype=dtype).T  # (vocab, n)
    delta = leaf.values.astype(dtype) - jnp.moveaxis(jnp.take(w, idx, axis=leaf.axis), leaf.axis, 0).astype(dtype)
    if leaf.axis == 0:  # an embedding table (vocab, d): the token axis is the input axis
        pair = Pair(a=onehot, b=delta, scale=1.0, dropout=0.0)
        layout = ("in", "out")
    else:  # an output head (d, vocab): the token axis is the output axis
        pair = Pair(a=delta.T, b=onehot.T, scale=1.0, dropout=0.0)
        layout = ("in", "out")
    axes, n_stack = roles_to_axes(layout)
    return LoraValue(w=w, pairs=(pair,), axes=axes, n_stack=n_stack, path=path, kernel_layout=layout)


def _slots_value(leaf: AdapterSlots, path: str) -> LoraValue:
    """Adapter slots as one pair with a slot axis (:class:`~jlora.transform.values.Pair`,
    ``slots = N``): the scales stay an array, so the program does not depend on them."""
    w = qforward.as_value(leaf.w) if is_quantized(leaf.w) else jax.lax.stop_gradient(leaf.w)
    axes, n_stack = roles_to_axes(leaf.layout)
    pair = Pair(a=leaf.a, b=leaf.b, scale=jax.lax.stop_gradient(leaf.scale), dropout=0.0, slots=leaf.num_slots)
    return LoraValue(w=w, pairs=(pair,), axes=axes, n_stack=n_stack, path=path, kernel_layout=tuple(leaf.layout))


def _check_slot_ids(flat: Sequence[Any], names: list[str], adapter_ids: Any) -> None:
    """A tree with adapter slots: one pool size, no named adapters beside them, and slot ids."""
    sizes = sorted({x.num_slots for x in flat if isinstance(x, AdapterSlots)})
    if not sizes:
        return
    if names:
        raise ValueError(f"jlora: a tree holds both adapter slots and named adapters {names}; adapter_ids would "
                         "mean slot indices for one and adapter indices for the other. Use one or the other")
    if len(sizes) > 1:
        raise ValueError(f"jlora: the adapter slots of this tree have different numbers of slots {sizes}; "
                         "build them with one jlora.adapters.adapter_slots call")
    if adapter_ids is None:
        raise ValueError("jlora: a tree with adapter slots needs adapter_ids= (the slot of each example, -1 for the "
                         "base model)")
    check_adapter_ids(adapter_ids, [f"slot {j}" for j in range(sizes[0])])


def _dora_k(w: Any, x: LoraWeight, n_stack: int) -> Any:
    """DoRA's ``k = m / stop_gradient(‖W + s·ΔW‖)`` for adapter ``x`` on kernel ``w``, once per
    call (float32, ``(*stack, 1, *out)``: B's axes with rank 1); None for a LoRA adapter."""
    if x.magnitude is None:
        return None
    if is_quantized(w):  # the norm of the dequantized base (a constant: no residual)
        w = w.dequantize(w.compute_dtype)
    grouped = {"groups": x.groups} if x.groups != 1 else {}  # PEFT's norm for a grouped convolution
    return jnp.expand_dims(magnitude_scale(w, x.a, x.b, x.magnitude, x.scale, x.layout, **grouped), n_stack)


def _run(fn, args, kwargs, key, on_materialize, events, adapter_ids=None, fused=True):
    flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(
        (args, kwargs), is_leaf=lambda x: is_lora_node(x) or is_quantized(x)
    )
    flat = [leaf for _, leaf in flat_with_path]
    names = _adapter_names(flat)
    mixed = adapter_ids is not None
    if mixed:
        adapter_ids = jnp.asarray(adapter_ids)
        if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise ValueError(
                f"adapter_ids must be a 1-D integer array (one adapter index per example, -1 for the base "
                f"model; see jlora.adapter_ids), got {adapter_ids.dtype}{list(adapter_ids.shape)}"
            )
    slots = any(isinstance(x, AdapterSlots) for x in flat)
    if slots:
        _check_slot_ids(flat, names, adapter_ids)
    elif mixed:
        check_adapter_ids(adapter_ids, names)
    statics = list(flat)
    dyn_idx: list[int] = []
    dyn_vals: list[Any] = []
    for i, (path, leaf) in enumerate(flat_with_path):
        if isinstance(leaf, (LoraWeight, MultiLoraWeight)):
            pn = path_names(path)
            dyn_idx.append(i)
            dyn_vals.append(_lora_value(leaf, "/".join(pn[2:]) or "/".join(pn), names, mixed))
        elif isinstance(leaf, AdapterSlots):
            pn = path_names(path)
            dyn_idx.append(i)
            dyn_vals.append(_slots_value(leaf, "/".join(pn[2:]) or "/".join(pn)))
        elif isinstance(leaf, Trainable):
            dyn_idx.append(i)
            dyn_vals.append(leaf.value)
        elif isinstance(leaf, TrainableTokens):
            pn = path_names(path)
            if mixed:
                raise ValueError(f"jlora: {'/'.join(pn[2:])!r} has trainable token rows, which named adapters and "
                                 "mixed batches (adapter_ids=) do not support")
            dyn_idx.append(i)
            dyn_vals.append(_tokens_value(leaf, "/".join(pn[2:]) or "/".join(pn)))
        elif is_quantized(leaf):  # a frozen quantized kernel that is not a LoRA target
            dyn_idx.append(i)
            dyn_vals.append(qforward.as_value(leaf))
        elif _is_dynamic(leaf):
            dyn_idx.append(i)
            dyn_vals.append(leaf)

    def flat_fn(*dyn):
        leaves = list(statics)
        for i, v in zip(dyn_idx, dyn):
            leaves[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, leaves)
        return fn(*a, **k)

    avals = [_abstract(v.w if isinstance(v, LoraValue) else v) for v in dyn_vals]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
    ctx = Context(key, on_materialize, events, adapter_ids, fused)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, dyn_vals, ctx)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _abstract(value: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of ``value`` (an array or a tracer), to trace ``fn`` with:
    under a mesh with ``Explicit`` axes the sharding is part of the type, and a jaxpr traced
    without it would build replicated intermediates that clash with the real ones."""
    if qforward.is_view(value):
        return value.aval
    t = jax.typeof(value)
    return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)


def lora(fn: Callable[..., Any], *, on_materialize: OnMaterialize = "warn", fused: bool = True) -> Callable[..., Any]:
    """Returns ``fn`` with LoRA applied to every ``LoraWeight`` in its arguments.

    For each LoRA weight used as a kernel, the wrapped function computes::

        y = x·W + s · (dropout(x)·A)·B          s = lora_alpha / r

    without ever forming ``W + s·A·B`` (see the module docstring for where it is formed).
    The base ``W`` is frozen (``stop_gradient``): gradients flow to A, B and ``Trainable``
    leaves only. ``Trainable`` leaves are passed to ``fn`` as plain arrays; leaves of
    merged weights (:func:`jlora.merge_adapter`) are passed as they are.

    The returned function has ``fn``'s signature plus two keyword-only arguments:

    - ``lora_rng``: a PRNG key for LoRA dropout (rate ``LoraConfig.lora_dropout``, on the
      input of A). No key (the default) means no dropout, as in evaluation. The same key
      gives the same masks; each use of a weight (each scanned layer) its own mask.
    - ``adapter_ids``: for trees with several named adapters (:mod:`jlora.adapters`), a
      mixed batch: one adapter index per example (from :func:`jlora.adapter_ids`; ``-1``
      for the base model alone), applied along axis 0 of each targeted layer's input.
      Without it, the active adapters' deltas are summed for every example. Concrete
      ids outside ``-1 .. n_adapters - 1`` raise ``ValueError``; traced ids (under
      ``jit``) cannot be checked, and an out-of-range id there selects no adapter (the
      example gets the base model), so build ids with :func:`jlora.adapter_ids`.

    Non-array arguments (Python bools, strings, ints) are static.

    Args:
      fn: any function whose arguments hold parameter trees, e.g. ``model.apply``.
      on_materialize: what to do where a weight cannot stay factored: ``"warn"`` (a
        :class:`MaterializationWarning`), ``"error"`` (:class:`MaterializationError`),
        or ``"allow"``.
      fused: on TPU, differentiate each LoRA product with the fused rule of
        :mod:`jlora.transform.fused` (``[x | t]·[W ; B]``: the branch shares the base
        product's passes over activations). ``False``: the plain rule, as on CPU and GPU;
        values are the same either way. Compiled for TPU chips (``benchmarks/tpu_aot.py``)
        the fused rule is faster on one chip (Llama-3-8B, bf16, v6e: est. 2.27 s
        against 2.83 s per step) and slower under FSDP over a sharded layer stack, where
        XLA relays out whole stacked kernels for its concatenations (Llama-3-70B on a
        v5p:2x2x2 slice: 33.6 GiB and 13.4 s per chip fused, 27.2 GiB and 9.4 s plain).

    Example:
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> config = jlora.LoraConfig(r=2, target_modules=["dense"], lora_dropout=0.1, init_lora_weights=False)
      >>> lp = jlora.wrap(params, config, rng=jax.random.key(0))
      >>> forward = lora(lambda p, x: x @ p["dense"]["kernel"])
      >>> y = forward(lp, jnp.ones((2, 4)))                       # x·W + s·(x·A)·B, no dropout
      >>> bool(jnp.allclose(y, jnp.ones((2, 4)) @ jlora.merge(lp)["dense"]["kernel"], atol=1e-5))
      True
      >>> forward(lp, jnp.ones((2, 4)), lora_rng=jax.random.key(1)).shape    # with dropout
      (2, 3)
    """
    if on_materialize not in ("warn", "error", "allow"):
        raise ValueError(f"on_materialize={on_materialize!r}: must be 'warn', 'error' or 'allow'")

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_rng: Optional[jax.Array] = None, adapter_ids: Optional[jax.Array] = None,
                **kwargs: Any) -> Any:
        return _run(fn, args, kwargs, lora_rng, on_materialize, [], adapter_ids, bool(fused))

    return wrapped


def explain(fn: Callable[..., Any], *args: Any, lora_rng: Optional[jax.Array] = None,
            adapter_ids: Optional[jax.Array] = None, **kwargs: Any) -> LoraReport:
    """Reports, for the call ``fn(*args, **kwargs)``, which LoRA weights ``lora(fn)``
    keeps factored and which it materialises, and where (primitive, module, source line).

    Only traces (``jax.eval_shape``); nothing is computed.

    >>> print(explain(model.apply, {"params": lp}, x))        # doctest: +SKIP
    >>> explain(model.apply, {"params": lp}, x).materialized  # doctest: +SKIP
    []
    """
    events: list[LoraEvent] = []
    # Only arrays are traced; everything else (Python flags such as ``train=False``,
    # strings, modules) is passed through unchanged, as ``lora(fn)`` does.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x) or isinstance(x, jax.ShapeDtypeStruct)]

    def run(dyn_vals, ids):
        full = list(leaves)
        for i, v in zip(dyn, dyn_vals):
            full[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return _run(fn, a, k, lora_rng, "allow", events, ids)

    jax.eval_shape(run, [leaves[i] for i in dyn], adapter_ids)
    return LoraReport(tuple(events))
