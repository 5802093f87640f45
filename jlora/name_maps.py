"""Name maps: how the leaves of a parameter tree correspond to PyTorch names and layouts.

This is model knowledge, not machinery (the core never imports it). The PEFT and Orbax
I/O (``jlora.save_peft`` / ``load_peft`` / ``save`` / ``load``), the ``jlora`` CLI and
the safetensors loader of :mod:`jlora.models` ask a name map, for each leaf of a tree,

* which PyTorch module(s) and state-dict name(s) it is (one, or one per slice when a
  single JAX array holds several PyTorch tensors, like Gemma's ``kv_einsum``),
* how its array is laid out against the PyTorch tensor (transpose, head axes
  flattened), and for a LoRA target the role of each kernel axis (its layout) and its
  PEFT layer kind (``linear`` / ``embedding`` / ``conv``).

Shipped maps, recognised from the tree's paths (so ``name_map=`` is rarely needed):

==============  ===========================================================================
``"qwen3"``     NNX trees laid out like tunix / bonsai's Qwen3 (``layers/<i>/attn/q_proj/w`` (D, N, H), ``q_norm``)
``"llama3"``    the same without ``q_norm``/``k_norm`` (Llama 3)
``"gemma3"``    tunix / bonsai's Gemma 3: ``q_einsum/w`` (N, D, H), ``kv_einsum/w`` (2, K, D, H) =
                PyTorch's ``k_proj`` and ``v_proj``, ``attn_vec_einsum/w`` (N, H, D)
``"hf"``        Hugging Face Flax models (transformers' own rules; everything else falls back to these)
==============  ===========================================================================

For the NNX families the map is, per layer ``i`` (PyTorch names of ``*ForCausalLM``)::

    embedder/input_embedding      (V, D)    model.embed_tokens.weight        (V, D)
    layers/i/attn/q_proj/w        (D, N, H) model.layers.i.self_attn.q_proj.weight  (N·H, D)
    layers/i/attn/k_proj/w, v_proj/w (D, K, H)  ...k_proj / v_proj.weight    (K·H, D)
    layers/i/attn/o_proj/w        (N, H, D) ...o_proj.weight                 (D, N·H)
    layers/i/attn/q_norm/w        (H,)      ...self_attn.q_norm.weight       (H,)
    layers/i/mlp/gate_proj/kernel (D, F)    model.layers.i.mlp.gate_proj.weight  (F, D)
    layers/i/input_layernorm/w    (D,)      model.layers.i.input_layernorm.weight
    final_norm/w                  (D,)      model.norm.weight
    lm_head/w                     (D, V)    lm_head.weight                   (V, D)
    Gemma 3: attn/q_einsum/w (N, D, H) → q_proj; attn/kv_einsum/w (2, K, D, H) → k_proj, v_proj;
             attn/attn_vec_einsum/w (N, H, D) → o_proj; attn/_query_norm/scale → q_norm;
             pre_attention_norm → input_layernorm, post_attention_norm → post_attention_layernorm,
             pre_ffw_norm → pre_feedforward_layernorm, post_ffw_norm → post_feedforward_layernorm,
             final_norm/scale → model.norm

Head axes flatten head-major (``n·H + h``), which is the row order of PyTorch's
``q_proj.weight``; so a LoRA factor pair of an einsum kernel is PEFT's 2-D
``lora_A (r, in)`` / ``lora_B (out, r)`` after a reshape, and ``kv_einsum``'s factors
(layout ``("stack", "out", "in", "out")``, the stack axis being k/v) are two PEFT
adapters.

Stacked layers (``jlora.models``' ``scan_layers=True``): every ``layers/<i>/...`` rule also
matches the leaf stacked over the layers, ``layers/attn/q_proj/w`` (L, D, N, H) →
``model.layers.<i>.self_attn.q_proj.weight`` for each ``i`` (a leading ``"stack"`` axis;
:mod:`jlora.stacked_rules`), so PEFT files hold one adapter per layer either way.

Plugging in your own:

* ``name_map={"encoder.layers.query": "bert.encoder.layer.query"}`` or a function of
  the ``.``-joined module path returning a PyTorch module path (or ``None`` for the
  default): overrides on top of the recognised map (``{layer}`` in the result for
  stacked kernels);
* ``name_map="qwen3"`` (a shipped map by name) or a :class:`FamilyMap` of your own
  :class:`Rule` s: a table of path regex → PyTorch name(s) and axes (see
  :data:`QWEN3`'s source for the pattern);
* any object with ``bind(leaves, prefix=None) -> TreeNames``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Protocol, Union, runtime_checkable

import numpy as np

from .stacked_rules import StackedRule, stacked_rules

__all__ = [
    "Rule",
    "FamilyMap",
    "TreeNames",
    "HFNames",
    "QWEN3",
    "LLAMA3",
    "GEMMA3",
    "FAMILY_MAPS",
    "NameMapSpec",
    "recognise",
    "for_tree",
    "get",
    "torch_param_name",
    "kernel_to_torch",
    "kernel_from_torch",
    "module_kind",
    "family_of",
    "record_param_to_torch",
    "layouts",
    "tree_leaves",
]

Leaves = Sequence[tuple[tuple[str, ...], Optional[tuple[int, ...]], int]]
ModuleOverrides = Union[Mapping[str, str], Callable[[str], Optional[str]]]


@runtime_checkable
class TreeNames(Protocol):
    """A name map bound to one tree (see :func:`for_tree`). ``names`` is a leaf's path
    as a tuple of strings (``("layers", "0", "attn", "q_proj", "w")``)."""

    name: str

    def modules(self, names: Sequence[str]) -> list[str]:
        """PyTorch module name(s) of the module holding the leaf (one per slice if split)."""

    def params(self, names: Sequence[str]) -> list[str]:
        """PyTorch state-dict name(s) of the leaf (one per slice if split)."""

    def split(self, names: Sequence[str]) -> bool:
        """Whether the leaf's first axis holds several PyTorch tensors (one per slice)."""

    def kind(self, names: Sequence[str], layout: Sequence[str]) -> str:
        """PEFT layer kind of a LoRA target: ``"linear"``, ``"embedding"`` or ``"conv"``."""

    def layout(self, names: Sequence[str], shape: Sequence[int]) -> Optional[tuple[str, ...]]:
        """The kernel layout (roles) the map knows for this leaf, or ``None``."""

    def is_kernel(self, names: Sequence[str], shape: Sequence[int]) -> bool:
        """Whether the leaf is the weight of a PyTorch module PEFT could adapt."""

    def param_to_torch(self, names: Sequence[str], value: Any) -> list[np.ndarray]:
        """The leaf's value as PyTorch tensor(s) (numpy), one per name of :meth:`params`."""

    def param_from_torch(self, names: Sequence[str], values: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
        """The leaf (of ``shape``) from its PyTorch tensor(s)."""

    def torch_shapes(self, names: Sequence[str], shape: Sequence[int]) -> list[tuple[int, ...]]:
        """The PyTorch shapes of the leaf's tensor(s)."""


# --------------------------------------------------------------------------------------
# Hugging Face Flax rules


_RENAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_param_name(names: Sequence[str]) -> str:
    """The PyTorch state-dict name of a Flax parameter path (transformers' rules).

    >>> torch_param_name(("transformer", "h", "0", "attn", "c_attn", "kernel"))
    'transformer.h.0.attn.c_attn.weight'
    """
    names = tuple(names)
    if not names:
        raise ValueError("empty parameter path")
    return ".".join(names[:-1] + (_RENAME.get(names[-1], names[-1]),))


def kernel_to_torch(kernel: Any) -> np.ndarray:
    """A Flax ``kernel`` in PyTorch's ``weight`` layout: (h, w, in, out) → (out, in, h, w)
    for 4-D convolutions, all axes reversed otherwise ((in, out) → (out, in); GPT-2's
    (out, in) → (in, out); 1-D conv (k, in, out) → (out, in, k))."""
    x = np.asarray(kernel)
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T


def kernel_from_torch(weight: Any) -> np.ndarray:
    """Inverse of :func:`kernel_to_torch`."""
    x = np.asarray(weight)
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T


def _kernel_torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(d) for d in shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else tuple(reversed(s))


def module_kind(names: Sequence[str], layout: Sequence[str]) -> str:
    """Which PEFT LoRA layer a Flax kernel corresponds to: ``"embedding"``
    (``lora_embedding_A/B``), ``"conv"`` (``nn.ConvNd``: a kernel (*spatial, in, out) in a
    module whose name contains ``conv``, with 3+ non-stack axes) or ``"linear"``
    (``nn.Linear``/``Conv1D``; multi-axis DenseGeneral kernels flatten their in and out
    axes in row-major order)."""
    names = tuple(names)
    roles = tuple(r for r in layout if r != "stack")
    if names[-1] == "embedding":
        return "embedding"
    module = names[-2] if len(names) >= 2 else ""
    if len(roles) >= 3 and "conv" in module.lower() and roles == ("in",) * (len(roles) - 1) + ("out",):
        return "conv"
    return "linear"


_HF_KERNEL_LEAVES = ("kernel", "embedding")


class HFNames:
    """Transformers' Flax ↔ PyTorch rules for the leaves of one tree (see :mod:`jlora.hf`).

    Built from ``[(names, shape, n_stack)]`` for every array leaf of the tree (``n_stack``
    is the number of leading stack axes of a LoRA kernel, 0 otherwise) so that stacked
    kernels can be split into per-layer modules: layer ``i`` of a leaf is named by
    inserting ``i`` after its *stack container*, the shortest path prefix under which
    every array has the same leading axis.

    Args:
      leaves: every array leaf of the tree as ``(names, shape, n_stack)``.
      name_map: ``{flax module path: torch module path}`` (``.``-joined) or a function
        returning the torch module path or ``None`` for the default rule. For stacked
        kernels the result must hold ``{layer}``.
      prefix: a module path prepended to every torch name (e.g. ``"bert"``).
    """

    name = "hf"

    def __init__(self, leaves: Leaves, name_map: Optional[ModuleOverrides] = None, prefix: Optional[str] = None):
        if name_map is not None and not (callable(name_map) or isinstance(name_map, Mapping)):
            raise TypeError(f"name_map must be a dict or a function, got {type(name_map).__name__}")
        self.name_map = name_map
        self.prefix = (prefix or "").strip(".")
        self._leaves = [(tuple(n), s) for n, s, _ in leaves]
        self.containers: dict[tuple[str, ...], int] = {}
        for names, shape, n_stack in leaves:
            if n_stack:
                if n_stack != 1:
                    raise ValueError(
                        f"{'/'.join(names)}: {n_stack} stack axes; only one leading stack axis maps to PyTorch layers"
                    )
                self.containers[self._container(tuple(names), shape[0])] = shape[0]

    def _container(self, names: tuple[str, ...], size: int) -> tuple[str, ...]:
        for j in range(1, len(names)):
            prefix = names[:j]
            under = [s for n, s in self._leaves if n[:j] == prefix]
            if under and all(s is not None and len(s) >= 1 and s[0] == size for s in under):
                return prefix
        return names[:-1]

    def stack_of(self, names: Sequence[str]) -> Optional[tuple[tuple[str, ...], int]]:
        """``(container, size)`` when the leaf at ``names`` lives in a stacked container."""
        names = tuple(names)
        best = None
        for c, size in self.containers.items():
            if names[: len(c)] == c and (best is None or len(c) < len(best[0])):
                best = (c, size)
        return best

    def split(self, names: Sequence[str]) -> bool:
        return self.stack_of(names) is not None

    def _mapped(self, module: str) -> Optional[str]:
        return _override(self.name_map, module)

    def _join(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def modules(self, names: Sequence[str]) -> list[str]:
        names = tuple(names)
        module = ".".join(names[:-1])
        mapped = self._mapped(module)
        stack = self.stack_of(names)
        if stack is None:
            if mapped is not None and "{layer}" in mapped:
                raise ValueError(f"name_map({module!r}) = {mapped!r} has {{layer}} but the leaf is not stacked")
            base = mapped if mapped is not None else module
            return [self._join(base)]
        container, size = stack
        if mapped is not None:
            if "{layer}" not in mapped:
                raise ValueError(
                    f"{'/'.join(names)} is stacked ({size} layers): name_map({module!r}) must return a name "
                    f"with '{{layer}}', e.g. 'model.layers.{{layer}}.q_proj'; got {mapped!r}"
                )
            return [self._join(mapped.format(layer=i)) for i in range(size)]
        k = len(container)
        return [self._join(".".join(names[:k] + (str(i),) + names[k:-1])) for i in range(size)]

    def params(self, names: Sequence[str]) -> list[str]:
        names = tuple(names)
        leaf = torch_param_name(names).rsplit(".", 1)[-1]
        return [f"{m}.{leaf}" if m else leaf for m in self.modules(names)]

    def kind(self, names: Sequence[str], layout: Sequence[str]) -> str:
        return module_kind(names, layout)

    def layout(self, names: Sequence[str], shape: Sequence[int]) -> Optional[tuple[str, ...]]:
        return None

    def is_kernel(self, names: Sequence[str], shape: Sequence[int]) -> bool:
        return bool(names) and tuple(names)[-1] in _HF_KERNEL_LEAVES and len(shape) >= 2

    def _is_torch_kernel(self, names: Sequence[str]) -> bool:
        return tuple(names)[-1] == "kernel"

    def param_to_torch(self, names: Sequence[str], value: Any) -> list[np.ndarray]:
        v = np.asarray(value)
        pieces = [v[i] for i in range(v.shape[0])] if self.split(names) else [v]
        return [kernel_to_torch(p) if self._is_torch_kernel(names) else p for p in pieces]

    def param_from_torch(self, names: Sequence[str], values: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
        pieces = [kernel_from_torch(x) if self._is_torch_kernel(names) else np.asarray(x) for x in values]
        out = np.stack(pieces) if self.split(names) else pieces[0]
        _check_shape(names, out.shape, shape)
        return out

    def torch_shapes(self, names: Sequence[str], shape: Sequence[int]) -> list[tuple[int, ...]]:
        shape = tuple(int(s) for s in shape)
        n, per = (shape[0], shape[1:]) if self.split(names) else (1, shape)
        t = _kernel_torch_shape(per) if self._is_torch_kernel(names) else per
        return [t] * n


def _override(name_map: Optional[ModuleOverrides], module: str) -> Optional[str]:
    if name_map is None:
        return None
    if isinstance(name_map, Mapping):
        return name_map.get(module)
    out = name_map(module)
    if out is not None and not isinstance(out, str):
        raise TypeError(f"name_map({module!r}) returned {out!r}; expected a str or None")
    return out


def _check_shape(names: Sequence[str], got: Sequence[int], want: Sequence[int]) -> None:
    if tuple(int(s) for s in got) != tuple(int(s) for s in want):
        raise ValueError(
            f"{'/'.join(names)}: the PyTorch tensor(s) give shape {tuple(got)}, the leaf has shape {tuple(want)}"
        )


# --------------------------------------------------------------------------------------
# Families: tables of rules


def _parse_axes(spec: str) -> list[tuple[str, ...]]:
    """``"(n h) d"`` → ``[("n", "h"), ("d",)]``; ``"d n h"`` → ``[("d",), ("n",), ("h",)]``."""
    groups: list[tuple[str, ...]] = []
    for m in re.finditer(r"\(([^()]*)\)|([A-Za-z_]\w*)", spec):
        if m.group(1) is not None:
            letters = tuple(m.group(1).split())
            if not letters:
                raise ValueError(f"axes {spec!r}: empty group")
            groups.append(letters)
        else:
            groups.append((m.group(2),))
    rest = re.sub(r"\(([^()]*)\)|([A-Za-z_]\w*)|\s", "", spec)
    if rest:
        raise ValueError(f"axes {spec!r}: unexpected {rest!r}; write axes as names, groups in parentheses")
    return groups


_L = r"layers/(\d+)/"  # a layer's index in a path (group 1 of the shipped rules)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a :class:`FamilyMap`: a leaf path pattern and its PyTorch counterpart.

    Attributes:
      path: regex over the ``/``-joined leaf path (it must match the end of the path
        after a ``/``, or all of it); its groups fill ``torch``.
      torch: the PyTorch state-dict name (``\\1`` for groups), or a tuple of names when
        the leaf's first axis holds one PyTorch tensor per slice (that first axis is
        then absent from ``torch_axes``).
      axes: the leaf's axes as names, e.g. ``"d n h"``.
      torch_axes: the PyTorch tensor's axes, with flattened groups in parentheses in
        row-major order, e.g. ``"(n h) d"``.
      kind: ``"linear"`` (an ``nn.Linear`` weight ``(out, in)``: ``torch_axes`` has two
        groups), ``"embedding"`` (an ``nn.Embedding`` weight ``(num, dim)``) or
        ``"param"`` (anything else, e.g. a norm weight; never a LoRA target).

    >>> r = Rule(r"layers/(\\d+)/attn/q_proj/w", r"model.layers.\\1.self_attn.q_proj.weight", "d n h", "(n h) d")
    >>> r.layout()
    ('in', 'out', 'out')
    """

    path: str
    torch: Union[str, tuple[str, ...]]
    axes: str
    torch_axes: str
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "embedding", "param"):
            raise ValueError(f"Rule {self.path!r}: kind={self.kind!r}; valid: 'linear', 'embedding', 'param'")
        letters = [g[0] for g in _parse_axes(self.axes)]
        if any(len(g) != 1 for g in _parse_axes(self.axes)):
            raise ValueError(f"Rule {self.path!r}: axes {self.axes!r} must not have groups")
        if len(set(letters)) != len(letters):
            raise ValueError(f"Rule {self.path!r}: repeated axis names in {self.axes!r}")
        groups = _parse_axes(self.torch_axes)
        flat = [x for g in groups for x in g]
        own = letters[1:] if self.is_split else letters
        if sorted(flat) != sorted(own):
            raise ValueError(
                f"Rule {self.path!r}: torch_axes {self.torch_axes!r} must name the axes {own} of {self.axes!r}"
                + (" (without the first, split axis)" if self.is_split else "")
            )
        object.__setattr__(self, "_letters", tuple(letters))
        object.__setattr__(self, "_groups", tuple(groups))
        object.__setattr__(self, "_regex", re.compile(r"(?:.*/)?" + self.path))
        if self.kind == "linear":
            if len(groups) != 2:
                raise ValueError(f"Rule {self.path!r}: a linear weight has two torch axes (out, in), got {self.torch_axes!r}")
            for g in groups:  # the kernel's order of each group must be torch's flattening order
                if [x for x in own if x in g] != list(g):
                    raise ValueError(
                        f"Rule {self.path!r}: axes {list(g)} appear in a different order in {self.axes!r}; "
                        "LoRA factors flatten in the kernel's order"
                    )
        if self.kind in ("linear", "embedding") and not all(t.endswith(".weight") for t in self.torch_names_template):
            raise ValueError(f"Rule {self.path!r}: a {self.kind} weight's torch name must end in '.weight'")

    @property
    def is_split(self) -> bool:
        return isinstance(self.torch, tuple)

    @property
    def torch_names_template(self) -> tuple[str, ...]:
        return self.torch if isinstance(self.torch, tuple) else (self.torch,)

    def match(self, path: str) -> Optional[re.Match]:
        return self._regex.fullmatch(path)

    def layout(self) -> Optional[tuple[str, ...]]:
        """Kernel roles (``"stack"`` for a split axis) for ``linear``/``embedding`` rules."""
        if self.kind == "param":
            return None
        # an embedding's table is indexed by its first group; a linear contracts its second
        ins = set(self._groups[0] if self.kind == "embedding" else self._groups[1])
        roles = []
        for i, x in enumerate(self._letters):
            if self.is_split and i == 0:
                roles.append("stack")
            else:
                roles.append("in" if x in ins else "out")
        return tuple(roles)

    def _sizes(self, shape: Sequence[int]) -> dict[str, int]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(self._letters):
            raise ValueError(f"leaf of shape {shape} does not fit axes {self.axes!r} (rule {self.path!r})")
        return dict(zip(self._letters, shape))

    def torch_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        sizes = self._sizes(shape)
        one = tuple(math.prod(sizes[x] for x in g) for g in self._groups)
        return [one] * (sizes[self._letters[0]] if self.is_split else 1)

    def to_torch(self, value: Any) -> list[np.ndarray]:
        v = np.asarray(value)
        self._sizes(v.shape)
        own = self._letters[1:] if self.is_split else self._letters
        pieces = [v[i] for i in range(v.shape[0])] if self.is_split else [v]
        order = [x for g in self._groups for x in g]
        perm = [own.index(x) for x in order]
        out = []
        for p in pieces:
            sizes = dict(zip(own, p.shape))
            out.append(np.ascontiguousarray(p.transpose(perm).reshape([math.prod(sizes[x] for x in g) for g in self._groups])))
        return out

    def from_torch(self, values: Sequence[Any], shape: Sequence[int], where: str = "") -> np.ndarray:
        sizes = self._sizes(shape)
        own = self._letters[1:] if self.is_split else self._letters
        order = [x for g in self._groups for x in g]
        want = self.torch_shapes(shape)
        if len(values) != len(want):
            raise ValueError(f"{where}: {len(values)} PyTorch tensor(s) for {len(want)} name(s)")
        pieces = []
        for x, w in zip(values, want):
            x = np.asarray(x)
            if tuple(x.shape) != w:
                raise ValueError(f"{where}: PyTorch tensor of shape {tuple(x.shape)}, expected {w} for a leaf of shape {tuple(shape)}")
            y = x.reshape([sizes[a] for a in order]).transpose([order.index(a) for a in own])
            pieces.append(y)
        return np.stack(pieces) if self.is_split else pieces[0]


class FamilyMap:
    """A name map for trees of one model family: a table of :class:`Rule` s.

    Args:
      name: the map's name (``name_map="<name>"`` selects it).
      rules: the rules; a leaf takes the first rule whose ``path`` matches.
      requires: regexes (same matching as ``Rule.path``) that each must match some leaf
        path for the family to be recognised in a tree.
      excludes: regexes none of which may match (tells Llama from Qwen3).

    Leaves no rule matches fall back to the Hugging Face rules (:class:`HFNames`).

    A rule whose path starts with ``layers/(\\d+)/`` also names the same leaf stacked over
    the layers (``layers/...`` with a leading layer axis, one PyTorch tensor per layer):
    :attr:`stacked` holds those :class:`jlora.stacked_rules.StackedRule` s, tried after
    :attr:`rules`.
    """

    def __init__(self, name: str, rules: Sequence[Rule], requires: Sequence[str], excludes: Sequence[str] = ()):
        self.name = name
        self.rules = tuple(rules)
        self.stacked = tuple(stacked_rules(self.rules, _L))
        self.requires = tuple(re.compile(r"(?:.*/)?" + r) for r in requires)
        self.excludes = tuple(re.compile(r"(?:.*/)?" + r) for r in excludes)

    def __repr__(self) -> str:
        return f"FamilyMap({self.name!r}, {len(self.rules)} rules)"

    def recognises(self, paths: Iterable[str]) -> bool:
        """Whether a tree with these ``/``-joined leaf paths is laid out like this family."""
        paths = list(paths)
        return all(any(r.fullmatch(p) for p in paths) for r in self.requires) and not any(
            r.fullmatch(p) for r in self.excludes for p in paths
        )

    def rule_for(self, path: str) -> Optional[tuple[Rule, re.Match]]:
        for rule in self.rules + self.stacked:
            m = rule.match(path)
            if m is not None:
                return rule, m
        return None

    def bind(self, leaves: Leaves, prefix: Optional[str] = None, overrides: Optional[ModuleOverrides] = None) -> "FamilyNames":
        return FamilyNames(self, leaves, prefix=prefix, overrides=overrides)


class FamilyNames:
    """A :class:`FamilyMap` bound to one tree (a :class:`TreeNames`)."""

    def __init__(self, family: FamilyMap, leaves: Leaves, prefix: Optional[str] = None,
                 overrides: Optional[ModuleOverrides] = None):
        self.family = family
        self.name = family.name
        self.prefix = (prefix or "").strip(".")
        self.overrides = overrides
        self._rules: dict[tuple[str, ...], tuple[Rule, re.Match]] = {}
        self._shapes = {tuple(names): shape for names, shape, _ in leaves}  # a StackedRule names per layer
        rest = []
        for names, shape, n_stack in leaves:
            hit = family.rule_for("/".join(names))
            if hit is not None:
                self._rules[tuple(names)] = hit
            else:
                rest.append((names, shape, n_stack))
        self.fallback = HFNames(rest, name_map=overrides, prefix=prefix)

    def _rule(self, names: Sequence[str]) -> Optional[tuple[Rule, re.Match]]:
        names = tuple(names)
        if names not in self._rules:
            hit = self.family.rule_for("/".join(names))
            if hit is None:
                return None
            self._rules[names] = hit
        return self._rules[names]

    def _join(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def params(self, names: Sequence[str]) -> list[str]:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.params(names)
        rule, m = hit
        if isinstance(rule, StackedRule):
            if self._shapes.get(tuple(names)) is None:
                raise ValueError(f"{'/'.join(names)}: a stacked leaf not among the tree's leaves (its layer count is unknown)")
            out = rule.torch_names(m, self._shapes[tuple(names)])
        else:
            out = [m.expand(t) for t in rule.torch_names_template]
        mapped = _override(self.overrides, ".".join(tuple(names)[:-1]))
        if mapped is not None:
            leaf = out[0].rsplit(".", 1)[-1]
            if rule.is_split:
                if "{layer}" not in mapped:
                    raise ValueError(
                        f"{'/'.join(names)} holds {len(out)} PyTorch modules: name_map must return a name with "
                        f"'{{layer}}' (the slice index); got {mapped!r}"
                    )
                out = [f"{mapped.format(layer=i)}.{leaf}" for i in range(len(out))]
            else:
                out = [f"{mapped}.{leaf}"]
        return [self._join(n) for n in out]

    def modules(self, names: Sequence[str]) -> list[str]:
        if self._rule(names) is None:
            return self.fallback.modules(names)
        return [p.rsplit(".", 1)[0] for p in self.params(names)]

    def split(self, names: Sequence[str]) -> bool:
        hit = self._rule(names)
        return hit[0].is_split if hit is not None else self.fallback.split(names)

    def kind(self, names: Sequence[str], layout: Sequence[str]) -> str:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.kind(names, layout)
        return "embedding" if hit[0].kind == "embedding" else "linear"

    def layout(self, names: Sequence[str], shape: Sequence[int]) -> Optional[tuple[str, ...]]:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.layout(names, shape)
        rule = hit[0]
        lay = rule.layout()
        if lay is not None and len(lay) != len(tuple(shape)):
            return None
        return lay

    def is_kernel(self, names: Sequence[str], shape: Sequence[int]) -> bool:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.is_kernel(names, shape)
        return hit[0].kind in ("linear", "embedding") and len(shape) >= 2

    def param_to_torch(self, names: Sequence[str], value: Any) -> list[np.ndarray]:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.param_to_torch(names, value)
        return hit[0].to_torch(value)

    def param_from_torch(self, names: Sequence[str], values: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.param_from_torch(names, values, shape)
        return hit[0].from_torch(values, shape, where="/".join(names))

    def torch_shapes(self, names: Sequence[str], shape: Sequence[int]) -> list[tuple[int, ...]]:
        hit = self._rule(names)
        if hit is None:
            return self.fallback.torch_shapes(names, shape)
        return hit[0].torch_shapes(shape)


# --------------------------------------------------------------------------------------
# The shipped families

_T = r"model.layers.\1."
_LS = r"layers/(?:\d+/)?"  # a layer's leaf, or the leaf stacked over the layers (scan_layers)


def _decoder_rules(qk_norm: bool) -> list[Rule]:
    rules = [
        Rule(r"embedder/input_embedding", "model.embed_tokens.weight", "v d", "v d", kind="embedding"),
        Rule(_L + r"attn/q_proj/w", _T + "self_attn.q_proj.weight", "d n h", "(n h) d"),
        Rule(_L + r"attn/k_proj/w", _T + "self_attn.k_proj.weight", "d k h", "(k h) d"),
        Rule(_L + r"attn/v_proj/w", _T + "self_attn.v_proj.weight", "d k h", "(k h) d"),
        Rule(_L + r"attn/o_proj/w", _T + "self_attn.o_proj.weight", "n h d", "d (n h)"),
        Rule(_L + r"mlp/(gate_proj|up_proj)/kernel", _T + r"mlp.\2.weight", "d f", "f d"),
        Rule(_L + r"mlp/down_proj/kernel", _T + "mlp.down_proj.weight", "f d", "d f"),
        Rule(_L + r"(input_layernorm|post_attention_layernorm)/w", _T + r"\2.weight", "d", "d", kind="param"),
        Rule(r"final_norm/w", "model.norm.weight", "d", "d", kind="param"),
        Rule(r"lm_head/w", "lm_head.weight", "d v", "v d"),
    ]
    if qk_norm:
        rules.append(Rule(_L + r"attn/(q_norm|k_norm)/w", _T + r"self_attn.\2.weight", "h", "h", kind="param"))
    return rules


QWEN3 = FamilyMap(
    "qwen3",
    _decoder_rules(qk_norm=True),
    requires=(_LS + r"attn/q_proj/w", _LS + r"attn/q_norm/w"),
)
"""tunix / bonsai's Qwen3 (``Qwen3ForCausalLM`` names)."""

LLAMA3 = FamilyMap(
    "llama3",
    _decoder_rules(qk_norm=False),
    requires=(_LS + r"attn/q_proj/w",),
    excludes=(_LS + r"attn/q_norm/w",),
)
"""tunix / bonsai's Llama 3 (``LlamaForCausalLM`` names)."""

_GEMMA_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

GEMMA3 = FamilyMap(
    "gemma3",
    [
        Rule(r"embedder/input_embedding", "model.embed_tokens.weight", "v d", "v d", kind="embedding"),
        Rule(_L + r"attn/q_einsum/w", _T + "self_attn.q_proj.weight", "n d h", "(n h) d"),
        Rule(
            _L + r"attn/kv_einsum/w",
            (_T + "self_attn.k_proj.weight", _T + "self_attn.v_proj.weight"),
            "s k d h",
            "(k h) d",
        ),
        Rule(
            _L + r"attn/qkv_einsum/w",
            (_T + "self_attn.q_proj.weight", _T + "self_attn.k_proj.weight", _T + "self_attn.v_proj.weight"),
            "s n d h",
            "(n h) d",
        ),
        Rule(_L + r"attn/attn_vec_einsum/w", _T + "self_attn.o_proj.weight", "n h d", "d (n h)"),
        Rule(_L + r"attn/_query_norm/scale", _T + "self_attn.q_norm.weight", "h", "h", kind="param"),
        Rule(_L + r"attn/_key_norm/scale", _T + "self_attn.k_norm.weight", "h", "h", kind="param"),
        Rule(_L + r"mlp/(gate_proj|up_proj)/kernel", _T + r"mlp.\2.weight", "d f", "f d"),
        Rule(_L + r"mlp/down_proj/kernel", _T + "mlp.down_proj.weight", "f d", "d f"),
        *[
            Rule(_L + jax_name + "/scale", _T + torch_name + ".weight", "d", "d", kind="param")
            for jax_name, torch_name in _GEMMA_NORMS.items()
        ],
        Rule(r"final_norm/scale", "model.norm.weight", "d", "d", kind="param"),
    ],
    requires=(_LS + r"attn/(q_einsum|kv_einsum|qkv_einsum)/w",),
)
"""tunix / bonsai's Gemma 3 text decoder (``Gemma3ForCausalLM`` names)."""

FAMILY_MAPS: tuple[FamilyMap, ...] = (QWEN3, LLAMA3, GEMMA3)
"""The shipped family maps, in the order :func:`recognise` tries them."""

_BY_NAME = {m.name: m for m in FAMILY_MAPS}

NameMapSpec = Union[None, str, FamilyMap, ModuleOverrides, Any]


def get(name: str) -> Optional[FamilyMap]:
    """A shipped map by name: ``"qwen3"``, ``"llama3"``, ``"gemma3"``; ``"hf"`` is ``None``
    (the Hugging Face rules, which need no table)."""
    if name == "hf":
        return None
    if name not in _BY_NAME:
        raise ValueError(f"name_map={name!r}: shipped maps are {['hf', *_BY_NAME]} (or 'auto')")
    return _BY_NAME[name]


def recognise(paths: Iterable[str]) -> Optional[FamilyMap]:
    """The shipped family whose layout these ``/``-joined leaf paths have, or ``None``
    (then the Hugging Face rules apply).

    >>> recognise(["embedder/input_embedding", "layers/0/attn/q_proj/w", "layers/0/attn/q_norm/w"]).name
    'qwen3'
    """
    paths = list(paths)
    for m in FAMILY_MAPS:
        if m.recognises(paths):
            return m
    return None


def for_tree(leaves: Leaves, name_map: NameMapSpec = None, prefix: Optional[str] = None) -> TreeNames:
    """The name map for one tree, bound to its leaves.

    Args:
      leaves: every array leaf as ``(names, shape, n_stack)`` (``n_stack``: leading stack
        axes of a LoRA kernel, else 0).
      name_map: ``None``/``"auto"`` (recognise a shipped family from the paths, else the
        Hugging Face rules), a shipped map's name, a :class:`FamilyMap`, an object with
        ``bind(leaves, prefix=None)``, or module-path overrides (a dict or a function)
        applied on top of the recognised map.
      prefix: a PyTorch module path prepended to every name (e.g. ``"bert"``).

    >>> tn = for_tree([(("layers", "0", "attn", "q_proj", "w"), (8, 2, 4), 0)])
    >>> tn.name, tn.modules(("layers", "0", "attn", "q_proj", "w"))
    ('llama3', ['model.layers.0.self_attn.q_proj'])
    """
    leaves = [(tuple(n), tuple(int(d) for d in s) if s is not None else None, int(k)) for n, s, k in leaves]
    overrides: Optional[ModuleOverrides] = None
    family: Optional[FamilyMap] = None
    if name_map is None or name_map == "auto":
        family = recognise("/".join(n) for n, _, _ in leaves)
    elif isinstance(name_map, str):
        family = get(name_map)
        if family is None:
            return HFNames(leaves, prefix=prefix)
    elif isinstance(name_map, FamilyMap):
        family = name_map
    elif hasattr(name_map, "bind") and callable(name_map.bind):
        return name_map.bind(leaves, prefix=prefix)
    elif isinstance(name_map, Mapping) or callable(name_map):
        overrides = name_map
        family = recognise("/".join(n) for n, _, _ in leaves)
    else:
        raise TypeError(
            f"name_map must be None, a shipped map's name ({['hf', *_BY_NAME]}), a FamilyMap, a dict or a "
            f"function of the module path; got {type(name_map).__name__}"
        )
    if family is None:
        return HFNames(leaves, name_map=overrides, prefix=prefix)
    return family.bind(leaves, prefix=prefix, overrides=overrides)


def family_of(source: Any) -> Optional[FamilyMap]:
    """The :class:`FamilyMap` an adapter's ``name_map`` record names (``"qwen3"``, a
    ``FamilyMap``), or ``None`` (Hugging Face rules, or a map that cannot be rebuilt
    without its tree)."""
    if isinstance(source, FamilyMap):
        return source
    if isinstance(source, str) and source in _BY_NAME:
        return _BY_NAME[source]
    return None


def record_param_to_torch(names: Sequence[str], value: Any, n: int, source: Any = None) -> list[np.ndarray]:
    """A fully trained leaf's value (JAX layout) as its ``n`` PyTorch tensors, without the
    tree: the rule of the family ``source`` names if one matches the path, else
    transformers' rules (a stacked leaf's slices one by one)."""
    family = family_of(source)
    if family is not None:
        hit = family.rule_for("/".join(names))
        if hit is not None:
            return hit[0].to_torch(value)
    v = np.asarray(value)
    conv = kernel_to_torch if tuple(names)[-1] == "kernel" else np.asarray
    return [conv(v[i] if n > 1 else v) for i in range(n)]


def tree_leaves(params: Any) -> list[tuple[tuple[str, ...], tuple[int, ...], int]]:
    """``[(names, shape, 0)]`` for every array leaf of ``params`` (a dict, an ``nnx.State``
    or ``nnx.Module``, a LoRA tree: a ``LoraWeight`` counts as its kernel, with its stack
    axes), the input of :func:`for_tree`."""
    import jax

    from .targets import path_names

    def node(x: Any) -> bool:
        return type(x).__name__ in ("LoraWeight", "MultiLoraWeight", "Trainable")

    out = []
    for keypath, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=node)[0]:
        n_stack = 0
        if type(x).__name__ in ("LoraWeight", "MultiLoraWeight"):
            n_stack = tuple(x.layout).count("stack")
            x = x.w
        elif type(x).__name__ == "Trainable":
            x = x.value
        shape = getattr(x, "shape", None)
        if shape is not None:
            out.append((path_names(keypath), tuple(int(d) for d in shape), n_stack))
    return out


def layouts(params: Any, name_map: NameMapSpec = None) -> Callable[[str, tuple[int, ...]], Optional[tuple[str, ...]]]:
    """The kernel layouts a name map knows for the leaves of ``params``, as a ``layouts=``
    argument of :func:`jlora.wrap` (``None`` for kernels it does not know, which are then
    inferred as usual).

    Use it to wrap a tree so that its adapter is exactly PEFT's: Gemma 3's ``kv_einsum``
    (2, K, D, H) gets ``("stack", "out", "in", "out")``, i.e. separate factors for k and v
    (PEFT's ``k_proj`` and ``v_proj``), where a layout found from its einsum alone would
    be ``("out", "out", "in", "out")`` (one adapter shared by k and v).

    >>> lp = jlora.wrap(state, config, layouts=jlora.name_maps.layouts(state))  # doctest: +SKIP
    """
    leaves = tree_leaves(params)
    tn = for_tree([(n, s, 0) for n, s, _ in leaves], name_map)
    table: dict[str, tuple[str, ...]] = {}
    for names, shape, _ in leaves:
        lay = tn.layout(names, shape)
        if lay is not None:
            table[".".join(names[:-1])] = lay

    def spec(module: str, shape: tuple[int, ...]) -> Optional[tuple[str, ...]]:
        lay = table.get(module)
        return lay if lay is not None and len(lay) == len(tuple(shape)) else None

    return spec
