"""Which leaves of a parameter pytree are LoRA targets, with their rank, alpha and layout.

Matching follows PEFT on the ``.``-joined *module path* of a kernel: its pytree path
without the final leaf name when that name is a parameter name (``kernel``, ``w``,
``weight``, ``embedding``, ``bias``, ``scale``, ...: :data:`PARAM_LEAF_NAMES`), and the
whole path for a *bare leaf* (any other name, e.g. ``mlp/linear`` or ``attn/wq``: the
leaf is its own module, so ``target_modules=["wq"]`` selects it). A list entry matches a
path that equals it or ends in ``.entry``; a string is a regex that must match the whole
path; ``"all-linear"`` is every linear kernel except the output head.

Which leaves are kernels, and their layouts: with ``uses`` (found from the model's own
computation by :mod:`jlora.usage`, ``wrap(..., apply_fn=)``), every leaf the model
contracts, convolves or gathers by rows, whatever its name; without, leaves named
``kernel``/``embedding`` (layout inferred from the tree, :func:`infer_layout`) and
``w``/``weight`` where the tree alone decides their layout. Leaves of NNX Variables
other than ``nnx.Param`` (caches, batch statistics, RNG state) are never kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax

from .config import LoraConfig
from .quantization import is_quantized
from .weight import KernelLayout, is_lora_node

__all__ = [
    "LeafEntry",
    "TargetSpec",
    "Plan",
    "flatten_params",
    "path_names",
    "plan_targets",
    "infer_layout",
    "OUTPUT_HEAD_NAMES",
    "PARAM_LEAF_NAMES",
]

KERNEL_LEAF_NAMES = ("kernel", "embedding")
# Leaf names that may hold a kernel without apply_fn (haiku / tunix / gemma ``w``, torch-
# and equinox-style ``weight``), where the tree alone tells their layout.
EXTRA_KERNEL_NAMES = ("w", "weight", "embeddings")
# Names of a module's parameter, not of a module: a leaf with another name is "bare",
# its own module (its module path is its whole path).
PARAM_LEAF_NAMES = ("kernel", "w", "weight", "embedding", "embeddings", "bias", "b", "scale", "offset")
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_projection", "proj_out", "head", "logits_dense")
# PEFT also leaves these out of "all-linear" when task_type is SEQ_CLS.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
_CONV1D_GPT2_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")

LayoutSpec = Union[
    None,
    Mapping[str, Sequence[str]],
    Callable[[str, tuple[int, ...]], Optional[Sequence[str]]],
]


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Turns a ``jax.tree_util`` key path into plain names, dropping NNX's ``.value``."""
    names: list[str] = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue  # NNX Variable / jlora.Trainable payload
            names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@dataclasses.dataclass(frozen=True)
