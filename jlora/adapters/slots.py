"""Adapter slots for serving: build a fixed-shape pool of adapters per kernel
(:class:`~jlora.nodes.slots.AdapterSlots`), load an adapter (a LoRA tree, or a PEFT
directory) into a slot, clear a slot, take one out.

A pool of ``N`` slots of rank at most ``R`` holds, per targeted kernel, ``A``
``(*stack, N, *in, R)``, ``B`` ``(*stack, N, R, *out)`` and the scales ``(N,)``. An adapter
of rank ``r ≤ R`` is stored zero-padded: ``A_j = [A, 0]``, ``B_j = [B; 0]``, so
``A_j·B_j = A·B``; its scale ``alpha/r`` (rsLoRA: ``alpha/√r``) is an array value. Every
function here returns a new tree of the *same structure, shapes and dtypes*: a program
compiled for the pool (a decode step, a training step) runs on the new one without
recompiling, whatever the ranks and alphas of the adapters swapped in.

:func:`jlora.lora` applies slot ``adapter_ids[e]`` to example ``e`` (``-1``: the base
model) by gathering each example's factors (two batched products: the cost of one
adapter, whatever ``N``). Training a pool with :func:`jlora.optimizer` trains ``A`` and
``B`` of the slots the batch uses; the zero padding gets zero gradients, so it stays zero
and ranks are kept.

>>> lp = jlora.wrap(params, jlora.LoraConfig(r=4, target_modules=["q_proj"]))   # doctest: +SKIP
>>> pool = adapter_slots(lp, num_slots=64, max_rank=16)        # lp's adapter in slot 0 # doctest: +SKIP
>>> pool = load_slot(pool, 3, "path/to/peft-adapter")          # PEFT's files, in slot 3 # doctest: +SKIP
>>> y = jlora.lora(apply)(pool, x, adapter_ids=jnp.array([3, 0, -1]))                # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from ..core.paths import path_names
from ..io.peft import load_peft
from ..nodes.slots import AdapterSlots, is_adapter_slots
from ..nodes.weight import (
    DEFAULT_ADAPTER,
    LoraWeight,
    MultiLoraWeight,
    Trainable,
    TrainableTokens,
)
from ..nodes.weight import is_lora_node as _is_node
from ..quant.array import is_quantized
from .named import adapter_names

__all__ = ["adapter_slots", "clear_slot", "get_slot", "load_slot", "slot_scales", "slots_base"]


def _flat(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _is_node(x) or is_quantized(x))
    return [("/".join(path_names(p)), x) for p, x in flat], treedef


def _pools(tree: Any) -> list[tuple[str, AdapterSlots]]:
    pools = [(p, x) for p, x in _flat(tree)[0] if is_adapter_slots(x)]
    if not pools:
        raise ValueError("jlora: this tree has no adapter slots; build them with jlora.adapters.adapter_slots(lp, ...)")
    return pools


def _pair_of(x: Any, name: Optional[str], path: str) -> Optional[LoraWeight]:
    """The adapter ``name`` of node ``x`` (a ``LoraWeight`` with ``w``), or None."""
    if isinstance(x, LoraWeight):
        if name not in (None, DEFAULT_ADAPTER):
            return None
        return x
    if isinstance(x, MultiLoraWeight):
        if name is None:
            if len(x.adapters) > 1:
                raise ValueError(f"jlora: {path!r} holds several adapters {list(x.adapters)}; pass name= to pick one")
            name = next(iter(x.adapters), None)
        p = x.adapters.get(name) if name is not None else None
        return None if p is None else p.replace(w=x.w)
    return None


def _check_pair(p: LoraWeight, pool: AdapterSlots, path: str) -> None:
    if p.merged:
        raise ValueError(f"jlora: the adapter at {path!r} is merged into its kernel; unmerge it first")
    what = ("a DoRA magnitude" if p.magnitude is not None else "a lora_B bias" if p.b_bias is not None
            else "PiSSA/OLoRA initial factors (a residual base)" if p.a0 is not None
            else "a grouped convolution" if p.groups != 1 else None)
    if what:
        raise ValueError(f"jlora: the adapter at {path!r} has {what}; adapter slots hold plain LoRA factors only "
                         "(convert PiSSA/OLoRA with save_peft(..., convert_to_lora=True))")
    if tuple(p.layout) != tuple(pool.layout):
        raise ValueError(f"jlora: the adapter at {path!r} has kernel layout {p.layout}, the slots {pool.layout}")
    ns = pool.n_stack
    want_a = pool.a.shape[:ns] + pool.a.shape[ns + 1:-1]
    want_b = pool.b.shape[:ns] + pool.b.shape[ns + 2:]
    if tuple(p.a.shape[:-1]) != tuple(want_a) or tuple(p.b.shape[:ns] + p.b.shape[ns + 1:]) != tuple(want_b):
        raise ValueError(f"jlora: the adapter at {path!r} has factors {tuple(p.a.shape)}, {tuple(p.b.shape)}; the "
                         f"slots' kernel needs A {tuple(want_a)} + (r,) and B (r,) inserted in {tuple(want_b)}")
    if p.rank > pool.max_rank:
        raise ValueError(f"jlora: the adapter at {path!r} has rank {p.rank} > the slots' max_rank {pool.max_rank}; "
                         "build the pool with a larger max_rank")


def _put(pool: AdapterSlots, slot: int, p: Optional[LoraWeight]) -> AdapterSlots:
    """``pool`` with slot ``slot`` holding ``p``'s factors zero-padded to the pool's rank
    (zeros and scale 0 when ``p`` is None)."""
    ns = pool.n_stack
    at = (slice(None),) * ns + (slot,)
    if p is None:
        return pool.replace(a=pool.a.at[at].set(0), b=pool.b.at[at].set(0), scale=pool.scale.at[slot].set(0.0))
    extra = pool.max_rank - p.rank
    a = jnp.pad(jnp.asarray(p.a, pool.a.dtype), [(0, 0)] * (p.a.ndim - 1) + [(0, extra)])
    b = jnp.pad(jnp.asarray(p.b, pool.b.dtype), [(0, 0)] * ns + [(0, extra)] + [(0, 0)] * (p.b.ndim - ns - 1))
    return pool.replace(a=pool.a.at[at].set(a), b=pool.b.at[at].set(b),
                        scale=pool.scale.at[slot].set(jnp.asarray(p.scale, pool.scale.dtype)))


def _check_slot(pool: AdapterSlots, slot: int) -> int:
    if not isinstance(slot, int) or isinstance(slot, bool):
        raise TypeError(f"jlora: slot must be an int in 0..{pool.num_slots - 1}, got {slot!r}")
    if not 0 <= slot < pool.num_slots:
        raise ValueError(f"jlora: slot must be an int in 0..{pool.num_slots - 1}, got {slot!r}")
    return slot


def adapter_slots(lp: Any, num_slots: int, max_rank: Optional[int] = None, *, fill: bool = True,
                  dtype: Any = None) -> Any:
    """A pool of ``num_slots`` adapter slots of rank at most ``max_rank`` at every kernel
    ``lp`` adapts; with ``fill``, ``lp``'s adapters (in ``jlora.adapter_names`` order) in
    slots ``0, 1, …`` and the other slots empty (scale 0: the base model).

    ``max_rank`` defaults to the largest rank in ``lp``; ``dtype`` of the factors defaults
    to ``lp``'s. A kernel an adapter does not target gets zeros in its slot.

    >>> lp = jlora.wrap({"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=2, target_modules=["d"]))
    >>> pool = adapter_slots(lp, num_slots=8, max_rank=4)
    >>> pool["d"]["kernel"].a.shape, pool["d"]["kernel"].b.shape, pool["d"]["kernel"].scale.tolist()[:2]
    ((8, 4, 4), (8, 4, 3), [4.0, 0.0])
    """
    if not isinstance(num_slots, int) or isinstance(num_slots, bool):
        raise TypeError(f"jlora: num_slots must be a positive int, got {num_slots!r}")
    if num_slots < 1:
        raise ValueError(f"jlora: num_slots must be a positive int, got {num_slots!r}")
    names = adapter_names(lp)
    flat, treedef = _flat(lp)
    nodes = [(path, x) for path, x in flat if isinstance(x, (LoraWeight, MultiLoraWeight))]
    if not nodes:
        raise ValueError("jlora: adapter_slots needs a LoRA tree (jlora.wrap / jlora.load_peft): no adapted kernel")
    for path, x in flat:
        if isinstance(x, (Trainable, TrainableTokens)):
            raise ValueError(f"jlora: {path!r} is trained in full (bias / modules_to_save / token rows); adapter "
                             "slots share one base, so they hold LoRA factors only")
    pairs = {path: [x] if isinstance(x, LoraWeight) else list(x.adapters.values()) for path, x in nodes}
    ranks = [p.rank for ps in pairs.values() for p in ps]
    if max_rank is None:
        max_rank = max(ranks) if ranks else 1
    if fill and len(names) > num_slots:
        raise ValueError(f"jlora: {len(names)} adapters {names} do not fit in {num_slots} slots")

    def empty(path: str, x: Any) -> AdapterSlots:
        p = x if isinstance(x, LoraWeight) else next(iter(x.adapters.values()), None)
        if p is None:
            raise ValueError(f"jlora: {path!r} holds no adapter")
        ns = sum(1 for r in p.layout if r == "stack")
        fd = jnp.dtype(dtype) if dtype is not None else p.a.dtype
        a_shape = p.a.shape[:ns] + (num_slots,) + p.a.shape[ns:-1] + (max_rank,)
        b_shape = p.b.shape[:ns] + (num_slots, max_rank) + p.b.shape[ns + 1:]
        return AdapterSlots(x.w, jnp.zeros(a_shape, fd), jnp.zeros(b_shape, fd), jnp.zeros((num_slots,), jnp.float32),
                            tuple(p.layout))

    out = []
    for path, x in flat:
        if not isinstance(x, (LoraWeight, MultiLoraWeight)):
            out.append(x)
            continue
        pool = empty(path, x)
        if fill:
            for j, n in enumerate(names):
                p = _pair_of(x, n, path)
                if p is not None:
                    _check_pair(p, pool, path)
                    pool = _put(pool, j, p)
        out.append(pool)
    return jax.tree_util.tree_unflatten(treedef, out)


def load_slot(pool: Any, slot: int, adapter: Union[str, os.PathLike, Any], *, name: Optional[str] = None,
              **load_kwargs: Any) -> Any:
    """``pool`` with ``adapter`` in slot ``slot`` (replacing what was there): a LoRA tree
    over the same base (``name`` picks one of several named adapters), or a PEFT adapter
    directory (read with :func:`jlora.load_peft` over :func:`slots_base`; ``load_kwargs``
    go to it). Kernels the adapter does not target get zeros in that slot.

    Only array values change (same shapes, dtypes and structure), so nothing compiled for
    ``pool`` recompiles. ``ValueError`` (and ``pool`` unchanged) when the adapter adapts a
    kernel that has no slots, has a rank above the pool's ``max_rank``, or is not plain
    LoRA (DoRA, lora_bias, PiSSA/OLoRA residuals, grouped convolutions).

    >>> lp = jlora.wrap({"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=2, target_modules=["d"]))
    >>> pool = adapter_slots(lp, num_slots=4, max_rank=4, fill=False)
    >>> other = jlora.wrap({"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=4, lora_alpha=2, target_modules=["d"]))
    >>> load_slot(pool, 2, other)["d"]["kernel"].scale.tolist()
    [0.0, 0.0, 0.5, 0.0]
    """
    pools = _pools(pool)
    slot = _check_slot(pools[0][1], slot)
    if isinstance(adapter, (str, os.PathLike)):
        adapter = load_peft(adapter, slots_base(pool), **load_kwargs)
    elif load_kwargs:
        raise TypeError(f"jlora: load_slot's keyword arguments {sorted(load_kwargs)} are for a PEFT directory")
    src = dict(_flat(adapter)[0])
    pool_paths = {p for p, _ in pools}
    stray = [p for p, x in src.items() if isinstance(x, (LoraWeight, MultiLoraWeight)) and p not in pool_paths
             and _pair_of(x, name, p) is not None]
    stray += [p for p, x in src.items() if isinstance(x, (Trainable, TrainableTokens))]
    if stray:
        raise ValueError(f"jlora: the adapter adapts {stray}, which have no adapter slots (slots: {sorted(pool_paths)})")
    new = {}
    found = False
    for path, x in pools:
        p = _pair_of(src.get(path), name, path)
        if p is not None:
            _check_pair(p, x, path)
            found = True
        new[path] = p
    if not found:
        raise ValueError(f"jlora: the adapter{'' if name is None else ' ' + repr(name)} adapts none of the slots' "
                         f"kernels {sorted(pool_paths)}")
    return _map_pools(pool, lambda path, x: _put(x, slot, new[path]))


def clear_slot(pool: Any, slot: int) -> Any:
    """``pool`` with slot ``slot`` empty (zero factors, scale 0): rows using it get the base
    model. Array values only, like :func:`load_slot`.

    >>> lp = jlora.wrap({"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=2, target_modules=["d"]))
    >>> clear_slot(adapter_slots(lp, 2), 0)["d"]["kernel"].scale.tolist()
    [0.0, 0.0]
    """
    _check_slot(_pools(pool)[0][1], slot)
    return _map_pools(pool, lambda path, x: _put(x, slot, None))


def get_slot(pool: Any, slot: int) -> Any:
    """The single-adapter LoRA tree of slot ``slot`` (rank ``max_rank``, the padding
    included; scale read from the pool), e.g. to merge it or save it with
    :func:`jlora.save_peft`.

    >>> lp = jlora.wrap({"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(r=2, target_modules=["d"]))
    >>> get_slot(adapter_slots(lp, 2), 0)["d"]["kernel"].scale
    4.0
    """
    _check_slot(_pools(pool)[0][1], slot)

    def take(path, x):
        a, b = x.slot_factors(slot)
        return LoraWeight(x.w, a, b, scale=float(x.scale[slot]), layout=tuple(x.layout))

    return _map_pools(pool, take)


def slots_base(pool: Any) -> Any:
    """The base tree under the slots (each pool replaced by its kernel ``w``)."""
    return _map_pools(pool, lambda path, x: x.w)


def slot_scales(pool: Any) -> dict[str, Any]:
    """``{path: scales (N,)}`` of every pool (0 where a slot is empty for that kernel)."""
    return {p: x.scale for p, x in _pools(pool)}


def _map_pools(tree: Any, fn: Any) -> Any:
    flat, treedef = _flat(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(p, x) if is_adapter_slots(x) else x for p, x in flat])
