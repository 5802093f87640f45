"""Several named adapters over one shared base: add, load, switch, delete, and the ids of a
mixed batch (combining them: :mod:`jlora.adapters.weighted`).

Representation: a targeted kernel that carries more than one adapter (or a named one)
is a :class:`MultiLoraWeight`: the base ``w`` once, and a dict of named factor pairs
(each a ``LoraWeight`` whose ``w`` is ``None``) with the set of active names as static
data. The base is never copied per adapter: adding an adapter adds only its factors.
Why one node per kernel and not one tree per adapter: the forward pass needs, at each
kernel, every active factor pair next to ``W`` (to sum them, or to gather them per
example in a mixed batch) in one place; one node gives that without aligning trees.

Functional, like the rest of jlora: each function returns a new tree.

>>> lp = jlora.wrap(params, cfg_a)                                  # doctest: +SKIP
>>> lp = jlora.add_adapter(lp, "b", cfg_b, rng=jax.random.key(1))   # doctest: +SKIP
>>> lp = jlora.set_adapter(lp, ["default", "b"])      # both active: deltas add up  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..core.config import LoraConfig
from ..io.orbax import load
from ..io.peft import load_peft
from ..nodes.inits import original_kernel
from ..nodes.weight import DEFAULT_ADAPTER, LoraWeight, MultiLoraWeight, Trainable, TrainableTokens
from ..nodes.weight import is_lora_node as _is_node
from ..quant.array import is_quantized
from ..tree.wrap import wrap

__all__ = [
    "DEFAULT_ADAPTER",
    "BASE_ADAPTER",
    "MultiLoraWeight",
    "add_adapter",
    "load_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "enable_adapter",
    "get_adapter",
    "adapter_names",
    "active_adapters",
    "adapter_ids",
    "check_adapter_ids",
]

BASE_ADAPTER = "__base__"


def _map(fn, tree: Any) -> Any:
    return jax.tree_util.tree_map(fn, tree, is_leaf=_is_node)


def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree, is_leaf=_is_node)


def _as_multi(x: Any) -> Any:
    if isinstance(x, LoraWeight):
        if x.merged:
            raise ValueError("unmerge the adapter first (jlora.unmerge_adapter) before adding or switching adapters")
        return MultiLoraWeight(x.w, {DEFAULT_ADAPTER: x.replace(w=None)}, (DEFAULT_ADAPTER,), True)
    return x


def adapter_names(lp: Any) -> list[str]:
    """Names of all adapters in the tree, in order of first appearance.

    A tree from ``jlora.wrap`` has one adapter, ``"default"``."""
    names: list[str] = []
    for x in _leaves(lp):
        found = [DEFAULT_ADAPTER] if isinstance(x, LoraWeight) else list(x.adapters) if isinstance(x, MultiLoraWeight) else []
        for n in found:
            if n not in names:
                names.append(n)
    return names


def active_adapters(lp: Any) -> list[str]:
    """Names of the active adapters (empty when disabled)."""
    active: list[str] = []
    for x in _leaves(lp):
        if isinstance(x, LoraWeight):
            names = [DEFAULT_ADAPTER]
        elif isinstance(x, MultiLoraWeight):
            names = list(x.active) if x.enabled else []
        else:
            continue
        for n in names:
            if n not in active:
                active.append(n)
    return active


def _check_names(lp: Any, names: Sequence[str]) -> None:
    existing = adapter_names(lp)
    for n in names:
        if n not in existing:
            raise ValueError(f"unknown adapter {n!r}; existing adapters: {existing}")


def _attach(lp: Any, single: Any, name: str, active: Optional[bool] = None) -> Any:
    """Adds the factors of a single-adapter tree ``single`` to ``lp`` under ``name``."""
    if name in adapter_names(lp):
        raise ValueError(f"adapter {name!r} already exists; existing adapters: {adapter_names(lp)}")
    if name == BASE_ADAPTER:
        raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' in mixed batches")
    had_any = bool(adapter_names(lp))
    _warn_residual_mix(lp, single, name)

    def join(old, new):
        if isinstance(new, (Trainable, TrainableTokens)):
            raise ValueError(
                f"adapter {name!r}: an added adapter may not train bias, modules_to_save leaves or token rows (they "
                "belong to the shared base); use bias='none', no modules_to_save and no trainable_token_indices"
            )
        if not isinstance(new, LoraWeight):
            return old
        if isinstance(old, Trainable):
            raise ValueError(f"adapter {name!r} targets a kernel that another adapter trains in full")
        if isinstance(old, (LoraWeight, MultiLoraWeight)):
            m = _as_multi(old)
        else:
            m = MultiLoraWeight(old, {}, (), True)
        if tuple(m.w.shape) != tuple(new.w.shape):
            raise ValueError(f"adapter {name!r}: base kernel shapes differ: {tuple(m.w.shape)} vs {tuple(new.w.shape)}")
        adapters = dict(m.adapters)
        adapters[name] = new.replace(w=None)
        act = m.active + (name,) if (active or (active is None and not had_any)) else m.active
        # PiSSA/OLoRA: the new adapter was initialised on the current base, which becomes its
        # residual for every adapter (as in PEFT); its A0/B0 let unload/delete restore it
        w = new.w if new.a0 is not None else m.w
        return m.replace(w=w, adapters=adapters, active=act)

    # a quantized base kernel (jlora.QuantizedArray) is one leaf on both sides
    return jax.tree_util.tree_map(join, lp, single, is_leaf=lambda x: _is_node(x) or is_quantized(x))


def _residual_names(tree: Any, default: str = DEFAULT_ADAPTER) -> list[str]:
    out: list[str] = []
    for x in _leaves(tree):
        pairs = {default: x} if isinstance(x, LoraWeight) else dict(x.adapters) if isinstance(x, MultiLoraWeight) else {}
        out += [n for n, p in pairs.items() if p.a0 is not None and n not in out]
    return out


def _warn_residual_mix(lp: Any, single: Any, name: str) -> None:
    """PEFT's warning (and more precise): a PiSSA/OLoRA adapter changes the shared base."""
    old = _residual_names(lp)
    new = _residual_names(single, name)
    others = [n for n in adapter_names(lp) if n not in old]
    if new and adapter_names(lp):
        warnings.warn(
            f"adapter {name!r} uses a PiSSA/OLoRA initialisation: it replaces the shared base of its kernels by the "
            f"residual W - s*A0*B0, so the adapters already present ({adapter_names(lp)}) and the disabled model "
            "now compute on that residual, as in PEFT. jlora.unload / jlora.delete_adapter still restore the original "
            "base. To combine adapters safely, convert it first: save_peft(..., convert_to_lora=True) and load that.",
            UserWarning, stacklevel=3,
        )
    elif old and not new:
        warnings.warn(
            f"adapter {name!r} is added over a PiSSA/OLoRA base: adapters {old} replaced the base by its residual "
            f"W - s*A0*B0, so {name!r} (and {others or 'the disabled model'}) computes on that residual, as in PEFT. "
            "To use it on the original base, convert the PiSSA/OLoRA adapter with save_peft(..., "
            "convert_to_lora=True) and load both into a tree over the original base.",
            UserWarning, stacklevel=3,
        )


