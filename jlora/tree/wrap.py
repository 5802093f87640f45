"""`wrap`, `unload` and parameter counting."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..core.config import LoraConfig
from ..core.nnx_modules import is_nnx_module, map_module_state
from ..core.paths import LeafEntry, path_names, stacklevel_outside_jlora
from ..layouts.from_tree import LayoutSpec
from ..layouts.from_use import find_kernel_uses
from ..layouts.kernel import KernelLayout
from ..nodes.dora import weight_norm
from ..nodes.factors import init_b_bias, init_factors
from ..nodes.inits import init_residual_factors, is_residual_init, original_kernel, residual_kernel
from ..nodes.weight import (
    LoraWeight,
    MultiLoraWeight,
    Trainable,
    TrainableTokens,
    is_lora_weight,
    is_trainable,
    is_trainable_tokens,
)
from ..nodes.weight import is_lora_node as _is_node
from ..quant.array import is_quantized
from .targets import flatten_params, plan_targets

__all__ = ["wrap", "unload", "count_parameters", "print_trainable_parameters", "is_lora_tree", "lora_leaves",
           "factor_sharding"]


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


def check_param_tree(params: Any) -> None:
    """``TypeError`` unless ``params`` is a pytree with at least one array (or
    ``jax.ShapeDtypeStruct``) leaf, saying what it got instead."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_node)
    if any(_is_node(x) or (hasattr(x, "shape") and hasattr(x, "dtype")) for x in leaves):
        return
    if not leaves or leaves == [params]:
        got = f"{type(params).__name__} {params!r:.60}"
    else:
        got = f"a {type(params).__name__} whose {len(leaves)} leaves hold no array (e.g. {type(leaves[0]).__name__} {leaves[0]!r:.40})"
    raise TypeError(
        f"wrap(params, config): params must be a parameter pytree of arrays (a Linen variables['params'] dict, "
        f"an nnx.State or nnx.Module, Hugging Face model.params, or jax.ShapeDtypeStructs), got {got}"
    )