class LeafEntry:
    index: int
    names: tuple[str, ...]
    leaf: Any
    param: bool = True  # False for the value of an NNX Variable that is not an nnx.Param

    @property
    def bare(self) -> bool:
        """A leaf that is its own module (its name is not a parameter name)."""
        return bool(self.names) and self.names[-1] not in PARAM_LEAF_NAMES

    @property
    def module_names(self) -> tuple[str, ...]:
        return self.names if self.bare else self.names[:-1]

    @property
    def module(self) -> str:
        return ".".join(self.module_names)

    @property
    def name(self) -> str:
        return self.names[-1] if self.names else ""

    @property
    def path(self) -> str:
        return "/".join(self.names)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    r: int
    alpha: float
    scale: float
    layout: tuple[str, ...]
    embedding: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of matching: targets by leaf index, and leaves that train in full."""

    targets: dict[int, TargetSpec]
    trainable: frozenset[int]


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


def _list_match(key: str, names: Sequence[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _matches(spec: Union[str, Sequence[str]], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return _list_match(key, spec)


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


class TreeFacts:
    """Facts about the whole tree used to infer kernel layouts."""

    def __init__(self, entries: Sequence[LeafEntry]):
        self.by_module: dict[str, dict[str, LeafEntry]] = collections.defaultdict(dict)
        for e in entries:
            self.by_module[e.module][e.name] = e
        # HF GPT-2 FlaxConv1D stores kernels (out, in): c_attn is (3d, d) there, (d, 3d) as Dense.
        self.gpt2_conv1d = any(
            e.name == "kernel"
            and e.names[-2:-1] == ("c_attn",)
            and _is_array_like(e.leaf)
            and len(e.leaf.shape) == 2
            and e.leaf.shape[0] == 3 * e.leaf.shape[1]
            for e in entries
        )
        scales = [e for e in entries if e.name == "scale" and _is_array_like(e.leaf)]
        # The model width: the most common size of unstacked (1-D) norm scales, else of
        # the scales' last axes (all of them stacked with a leading layer axis).
        flat = collections.Counter(int(e.leaf.shape[0]) for e in scales if len(e.leaf.shape) == 1)
        sizes = flat or collections.Counter(int(e.leaf.shape[-1]) for e in scales if len(e.leaf.shape) >= 1)
        self.model_dim = sizes.most_common(1)[0][0] if sizes else None
        self.scales = scales

    def _near_scales(self, names: tuple[str, ...]) -> list[LeafEntry]:
        for depth in range(len(names) - 2, 0, -1):
            prefix = names[:depth]
            near = [s for s in self.scales if s.names[:depth] == prefix]
            if near:
                return near
        return []

    def stack_axis(self, names: tuple[str, ...], shape: Sequence[int]) -> Optional[int]:
        """The position of the layer axis that ``nn.scan(variable_axes={"params": p})``
        inserted, read off the norm scales near this kernel: a 2-D scale ``(width, L)``
        says ``p = 1`` (MaxText's ``param_scan_axis: 1``); ``(L, width)`` says 0. ``None``
        when the scales are not stacked or the kernel has no axis of their layer count
        there."""
        near = self._near_scales(names)
        if not near or any(len(s.leaf.shape) < 2 for s in near):
            return None
        d = self.model_dim
        pos = {
            1 if len(s.leaf.shape) == 2 and d is not None and s.leaf.shape[0] == d and s.leaf.shape[1] != d else 0
            for s in near
        }
        if len(pos) != 1:
            return None
        p = pos.pop()
        if p >= len(shape) or any(int(s.leaf.shape[p]) != int(shape[p]) for s in near):
            return None
        return p

    def stacked_by_norms(self, names: tuple[str, ...], lead: int) -> Optional[bool]:
        """Whether norm scales near this kernel carry a leading layer axis of size ``lead``."""
        for depth in range(len(names) - 2, 0, -1):
            prefix = names[:depth]
            near = [s for s in self.scales if s.names[:depth] == prefix]
            if near:
                return all(len(s.leaf.shape) >= 2 and s.leaf.shape[0] == lead for s in near)
        return None


def infer_layout(entry: LeafEntry, facts: TreeFacts) -> tuple[str, ...]:
    """Role of each kernel axis (``"stack"``, ``"in"``, ``"out"``), inferred from the tree.

    Rules, in order: HF GPT-2 ``FlaxConv1D`` kernels are (out, in); an ``embedding`` is
    (vocab, features) = ("in", "out"); leaves named ``w``/``weight`` (and bare leaves)
    follow :func:`_infer_generic`; norm scales ``(width, L)`` mark a layer axis at
    position 1 (``nn.scan(variable_axes={"params": 1})``); a sibling ``bias`` fixes the
    output axes (and a leading layer axis when the bias has one too); norm scales with a
    leading layer axis mark ``nn.scan``-stacked layers; a module named ``*conv*`` has one
    output axis; a 3-D+ kernel whose last axis is the model width is an output
    projection; otherwise the first non-stack axis is the input.
    """
    shape = tuple(int(s) for s in entry.leaf.shape)
    nd = len(shape)
    module_name = entry.names[-2] if len(entry.names) >= 2 else ""
    if entry.name in ("embedding", "embeddings"):
        n_stack = nd - 2
        return ("stack",) * n_stack + ("in", "out")
    if entry.name != "kernel":
        return _infer_generic(entry, facts, shape)
    if nd == 2:
        if facts.gpt2_conv1d and module_name in _CONV1D_GPT2_NAMES:
            return ("out", "in")
        return ("in", "out")
    bias = facts.by_module.get(entry.module, {}).get("bias")
    p = facts.stack_axis(entry.names, shape)
    if p is not None and p > 0:
        # A layer axis inside the kernel (MaxText's (in, L, out)): the other axes are one
        # layer's kernel, the bias (if any) carries the layer axis at the same position.
        sub = shape[:p] + shape[p + 1:]
        bshape = tuple(int(s) for s in bias.leaf.shape) if bias is not None and _is_array_like(bias.leaf) else None
        if bshape is not None and len(bshape) > p and bshape[p] == shape[p]:
            bshape = bshape[:p] + bshape[p + 1:]
        n_out = None
        if bshape and len(bshape) < len(sub) and sub[len(sub) - len(bshape):] == bshape:
            n_out = len(bshape)
        elif "conv" in module_name.lower() or len(sub) == 2:
            n_out = 1
        elif facts.model_dim is not None and sub[-1] == facts.model_dim and sub[0] != facts.model_dim:
            n_out = 1
        else:
            n_out = len(sub) - 1
        roles = ["in"] * (len(sub) - n_out) + ["out"] * n_out
        roles.insert(p, "stack")
        return tuple(roles)
    n_stack = None
    n_out = None
    if bias is not None and _is_array_like(bias.leaf):
        bshape = tuple(int(s) for s in bias.leaf.shape)
        plain = 1 <= len(bshape) < nd and shape[nd - len(bshape):] == bshape
        stacked = (
            len(bshape) >= 2 and bshape[0] == shape[0] and len(bshape) - 1 < nd - 1
            and shape[nd - len(bshape) + 1:] == bshape[1:]
        )
        if plain and stacked:
            stacked = bool(facts.stacked_by_norms(entry.names, shape[0]))
        if stacked:
            n_stack, n_out = 1, len(bshape) - 1
        elif plain:
            n_stack, n_out = 0, len(bshape)
    if n_stack is None:
        n_stack = 1 if facts.stacked_by_norms(entry.names, shape[0]) else 0
    rest = shape[n_stack:]
    if len(rest) < 2:
        raise ValueError(f"{entry.path}: cannot infer a kernel layout for shape {shape}; pass layouts=")
    if n_out is None:
        if "conv" in module_name.lower():
            n_out = 1
        elif len(rest) == 2:
            n_out = 1
        elif facts.model_dim is not None and rest[-1] == facts.model_dim and rest[0] != facts.model_dim:
            n_out = 1
        else:
            n_out = len(rest) - 1
    return ("stack",) * n_stack + ("in",) * (len(rest) - n_out) + ("out",) * n_out


def ambiguous_layout_error(entry: LeafEntry, why: str) -> ValueError:
    """The error for a kernel whose layout the tree alone does not tell."""
    shape = tuple(int(s) for s in entry.leaf.shape)
    example = ", ".join(["'in'"] + ["'out'"] * (len(shape) - 1))
    return ValueError(
        f"{entry.path}: cannot tell the layout of a kernel of shape {shape} from the tree alone ({why}). "
        "Pass apply_fn= and example_args= to jlora.wrap (layouts found from how the model uses each leaf), "
        f"or layouts={{{entry.module!r}: ({example})}} (a role 'stack', 'in' or 'out' per axis)"
    )


def _infer_generic(entry: LeafEntry, facts: TreeFacts, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Layouts of kernels not named ``kernel`` (``w``, ``weight``, bare leaves), where the
    tree decides them: a 2-D ``w`` is (in, out) (haiku, tunix, gemma); a 2-D ``weight`` is
    oriented by a sibling ``bias``; a 3-D+ ``w``/``weight`` by the model width (the most
    common norm-scale size), which is its input axis, or its output axis when last (an
    output projection (heads, head_dim, width)); a leading layer axis by norm scales."""
    nd = len(shape)
    if entry.bare:
        raise ambiguous_layout_error(entry, f"{entry.name!r} is not a known parameter name")
    if nd == 2:
        if entry.name == "w":
            return ("in", "out")
        bias = facts.by_module.get(entry.module, {}).get("bias")
        n = tuple(bias.leaf.shape) if bias is not None and _is_array_like(bias.leaf) else None
        if n is not None and len(n) == 1 and shape[0] != shape[1] and n[0] in shape:
            return ("out", "in") if shape[0] == n[0] else ("in", "out")
        raise ambiguous_layout_error(
            entry, "a 2-D 'weight' is (out, in) in PyTorch and equinox, (in, out) after a transpose, and no "
            "sibling bias of a non-square kernel tells which"
        )
    n_stack = 1 if facts.stacked_by_norms(entry.names, shape[0]) else 0
    rest = shape[n_stack:]
    width = facts.model_dim
    at = [i for i, s in enumerate(rest) if s == width]
    if width is None or len(at) != 1 or len(rest) < 2:
        why = "no norm scale gives the model width" if width is None else (
            f"the model width {width} is not exactly one of its axes"
        )
        raise ambiguous_layout_error(entry, why)
    k = at[0]
    if k == len(rest) - 1:
        roles = ("in",) * (len(rest) - 1) + ("out",)
    else:
        roles = tuple("in" if i == k else "out" for i in range(len(rest)))
    return ("stack",) * n_stack + roles


def user_layout(layouts: LayoutSpec, entry: LeafEntry) -> Optional[tuple[str, ...]]:
    if layouts is None:
        return None
    shape = tuple(int(s) for s in entry.leaf.shape)
    if callable(layouts):
        got = layouts(entry.module, shape)
        return tuple(got) if got is not None else None
    for pattern, roles in layouts.items():
        if re.fullmatch(pattern, entry.module) or _list_match(entry.module, [pattern]):
            return tuple(roles)
    return None


def _kernel_kind(e: LeafEntry, uses: Optional[Mapping[int, Any]], explicit: bool) -> Optional[str]:
    """``"linear"``, ``"embedding"``, ``"conv"`` or ``None`` (not a kernel) for a leaf.

    With ``uses`` (from :mod:`jlora.usage`) a leaf the model contracts is a kernel of the
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
    if e.bare and explicit and uses is None and _is_array_like(e.leaf) and len(e.leaf.shape) >= 2:
        return "linear"
    return None


def _candidate_modules(entries: Sequence[LeafEntry], uses: Optional[Mapping[int, Any]] = None) -> list[str]:
    return sorted(
        {
            e.module for e in entries
            if _kernel_kind(e, uses, explicit=True) and _is_array_like(e.leaf) and len(e.leaf.shape) >= 2
        }
    )


def _format_list(items: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return shown + more


def stacklevel_outside_jlora() -> int:
    """``stacklevel`` for ``warnings.warn`` from inside jlora that points at the caller's
    frame (the first one outside the package), however deep the call."""
    import os

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


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

    ``uses`` (``{leaf index: jlora.usage.LeafUse}``, from ``wrap(..., apply_fn=)``) makes
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
            "a regex, or 'all-linear'; jlora.hf.default_target_modules(model_type) gives PEFT's defaults"
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

    def resolve_layout(e: LeafEntry) -> tuple[str, ...]:
        """layouts= (checked against the uses), else the uses' layout, else inference."""
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
        return infer_layout(e, facts)

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
                    if _kernel_kind(e, uses, True) and _is_array_like(e.leaf) and len(e.leaf.shape) >= 3:
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
            if not _is_array_like(e.leaf):
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
            targets[e.index] = TargetSpec(
                r=int(r), alpha=alpha, scale=config.scale_for(int(r), alpha), layout=layout,
                embedding=kinds[e.index] == "embedding",
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
    return Plan(targets=targets, trainable=frozenset(trainable))
