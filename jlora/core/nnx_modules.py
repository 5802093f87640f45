"""NNX modules as trees: jlora's verbs on an ``nnx.Module`` run on its graph state and give
a module of the same class back. flax is imported only if the caller already did.

>>> from flax import nnx
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> is_nnx_module(m), type(map_module_state(lambda s: s, m)).__name__
(True, 'Linear')
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["is_nnx_module", "map_module_state"]


def is_nnx_module(x: Any) -> bool:
    """Whether ``x`` is an ``nnx.Module`` (False without importing flax.nnx)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Module)


def map_module_state(fn: Callable[[Any], Any], module: Any) -> Any:
    """``fn`` applied to an ``nnx.Module``'s state (``nnx.split``: each Variable once, even
    where several attributes share it), and the result merged back into a new module of
    the same class (``nnx.merge``); the module itself is unchanged."""
    nnx = sys.modules["flax.nnx"]
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, fn(state))
