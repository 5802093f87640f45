"""Which example each row of an array came from: the row map that a mixed batch
(``adapter_ids``) needs where a kernel's input is not laid out by example.

``lora(fn)(lp, x, adapter_ids=ids)`` applies adapter ``ids[e]`` to example ``e``, read along
axis 0 of each targeted layer's input. A mixture of experts breaks that: the input of an
expert kernel used by ``ragged_dot`` is a ``(tokens · k, d)`` array of token copies *sorted
by expert*, whose rows belong to examples in an order computed at run time. This module
finds that order from the jaxpr being interpreted: it walks back from the input of the
product through the operations that produced it, to a value whose axis 0 is the example
axis, composing a map ``row → example`` on the way:

* a row gather ``x[idx]`` (``x[order // k]``, ``jnp.take(x, idx, axis=0)``):
  ``rows(out) = rows(x)[idx]``, with ``idx`` the value the interpreter computed;
* a reshape that merges or splits the leading axes (``(B, S, d) → (B·S, d)``, the
  ``jnp.repeat`` of the top-k copies): row ``i`` of the output starts at element
  ``i·m`` of the input's flattened leading block, i.e. input row ``i·m // n``;
* a static slice of axis 0; ``broadcast_in_dim``, ``transpose``, ``squeeze`` and casts that
  keep axis 0 where it is; elementwise operations (any operand of the output's shape);
  products ``x·W`` and ``ragged_dot(x, W)`` whose output keeps axis 0 of ``x`` (an expert's
  gate projection feeding its down projection);
* the lookup ``table[ids]`` of an embedding: the rows of the output are those of ``ids``;
* the body of a ``jit`` (``jnp.take`` is one): the walk enters it, and leaves a body
  through its parameters to the caller.

The walk succeeds where it reaches an argument of ``fn`` or an input of a ``scan`` /
``remat`` / ``cond`` / ``while`` body (a layer's hidden state) whose axis 0 has one entry
per example; anything else (a sort, a scatter, a reduction along axis 0, a dense dispatch
einsum) ends it, and the caller raises an error naming the operation.

Frames: while a mixed batch is interpreted, every jaxpr the interpreter evaluates is a
:class:`Frame` (its variables' values, and the ``jit`` equation that called it), so the
walk can read the index arrays it needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from ..core import jaxprs
from ..core.jaxprs import reshape_blocks

__all__ = ["Frame", "RowsNotFound", "example_rows"]

# Elementwise primitives: the output's rows are those of any operand of the output's shape.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "rsqrt", "sqrt", "cbrt", "integer_pow", "pow", "abs", "sign", "erf", "erf_inv", "select_n", "square", "sin",
    "cos", "tan", "clamp", "and", "or", "not", "xor", "round", "floor", "ceil", "reduce_precision", "nextafter",
    "rem", "atan2", "is_finite", "convert_element_type", "copy", "copy_p", "sharding_constraint", "reshard",
    "stop_gradient", "optimization_barrier",
})


_MAX_DEPTH = 300  # steps of one walk (each two Python frames; earlier walks' results are cached)


class RowsNotFound(ValueError):
    """The rows of a value could not be traced back to the examples (``where`` says where the walk stopped)."""


@dataclasses.dataclass(eq=False)
class Frame:
    """One jaxpr under evaluation: its environment (variable → value, filled as the
    interpreter goes), the ``jit``-like equation that called it (``None`` for ``fn`` itself
    and for the bodies of ``scan``, ``remat``, ``cond`` and ``while``), the calling frame,
    and the frames of the ``jit`` bodies evaluated in it (by equation)."""

    jaxpr: Any
    env: dict
    caller: Any = None
    parent: Optional["Frame"] = None
    children: dict = dataclasses.field(default_factory=dict)
    _producers: Optional[dict] = None
    _cache: dict = dataclasses.field(default_factory=dict)

    def producer(self, var: Any) -> Optional[tuple[Any, int]]:
        """``(equation, output index)`` that defines ``var`` in this jaxpr, or None."""
        if self._producers is None:
            self._producers = {}
            for eqn in self.jaxpr.eqns:
                for j, v in enumerate(eqn.outvars):
                    if not isinstance(v, jex.core.DropVar):
                        self._producers[v] = (eqn, j)
        return self._producers.get(var)


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex.core.Literal)


def _reshape_rows(old: tuple[int, ...], new: tuple[int, ...]):
    """``rows_in → rows_out`` for a reshape, where the leading axis stays in one block."""
    blocks = reshape_blocks(old, new)
    if blocks is None:
        return None
    for oi, nj in blocks:
        if 0 in nj:
            if not oi or oi[0] != 0:
                return None
            inner_old = int(np.prod([old[i] for i in oi[1:]], dtype=np.int64))
            inner_new = int(np.prod([new[j] for j in nj[1:]], dtype=np.int64))
            n_out = new[0]
            return lambda rows: rows[(jnp.arange(n_out) * inner_new) // inner_old]
    return None


def _row_gather(eqn: Any) -> bool:
    """Whether ``eqn`` is ``operand[idx]`` along axis 0 with ``idx`` of shape ``(n, 1)``."""
    dn = eqn.params["dimension_numbers"]
    shape = _shape(eqn.invars[0])
    idx_shape = _shape(eqn.invars[1])
    return (
        len(idx_shape) == 2 and idx_shape[1] == 1 and tuple(dn.start_index_map) == (0,)
        and tuple(dn.collapsed_slice_dims) == (0,) and not dn.operand_batching_dims
        and tuple(dn.offset_dims) == tuple(range(1, len(shape)))
        and tuple(eqn.params["slice_sizes"]) == (1,) + shape[1:]
    )


def _leading_batch_gather(eqn: Any) -> bool:
    """Whether axis 0 of the gather's output is axis 0 of its indices (a lookup ``table[ids]``)."""
    dn = eqn.params["dimension_numbers"]
    return 0 not in dn.offset_dims and len(_shape(eqn.invars[1])) >= 2 and not dn.operand_batching_dims


