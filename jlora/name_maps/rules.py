"""The machinery of name maps: the :class:`TreeNames` protocol, transformers' Flax ↔
PyTorch rules (:class:`HFNames`), and table-driven maps (:class:`Rule`, :class:`FamilyMap`)
whose rules are written as axis names (``"d n h"`` in JAX, ``"(n h) d"`` in PyTorch).

The tables themselves are in :mod:`jlora.name_maps.families`; choosing and binding a map
for a tree is :mod:`jlora.name_maps.lookup`. The package docstring describes the maps.

>>> r = Rule(r"layers/(\\d+)/attn/q_proj/w", r"model.layers.\\1.self_attn.q_proj.weight", "d n h", "(n h) d")
>>> r.layout()
('in', 'out', 'out')
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Protocol, Union, runtime_checkable

import numpy as np

from .stacked import StackedRule, stacked_rules

__all__ = [
    "Rule",
    "FamilyMap",
    "FamilyNames",
    "TreeNames",
    "HFNames",
    "Leaves",
    "ModuleOverrides",
    "torch_param_name",
    "kernel_to_torch",
    "kernel_from_torch",
    "module_kind",
]

LAYER_PATTERN = r"layers/(\d+)/"  # a layer's index in a path (group 1 of the shipped rules)

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


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a :class:`FamilyMap`: a leaf path pattern and its PyTorch counterpart.

    Attributes:
      path: regex over the ``/``-joined leaf path (it must match the end of the path
        after a ``/``, or all of it); its groups fill ``torch``.
      torch: the PyTorch state-dict name (``\\1`` for groups), or a tuple of names when
        the leaf's first axis holds one PyTorch tensor per slice (that first axis is
        then absent from ``torch_axes``), or a name with ``{i}`` for as many slices as the
        first axis has (``model.layers.\\1.mlp.experts.{i}.gate_proj.weight``: a stack of
        experts, whatever their number).
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
        return isinstance(self.torch, tuple) or self.per_slice

    @property
    def per_slice(self) -> bool:
        """Whether ``torch`` is one name with ``{i}``, for each slice of the first axis."""
        return isinstance(self.torch, str) and "{i}" in self.torch

    def torch_names(self, m: re.Match, shape: Optional[Sequence[int]] = None) -> list[str]:
        """The PyTorch names of the leaf matched by ``m`` (of ``shape``: needed for ``{i}``)."""
        if not self.per_slice:
            return [m.expand(t) for t in self.torch_names_template]
        if shape is None or not len(shape):
            raise ValueError(f"Rule {self.path!r}: the names of each slice need the leaf's shape")
        return [m.expand(self.torch).replace("{i}", str(i)) for i in range(int(shape[0]))]

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
    :attr:`stacked` holds those :class:`jlora.name_maps.stacked.StackedRule` s, tried after
    :attr:`rules`.
    """

    def __init__(self, name: str, rules: Sequence[Rule], requires: Sequence[str], excludes: Sequence[str] = ()):
        self.name = name
        self.rules = tuple(rules)
        self.stacked = tuple(stacked_rules(self.rules, LAYER_PATTERN))
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
        self._shapes = {tuple(names): shape for names, shape, _ in leaves}
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
        shape = self._shapes.get(tuple(names))
        if shape is None and isinstance(rule, StackedRule):
            raise ValueError(f"{'/'.join(names)}: a stacked leaf not among the tree's leaves (its layer count is unknown)")
        out = rule.torch_names(m, shape)
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