def _base(lp: Any) -> Any:
    def strip(x):
        if isinstance(x, (LoraWeight, MultiLoraWeight)):
            if isinstance(x, LoraWeight) and x.merged:
                raise ValueError("unmerge the adapter first (jlora.unmerge_adapter)")
            return x.w
        if isinstance(x, Trainable):
            return x.value
        if isinstance(x, TrainableTokens):
            return x.w
        return x

    return _map(strip, lp)


def add_adapter(lp: Any, name: str, config: LoraConfig, rng: Optional[jax.Array] = None, **wrap_kwargs: Any) -> Any:
    """Adds a new adapter ``name`` (PEFT's ``add_adapter``), initialised as ``jlora.wrap``
    would, over the same base. The active adapters do not change (unless it is the first).

    Adds only the new factors' bytes: the base arrays are shared, not copied.

    >>> lp = add_adapter(lp, "b", LoraConfig(r=4, target_modules=["q_proj"]), rng=key)  # doctest: +SKIP
    """
    single = wrap(_base(lp), config, rng=rng, **wrap_kwargs)
    return _attach(lp, single, name)


def load_adapter(lp: Any, path: Union[str, os.PathLike], name: str, *, active: bool = False, **load_kwargs: Any) -> Any:
    """Loads an adapter saved by ``jlora.save`` (Orbax) or in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``) as ``name``
    (PEFT's ``load_adapter``); ``active=True`` also activates it. ``load_kwargs`` go to
    :func:`jlora.load_peft` / :func:`jlora.load`, ``apply_fn=`` / ``example_args=``
    included (called as ``apply_fn(base_params, *example_args)``: each kernel's layout
    from its use)."""
    path = os.fspath(path)
    base = _base(lp)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        single = load_peft(path, base, **load_kwargs)
    else:
        single = load(path, base, **load_kwargs)
    return _attach(lp, single, name, active=active)


