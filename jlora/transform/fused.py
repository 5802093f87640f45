"""The LoRA product ``x·W + s·(x·A)·B`` with fewer passes over activations under
differentiation on TPU.

:func:`lora_product` wraps the product that :func:`jlora.lora` emits (``plain``: the
model's own ``x·W``, the branch ``(s·(x·A))·B``, one rounding) in a ``jax.custom_jvp``.
Evaluated, it is ``plain`` on every backend. Differentiated (a train step), its JVP rule
is ``plain``'s own JVP everywhere except on TPU, where the products are arranged so that
XLA never materialises an activation-sized intermediate of the branch. All products keep
the model's own operands and dimension numbers (the model's layouts around them stay as
XLA lays them out without LoRA); ``W`` is extended by the factors along one axis:

* forward, where ``x`` is contracted over one axis: ``t = s·(x·A)`` (``tokens x r``),
  then **one** product over that axis extended by ``r``: ``y = [x | t]·[W ; B]``,
  accumulated in float32 and rounded once. The branch lands in the output, which is
  written once, as without LoRA;
* forward, where ``x`` is contracted over several axes (an attention output projection
  over heads x head size) and ``W`` has one output axis, or where the output is narrower
  than the input (an MLP's down-projection) and ``W`` is on a mesh of several devices:
  ``[x·W | x·A] = x·[W | A]`` in one pass over ``x``, whose producer (the attention,
  ``silu(g)·u``) then stays fused into it as without LoRA; then ``y = x·W + t·B`` in the
  output pass. On one device the down-projection takes ``[W ; B]``: appending ``A``
  along ``W``'s output axis, the minor axis of its layout, made XLA:TPU copy ``W`` into
  the transposed layout. On a mesh FSDP shards ``W``'s larger axis, the contracted one
  here: appending ``B`` along it made XLA's partitioner gather the activations instead
  (``_on_several_devices`` reads the mesh from the traced value's type);
* tangent (whose transpose is the backward pass): ``ṫ = s·(ẋ·A + x·Ȧ)``,
  ``ẏ = ẋ·W + ṫ·B + t·Ḃ``, with ``[ẋ·W | ẋ·A] = ẋ·[W | A]`` as one product where ``W``
  has one output axis no wider than the input, and ``ẋ·W + ṫ·B = [ẋ | ṫ]·[W ; B]`` where
  the output is wider than the input. Transposed, ``ȳ`` gives ``g = s·ȳ·Bᵀ``,
  ``B̄ = tᵀ·ȳ``, ``Ā = xᵀ·g`` and ``x̄ = [ȳ | g]·[W | A]ᵀ`` in one product (a narrower
  ``ȳ``: XLA copies it with ``g`` appended), or ``[ȳ·Wᵀ | ȳ·Bᵀ] = ȳ·[W ; B]ᵀ`` in one
  pass over a wider ``ȳ`` and ``x̄ = ȳ·Wᵀ + g·Aᵀ`` (else ``ȳ·Wᵀ`` and ``ȳ·Bᵀ`` in two).

Measured with XLA's TPU compiler (``benchmarks/tpu_aot.py``): written as two separate
products XLA:TPU materialises ``(x·A)·B`` or ``x·W`` in float32, reads it back to add
the other, and adds the branch's ``g·Aᵀ`` to ``x̄`` in another pass; this form removes
those passes. On TPU the concatenated operands are in the model's dtype: a float32 ``A``,
``B`` or ``t`` meets a bfloat16 ``x`` as bfloat16, which is what XLA:TPU does with a
float32 product at the default precision anyway. On CPU and GPU nothing changes: the
rule is ``jax.jvp`` of ``plain``, the same program as before.

``W`` is frozen (``jlora.lora`` stops its gradient): its tangent is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["ProductLayout", "lora_product", "FUSED_PLATFORMS"]

#: The platforms whose JVP rule is the fused one (tests add "cpu" to check its numbers).
FUSED_PLATFORMS = ("tpu",)


@dataclasses.dataclass(frozen=True)
class ProductLayout:
    """How ``x·W`` contracts (the model's ``dot_general``, ``x`` on the left) and where the
    factors' axes sit in it.

    ``dims``: the model's dimension numbers ``((xc, wc), (xb, wb))``. ``a_contract`` /
    ``a_batch``: the axes of ``A`` that pair with ``xc`` / ``xb`` (``A``'s last axis is
    ``r``). ``b_batch``: the axes of ``B`` that pair with ``xb``; ``b_rank`` its rank
    axis. ``u_perm``: the transpose taking ``t·B`` (batch, x's free axes, B's output axes
    in B's order) to the model's output order, or None. ``b_as_w``: the transpose of ``B``
    into ``W``'s axis order with ``r`` at ``W``'s one contracted axis (None where ``W`` is
    contracted over several axes); ``a_as_w``: ``A`` into ``W``'s order with ``r`` at its
    one output axis (None where ``W`` has several)."""

    dims: tuple
    a_contract: tuple
    a_batch: tuple
    b_batch: tuple
    b_rank: int
    u_perm: Optional[tuple]
    b_as_w: Optional[tuple]
    a_as_w: Optional[tuple]
    n_in: int
    n_out: int

    @property
    def w_contract(self) -> int:
        return self.dims[0][1][0]

    @property
    def w_free(self) -> Optional[int]:
        if self.a_as_w is None:
            return None
        (xc, wc), (xb, wb) = self.dims
        return next(i for i in range(len(self.a_as_w)) if i not in wc and i not in wb)


def _on_several_devices(v: jax.Array) -> bool:
    """Whether ``v`` (a traced value) lives on a mesh of more than one device: its type's
    sharding (set by ``jit``'s input shardings) or the mesh in context (``jax.set_mesh``)."""
    sharding = getattr(jax.typeof(v), "sharding", None)
    sizes = [getattr(getattr(sharding, "mesh", None), "size", 0), jax.sharding.get_abstract_mesh().size]
    return max(sizes) > 1


def _is_zero(t: Any) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def lora_product(plain: Callable[..., jax.Array], x: jax.Array, w: jax.Array, a_list: Sequence[jax.Array],
                 b_list: Sequence[jax.Array], scales: Sequence[float], layout: ProductLayout, *, out_dtype: Any,
                 acc_dtype: Any, precision: Any, fused_platforms: Optional[Sequence[str]] = None) -> jax.Array:
    """``plain(x, w, a_list, b_list)`` (``x·W + Σ sᵢ·(x·Aᵢ)·Bᵢ`` as jlora computes it), with
    the TPU-only JVP rule described in the module docstring. ``layout`` says how the
    model contracts ``x`` with ``W`` and where the factors' axes are
    (:class:`ProductLayout`). ``fused_platforms``: where that rule is used (tests pass
    ``("cpu",)`` to check its numbers on this machine; default :data:`FUSED_PLATFORMS`).

    >>> # inside jlora.lora's interpreter: y = lora_product(plain, x, w, [a], [b], [s], layout, ...)
    """
    a_list, b_list = tuple(a_list), tuple(b_list)
    (xc, wc), (xb, wb) = layout.dims
    nb = len(xb)

    def dot(lhs, rhs, dims):
        return jax.lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=acc_dtype)

    def times_a(v, a):  # v·A: (batch..., v's free axes..., r)
        return dot(v, a.astype(v.dtype), ((xc, layout.a_contract), (xb, layout.a_batch)))

    def times_b(t, b):  # t·B in the model's output order
        u = dot(t, b.astype(w.dtype), (((t.ndim - 1,), (layout.b_rank,)), (tuple(range(nb)), layout.b_batch)))
        return u if layout.u_perm is None else jnp.transpose(u, layout.u_perm)

    def times_w(v, w):  # the model's own product
        return dot(v, w, layout.dims)

    @jax.custom_jvp
    def product(x, w, a_list, b_list):
        return plain(x, w, a_list, b_list)

    def with_a(w, a_list):  # [W | A]: A's rank axis appended to W's one output axis
        return jnp.concatenate([w, *(jnp.transpose(a, layout.a_as_w).astype(w.dtype) for a in a_list)],
                               axis=layout.w_free)

    def with_b(w, b_list):  # [W ; B]: B's rank axis appended to W's one contracted axis
        return jnp.concatenate([w, *(jnp.transpose(b, layout.b_as_w).astype(w.dtype) for b in b_list)],
                               axis=layout.w_contract)

    def tpu_rule(primals, tangents):
        x, w, a_list, b_list = primals
        dx, da_list, db_list = tangents
        cx = x.dtype
        ranks = [a.shape[-1] for a in a_list]
        n_free = w.shape[layout.w_free] if layout.a_as_w is not None else None
        # [W | A] where [W ; B] is not possible, or where the output is narrower than the input
        # and W is on several devices (FSDP shards the larger axis, here the contracted one:
        # appending B along it made XLA's partitioner gather the activations instead of W)
        if layout.b_as_w is None or (layout.a_as_w is not None and layout.n_out < layout.n_in
                                     and _on_several_devices(w)):
            # [x·W | x·A] = x·[W | A]: one pass over x; then y = x·W + t·B
            z = times_w(x, with_a(w, a_list))
            ts, off = [], n_free
            for r, s in zip(ranks, scales):
                # t on its own (tokens x r): else XLA keeps all of z, float32, for the backward's tᵀ·ȳ
                ts.append(jax.lax.optimization_barrier((z[..., off:off + r] * jnp.asarray(s, acc_dtype)).astype(cx)))
                off += r
            y = z[..., :n_free]  # W's one output axis is z's last
            for t, b in zip(ts, b_list):
                y = y + times_b(t, b)
        else:
            # t = s·(x·A); y = [x | t]·[W ; B]: accumulated once, rounded once
            ts = [(times_a(x, a) * jnp.asarray(s, acc_dtype)).astype(cx) for a, s in zip(a_list, scales)]
            wb = with_b(w, b_list)
            y = times_w(jnp.concatenate([x, *ts], axis=xc[0]), wb)
        y = y.astype(out_dtype)
        # tangent: ẏ = ẋ·W + ṫ·B + t·Ḃ, ṫ = s·(ẋ·A + x·Ȧ)
        terms, dts = [], [None] * len(a_list)
        # where the output is wider than the input (the forward took [W ; B]): ẋ·W + ṫ·B =
        # [ẋ | ṫ]·[W ; B]; transposed, [x̄ | t̄] = ȳ·[W ; B]ᵀ reads the wider ȳ once (else once
        # for x̄, once for t̄)
        tangent_wb = dx is not None and layout.b_as_w is not None and layout.n_out > layout.n_in
        if dx is not None and layout.a_as_w is not None and layout.n_out <= layout.n_in:
            # [ẋ·W | ẋ·A] = ẋ·[W | A]: transposed, x̄ = [ȳ | g]·[W | A]ᵀ in one product (XLA
            # materialises [ȳ | g]: a copy of ȳ, no wider than x̄). [W | A] is formed inside a
            # checkpoint, so the backward pass rebuilds it instead of keeping a copy of W.
            u = jax.checkpoint(lambda dx, w, a_list: times_w(dx, with_a(w, a_list)))(dx, w, a_list)
            terms.append(u[..., :n_free])
            off = n_free
            for i, r in enumerate(ranks):
                dts[i] = u[..., off:off + r]
                off += r
        elif dx is not None:
            if not tangent_wb:
                terms.append(times_w(dx, w))
            dts = [times_a(dx, a) for a in a_list]
        for i, da in enumerate(da_list):
            if da is not None:
                part = times_a(x, da)
                dts[i] = part if dts[i] is None else dts[i] + part
        dts = [None if d is None else (d * jnp.asarray(s, acc_dtype)).astype(cx) for d, s in zip(dts, scales)]
        if tangent_wb:
            # the forward's own [W ; B] (XLA forms it again, fused, in the backward pass; rebuilt
            # under a checkpoint the step was slower by XLA's TPU compiler's estimate, same peak)
            terms.append(times_w(jnp.concatenate([dx, *dts], axis=xc[0]), wb))
        else:
            terms += [times_b(d, b) for d, b in zip(dts, b_list) if d is not None]
        terms += [times_b(t, db) for t, db in zip(ts, db_list) if db is not None]
        dy = sum(terms[1:], terms[0]) if terms else jnp.zeros(y.shape, acc_dtype)
        return y, dy.astype(out_dtype)

    def default_rule(primals, tangents):
        x, w, a_list, b_list = primals
        dx, da_list, db_list = tangents
        # jax.jvp of plain over the inputs with a tangent (W frozen)
        args = [x, *a_list, *b_list]
        tans = [dx, *da_list, *db_list]
        live = [i for i, t in enumerate(tans) if t is not None]
        n_a = len(a_list)

        def f(*vals):
            full = list(args)
            for i, v in zip(live, vals):
                full[i] = v
            return plain(full[0], w, tuple(full[1:1 + n_a]), tuple(full[1 + n_a:]))

        if not live:
            y = plain(x, w, a_list, b_list)
            return y, jnp.zeros_like(y)
        return jax.jvp(f, [args[i] for i in live], [tans[i] for i in live])

    def rule(primals, tangents):
        dx, _, da_list, db_list = tangents
        norm = lambda t: None if _is_zero(t) else t  # noqa: E731
        tans = (norm(dx), tuple(norm(t) for t in da_list), tuple(norm(t) for t in db_list))
        rules = {p: tpu_rule for p in (FUSED_PLATFORMS if fused_platforms is None else fused_platforms)}
        return jax.lax.platform_dependent(primals, tans, default=default_rule, **rules)

    product.defjvp(rule, symbolic_zeros=True)
    return product(x, w, a_list, b_list)
