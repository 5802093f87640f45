"""Which leaves of a parameter pytree are LoRA targets, with their rank, alpha and layout.

Matching follows PEFT on the ``.``-joined *module path* of a kernel: its pytree path
without the final leaf name when that name is a parameter name (``kernel``, ``w``,
``weight``, ``embedding``, ``bias``, ``scale``, ...: :data:`PARAM_LEAF_NAMES`), and the
whole path for a *bare leaf* (any other name, e.g. ``mlp/linear`` or ``attn/wq``: the
leaf is its own module, so ``target_modules=["wq"]`` selects it). A list entry matches a
path that equals it or ends in ``.entry``; a string is a regex that must match the whole
path; ``"all-linear"`` is every linear kernel except the output head.

Which leaves are kernels, and their layouts: with ``uses`` (found from the model's own
computation by :mod:`jlora.layouts.from_use`, ``wrap(..., apply_fn=)``), every leaf the model
contracts, convolves or gathers by rows, whatever its name; without, leaves named
``kernel``/``embedding`` (layout inferred from the tree, :func:`jlora.layouts.from_tree.infer_layout`) and
``w``/``weight`` where the tree alone decides their layout. Leaves of NNX Variables
other than ``nnx.Param`` (caches, batch statistics, RNG state) are never kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax

from ..core.config import LoraConfig
from ..core.paths import (
    EXTRA_KERNEL_NAMES,
    KERNEL_LEAF_NAMES,
    OUTPUT_HEAD_NAMES,
    SEQ_CLS_HEAD_NAMES,
    LeafEntry,
    is_array_like,
    list_match,
    path_names,
    stacklevel_outside_jlora,
)
from ..layouts.from_tree import LayoutSpec, TreeFacts, infer_layout_guess, user_layout
from ..layouts.kernel import KernelLayout
from ..nodes.weight import is_lora_node
from ..quant.array import is_quantized

__all__ = ["TargetSpec", "TokenSpec", "Plan", "flatten_params", "plan_targets", "warn_rank_above_size",
           "check_groups", "INPUT_EMBEDDING_NAMES"]

# Module names of a model's input (token) embedding: ``trainable_token_indices`` given as a
# list applies to it (PEFT: ``model.get_input_embeddings()``).
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embedder",
                         "input_embedding", "token_embedding", "shared", "embeddings")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    r: int
    alpha: float
    scale: float
    layout: tuple[str, ...]
    embedding: bool
    guessed: bool = False  # the layout is the tree's naming convention for a 2-D kernel, not evidence
    groups: int = 1  # a grouped convolution's feature_group_count (found by use)


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Trainable token rows of one table: the token ids and the table's token axis."""

    indices: tuple[int, ...]
    axis: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of matching: targets by leaf index, leaves that train in full, and
    tables with trainable token rows."""

    targets: dict[int, TargetSpec]
    trainable: frozenset[int]
    tokens: dict[int, TokenSpec] = dataclasses.field(default_factory=dict)


def check_groups(path: str, layout: Sequence[str], r: int, groups: int, feature_axis: Optional[int],
                 shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless a grouped convolution can carry PEFT's LoRA: ``r``
    divisible by ``groups`` (PEFT's rule), one output axis divisible by it, no stack
    axis, and the input features on the kernel's last input axis (Flax's ``nn.Conv``)."""
    if groups == 1:
        return
    kl = KernelLayout(tuple(layout))
    if r % groups:
        raise ValueError(
            f"{path}: a grouped convolution (feature_group_count={groups}) with r={r}: PEFT's LoRA on grouped "
            f"convolutions needs r divisible by the groups (its lora_B is a grouped 1x1 convolution); use "
            f"rank_pattern to give this module a multiple of {groups}, or leave it out"
        )
    if kl.stack_axes or len(kl.out_axes) != 1 or int(shape[kl.out_axes[0]]) % groups:
        raise ValueError(f"{path}: grouped convolution kernel {tuple(shape)} with layout {tuple(layout)}: "
                         "expected one output axis divisible by the groups and no stack axis")
    if feature_axis is not None and feature_axis != kl.in_axes[-1]:
        raise ValueError(
            f"{path}: a grouped convolution whose input-feature axis is kernel axis {feature_axis}, not its last "
            f"input axis {kl.in_axes[-1]}: jlora adapts grouped convolutions with Flax's kernel layout "
            "(*window, in/groups, out)"
        )


