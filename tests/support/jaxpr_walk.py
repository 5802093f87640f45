"""Walking a jaxpr and the jaxprs nested in it (scan, cond, remat, pjit, custom rules)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def all_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` (a ``Jaxpr``) and of every jaxpr nested in its params."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def primitive_names(jaxpr: Any) -> list[str]:
    """The primitive name of each equation of :func:`all_eqns`."""
    return [e.primitive.name for e in all_eqns(jaxpr)]