def _keeps_lhs_rows(eqn: Any) -> bool:
    """Whether axis 0 of a (ragged) dot's output is axis 0 of its left operand: its first batch
    dimension, or, without batch dimensions, its first kept one (``x·W``, ``ragged_dot(x, W)``)."""
    dn = eqn.params.get("dimension_numbers")
    if dn is None:
        ragged = eqn.params["ragged_dot_dimension_numbers"]
        if not ragged.rhs_group_dimensions:
            return False  # a ragged contraction or batch: the output leads with the groups
        dn = ragged.dot_dimension_numbers  # rows of x meet the kernel of their group
    (lc, _), (lb, _) = dn
    if lb:
        return lb[0] == 0
    return 0 not in lc


class _Walk:
    def __init__(self, n: int):
        self.n = n
        self.stopped: list[str] = []

    def rows(self, frame: Frame, var: Any, depth: int = 0):
        """The example index of each row of ``var`` (an int array), or None."""
        key = (id(var), self.n)
        if key in frame._cache:
            return frame._cache[key]
        out = self._rows(frame, var, depth)
        frame._cache[key] = out
        return out

    def _stop(self, what: str) -> None:
        self.stopped.append(what)

    def _rows(self, frame: Frame, var: Any, depth: int):
        if depth > _MAX_DEPTH:
            self._stop(f"a chain of more than {_MAX_DEPTH} operations")
            return None
        shape = _shape(var)
        if not shape:
            return None
        hit = frame.producer(var)
        if hit is None:
            if frame.caller is not None and frame.parent is not None and var in frame.jaxpr.invars:
                outer = frame.caller.invars[frame.jaxpr.invars.index(var)]
                return self.rows(frame.parent, outer, depth + 1) if _is_var(outer) else None
            if shape[0] == self.n:
                return jnp.arange(self.n)
            self._stop(f"an input of shape {shape} (axis 0 is not the {self.n} examples)")
            return None
        eqn, j = hit
        name = eqn.primitive.name
        nested = jaxprs.nested(eqn)
        if nested is not None and nested.kind == jaxprs.CALL and id(eqn) in frame.children:
            child = frame.children[id(eqn)]
            inner = child.jaxpr.outvars[j]
            return self.rows(child, inner, depth + 1) if _is_var(inner) else None
        operand = eqn.invars[0] if eqn.invars else None
        if name in _ELEMENTWISE:
            for v in eqn.invars:
                if _is_var(v) and _shape(v) == shape:
                    got = self.rows(frame, v, depth + 1)
                    if got is not None:
                        return got
            return None
        if name == "reshape" and eqn.params.get("dimensions") is None:
            f = _reshape_rows(_shape(operand), shape)
            got = self.rows(frame, operand, depth + 1) if f is not None else None
            return None if got is None else f(got)
        if name == "broadcast_in_dim":
            bd = tuple(eqn.params["broadcast_dimensions"])
            if bd and bd[0] == 0 and _shape(operand)[0] == shape[0]:
                return self.rows(frame, operand, depth + 1)
        if name == "transpose" and eqn.params["permutation"][0] == 0:
            return self.rows(frame, operand, depth + 1)
        if name == "squeeze" and 0 not in {d % len(_shape(operand)) for d in eqn.params["dimensions"]}:
            return self.rows(frame, operand, depth + 1)
        if name == "slice":
            strides = eqn.params.get("strides") or (1,) * len(shape)
            got = self.rows(frame, operand, depth + 1)
            if got is not None:
                p = eqn.params
                return got[p["start_indices"][0]:p["limit_indices"][0]:strides[0]]
            return None
        if name in ("dot_general", "ragged_dot_general") and _keeps_lhs_rows(eqn):
            return self.rows(frame, operand, depth + 1)
        if name == "gather":
            if _row_gather(eqn) and eqn.invars[1] in frame.env:
                got = self.rows(frame, operand, depth + 1)
                if got is not None:
                    idx = jnp.clip(jnp.asarray(frame.env[eqn.invars[1]])[:, 0], 0, _shape(operand)[0] - 1)
                    return got[idx]
            if _leading_batch_gather(eqn) and _is_var(eqn.invars[1]):
                return self.rows(frame, eqn.invars[1], depth + 1)
            return None
        self._stop(f"{name} ({jaxprs.where(eqn)})")
        return None