def _param_flags(params: Any, n: int) -> list[bool]:
    """Per leaf: False where it is the value of an NNX Variable that is not an ``nnx.Param``."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return [True] * n
    is_var = lambda x: is_lora_node(x) or isinstance(x, nnx.Variable)  # noqa: E731
    flags: list[bool] = []
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_var):
        if isinstance(x, nnx.Variable):
            k = len(jax.tree_util.tree_leaves(x, is_leaf=is_lora_node))
            flags += [isinstance(x, nnx.Param)] * k
        else:
            flags.append(True)
    return flags if len(flags) == n else [True] * n


def flatten_params(params: Any) -> tuple[list[LeafEntry], Any]:
    """Flattens ``params`` (dict, FrozenDict, ``nnx.State``, an ``nnx.Module``, HF
    ``model.params``); a ``jlora.QuantizedArray`` (a quantized kernel) is one leaf, of the
    kernel's shape."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_lora_node(x) or is_quantized(x))
    flags = _param_flags(params, len(flat))
    entries = [LeafEntry(i, path_names(p), leaf, flags[i]) for i, (p, leaf) in enumerate(flat)]
    for e in entries:
        if is_lora_node(e.leaf):
            raise ValueError(
                f"{e.path}: params already carry LoRA ({type(e.leaf).__name__}); "
                "call jlora.unload(lp) (or jlora.merge) first, or use jlora.add_adapter"
            )
    return entries, treedef


