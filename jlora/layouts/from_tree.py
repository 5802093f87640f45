"""Kernel layouts from the tree alone (no ``apply_fn``): the role of each axis of a kernel
(``"stack"``, ``"in"``, ``"out"``) read off its name, its shape, a sibling ``bias`` and the
norm scales around it; and the user's ``layouts=`` overrides.

Inference can only be wrong in the orientation of a square kernel; where the tree does not
decide, :func:`infer_layout` raises and names what to pass (``apply_fn=`` for layouts found
by use, :mod:`jlora.layouts.from_use`, or ``layouts=``).

>>> import numpy as np
>>> from jlora.core.paths import LeafEntry
>>> entries = [LeafEntry(0, ("dense", "kernel"), np.zeros((4, 8)))]
>>> infer_layout(entries[0], TreeFacts(entries))
('in', 'out')
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

from ..core.paths import LeafEntry, is_array_like, list_match

__all__ = ["LayoutSpec", "TreeFacts", "infer_layout", "infer_layout_guess", "ambiguous_layout_error", "user_layout",
           "transposed_layout"]

_CONV1D_GPT2_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")

LayoutSpec = Union[
    None,
    Mapping[str, Sequence[str]],
    Callable[[str, tuple[int, ...]], Optional[Sequence[str]]],
]


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
            and is_array_like(e.leaf)
            and len(e.leaf.shape) == 2
            and e.leaf.shape[0] == 3 * e.leaf.shape[1]
            for e in entries
        )
        scales = [e for e in entries if e.name == "scale" and is_array_like(e.leaf)]
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


def infer_layout_guess(entry: LeafEntry, facts: TreeFacts) -> tuple[tuple[str, ...], bool]:
    """:func:`infer_layout` and whether its orientation is only a *guess*: a 2-D kernel
    (after stack axes) named ``kernel`` or ``w`` whose orientation comes from the naming
    convention alone (Flax's ``Dense`` is (in, out)), with no GPT-2 ``Conv1D`` name and no
    sibling bias of a non-square kernel to confirm it. A transformers ``FlaxConv1D``
    twin is (out, in) under the same name: only use (``apply_fn=``), ``layouts=``, a name
    map or factor shapes that fit one orientation can tell.

    >>> import numpy as np
    >>> from jlora.core.paths import LeafEntry
    >>> e = [LeafEntry(0, ("proj", "kernel"), np.zeros((4, 4)))]
    >>> infer_layout_guess(e[0], TreeFacts(e))
    (('in', 'out'), True)
    """
    layout = infer_layout(entry, facts)
    roles = tuple(r for r in layout if r != "stack")
    if roles not in (("in", "out"), ("out", "in")) or entry.name in ("embedding", "embeddings"):
        return layout, False
    if entry.name == "kernel" and facts.gpt2_conv1d and len(entry.names) >= 2 and entry.names[-2] in _CONV1D_GPT2_NAMES:
        return layout, False
    shape = [int(s) for s, r in zip(entry.leaf.shape, layout) if r != "stack"]
    bias = facts.by_module.get(entry.module, {}).get("bias")
    if bias is not None and is_array_like(bias.leaf) and shape[0] != shape[1] and int(bias.leaf.shape[-1]) in shape:
        return layout, False
    return layout, entry.name in ("kernel", "w")


def transposed_layout(layout: Sequence[str]) -> tuple[str, ...]:
    """``layout`` with ``"in"`` and ``"out"`` swapped (the other orientation of a 2-D kernel)."""
    return tuple({"in": "out", "out": "in"}.get(r, r) for r in layout)


def infer_layout(entry: LeafEntry, facts: TreeFacts) -> tuple[str, ...]:
    """Role of each kernel axis (``"stack"``, ``"in"``, ``"out"``), inferred from the tree.

    Rules, in order: HF GPT-2 ``FlaxConv1D`` kernels are (out, in); a 2-D ``kernel`` is
    (in, out) (Flax's ``Dense``) unless a sibling bias fits only its first axis; an
    ``embedding`` is
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
    bias = facts.by_module.get(entry.module, {}).get("bias")
    if nd == 2:
        if facts.gpt2_conv1d and module_name in _CONV1D_GPT2_NAMES:
            return ("out", "in")
        n = tuple(bias.leaf.shape) if bias is not None and is_array_like(bias.leaf) else None
        if n is not None and len(n) == 1 and shape[0] != shape[1] and n[0] == shape[0]:
            return ("out", "in")  # a (out, in) kernel, e.g. a transformers FlaxConv1D twin
        return ("in", "out")
    p = facts.stack_axis(entry.names, shape)
    if p is not None and p > 0:
        # A layer axis inside the kernel (MaxText's (in, L, out)): the other axes are one
        # layer's kernel, the bias (if any) carries the layer axis at the same position.
        sub = shape[:p] + shape[p + 1:]
        bshape = tuple(int(s) for s in bias.leaf.shape) if bias is not None and is_array_like(bias.leaf) else None
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
    if bias is not None and is_array_like(bias.leaf):
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
        n = tuple(bias.leaf.shape) if bias is not None and is_array_like(bias.leaf) else None
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
        if re.fullmatch(pattern, entry.module) or list_match(entry.module, [pattern]):
            return tuple(roles)
    return None
