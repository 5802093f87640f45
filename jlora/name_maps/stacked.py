"""Name-map rules for layers stacked on a leading axis (``nnx.vmap``/``nnx.scan`` stacks,
``jlora.models``' ``scan_layers=True``).

A :class:`jlora.name_maps.Rule` names one layer's leaf, e.g. ``layers/(\\d+)/attn/q_proj/w``
(D, N, H) → ``model.layers.\\1.self_attn.q_proj.weight``. Its :class:`StackedRule` names the
same leaf stacked over the layers, ``layers/attn/q_proj/w`` (L, D, N, H): one PyTorch
tensor per layer, ``model.layers.<i>.self_attn.q_proj.weight`` for ``i < L``, each laid out
by the per-layer rule. The layer axis is a ``"stack"`` axis of the kernel layout, so a LoRA
factor pair of the stacked kernel is one PEFT adapter per layer. A per-layer rule that
already splits its first axis (Gemma's ``kv_einsum`` (2, K, D, H) → ``k_proj``,
``v_proj``) gives, stacked (L, 2, K, D, H), the names layer by layer (``0.k, 0.v, 1.k,
...``): both leading axes are stack axes, flattened in row-major order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["StackedRule", "stacked_rules"]


class StackedRule:
    """A per-layer rule over a leaf stacked on a leading layer axis (see the module docstring).

    Args:
      rule: the per-layer :class:`jlora.name_maps.Rule`; group 1 of its path must be the
        layer index (``(\\d+)``) and ``\\1`` in its PyTorch names the layer.
      layer_pattern: the part of ``rule.path`` holding the index, replaced by
        ``stacked_pattern`` (default: ``layers/(\\d+)/`` → ``layers/()``, an empty group 1 so
        that the rule's other groups keep their numbers).

    >>> from jlora.name_maps import Rule
    >>> r = StackedRule(Rule(r"layers/(\\d+)/attn/q_proj/w", r"model.layers.\\1.self_attn.q_proj.weight", "d n h", "(n h) d"))
    >>> r.torch_names(r.match("layers/attn/q_proj/w"), (2, 8, 2, 4))
    ['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.q_proj.weight']
    >>> r.layout()
    ('stack', 'in', 'out', 'out')
    """

    is_split = True

    def __init__(self, rule: Any, layer_pattern: str = r"layers/(\d+)/", stacked_pattern: str = r"layers/()"):
        if not rule.path.startswith(layer_pattern):
            raise ValueError(
                f"StackedRule: the rule's path {rule.path!r} must start with its layer index {layer_pattern!r} (group 1)"
            )
        self.rule = rule
        self.path = rule.path.replace(layer_pattern, stacked_pattern, 1)
        self.kind = rule.kind
        self.torch = rule.torch
        self._regex = re.compile(r"(?:.*/)?" + self.path)

    def __repr__(self) -> str:
        return f"StackedRule({self.path!r})"

    @property
    def torch_names_template(self) -> tuple[str, ...]:
        return self.rule.torch_names_template

    @property
    def per_layer(self) -> int:
        """PyTorch tensors per layer (2 for Gemma's ``kv_einsum``)."""
        return len(self.rule.torch_names_template)

    def match(self, path: str) -> Optional[re.Match]:
        return self._regex.fullmatch(path)

    def _layers(self, shape: Sequence[int]) -> int:
        if not shape:
            raise ValueError(f"{self.path}: a stacked leaf needs a leading layer axis, got a scalar")
        return int(shape[0])

    def torch_names(self, m: re.Match, shape: Sequence[int]) -> list[str]:
        """The PyTorch names of the leaf, layer by layer (per layer, the rule's names)."""
        return [m.expand(t.replace("\\1", str(i))) for i in range(self._layers(shape)) for t in self.torch_names_template]

    def layout(self) -> Optional[tuple[str, ...]]:
        inner = self.rule.layout()
        return None if inner is None else ("stack",) + tuple(inner)

    def torch_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        return list(self.rule.torch_shapes(tuple(shape)[1:])) * self._layers(shape)

    def to_torch(self, value: Any) -> list[np.ndarray]:
        v = np.asarray(value)
        return [t for i in range(self._layers(v.shape)) for t in self.rule.to_torch(v[i])]

    def from_torch(self, values: Sequence[Any], shape: Sequence[int], where: str = "") -> np.ndarray:
        n, k = self._layers(shape), self.per_layer
        if len(values) != n * k:
            raise ValueError(f"{where}: {len(values)} PyTorch tensor(s) for {n} layers × {k}")
        per = tuple(shape)[1:]
        return np.stack([self.rule.from_torch(values[i * k:(i + 1) * k], per, where=f"{where} (layer {i})")
                         for i in range(n)])


def stacked_rules(rules: Sequence[Any], layer_pattern: str = r"layers/(\d+)/") -> list[StackedRule]:
    """A :class:`StackedRule` for every rule whose path starts with ``layer_pattern`` (so
    that the layer index is the rule's group 1)."""
    return [StackedRule(r, layer_pattern) for r in rules if r.path.startswith(layer_pattern)]