def _matches(spec: Union[str, Sequence[str]], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return list_match(key, spec)


def _layer_index(key: str, layers_pattern: Optional[Sequence[str]]) -> Optional[int]:
    # PEFT's regexes (check_target_module_exists): the *first* numbered segment, lazily, so
    # a nested index ("layers.1.experts.0.up") is not taken for the layer index, and the
    # layer container may start the path ("layers.0.q").
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
            if m is not None:
                break
    return int(m.group(1)) if m else None


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    for pat, value in patterns.items():
        if key == pat or re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _kernel_kind(e: LeafEntry, uses: Optional[Mapping[int, Any]], explicit: bool) -> Optional[str]:
    """``"linear"``, ``"embedding"``, ``"conv"`` or ``None`` (not a kernel) for a leaf.

    With ``uses`` (from :mod:`jlora.layouts.from_use`) a leaf the model contracts is a kernel of the
    kind of its use, whatever its name; otherwise (and for leaves ``apply_fn`` does not
    use) the leaf's name decides; a bare leaf counts only when named explicitly.
    """
    if not e.param:
        return None
    u = uses.get(e.index) if uses is not None else None
    if u is not None and u.contracted:
        return u.kind or "linear"
    if e.name in ("embedding", "embeddings"):
        return "embedding"
    if e.name in KERNEL_LEAF_NAMES or e.name in EXTRA_KERNEL_NAMES:
        return "linear"
    if e.bare and explicit and uses is None and is_array_like(e.leaf) and len(e.leaf.shape) >= 2:
        return "linear"
    return None


def _candidate_modules(entries: Sequence[LeafEntry], uses: Optional[Mapping[int, Any]] = None) -> list[str]:
    return sorted(
        {
            e.module for e in entries
            if _kernel_kind(e, uses, explicit=True) and is_array_like(e.leaf) and len(e.leaf.shape) >= 2
        }
    )


def _format_list(items: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return shown + more


def warn_rank_above_size(path: str, shape: tuple[int, ...], layout: Sequence[str], r: int) -> None:
    """Warns when ``r`` exceeds a target's smaller side, ``min(in_features, out_features)``:
    ``A·B`` can never have a rank above it, so the extra rank only costs memory."""
    kl = KernelLayout(tuple(layout))
    n_in = 1
    for i in kl.in_axes:
        n_in *= int(shape[i])
    n_out = 1
    for i in kl.out_axes:
        n_out *= int(shape[i])
    if r > min(n_in, n_out):
        warnings.warn(
            f"{path}: r={r} is above min(in_features={n_in}, out_features={n_out}) = {min(n_in, n_out)}; "
            f"the update s·A·B has rank at most {min(n_in, n_out)}, so the extra rank only costs memory "
            "(use rank_pattern to give this module a smaller r)",
            UserWarning,
            stacklevel=stacklevel_outside_jlora(),
        )


def plan_targets(
    entries: Sequence[LeafEntry],
    config: LoraConfig,
    layouts: LayoutSpec = None,
    uses: Optional[Mapping[int, Any]] = None,
    aliases: Optional[Mapping[str, Sequence[str]]] = None,
) -> Plan:
    """Matches ``config`` against the tree: targets with (r, alpha, scale, layout), and
    the leaves made trainable in full by ``bias`` / ``modules_to_save``.

    ``uses`` (``{leaf index: jlora.layouts.from_use.LeafUse}``, from ``wrap(..., apply_fn=)``) makes
    every leaf the model contracts a kernel, with the layout of its use; ``layouts=``
    still wins, and is checked against the uses. ``"all-linear"`` is then every kernel
    used in a ``dot_general`` (einsum kernels included; not embeddings, convolutions or
    the output head). ``aliases`` (``{module path: other paths of the same module}``, an
    NNX module shared by two attributes) lets any of a module's names select it.

    Raises ``ValueError`` when ``target_modules`` (or one of its entries) matches nothing,
    listing the module paths that could have matched, when a target's layout cannot be
    told (the message names the leaf and what would decide it), and ``TypeError`` when
    a targeted module's kernel is not an array.
    """
    if config.target_modules is None:
        raise ValueError(
            "LoraConfig.target_modules is None: name the modules to adapt (e.g. ['q_proj', 'v_proj']), "
            "a regex, or 'all-linear'; jlora.default_target_modules(model_type) gives PEFT's defaults"
        )
    facts = TreeFacts(entries)
    candidates = _candidate_modules(entries, uses)
    tm = config.target_modules
    all_linear = (isinstance(tm, str) and tm.lower() == "all-linear") or tm == ("all-linear",)

    def is_target_module(key: str, layer_filter: bool = True) -> bool:
        if config.exclude_modules is not None and _matches(config.exclude_modules, key):
            return False
        # As PEFT: a module (or a module inside one) listed in modules_to_save trains in full
        # and never gets an adapter.
        if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
            return False
        if all_linear:
            last = key.rsplit(".", 1)[-1]
            if config.task_type == "SEQ_CLS" and key in SEQ_CLS_HEAD_NAMES:
                return False
            return last not in OUTPUT_HEAD_NAMES
        if isinstance(tm, str):
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        found = any(key.endswith("." + t) for t in tm)
        if found and layer_filter and config.layers_to_transform is not None:
            idx = _layer_index(key, config.layers_pattern)
            found = idx is not None and idx in config.layers_to_transform
        return found

    def used_as_kernel(e: LeafEntry) -> Any:
        u = uses.get(e.index) if uses is not None else None
        return u if u is not None and u.contracted else None

    guessed: set[int] = set()

    def resolve_layout(e: LeafEntry) -> tuple[str, ...]:
        """layouts= (checked against the uses), else the uses' layout, else inference
        (a guessed orientation is noted in ``guessed``)."""
        if is_quantized(e.leaf):  # a quantized kernel knows its layout (jlora.quantize inferred or was told it)
            return user_layout(layouts, e) or e.leaf.layout
        used = used_as_kernel(e)
        layout = user_layout(layouts, e)
        if layout is not None:
            if used is not None:
                used.check(layout)
            return layout
        if used is not None:
            return used.layout()
        layout, guess = infer_layout_guess(e, facts)
        if guess:
            guessed.add(e.index)
        return layout

    # Every module path in the tree (a module may hold no kernel, e.g. a LayerNorm).
    modules: dict[str, list[LeafEntry]] = collections.defaultdict(list)
    for e in entries:
        modules[e.module].append(e)

    targets: dict[int, TargetSpec] = {}
    matched_without_kernel: list[str] = []
    aliases = aliases or {}
    for key, leaves in modules.items():
        if not key:
            continue
        if not (is_target_module(key) or any(is_target_module(k) for k in aliases.get(key, ()))):
            if config.layers_to_transform is not None and is_target_module(key, layer_filter=False):
                # Named, but its path has no layer index: a stacked (nn.scan) kernel holds
                # every layer, and selecting some of them is not supported; say so.
                for e in leaves:
                    if _kernel_kind(e, uses, True) and is_array_like(e.leaf) and len(e.leaf.shape) >= 3:
                        try:
                            stacked = "stack" in resolve_layout(e)
                        except ValueError:
                            stacked = False
                        if stacked:
                            raise ValueError(
                                f"{e.path}: layers_to_transform on stacked (nn.scan) layers is not supported; "
                                "all layers of a stacked kernel share one adapter layout"
                            )
            continue
        kinds = {e.index: _kernel_kind(e, uses, explicit=not all_linear) for e in leaves}
        kernels = [e for e in leaves if kinds[e.index]]
        if all_linear:
            def linear(e: LeafEntry) -> bool:
                u = used_as_kernel(e)
                if u is not None:
                    return u.kind == "linear" or (u.kind is None and any(x.problem for x in u.uses))
                seen = uses.get(e.index) if uses is not None else None
                if seen is not None and not any(x.problem for x in seen.uses):
                    return False  # apply_fn uses it, never in a matmul (a norm scale stacked over layers)
                return e.name in ("kernel", "w", "weight")

            kernels = [e for e in kernels if linear(e)]
        if not kernels:
            if not all_linear:
                matched_without_kernel.append(f"{key} (leaves: {', '.join(e.name for e in leaves)})")
            continue
        for e in kernels:
            if not is_array_like(e.leaf):
                raise TypeError(
                    f"{e.path}: expected an array kernel for target module {key!r}, "
                    f"got {type(e.leaf).__name__} ({e.leaf!r:.60})"
                )
            if len(e.leaf.shape) < 2:
                if all_linear:
                    continue
                raise ValueError(f"{e.path}: kernel of shape {tuple(e.leaf.shape)} has fewer than 2 axes")
            try:
                layout = resolve_layout(e)
            except ValueError:
                if all_linear and e.name != "kernel" and not used_as_kernel(e):
                    continue  # a `w`/`weight` the tree does not orient: all-linear leaves it
                raise
            try:
                KernelLayout(layout).factor_shapes(tuple(e.leaf.shape), 1)  # validates length
            except ValueError as err:
                raise ValueError(f"{e.path}: {err}") from None
            if "stack" in layout and config.layers_to_transform is not None:
                raise ValueError(
                    f"{e.path}: layers_to_transform on stacked (nn.scan) layers is not supported; "
                    "all layers of a stacked kernel share one adapter layout"
                )
            r = _pattern_value(config.rank_pattern, key, config.r)
            alpha = _pattern_value(config.alpha_pattern, key, config.lora_alpha)
            warn_rank_above_size(e.path, tuple(e.leaf.shape), layout, int(r))
            used = used_as_kernel(e)
            groups = used.groups if used is not None else 1
            check_groups(e.path, layout, int(r), groups, used.feature_axis if used is not None else None,
                         tuple(e.leaf.shape))
            if config.lora_bias and kinds[e.index] == "embedding":
                raise ValueError(f"{e.path}: lora_bias=True on an embedding: PEFT does not support it either; "
                                 "exclude the embedding or use lora_bias=False")
            targets[e.index] = TargetSpec(
                r=int(r), alpha=alpha, scale=config.scale_for(int(r), alpha), layout=layout,
                embedding=kinds[e.index] == "embedding", guessed=e.index in guessed, groups=groups,
            )

    if not targets:
        hint = f" Modules it matched have no kernel: {_format_list(matched_without_kernel)}." if matched_without_kernel else ""
        if isinstance(tm, str) and not all_linear:
            leaf_hits = [".".join(e.names) for e in entries if re.fullmatch(tm, ".".join(e.names))]
            if leaf_hits:
                hint += (
                    f" The regex matches leaf paths, not module paths: {_format_list(leaf_hits)}"
                    " (only biases or non-kernels); match the module path, e.g. '.*c_attn'."
                )
        if config.layers_to_transform is not None:
            hint += f" (layers_to_transform={config.layers_to_transform}, layers_pattern={config.layers_pattern})"
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no kernel.{hint} "
            f"Module paths that could match: {_format_list(candidates)}"
        )
    if isinstance(tm, tuple) and not all_linear:
        unmatched = [
            t for t in tm
            if not any(
                (m == t or m.endswith("." + t))
                for i in targets for m in (entries[i].module, *aliases.get(entries[i].module, ()))
            )
        ]
        if unmatched:
            raise ValueError(
                f"target_modules entries {unmatched} matched no kernel "
                f"(layers_to_transform={config.layers_to_transform}); "
                f"module paths that could match: {_format_list(candidates)}"
            )

    trainable: set[int] = set()
    target_modules = {entries[i].module for i in targets}
    for e in entries:
        if e.index in targets:
            continue
        if e.name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and e.module in target_modules)):
            trainable.add(e.index)
        if config.modules_to_save:
            prefixes = [".".join(e.module_names[:k]) for k in range(1, len(e.module_names) + 1)]
            if any(p.endswith(m) for p in prefixes for m in config.modules_to_save):
                trainable.add(e.index)
    if config.modules_to_save:
        all_prefixes = sorted(
            {".".join(e.module_names[:k]) for e in entries for k in range(1, len(e.module_names) + 1)}
        )
        for m in config.modules_to_save:
            if not any(p.endswith(m) for p in all_prefixes):
                raise ValueError(
                    f"modules_to_save entry {m!r} matched no module; modules: {_format_list(all_prefixes)}"
                )
    tokens = _plan_tokens(entries, config, uses, targets, trainable, resolve_layout) if (
        config.trainable_token_indices is not None) else {}
    return Plan(targets=targets, trainable=frozenset(trainable), tokens=tokens)


