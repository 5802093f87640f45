"""Several named adapters over one shared base: add, load, switch, combine, delete.

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

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .quantization import is_quantized
from .weight import DEFAULT_ADAPTER, LoraWeight, MultiLoraWeight, Trainable
from .weight import is_lora_node as _is_node

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
    "add_weighted_adapter",
]

BASE_ADAPTER = "__base__"

CombinationType = Literal[
    "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
]


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
        if isinstance(new, Trainable):
            raise ValueError(
                f"adapter {name!r}: an added adapter may not train bias or modules_to_save leaves (they belong "
                "to the shared base); use bias='none' and no modules_to_save"
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
        return x

    return _map(strip, lp)


def add_adapter(lp: Any, name: str, config: LoraConfig, rng: Optional[jax.Array] = None, **wrap_kwargs: Any) -> Any:
    """Adds a new adapter ``name`` (PEFT's ``add_adapter``), initialised as ``jlora.wrap``
    would, over the same base. The active adapters do not change (unless it is the first).

    Adds only the new factors' bytes: the base arrays are shared, not copied.

    >>> lp = add_adapter(lp, "b", LoraConfig(r=4, target_modules=["q_proj"]), rng=key)  # doctest: +SKIP
    """
    from .wrap import wrap

    single = wrap(_base(lp), config, rng=rng, **wrap_kwargs)
    return _attach(lp, single, name)


def load_adapter(lp: Any, path: Union[str, os.PathLike], name: str, *, active: bool = False, **load_kwargs: Any) -> Any:
    """Loads an adapter saved by ``jlora.save`` (Orbax) or in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``) as ``name``
    (PEFT's ``load_adapter``); ``active=True`` also activates it."""
    path = os.fspath(path)
    base = _base(lp)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from .peft_format import load_peft

        single = load_peft(path, base, **load_kwargs)
    else:
        from .checkpoint import load

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
            from .inits import original_kernel

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


# ----------------------------------------------------------------------------------
# add_weighted_adapter: PEFT's combinations
# ----------------------------------------------------------------------------------


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = jnp.abs(t).reshape(-1)
    if k <= 0:
        return jnp.zeros_like(t)
    _, idx = jax.lax.top_k(flat, k)
    mask = jnp.zeros_like(flat).at[idx].set(1).reshape(t.shape)
    return t * mask


def _random_prune(t: jax.Array, density: float, key: jax.Array, rescale: bool) -> jax.Array:
    if density >= 1:
        return t
    mask = jax.random.bernoulli(key, density, t.shape).astype(t.dtype)
    out = t * mask
    return out / density if rescale else out


def _majority_sign_mask(stacked: jax.Array, method: str) -> jax.Array:
    sign = jnp.sign(stacked)
    if method == "total":
        mag = stacked.sum(axis=0)
    elif method == "frequency":
        mag = sign.sum(axis=0)
    else:
        raise ValueError(f"majority_sign_method={method!r}: must be 'total' or 'frequency'")
    majority = jnp.where(mag >= 0, 1.0, -1.0).astype(stacked.dtype)
    return sign == majority


def combine_task_tensors(
    tensors: Sequence[jax.Array],
    weights: Sequence[float],
    method: str,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    key: Optional[jax.Array] = None,
) -> jax.Array:
    """PEFT's ``merge_utils`` task-vector merges on JAX arrays.

    - ``"linear"`` (task arithmetic): Σ wᵢ·tᵢ
    - ``"magnitude_prune"``: Σ wᵢ·top-k(|tᵢ|, density)
    - ``"ties"``: magnitude-prune each tᵢ, elect the majority sign of Σ tᵢ (or of the
      signs, ``"frequency"``), average the weighted values that agree with it
    - ``"dare_linear"``: Σ wᵢ·(bernoulli(density)·tᵢ/density)
    - ``"dare_ties"``: DARE pruning then the TIES sign election and disjoint mean

    ``key`` seeds DARE's random pruning (one subkey per tensor).
    """
    stacked_w = jnp.asarray(weights, jnp.float32)
    needs_density = method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and density is None:
        raise ValueError(f"combination {method!r} needs density= (a fraction in [0, 1])")
    if density is not None and density < 0:
        raise ValueError(f"density={density}: must be >= 0")
    if method.startswith("dare"):
        if key is None:
            raise ValueError(f"combination {method!r} prunes at random: pass rng=jax.random.key(seed)")
        keys = jax.random.split(key, len(tensors))
        tensors = [_random_prune(t, density, k, rescale=True) for t, k in zip(tensors, keys)]
    elif method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    stacked = jnp.stack([t.astype(jnp.float32) for t in tensors])
    w = stacked_w.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ("linear", "dare_linear", "magnitude_prune"):
        return (stacked * w).sum(0)
    if method in ("ties", "dare_ties"):
        mask = _majority_sign_mask(stacked, majority_sign_method)
        weighted = stacked * w
        return (weighted * mask).sum(0) / jnp.clip(mask.sum(0), 1.0, None)
    raise ValueError(f"unknown combination method {method!r}")


def _svd_factors(d: jax.Array, n_stack: int, n_in: int, rank: int) -> tuple[jax.Array, jax.Array]:
    """Rank-``rank`` factors (A, B) of a canonical delta (*stack, *in, *out)."""
    stack = d.shape[:n_stack]
    ins = d.shape[n_stack:n_stack + n_in]
    outs = d.shape[n_stack + n_in:]
    m = d.reshape(stack + (int(np.prod(ins)), int(np.prod(outs))))
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    k = min(rank, s.shape[-1])
    a = u[..., :, :k]
    b = s[..., :k, None] * vh[..., :k, :]
    if k < rank:  # pad to the requested rank with zeros
        a = jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (rank - k,), a.dtype)], -1)
        b = jnp.concatenate([b, jnp.zeros(b.shape[:-2] + (rank - k, b.shape[-1]), b.dtype)], -2)
    return a.reshape(stack + ins + (rank,)), b.reshape(stack + (rank,) + outs)


