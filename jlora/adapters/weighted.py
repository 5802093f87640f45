"""``add_weighted_adapter``: PEFT's ways of combining named adapters into a new one
(concatenation, linear, SVD, TIES, DARE, magnitude pruning).

>>> lp = jlora.add_weighted_adapter(lp, ["a", "b"], [0.5, 0.5], "ab", combination_type="cat")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..nodes.weight import LoraWeight, MultiLoraWeight
from .named import _as_multi, _check_names, _leaves, _map, adapter_names

__all__ = ["add_weighted_adapter", "combine_task_tensors", "CombinationType"]

CombinationType = Literal[
    "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
]



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
    special = sorted({a for x in leaves for a in adapters if a in x.adapters
                      and (x.adapters[a].b_bias is not None or x.adapters[a].groups != 1)})
    if special:
        raise ValueError(
            f"add_weighted_adapter: adapters {special} have a lora_B bias (lora_bias=True) or adapt a grouped "
            "convolution; a weighted combination of those is not implemented (PEFT's combinations ignore the bias "
            "and the grouped lora_B); combine plain LoRA adapters"
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