def _plan_tokens(entries: Sequence[LeafEntry], config: LoraConfig, uses: Optional[Mapping[int, Any]],
                 targets: Mapping[int, TargetSpec], trainable: set, resolve_layout: Any) -> dict[int, TokenSpec]:
    """The tables of ``trainable_token_indices`` (PEFT's matching: a dict key names a module
    whose dotted path ends with it; a list applies to the input embedding) and their token axes."""
    tables = []
    for e in entries:
        kind = _kernel_kind(e, uses, explicit=True)
        if kind in ("embedding", "linear") and is_array_like(e.leaf) and len(e.leaf.shape) == 2:
            tables.append((e, kind))
    spec = config.trainable_token_indices
    chosen: list[tuple[LeafEntry, str, tuple[int, ...]]] = []
    if isinstance(spec, Mapping):
        for name, ids in spec.items():
            hits = [(e, k) for e, k in tables if e.module.endswith(name)]
            if not hits:
                raise ValueError(
                    f"trainable_token_indices names module {name!r}, which matches no embedding or 2-D kernel; "
                    f"modules that could: {_format_list(sorted({e.module for e, _ in tables}))}"
                )
            chosen += [(e, k, ids) for e, k in hits]
    else:
        embeddings = [(e, k) for e, k in tables if k == "embedding"]
        if len(embeddings) > 1:
            named = [(e, k) for e, k in embeddings if e.module_names and e.module_names[-1] in INPUT_EMBEDDING_NAMES]
            embeddings = named if len(named) == 1 else embeddings
        if len(embeddings) != 1:
            raise ValueError(
                "trainable_token_indices as a list applies to the input embedding, and the tree has "
                f"{len(embeddings)} embedding tables ({_format_list([e.module for e, _ in embeddings]) or 'none'}); "
                "pass a dict {module name: token ids}"
            )
        chosen = [(embeddings[0][0], embeddings[0][1], tuple(spec))]
    out: dict[int, TokenSpec] = {}
    for e, kind, ids in chosen:
        if e.index in targets:
            raise ValueError(f"{e.path}: both a LoRA target and in trainable_token_indices; choose one for this table")
        if e.index in trainable:
            raise ValueError(f"{e.path}: both in modules_to_save (trained in full) and in trainable_token_indices "
                             "(as PEFT, choose one)")
        axis = 0 if kind == "embedding" else resolve_layout(e).index("out")
        n = int(e.leaf.shape[axis])
        bad = [i for i in ids if i >= n]
        if bad:
            raise ValueError(f"{e.path}: trainable_token_indices {bad} out of range for a table of {n} tokens "
                             f"(shape {tuple(e.leaf.shape)}, token axis {axis})")
        out[e.index] = TokenSpec(tuple(ids), axis)
    return out