def wrap(
    params: Any,
    config: LoraConfig,
    *,
    rng: Optional[jax.Array] = None,
    apply_fn: Optional[Callable[..., Any]] = None,
    example_args: Sequence[Any] = (),
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
    containers (dict, FrozenDict, ``nnx.State``, an ``nnx.Module`` of the same class)
    are otherwise unchanged.

    Which leaves are kernels, and the role of each of their axes (``"stack"``, ``"in"``,
    ``"out"``): with ``apply_fn``, found from how the model uses them
    (:mod:`jlora.layouts.from_use`: ``apply_fn(params, *example_args)`` is traced abstractly, nothing
    is computed, and every leaf the model contracts in a ``dot_general``, convolves or
    gathers by rows is a kernel whatever its name: ``kernel``, ``w``, ``weight``, a bare
    leaf). Without it, inferred from the tree (names ``kernel``/``embedding``, and
    ``w``/``weight`` where the tree tells their layout; otherwise the error says what to
    pass). ``target_modules`` matches module paths as PEFT does (see
    :mod:`jlora.tree.targets`; a bare leaf is its own module). A 2-D kernel that only the
    (in, out) naming convention orients is marked ``guessed``: :func:`jlora.lora` raises
    where the model reads it transposed (pass ``apply_fn=`` or ``layouts=``). A grouped
    convolution (found by use) gets PEFT's structure: A a full convolution, B a grouped
    1×1 convolution (``LoraWeight.groups``; ``r`` must be divisible by the groups).
    ``lora_bias`` adds a trained ``b_bias``; ``trainable_token_indices`` turns the chosen
    tables into :class:`jlora.TrainableTokens` (their rows start as the original rows).

    Args:
      params: a parameter pytree (Linen ``variables['params']``, ``nnx.State``, an
        ``nnx.Module``, HF Flax ``model.params``), of arrays or of
        ``jax.ShapeDtypeStruct`` (then nothing is allocated: the result holds
        ``ShapeDtypeStruct`` too).
      config: the :class:`LoraConfig`.
      rng: PRNG key for the random factor; ``None`` means ``jax.random.key(0)``.
      apply_fn: the model's forward, called as ``apply_fn(params, *example_args)``
        (for an ``nnx.Module`` ``params``, e.g. ``lambda m, ids: m(ids)``); only traced.
      example_args: the other arguments of ``apply_fn`` (arrays or
        ``jax.ShapeDtypeStruct``; non-array values are passed as they are).
      dtype: dtype of A and B (default float32, whatever the base dtype).
      layouts: optional ``{module regex: roles}`` or ``f(module_path, shape) -> roles``
        overriding the found or inferred kernel layouts, e.g.
        ``{".*kv_einsum": ("stack", "out", "in", "out")}``; with ``apply_fn`` they are
        checked against the uses.

    Example:
      >>> import flax.linen as nn
      >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> lp = wrap({"dense": params}, LoraConfig(r=2, target_modules=["dense"]))
      >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
      ((3, 2), (2, 4))

      Einsum kernels found by use (a leaf ``w`` of shape (D, N, H)):

      >>> p = {"q_proj": {"w": jnp.ones((8, 2, 4))}}
      >>> f = lambda p, x: jnp.einsum("btd,dnh->btnh", x, p["q_proj"]["w"])
      >>> lp = wrap(p, LoraConfig(r=2, target_modules=["q_proj"]), apply_fn=f,
      ...           example_args=(jnp.ones((1, 3, 8)),))
      >>> lp["q_proj"]["w"].layout
      ('in', 'out', 'out')
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    if config.init_lora_weights == "mica":
        raise ValueError(
            "init_lora_weights='mica': jlora loads MiCA adapters (jlora.load_peft: a plain LoRA forward and merge) "
            "but cannot initialise one for training (MiCA freezes B at the minor singular vectors of W)"
        )
    check_param_tree(params)
    if not isinstance(example_args, (tuple, list)):
        raise TypeError(
            f"example_args must be a tuple of apply_fn's other arguments, e.g. example_args=(ids,), "
            f"got {type(example_args).__name__}"
        )
    if example_args and apply_fn is None:
        raise ValueError("example_args= is given without apply_fn=: pass the model's forward as apply_fn")
    if is_nnx_module(params):
        # Through the module's graph state, so that a Variable shared by two attributes
        # (weight tying by reference) is wrapped once and stays shared; target_modules may
        # name it by any of its paths.
        nnx = sys.modules["flax.nnx"]
        graphdef = nnx.graphdef(params)
        on_state = None
        if apply_fn is not None:
            on_state = lambda s, *args: apply_fn(nnx.merge(graphdef, s), *args)  # noqa: E731
        aliases = _module_aliases(params)
        return map_module_state(
            lambda s: _wrap_tree(s, config, rng, on_state, tuple(example_args), dtype, layouts, aliases), params
        )
    return _wrap_tree(params, config, rng, apply_fn, tuple(example_args), dtype, layouts, None)


def _module_aliases(module: Any) -> dict[str, list[str]]:
    """``{module path: the other paths of the same module}`` for the Variables an
    ``nnx.Module`` reaches by more than one attribute path."""
    nnx = sys.modules["flax.nnx"]
    paths: dict[int, list[str]] = {}
    flat = jax.tree_util.tree_flatten_with_path(module, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, x in flat:
        if isinstance(x, nnx.Variable):
            paths.setdefault(id(x), []).append(LeafEntry(0, path_names(path), None).module)
    out: dict[str, list[str]] = {}
    for group in paths.values():
        for key in group:
            others = [k for k in group if k != key]
            if others:
                out.setdefault(key, []).extend(others)
    return out


def _wrap_tree(params: Any, config: LoraConfig, rng: Optional[jax.Array], apply_fn: Optional[Callable[..., Any]],
               example_args: tuple, dtype: Any, layouts: LayoutSpec, aliases: Optional[dict]) -> Any:
    """:func:`wrap` on a pytree (an ``nnx.Module`` has become its state)."""
    entries, treedef = flatten_params(params)
    uses = None
    if apply_fn is not None:
        # a quantized kernel is one leaf, used as the kernel it stands for
        uses = find_kernel_uses(apply_fn, params, example_args,
                                is_leaf=lambda x: _is_node(x) or is_quantized(x))
    plan = plan_targets(entries, config, layouts, uses, aliases)
    if config.lora_bias:
        _warn_no_base_bias(entries, plan)
    if rng is None:
        rng = jax.random.key(0)

    abstract = any(
        isinstance(e.leaf, jax.ShapeDtypeStruct)
        or (is_quantized(e.leaf) and isinstance(e.leaf.codes, jax.ShapeDtypeStruct))
        for e in entries
    )
    if abstract:
        # Trace the same function on abstract values: allocates nothing.
        def concrete(p, key):
            ents, tdef = flatten_params(p)
            return _attach(ents, tdef, plan, config, key, dtype)

        return jax.eval_shape(concrete, params, rng)
    return _attach(entries, treedef, plan, config, rng, dtype)


def _attach(entries: Sequence[Any], treedef: Any, plan: Any, config: LoraConfig, rng: jax.Array, dtype: Any) -> Any:
    """The LoRA tree: factors on ``plan``'s targets, ``Trainable`` on its trainable leaves."""
    leaves = []
    residual_embeddings = []
    for e in entries:
        spec = plan.targets.get(e.index)
        if spec is not None:
            key = jax.random.fold_in(rng, e.index)
            lw = _init_target(e, spec, config, key, dtype, residual_embeddings)
            a_sh, b_sh = factor_sharding(e.leaf, spec.layout)
            if a_sh is not None and not isinstance(lw.a, jax.core.Tracer):
                put = {"a": a_sh, "b": b_sh, "a0": a_sh, "b0": b_sh}
                lw = lw.replace(**{n: jax.device_put(getattr(lw, n), sh) for n, sh in put.items()
                                   if getattr(lw, n) is not None})
            leaves.append(lw)
        elif e.index in plan.trainable:
            leaves.append(Trainable(e.leaf))
        elif e.index in plan.tokens:
            tok = plan.tokens[e.index]
            idx = jnp.asarray(tok.indices, jnp.int32)
            rows = jnp.take(e.leaf, idx, axis=tok.axis)  # PEFT starts from the original rows
            leaves.append(TrainableTokens(e.leaf, jnp.moveaxis(rows, tok.axis, 0).astype(dtype), tok.indices, tok.axis))
        else:
            leaves.append(e.leaf)
    if residual_embeddings:
        warnings.warn(
            f"init_lora_weights={config.init_lora_weights!r} on embedding targets {residual_embeddings}: PEFT "
            "applies PiSSA/OLoRA to Linear layers only and gives embeddings its default init (A = 0, "
            "B ~ N(0, 1)); jlora does the same, so these tables are not changed",
            UserWarning,
            stacklevel=stacklevel_outside_jlora(),
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _init_target(e: Any, spec: Any, config: LoraConfig, key: jax.Array, dtype: Any,
                 residual_embeddings: list) -> LoraWeight:
    """The ``LoraWeight`` of one target: factors as ``config.init_lora_weights`` says
    (PiSSA/OLoRA: from ``W``, with ``w`` the residual and the initial factors kept), and
    DoRA's magnitude ``m = ‖w + s·A·B‖`` (so that DoRA equals LoRA at init)."""
    init = config.init_lora_weights
    shape = tuple(e.leaf.shape)
    w, a0, b0, init_name = e.leaf, None, None, None
    if is_residual_init(init) and spec.embedding:
        residual_embeddings.append(e.path)
        a, b = init_factors(key, shape, spec.layout, spec.r, True, dtype, spec.embedding)
    elif is_residual_init(init) and is_quantized(e.leaf):
        raise ValueError(
            f"{e.path}: init_lora_weights={init!r} rewrites the base kernel (W - s·A·B); on a quantized base use "
            "init_lora_weights=True (or 'gaussian'), or initialise on the dense base and quantize the residual "
            "(jlora.quantize(jlora.unload(lp)))"
        )
    elif is_residual_init(init):
        a32, b32 = init_residual_factors(e.leaf, spec.layout, spec.r, spec.scale, init, key, e.path)
        w = residual_kernel(e.leaf, a32, b32, spec.scale, spec.layout)
        a, b = a32.astype(dtype), b32.astype(dtype)
        a0, b0, init_name = a, b, init
    else:
        a, b = init_factors(key, shape, spec.layout, spec.r, init, dtype, spec.embedding, spec.groups)
    magnitude = None
    if config.use_dora:
        dense = w.dequantize(w.compute_dtype) if is_quantized(w) else w  # the norm of the dequantized base
        magnitude = weight_norm(dense, a, b, spec.scale, spec.layout, spec.groups).astype(dtype)
    b_bias = None
    if config.lora_bias:
        kl = KernelLayout(spec.layout)
        out_shape = tuple(shape[i] for i in kl.stack_axes) + tuple(shape[i] for i in kl.out_axes)
        b_bias = init_b_bias(jax.random.fold_in(key, 1), out_shape, spec.r // spec.groups, init, dtype)
    return LoraWeight(w, a, b, scale=spec.scale, layout=spec.layout, dropout=config.lora_dropout,
                      magnitude=magnitude, a0=a0, b0=b0, init=init_name, b_bias=b_bias, groups=spec.groups,
                      guessed=spec.guessed)


def _warn_no_base_bias(entries: Sequence[Any], plan: Any) -> None:
    """PEFT's warning: ``lora_bias=True`` on a target whose module has no bias cannot be merged."""
    biases = {e.module for e in entries if e.name == "bias"}
    missing = [entries[i].path for i in plan.targets if entries[i].module not in biases]
    if missing:
        warnings.warn(
            f"lora_bias=True but the targets {missing} have no bias next to their kernel: jlora.merge cannot fold "
            "their lora_B bias into a base bias (as in PEFT, which cannot merge them either)",
            UserWarning,
            stacklevel=stacklevel_outside_jlora(),
        )


def is_lora_tree(tree: Any) -> bool:
    """Whether ``tree`` holds at least one ``LoraWeight``."""
    return any(
        isinstance(x, (LoraWeight, MultiLoraWeight)) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_node)
    )


def lora_leaves(tree: Any) -> list[tuple[str, LoraWeight]]:
    """``[(path, LoraWeight), ...]`` in tree order, paths ``/``-joined."""
    if is_nnx_module(tree):  # each Variable once, as nnx.split sees it
        tree = sys.modules["flax.nnx"].state(tree)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]
    return [("/".join(path_names(p)), x) for p, x in flat if is_lora_weight(x)]


def unload(lp: Any) -> Any:
    """The base parameters back: every ``LoraWeight`` replaced by its ``w``, every
    ``Trainable`` by its value (PEFT's ``unload``). If the adapter was merged with
    :func:`jlora.merge_adapter`, ``w`` still holds the merged kernel; call
    :func:`jlora.unmerge_adapter` first to get ``W`` itself.

    For PiSSA/OLoRA adapters, whose ``w`` is the residual ``W − s·A₀·B₀``, the *original*
    kernel ``w + s·A₀·B₀`` comes back (computed in float32; exact to float32 rounding for
    a float32 base, within one rounding of the residual for bfloat16). PEFT's ``unload``
    returns the residual instead.

    >>> base = unload(wrap(params, config))   # doctest: +SKIP
    """
    if is_nnx_module(lp):
        return map_module_state(unload, lp)
    return jax.tree_util.tree_map(_original_base, lp, is_leaf=_is_node)


def _original_base(x: Any) -> Any:
    """The kernel a node was made on: ``w``, plus ``s·a0·b0`` of PiSSA/OLoRA adapters."""
    if isinstance(x, LoraWeight):
        if x.a0 is not None and not x.merged:
            return original_kernel(x.w, x.a0, x.b0, x.scale, x.layout)
        return x.w
    if isinstance(x, MultiLoraWeight):
        w = x.w
        for p in x.adapters.values():
            if p.a0 is not None:
                w = original_kernel(w, p.a0, p.b0, p.scale, p.layout)
        return w
    if is_trainable(x):
        return x.value
    if is_trainable_tokens(x):
        return x.w
    return x


def _size(x: Any) -> int:
    shape = getattr(x, "shape", None)
    return int(np.prod(shape)) if shape is not None else 0


def count_parameters(lp: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a LoRA tree, as PEFT counts them.

    trainable = Σ |A| + |B| (+ |m| with DoRA, + |b_B| with lora_bias) + Σ |Trainable leaves|
    + Σ |trainable token rows|; total = trainable + all
    frozen leaves. PiSSA/OLoRA's frozen initial factors and DoRA's saved norm are jlora's
    bookkeeping, not PEFT parameters, and are not counted.
    With several adapters (``jlora.add_adapter``), only the active ones are trainable.

    >>> count_parameters(lp)  # doctest: +SKIP
    (811008, 125250816)
    """
    if is_nnx_module(lp):  # each Variable once, as nnx.split sees it
        lp = sys.modules["flax.nnx"].state(lp)
    trainable = 0
    total = 0
    # a quantized kernel counts its parameters (its shape), not its bytes, as PEFT counts
    for x in jax.tree_util.tree_leaves(lp, is_leaf=lambda x: _is_node(x) or is_quantized(x)):
        if is_lora_weight(x):
            n = _size(x.a) + _size(x.b) + _size(x.magnitude) + _size(x.b_bias)
            trainable += n
            total += n + _size(x.w)
        elif is_trainable_tokens(x):
            trainable += _size(x.values)
            total += _size(x.values) + _size(x.w)
        elif isinstance(x, MultiLoraWeight):
            total += _size(x.w)
            live = {id(p) for p in x.active_pairs()}
            for p in x.adapters.values():
                n = _size(p.a) + _size(p.b) + _size(p.magnitude) + _size(p.b_bias)
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