def _canonical_delta(p: LoraWeight) -> jax.Array:
    """s·A·B in canonical (stack, in, out) order."""
    n_stack = p.layout.count("stack")
    st = tuple(range(n_stack))
    d = jax.lax.dot_general(
        p.a.astype(jnp.float32), p.b.astype(jnp.float32), (((p.a.ndim - 1,), (n_stack,)), (st, st)),
        precision=jax.lax.Precision.HIGHEST,
    )
    return d * p.scale


def add_weighted_adapter(
    lp: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    *,
    svd_rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    rng: Optional[jax.Array] = None,
) -> Any:
    """Adds ``adapter_name``, a weighted combination of existing adapters (PEFT's
    ``add_weighted_adapter``, same semantics). With ``sᵢ`` the adapters' scales:

    - ``"cat"``: A = [w₁s₁A₁ | w₂s₂A₂ | …], B = [B₁; B₂; …] (rank Σ rᵢ): exactly Σ wᵢ·sᵢ·AᵢBᵢ.
    - ``"linear"``: A = Σ √|wᵢsᵢ|·sign(wᵢsᵢ)·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (same ranks required).
      Not Σ wᵢ·ΔWᵢ for different adapters: the cross terms AᵢBⱼ appear.
    - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"`` with
      PEFT's task-vector merge (``density``; DARE prunes at random with ``rng``).
    - ``"svd"`` (and ``"ties_svd"``, ``"dare_*_svd"``, ``"magnitude_prune_svd"``): merge the
      full deltas ΔWᵢ = sᵢAᵢBᵢ, then keep the top ``svd_rank`` (default: max rᵢ) singular
      directions.

    The new adapter has scale 1 (PEFT sets ``lora_alpha = r``) and is not activated.

    Raises ``ValueError`` for unknown names, ``weights``/``adapters`` of different lengths,
    an existing ``adapter_name``, different ranks for the linear family, or adapters with
    different targets where the combination cannot combine them (the linear family).
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if len(adapters) != len(weights):
        raise ValueError(f"got {len(adapters)} adapters {adapters} but {len(weights)} weights {weights}")
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    _check_names(lp, adapters)
    if adapter_name in adapter_names(lp):
        raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {adapter_names(lp)}")
    ctype = "linear" if len(adapters) == 1 else combination_type  # as PEFT
    valid = {"cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
             "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"}
    if ctype not in valid:
        raise ValueError(f"combination_type={combination_type!r}: must be one of {sorted(valid)}")
    base_method = ctype[:-4] if ctype.endswith("_svd") else ("linear" if ctype == "svd" else ctype)

    lp_multi = _map(_as_multi, lp)
    leaves = [x for x in _leaves(lp_multi) if isinstance(x, MultiLoraWeight)]
    dora = sorted({a for x in leaves for a in adapters if a in x.adapters and x.adapters[a].magnitude is not None})
    if dora:
        raise ValueError(
            f"add_weighted_adapter: adapters {dora} are DoRA adapters (use_dora=True). A weighted combination of "
            "their A and B has no magnitude that makes it the weighted model (PEFT 0.21.2 silently keeps one "
            "adapter's magnitude and produces a wrong adapter, PEFT issue #3761); jlora refuses. Combine LoRA "
            "adapters, or merge the DoRA adapters into the base (jlora.merge) instead"
        )
    linear_family = ctype in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    if linear_family:
        ranks = {x.adapters[a].rank for x in leaves for a in adapters if a in x.adapters}
        if len(ranks) > 1:
            raise ValueError(f"combination {ctype!r} needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
        for x in leaves:
            present = [a for a in adapters if a in x.adapters]
            if present and len(present) != len(adapters):
                raise ValueError(
                    f"adapters {adapters} target different kernels ({present} only on one of them); "
                    f"{ctype!r} combines A's and B's separately and cannot; use 'cat' or 'svd'"
                )
    key = rng if rng is not None else jax.random.key(0)
    counter = [0]

    def combine_leaf(x):
        if not isinstance(x, MultiLoraWeight):
            return x
        present = [(a, w) for a, w in zip(adapters, weights) if a in x.adapters]
        if not present:
            return x
        pairs = [x.adapters[a] for a, _ in present]
        ws = [w for _, w in present]
        first = pairs[0]
        n_stack = first.layout.count("stack")
        counter[0] += 1
        leaf_key = jax.random.fold_in(key, counter[0])
        if ctype == "cat":
            a = jnp.concatenate([(w * p.scale) * p.a.astype(jnp.float32) for p, w in zip(pairs, ws)], axis=-1)
            b = jnp.concatenate([p.b.astype(jnp.float32) for p in pairs], axis=n_stack)
        elif linear_family:
            signed = [math.copysign(math.sqrt(abs(w * p.scale)), w * p.scale) for p, w in zip(pairs, ws)]
            plain = [math.sqrt(abs(w * p.scale)) for p, w in zip(pairs, ws)]
            ka, kb = jax.random.split(leaf_key)
            a = combine_task_tensors([p.a for p in pairs], signed, ctype, density, majority_sign_method, ka)
            b = combine_task_tensors([p.b for p in pairs], plain, ctype, density, majority_sign_method, kb)
        else:
            rank = svd_rank or max(p.rank for p in pairs)
            deltas = [_canonical_delta(p) for p in pairs]
            d = combine_task_tensors(deltas, ws, base_method, density, majority_sign_method, leaf_key)
            n_in = first.layout.count("in")
            a, b = _svd_factors(d, n_stack, n_in, rank)
        new = first.replace(a=a.astype(first.a.dtype), b=b.astype(first.b.dtype), scale=1.0)
        adapters_ = dict(x.adapters)
        adapters_[adapter_name] = new
        return x.replace(adapters=adapters_)

    return _map(combine_leaf, lp_multi)