def example_rows(frame: Frame, var: Any, n: int) -> jax.Array:
    """The example (``0 .. n-1``) each row of ``var`` (axis 0) belongs to, traced back through
    the operations that produced it (see the module docstring); ``RowsNotFound`` otherwise.

    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda h, idx: h.reshape(6, 2)[idx])(jnp.ones((2, 3, 2)), jnp.arange(6))
    >>> env = dict(zip(closed.jaxpr.invars, [jnp.ones((2, 3, 2)), jnp.array([5, 0, 4, 1, 3, 2])]))
    >>> for eqn in closed.jaxpr.eqns:  # what the interpreter does as it goes
    ...     ins = [v.val if isinstance(v, jax.extend.core.Literal) else env[v] for v in eqn.invars]
    ...     outs = eqn.primitive.bind(*ins, **eqn.params)
    ...     env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
    >>> example_rows(Frame(closed.jaxpr, env), closed.jaxpr.outvars[0], 2).tolist()
    [1, 0, 1, 0, 1, 0]
    """
    walk = _Walk(int(n))
    rows = walk.rows(frame, var)
    if rows is None:
        where = walk.stopped[-1] if walk.stopped else "an operation that moves rows"
        raise RowsNotFound(
            f"the rows of this input could not be traced back to the {n} examples of adapter_ids (the walk "
            f"stopped at {where}); supported: rows taken from the examples' tokens by reshapes, row gathers "
            "(x[order], jnp.take), repeats, slices and elementwise operations"
        )
    return rows