def set_adapter(lp: Any, names: Union[str, Sequence[str]]) -> Any:
    """Makes ``names`` the active adapters (PEFT's ``set_adapter``); several active adapters
    add up: ``W + Σ_i s_i·A_i·B_i``. Only active adapters train under ``jlora.optimizer``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name; use jlora.disable_adapter for the base alone")
    _check_names(lp, names)

    def activate(x):
        x = _as_multi(x)
        if isinstance(x, MultiLoraWeight):
            return x.replace(active=tuple(n for n in names if n in x.adapters), enabled=True)
        return x

    return _map(activate, lp)


def disable_adapter(lp: Any) -> Any:
    """The tree with every adapter switched off: ``jlora.lora(fn)`` computes the base
    model (PEFT's ``disable_adapter``), without unwrapping. Undo with :func:`enable_adapter`."""

    def off(x):
        x = _as_multi(x)
        return x.replace(enabled=False) if isinstance(x, MultiLoraWeight) else x

    return _map(off, lp)


def enable_adapter(lp: Any) -> Any:
    """Undoes :func:`disable_adapter`."""

    return _map(lambda x: x.replace(enabled=True) if isinstance(x, MultiLoraWeight) else x, lp)


def delete_adapter(lp: Any, name: str) -> Any:
    """Removes adapter ``name`` (PEFT's ``delete_adapter``). Deleting the last active
    adapter is an error: activate another one first (or use :func:`jlora.unload`).
    Deleting a PiSSA/OLoRA adapter also restores the base it replaced by its residual
    (``W_res + s·A₀·B₀``; PEFT leaves the residual)."""
    _check_names(lp, [name])
    active = active_adapters(lp)
    if active == [name]:
        raise ValueError(
            f"cannot delete {name!r}: it is the last active adapter; set_adapter() to one of "
            f"{[n for n in adapter_names(lp) if n != name]} first, or jlora.unload(lp) for the base"
        )

    def drop(x):
        x = _as_multi(x)
        if not isinstance(x, MultiLoraWeight) or name not in x.adapters:
            return x
        gone = x.adapters[name]
        w = x.w
        if gone.a0 is not None:  # a PiSSA/OLoRA adapter: its residual is undone
            w = original_kernel(w, gone.a0, gone.b0, gone.scale, gone.layout)
        adapters = {k: v for k, v in x.adapters.items() if k != name}
        if not adapters:
            return w
        return x.replace(w=w, adapters=adapters, active=tuple(n for n in x.active if n != name))

    return _map(drop, lp)


def get_adapter(lp: Any, name: str) -> Any:
    """A single-adapter LoRA tree holding only adapter ``name`` over the base (what
    ``jlora.save`` / ``jlora.save_peft`` write)."""
    _check_names(lp, [name])

    def pick(x):
        if isinstance(x, LoraWeight):
            return x if name == DEFAULT_ADAPTER else x.w
        if isinstance(x, MultiLoraWeight):
            return x.adapters[name].replace(w=x.w) if name in x.adapters else x.w
        return x

    return _map(pick, lp)


def adapter_ids(lp: Any, names: Sequence[str]) -> jax.Array:
    """Per-example adapter indices for a mixed batch: ``names[i]`` is an adapter name or
    ``"__base__"`` (the base model alone). Pass the result as ``adapter_ids=`` to the
    function returned by ``jlora.lora``.

    ``ids[e] = adapter_names(lp).index(names[e])``, ``-1`` for ``"__base__"``. This is
    the safe way to build ids: an unknown name is a ``ValueError``. Hand-made concrete
    ids outside ``-1 .. len(adapter_names(lp)) - 1`` are a ``ValueError`` too (see
    :func:`check_adapter_ids`); traced ids (inside ``jit``) cannot be checked, and an
    out-of-range index there selects no adapter: that example gets the base model.

    >>> ids = adapter_ids(lp, ["a", "b", "__base__", "a"])     # doctest: +SKIP
    >>> y = jlora.lora(apply)(lp, x, adapter_ids=ids)           # doctest: +SKIP
    """
    existing = adapter_names(lp)
    out = []
    for n in names:
        if n == BASE_ADAPTER:
            out.append(-1)
        elif n in existing:
            out.append(existing.index(n))
        else:
            raise ValueError(f"unknown adapter {n!r}; existing adapters: {existing} (or {BASE_ADAPTER!r})")
    return jnp.asarray(out, jnp.int32)


def check_adapter_ids(ids: Any, names: Sequence[str]) -> None:
    """Raises ``ValueError`` if concrete ``ids`` hold an index outside ``-1 .. len(names)-1``.

    ``names`` are the tree's adapter names (``adapter_names(lp)``); ``-1`` is the base
    model. Traced ids (under ``jit``/``vmap``) are not checked: there an out-of-range index
    matches no adapter, so that example computes the base model alone. Only the shards
    this process holds are checked for a multi-process global array.

    >>> check_adapter_ids(np.array([0, -1]), ["a", "b"])
    >>> check_adapter_ids(np.array([2]), ["a", "b"])
    Traceback (most recent call last):
    ...
    ValueError: adapter_ids[0] = 2 is out of range: valid ids are -1 (the base model) and 0..1 for the adapters ['a', 'b'] (0='a', 1='b'); jlora.adapter_ids(lp, names) builds them from names
    """
    if isinstance(ids, jax.core.Tracer):
        return
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
        chunks = [(s.index[0].start or 0 if s.index else 0, np.asarray(s.data).reshape(-1)) for s in ids.addressable_shards]
    else:
        chunks = [(0, np.asarray(ids).reshape(-1))]
    n = len(names)
    for start, vals in chunks:
        bad = np.nonzero((vals < -1) | (vals >= n))[0]
        if bad.size:
            i = int(bad[0])
            listing = ", ".join(f"{k}={nm!r}" for k, nm in enumerate(names))
            raise ValueError(
                f"adapter_ids[{start + i}] = {int(vals[i])} is out of range: valid ids are -1 (the base model) and "
                f"0..{n - 1} for the adapters {list(names)} ({listing}); jlora.adapter_ids(lp, names) builds them "
                "from names"
            )
