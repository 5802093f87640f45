"""`wrap`, `unload` and parameter counting."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .quantization import is_quantized
from .targets import LayoutSpec, flatten_params, plan_targets
from .weight import KernelLayout, LoraWeight, MultiLoraWeight, Trainable, init_factors, is_lora_weight, is_trainable
from .weight import is_lora_node as _is_node

__all__ = ["wrap", "unload", "count_parameters", "print_trainable_parameters", "is_lora_tree", "lora_leaves"]


def factor_sharding(w: Any, layout: tuple[str, ...]):
    """Shardings for A and B following W's NamedSharding (rank axis replicated)."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
    kl = KernelLayout(layout)
    stack = [spec[i] for i in kl.stack_axes]
    a_spec = jax.sharding.PartitionSpec(*stack, *[spec[i] for i in kl.in_axes], None)
    b_spec = jax.sharding.PartitionSpec(*stack, None, *[spec[i] for i in kl.out_axes])
    return (
        jax.sharding.NamedSharding(sharding.mesh, a_spec),
        jax.sharding.NamedSharding(sharding.mesh, b_spec),
    )


def wrap(
    params: Any,
    config: LoraConfig,
    *,
    rng: Optional[jax.Array] = None,
    dtype: Any = jnp.float32,
    layouts: LayoutSpec = None,
) -> Any:
    """Attaches LoRA factors to every targeted kernel of ``params``; pure.

    Each matched kernel ``W`` becomes ``LoraWeight(w=W, a=A, b=B)`` with
    ``A: (*stack, *in, r)``, ``B: (*stack, r, *out)`` and scale ``s = lora_alpha / r``
    (``/ sqrt(r)`` with rsLoRA), so the effective kernel is ``W + s·A·B`` (in ``W``'s
    layout). With the default ``init_lora_weights=True``, ``B = 0``: a freshly wrapped
    model computes exactly what the base model computes. Biases (``bias=``) and
    ``modules_to_save`` leaves become ``Trainable(value)``. The tree's structure and
    containers (dict, FrozenDict, ``nnx.State``) are otherwise unchanged.

    Args:
      params: a parameter pytree (Linen ``variables['params']``, ``nnx.State``, HF Flax
        ``model.params``), of arrays or of ``jax.ShapeDtypeStruct`` (then nothing is
        allocated: the result holds ``ShapeDtypeStruct`` too).
      config: the :class:`LoraConfig`.
      rng: PRNG key for the random factor; ``None`` means ``jax.random.key(0)``.
      dtype: dtype of A and B (default float32, whatever the base dtype).
      layouts: optional ``{module regex: roles}`` or ``f(module_path, shape) -> roles``
        overriding the inferred kernel layouts, e.g. ``{".*out": ("in", "in", "out")}``.

    Example:
      >>> import flax.linen as nn
      >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> lp = wrap({"dense": params}, LoraConfig(r=2, target_modules=["dense"]))
      >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
      ((3, 2), (2, 4))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    entries, treedef = flatten_params(params)
    plan = plan_targets(entries, config, layouts)
    if rng is None:
        rng = jax.random.key(0)

    abstract = any(
        isinstance(e.leaf, jax.ShapeDtypeStruct) or (is_quantized(e.leaf) and isinstance(e.leaf.codes, jax.ShapeDtypeStruct))
        for e in entries
    )
    if abstract:
        # Trace the same function on abstract values: allocates nothing.
        def concrete(p, key):
            return wrap(p, config, rng=key, dtype=dtype, layouts=layouts)

        return jax.eval_shape(concrete, params, rng)

    leaves = []
    for e in entries:
        spec = plan.targets.get(e.index)
        if spec is not None:
            key = jax.random.fold_in(rng, e.index)
            a, b = init_factors(
                key, tuple(e.leaf.shape), spec.layout, spec.r, config.init_lora_weights, dtype, spec.embedding
            )
            a_sh, b_sh = factor_sharding(e.leaf, spec.layout)
            if a_sh is not None and not isinstance(a, jax.core.Tracer):
                a, b = jax.device_put(a, a_sh), jax.device_put(b, b_sh)
            leaves.append(
                LoraWeight(e.leaf, a, b, scale=spec.scale, layout=spec.layout, dropout=config.lora_dropout)
            )
        elif e.index in plan.trainable:
            leaves.append(Trainable(e.leaf))
        else:
            leaves.append(e.leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def is_lora_tree(tree: Any) -> bool:
    """Whether ``tree`` holds at least one ``LoraWeight``."""
    return any(
        isinstance(x, (LoraWeight, MultiLoraWeight)) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_node)
    )


def lora_leaves(tree: Any) -> list[tuple[str, LoraWeight]]:
    """``[(path, LoraWeight), ...]`` in tree order, paths ``/``-joined."""
    from .targets import path_names

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]
    return [("/".join(path_names(p)), x) for p, x in flat if is_lora_weight(x)]


def unload(lp: Any) -> Any:
    """The base parameters back: every ``LoraWeight`` replaced by its ``w``, every
    ``Trainable`` by its value (PEFT's ``unload``). If the adapter was merged with
    :func:`jlora.merge_adapter`, ``w`` still holds the merged kernel; call
    :func:`jlora.unmerge_adapter` first to get ``W`` itself.

    >>> base = unload(wrap(params, config))   # doctest: +SKIP
    """

    def strip(x):
        if isinstance(x, (LoraWeight, MultiLoraWeight)):
            return x.w
        if is_trainable(x):
            return x.value
        return x

    return jax.tree_util.tree_map(strip, lp, is_leaf=_is_node)


def _size(x: Any) -> int:
    shape = getattr(x, "shape", None)
    return int(np.prod(shape)) if shape is not None else 0


def count_parameters(lp: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a LoRA tree, as PEFT counts them.

    trainable = Σ |A| + |B| + Σ |Trainable leaves|; total = trainable + all frozen leaves.
    With several adapters (``jlora.add_adapter``), only the active ones are trainable.

    >>> count_parameters(lp)  # doctest: +SKIP
    (811008, 125250816)
    """
    trainable = 0
    total = 0
    # a quantized kernel counts its parameters (its shape), not its bytes, as PEFT counts
    for x in jax.tree_util.tree_leaves(lp, is_leaf=lambda x: _is_node(x) or is_quantized(x)):
        if is_lora_weight(x):
            n = _size(x.a) + _size(x.b)
            trainable += n
            total += n + _size(x.w)
        elif isinstance(x, MultiLoraWeight):
            total += _size(x.w)
            live = {id(p) for p in x.active_pairs()}
            for p in x.adapters.values():
                n = _size(p.a) + _size(p.b)
                total += n
                trainable += n if id(p) in live else 0
        elif is_trainable(x):
            n = sum(_size(v) for v in jax.tree_util.tree_leaves(x.value))
            trainable += n
            total += n
        else:
            total += _size(x)
    return trainable, total


def print_trainable_parameters(lp: Any) -> None:
    """Prints PEFT's line, e.g.
    ``trainable params: 811,008 || all params: 125,250,816 || trainable%: 0.6475``."""
    trainable, total = count_parameters(lp)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
