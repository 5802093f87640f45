"""Kernel layouts, layer 2: the role of each axis of a kernel (``"stack"``, ``"in"``,
``"out"``; :class:`~jlora.KernelLayout`, :mod:`.kernel`), read off the tree
(:mod:`.from_tree`) or found from how the model uses each leaf (:mod:`.from_use`)."""

from .from_tree import LayoutSpec, infer_layout, user_layout
from .from_use import LeafUse, Use, find_kernel_uses
from .kernel import KernelLayout

__all__ = ["KernelLayout", "LayoutSpec", "infer_layout", "user_layout", "find_kernel_uses", "LeafUse", "Use"]
