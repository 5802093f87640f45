"""A quantized base inside ``jlora.lora(fn)``: lazy dequantization, recomputed in the backward.

``fn`` is traced with each :class:`~jlora.QuantizedArray` standing in as a plain kernel of
its shape in ``compute_dtype``. The interpreter of :mod:`jlora.transform` then carries a
:class:`QuantView` instead: the packed kernel plus the view operations ``fn`` applied to
it (``transpose``, ``convert_element_type``, ``reshape``, slices, ...), still packed.
Where the kernel is used, by ``dot_general``, ``conv_general_dilated`` or ``gather``::

    y = checkpoint(lambda q, x: x · views(dequantize(q)))(q, x)

so the dequantized kernel is a temporary of the forward pass and is recomputed, from the
packed codes, in the backward pass (``jax.checkpoint`` saves only its inputs): the
step's memory is the packed base plus activations, not a dequantized copy of every
kernel kept for the backward. Slices of the leading (stack) axes of a scanned or stacked
kernel (``scan`` over layers, ``W[i]`` in a loop) slice the packed arrays themselves.
Any other use dequantizes the kernel at that point (correct, only without the saving).

A 4-bit kernel larger than :data:`CHUNK_BYTES` dequantized is multiplied in chunks of
output columns under a ``lax.scan`` (:func:`column_chunked_product`), so one chunk at a time
exists, forward and backward. In a ``scan`` over layers the packed stack is not sliced by the
scan: the body's view holds the whole stack and the iteration index (:attr:`QuantView.layer`),
and each chunk is sliced from the stack where it is used.

The LoRA branch ``s·(x·A)·B`` is unchanged: a :class:`QuantView` is the ``W`` of a LoRA
value like any other kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .array import QuantizedArray, dense_for_compute, is_quantized, packed_transposed
from .codec import dequantize_4bit_transposed, undo_double_quant_transposed

__all__ = [
    "QuantView", "is_view", "as_value", "dense", "bind", "prepare_scanned", "scanned_view", "column_chunked_product",
    "CHUNK_BYTES",
]

Bind = Callable[[Any, dict, Sequence[Any]], Any]

# primitives that only rearrange, cast or slice a kernel: applied lazily, after dequantizing
_VIEW_OPS = frozenset({
    "transpose", "convert_element_type", "reshape", "squeeze", "broadcast_in_dim", "copy", "copy_p",
    "sharding_constraint", "reshard", "slice", "dynamic_slice", "rev", "reduce_precision",
})
# primitives that consume a kernel: dequantize + op under jax.checkpoint
_CONSUMERS = frozenset({"dot_general", "conv_general_dilated", "gather"})


@dataclasses.dataclass(eq=False, frozen=True)
class _Op:
    """One deferred view operation: ``primitive.bind(x, *dyn[start:start + n], **params)``."""

    primitive: Any
    params: dict
    n_dyn: int
    aval: jax.ShapeDtypeStruct  # the view's shape/dtype after this op


@dataclasses.dataclass(frozen=True)
class QuantView:
    """A quantized kernel ``q`` seen through deferred view operations ``ops`` (a pytree:
    children ``q`` and the ops' traced operands ``dyn``; ``ops`` static)."""

    q: QuantizedArray
    ops: tuple[_Op, ...] = ()
    dyn: tuple[Any, ...] = ()
    in_loop: bool = False  # sliced by a scan over its stack axis: the kernel of one iteration
    # A scan's iteration index: ``q`` is then the whole stack (the scan's operand, not sliced
    # by it) and the kernel is ``q[layer]``, sliced where it is used (:meth:`item`), so a
    # product in column chunks reads each chunk from the stack (no copy of the layer's codes).
    layer: Any = None

    def item(self) -> QuantizedArray:
        """The quantized kernel itself: ``q``, or ``q[layer]`` of a stack."""
        if self.layer is None:
            return self.q
        return jax.tree_util.tree_map(lambda c: jax.lax.dynamic_index_in_dim(c, self.layer, 0, keepdims=False), self.q)

    def resolved(self) -> "QuantView":
        """The same view with ``layer`` applied (``q`` the kernel itself)."""
        return self if self.layer is None else dataclasses.replace(self, q=self.item(), layer=None)

    @property
    def aval(self) -> jax.ShapeDtypeStruct:
        if self.ops:
            return self.ops[-1].aval
        shape = self.q.shape[1:] if self.layer is not None else self.q.shape
        return jax.ShapeDtypeStruct(shape, np.dtype(self.q.compute_dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def dtype(self):
        return self.aval.dtype


jax.tree_util.register_pytree_node(
    QuantView,
    lambda v: ((v.q, v.dyn, v.layer), (v.ops, v.in_loop)),
    lambda aux, children: QuantView(children[0], aux[0], tuple(children[1]), aux[1], children[2]),
)


def is_view(x: Any) -> bool:
    return isinstance(x, QuantView)


def as_value(x: Any) -> Any:
    """The interpreter's value for a kernel: a :class:`QuantView` for a (frozen) quantized
    kernel, ``x`` otherwise."""
    if is_quantized(x):
        return QuantView(jax.lax.stop_gradient(x))
    return x


def _raw_bind(primitive: Any, params: dict, invals: Sequence[Any]) -> Any:
    got = primitive.get_bind_params(params)
    subfuns, bind_params = (tuple(got[0]), got[1]) if isinstance(got, tuple) else ((), got)
    return primitive.bind(*subfuns, *invals, **bind_params)


def dense(x: Any, raw: Bind = _raw_bind) -> Any:
    """A view's values (dequantized to ``compute_dtype``, then its view ops applied);
    anything else unchanged."""
    if not is_view(x):
        return x
    out = dense_for_compute(x.item())
    i = 0
    for op in x.ops:
        out = raw(op.primitive, op.params, [out, *x.dyn[i:i + op.n_dyn]])
        i += op.n_dyn
    return out


def _abstract(v: Any) -> Any:
    if is_view(v):
        return v.aval
    t = jax.typeof(v)
    return jax.ShapeDtypeStruct(t.shape, t.dtype)


def _packed_slice(view: QuantView, primitive: Any, params: dict, rest: Sequence[Any]):
    """The view of ``op(view)`` as a slice of the packed arrays, where ``op`` only slices
    or drops leading stack axes of an un-viewed quantized kernel; else None."""
    view = view.resolved()
    if view.ops:
        return None
    q = view.q
    ns = len(q.stack_shape)
    if ns == 0:
        return None
    shape = q.shape
    name = primitive.name

    def apply(fn):  # fn on each packed array (QuantizedArray's children)
        return QuantView(jax.tree_util.tree_map(fn, q), in_loop=view.in_loop)

    if name == "slice":
        starts, limits = params["start_indices"], params["limit_indices"]
        strides = params.get("strides") or (1,) * len(shape)
        if any(starts[i] != 0 or limits[i] != shape[i] or strides[i] != 1 for i in range(ns, len(shape))):
            return None

        def cut(c):
            st = list(starts[:ns]) + [0] * (c.ndim - ns)
            lim = list(limits[:ns]) + list(c.shape[ns:])
            return jax.lax.slice(c, st, lim, list(strides[:ns]) + [1] * (c.ndim - ns))

        return apply(cut)
    if name == "dynamic_slice":
        sizes = params["slice_sizes"]
        if len(rest) != len(shape) or any(sizes[i] != shape[i] for i in range(ns, len(shape))):
            return None
        dtype = jnp.asarray(rest[0]).dtype

        def dcut(c):
            st = [jnp.asarray(s).astype(dtype) for s in rest[:ns]] + [jnp.zeros((), dtype)] * (c.ndim - ns)
            return jax.lax.dynamic_slice(c, st, list(sizes[:ns]) + list(c.shape[ns:]))

        return apply(dcut)
    if name in ("squeeze", "reshape"):
        if name == "squeeze":
            dims = sorted(d % len(shape) for d in params["dimensions"])
        else:
            if params.get("dimensions") is not None:
                return None
            new = tuple(params["new_sizes"])
            k = len(shape) - len(new)
            if k <= 0 or new != shape[k:] or any(s != 1 for s in shape[:k]):
                return None
            dims = list(range(k))
        if not dims or any(d >= ns or shape[d] != 1 for d in dims):
            return None
        return apply(lambda c: jnp.squeeze(c, axis=tuple(dims)))
    return None


def _lazy(primitive: Any, params: dict, invals: Sequence[Any]) -> QuantView:
    view, rest = invals[0], list(invals[1:])
    sliced = _packed_slice(view, primitive, params, rest)
    if sliced is not None:
        return sliced
    out_aval = jax.eval_shape(lambda x, *r: _raw_bind(primitive, params, [x, *r]), view.aval,
                              *[_abstract(r) for r in rest])
    op = _Op(primitive, dict(params), len(rest), jax.ShapeDtypeStruct(out_aval.shape, out_aval.dtype))
    return QuantView(view.q, view.ops + (op,), view.dyn + tuple(rest), view.in_loop, view.layer)


def _is_float_cast(primitive: Any, params: dict) -> bool:
    """Not a cast, or a cast to a float dtype (a cast to an integer type is not a view)."""
    if primitive.name != "convert_element_type":
        return True
    new = params.get("new_dtype")
    return new is not None and jnp.issubdtype(new, jnp.floating)


def bind(primitive: Any, params: dict, invals: Sequence[Any], raw: Bind = _raw_bind) -> Any:
    """``primitive.bind`` where some operands are :class:`QuantView`:

    * a view operation on the kernel (first operand) gives a new view, still packed;
    * ``dot_general`` / ``conv_general_dilated`` / ``gather`` dequantize and apply the op
      inside ``jax.checkpoint``, so only the packed kernel is kept for the backward;
    * anything else dequantizes the kernel there.
    """
    name = primitive.name
    first = invals[0] if invals else None
    if (
        name in _VIEW_OPS and is_view(first) and not any(is_view(x) for x in invals[1:])
        and _is_float_cast(primitive, params)
    ):
        return _lazy(primitive, params, invals)
    if name in _CONSUMERS:
        idx = [i for i, x in enumerate(invals) if is_view(x)]
        views = [invals[i] for i in idx]
        others = [x for i, x in enumerate(invals) if i not in idx]

        pin = any(v.in_loop for v in views)

        def product(views, others):
            if pin:
                # in a scanned layer the dequantization waits for the activations it meets:
                # else XLA:TPU may dequantize every kernel of the layer at the top of the body
                # (Llama-3-8B NF4 QLoRA on v5e: est 1.22 -> 1.07 s, 7.74 -> 7.64 GiB). Not
                # outside loops, where it stops XLA overlapping the next kernel's dequantization
                # (a 4-layer QLoRA step on v5p:2x2x2: 11.5 -> 13.0 ms). A view of a whole
                # stack (``layer`` set) is pinned by its index.
                keys = [v if v.layer is None else v.layer for v in views]
                keys, others = jax.lax.optimization_barrier((keys, others))
                views = [k if v.layer is None else dataclasses.replace(v, layer=k) for v, k in zip(views, keys)]
            if name == "dot_general" and idx == [1]:
                y = column_chunked_product(views[0], others[0], params, raw)
                if y is not None:
                    return y
            vals, vi, oi = [], iter(views), iter(others)
            for i in range(len(invals)):
                vals.append(dense(next(vi), raw) if i in idx else next(oi))
            return raw(primitive, params, vals)

        return jax.checkpoint(product)(views, others)
    return raw(primitive, params, [dense(x, raw) for x in invals])


#: A 4-bit kernel whose dequantized values (in its compute dtype) exceed this many bytes is
#: multiplied in column chunks of at most this size (:func:`column_chunked_product`).
CHUNK_BYTES = 32 * 2**20


def _column_chunk(n_in: int, n_out: int, itemsize: int, limit: int) -> Optional[int]:
    """The widest chunk of output columns, a multiple of 128 (the TPU's lanes) dividing
    ``n_out``, whose ``(n_in, width)`` dequantized slice fits ``limit`` bytes; None where the
    whole kernel fits, or no such width exists."""
    if n_in * n_out * itemsize <= limit:
        return None
    widths = [w for w in range(128, n_out, 128) if n_out % w == 0 and n_in * w * itemsize <= limit]
    return max(widths) if widths else None


def column_chunked_product(view: QuantView, x: Any, params: dict, raw: Bind = _raw_bind,
                           limit: Optional[int] = None) -> Optional[jax.Array]:
    """``x · W`` for a large 4-bit kernel ``W (n_in, n_out)``, dequantized and multiplied
    one chunk of columns at a time, or None where this does not apply::

        y[..., c] = x · dequantize(codes[:, c], scales[:, c])    for each chunk c

    under ``lax.scan`` with the body in ``jax.checkpoint``: at most one dequantized chunk
    exists at a time, forward or backward (the backward pass re-dequantizes each chunk for
    ``x̄ += ȳ[..., c] · W[:, c]ᵀ``). Each output column is the same dot product as in the
    whole product; double quantization is undone once for all the block scales
    (``(n_in/block, n_out)`` float32, 1/16 of the bf16 kernel). Applies to one layer's
    kernel (no stack axes left) stored transposed (``codes (n_in/2, n_out)``), seen as
    ``(n_in, n_out)`` (no view ops, or a reshape to that), contracted over ``n_in`` with
    the last axis of ``x``, no batch axes. Why: XLA:TPU keeps the dequantized kernels of a
    layer's backward pass alive together (Llama-3-70B: 448 MiB each for gate, up, down).

    >>> # inside jlora.lora: y = column_chunked_product(view, x, dot_general_params)
    """
    q = view.q
    stacked = view.layer is not None
    limit = CHUNK_BYTES if limit is None else limit
    if q.quant_type not in ("nf4", "fp4") or len(q.stack_shape) != int(stacked) or q.codes is None:
        return None
    if not packed_transposed(q.item_shape, q.roles, q.quant_type, q.block_size):
        return None
    roles = list(q.roles)
    if roles != sorted(roles, key=lambda r: r != "in"):  # every input axis before every output axis
        return None
    n_in = int(np.prod([d for d, r in zip(q.item_shape, roles) if r == "in"]))
    n_out = int(np.prod([d for d, r in zip(q.item_shape, roles) if r == "out"]))
    if any(op.primitive.name != "reshape" for op in view.ops) or view.shape != (n_in, n_out):
        return None
    (xc, wc), (xb, wb) = params["dimension_numbers"]
    xd = jnp.ndim(x)
    if tuple(wc) != (0,) or tuple(xc) != (xd - 1,) or xb or wb:
        return None
    cdt = np.dtype(q.compute_dtype)
    width = _column_chunk(n_in, n_out, cdt.itemsize, limit)
    if width is None:
        return None
    item = view.item()
    scales = item.absmax.astype(jnp.float32)
    if q.double_quant:
        scales = undo_double_quant_transposed(item.absmax, item.nested_absmax, item.offset)
    codes = q.codes  # the whole stack where ``view.layer`` is set: each chunk is sliced from it

    lead = (view.layer.astype(jnp.int32),) if stacked else ()
    rows = codes.shape[-2]

    def body(y, c):
        start = c * width
        chunk = jax.lax.dynamic_slice(codes, lead + (jnp.zeros((), jnp.int32), start),
                                      (1,) * len(lead) + (rows, width)).reshape(rows, width)
        w = dequantize_4bit_transposed(
            chunk, jax.lax.dynamic_slice_in_dim(scales, start, width, axis=1),
            q.block_size, q.quant_type, q.dtype, cdt,
        )
        return jax.lax.dynamic_update_slice_in_dim(y, raw(jax.lax.dot_general_p, params, [x, w]), start, -1), None

    out = jax.typeof(jax.eval_shape(lambda x, w: raw(jax.lax.dot_general_p, params, [x, w]), x,
                                    jax.ShapeDtypeStruct((n_in, n_out), cdt)))
    init = jnp.zeros(out.shape, out.dtype, out_sharding=out.sharding)  # the product's (Explicit mesh axes too)
    y, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), init, jnp.arange(n_out // width, dtype=jnp.int32))
    return y


def prepare_scanned(x: Any) -> Any:
    """A view that a ``scan`` slices along its leading axis: fine as it is when that axis
    is a stack axis of the packed arrays (no view ops yet); dequantized otherwise."""
    if not is_view(x):
        return x
    x = x.resolved()
    if x.ops or not x.q.stack_shape:
        return dense(x)
    return dataclasses.replace(x, in_loop=True)


def scanned_view(stack: QuantView, index: Any) -> QuantView:
    """The kernel of iteration ``index`` of a scan over ``stack``'s leading axis (a view
    from :func:`prepare_scanned`), without slicing the packed arrays yet
    (:attr:`QuantView.layer`)."""
    return QuantView(stack.q, in_loop=True, layer=index)
