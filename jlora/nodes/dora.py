"""DoRA (weight-decomposed low-rank adaptation) as PEFT 0.21.2 computes it, factored.

A DoRA adapter adds a trainable magnitude ``m`` (one value per output feature) to a LoRA
pair. With ``ΔW = A·B`` (jlora's canonical factors), ``s`` the LoRA scale and the norm
taken over the *input* axes of the kernel (one value per output feature and layer)::

    n = ‖W + s·ΔW‖                    (treated as a constant: stop_gradient, as PEFT)
    k = m / n
    y = x·W + (k − 1)⊙(x̃·W) + k⊙s·(x̃·A)·B     x̃ = dropout(x)
      = k⊙(x·W + s·(x·A)·B)                   without dropout (x̃ = x)

and the merged kernel is ``W' = k⊙(W + s·ΔW)``. At creation ``m = n`` (so ``k = 1``):
DoRA equals LoRA with the same A and B.

The norm is computed without forming ``W + s·ΔW`` or any other kernel-shaped array::

    n² = ‖W‖² + 2s·Σ_r (AᵀW)[r]⊙B[r] + s²·Σ_r ((AᵀA)·B)[r]⊙B[r]

from ``‖W‖²`` per output (a reduction of the frozen kernel), the small product ``AᵀW``
(``r × d_out``) and the Gram matrix ``AᵀA`` (``r × r``), all in float32 whatever the
base dtype. Kernels of any layout work: the norm runs over the ``"in"`` axes (a Conv's
window and input channels, an embedding table's vocabulary axis), with one value per
``"stack"`` and ``"out"`` index.

Shapes: ``m`` and ``n`` are ``(*stack, *out)``. PEFT's file stores ``(out,)`` for Linear
and Embedding (``(d,)``) and ``(1, out, 1, …)`` for convolutions (``jlora.io.peft``).

Several DoRA adapters on one kernel compose in order, as PEFT's forward and merge do
(each ``kᵢ`` from ``‖W + sᵢ·ΔWᵢ‖``, the base without the other adapters)::

    W_eff = k_n⊙(… k₂⊙(k₁⊙(W + s₁ΔW₁) + s₂ΔW₂) … + s_nΔW_n)

(a plain LoRA adapter in the chain has ``k = 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ..layouts.kernel import KernelLayout
from ..quant.array import is_quantized
from .factors import delta

__all__ = ["weight_norm", "magnitude_scale", "scale_to_kernel", "merge_kernel", "unmerge_kernel", "chain_kernel",
           "grouped_peft_delta"]

_HI = jax.lax.Precision.HIGHEST


def _dense(w: Any) -> Any:
    """A quantized base (``jlora.QuantizedArray``) dequantized (PEFT's QDoRA dequantizes
    too); any other kernel as it is."""
    return w.dequantize() if is_quantized(w) else w


def _axes(layout: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    roles = tuple(layout)
    pick = lambda role: tuple(i for i, r in enumerate(roles) if r == role)  # noqa: E731
    return pick("stack"), pick("in"), pick("out")


def grouped_peft_delta(a: jax.Array, b: jax.Array, layout: Sequence[str], groups: int) -> jax.Array:
    """What PEFT 0.21.2's DoRA takes for ``ΔW`` of a grouped convolution, in the kernel's
    layout (float32): ``(lora_B.view(-1, r) @ lora_A.view(r, -1)).reshape(W.shape)``
    in PyTorch's ``(out, in/groups, *window)`` order.

    For ``groups > 1`` this is not the adapter's update (which reads every input channel
    and has no grouped kernel shape): it regroups B's rows, so the DoRA norm PEFT divides
    by is the norm of that array. jlora uses it to give PEFT's outputs and files; for
    ``groups == 1`` it is ``A·B``. ``a``: ``(*window, in, r)``, ``b``: ``(r / groups, out)``,
    the input features the last input axis of ``layout``.

    >>> a = jnp.ones((3, 4, 2)); b = jnp.ones((1, 4))      # window 3, 4 channels in, r = 2, 2 groups
    >>> grouped_peft_delta(a, b, ("in", "in", "out"), 2).shape
    (3, 2, 4)
    """
    kl = KernelLayout(tuple(layout))
    r = int(a.shape[-1])
    n = a.ndim
    a_t = jnp.transpose(a.astype(jnp.float32), (n - 1, n - 2, *range(n - 2)))  # (r, in, *window)
    b_t = jnp.transpose(b.astype(jnp.float32))  # (out, r / groups)
    out = int(b.shape[-1])
    cin_g = int(a.shape[-2]) // groups
    p = jnp.matmul(b_t.reshape(-1, r), a_t.reshape(r, -1), precision=_HI)
    p = p.reshape((out, cin_g) + tuple(a.shape[:-2]))  # PyTorch (out, in/groups, *window)
    canonical = jnp.transpose(p, (*range(2, p.ndim), 1, 0))  # (*window, in/groups, out)
    return jnp.transpose(canonical, kl.canonical_permutation())


def weight_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: Sequence[str],
                groups: int = 1) -> jax.Array:
    """``‖W + s·A·B‖`` over the input axes, per (stack, output) index, in float32, without
    forming ``W + s·A·B``: ``n² = ‖W‖² + 2s·⟨AᵀW, B⟩_r + s²·⟨(AᵀA)B, B⟩_r``.

    Args:
      w: the kernel, in its own ``layout`` (any float dtype).
      a: ``(*stack, *in, r)``; b: ``(*stack, r, *out)``.
      scale: the LoRA scale ``s``.
      layout: the role of each axis of ``w`` (``"stack"``, ``"in"``, ``"out"``).
      groups: a grouped convolution (PEFT's structure): the norm PEFT computes,
        ``‖W + s·grouped_peft_delta(A, B)‖`` (a kernel-sized array; convolution kernels
        are small).

    Returns: ``(*stack, *out)`` float32.

    >>> w = jnp.arange(6.0).reshape(3, 2); a = jnp.ones((3, 1)); b = jnp.ones((1, 2))
    >>> weight_norm(w, a, b, 0.5, ("in", "out")).tolist() == jnp.linalg.norm(w + 0.5, axis=0).tolist()
    True
    """
    if groups != 1:
        _, ins, _ = _axes(layout)
        full = _dense(w).astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * grouped_peft_delta(a, b, layout, groups)
        return jnp.sqrt(jnp.sum(jnp.square(full), axis=ins))
    stack, ins, _ = _axes(layout)
    ns, n_in = len(stack), len(ins)
    f32 = jnp.float32
    w32, a32, b32 = _dense(w).astype(f32), a.astype(f32), b.astype(f32)
    st = tuple(range(ns))
    a_in = tuple(range(ns, ns + n_in))
    # ‖W‖² per (stack, out), its axes put in canonical order (stack axes may sit anywhere in W)
    w2 = jnp.transpose(jnp.sum(jnp.square(w32), axis=ins), _canonical_from_kept(layout))
    # AᵀW: (*stack, r, *out) -- contracts the input axes; r x d_out per layer
    aw = jax.lax.dot_general(a32, w32, ((a_in, ins), (st, stack)), precision=_HI)
    cross = jnp.sum(aw * b32, axis=ns)
    gram = jax.lax.dot_general(a32, a32, ((a_in, a_in), (st, st)), precision=_HI)  # (*stack, r, r)
    gb = jax.lax.dot_general(gram, b32, (((ns + 1,), (ns,)), (st, st)), precision=_HI)  # (*stack, r, *out)
    quad = jnp.sum(gb * b32, axis=ns)
    s = jnp.asarray(scale, f32)
    n2 = w2 + 2.0 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(n2, 0.0))


def magnitude_scale(w: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float,
                    layout: Sequence[str], groups: int = 1) -> jax.Array:
    """DoRA's ``k = m / stop_gradient(‖W + s·A·B‖)``, ``(*stack, *out)`` float32.

    The norm is a constant for differentiation (paper §4.3, as PEFT): gradients reach
    ``m`` through ``k``, and reach A and B only through the LoRA branch.
    """
    n = jax.lax.stop_gradient(weight_norm(jax.lax.stop_gradient(w), jax.lax.stop_gradient(a),
                                          jax.lax.stop_gradient(b), scale, layout, groups))
    return magnitude.astype(jnp.float32) / n


def _canonical_from_kept(layout: Sequence[str]) -> list[int]:
    """Permutation taking the kernel's non-input axes (in kernel order) to (*stack, *out)."""
    kept = [r for r in layout if r != "in"]
    return [i for i, r in enumerate(kept) if r == "stack"] + [i for i, r in enumerate(kept) if r == "out"]


def scale_to_kernel(k: jax.Array, layout: Sequence[str], shape: Sequence[int]) -> jax.Array:
    """``k`` ``(*stack, *out)`` arranged to broadcast against a kernel of ``shape`` in
    ``layout`` (size 1 along the input axes)."""
    perm = _canonical_from_kept(layout)
    k = jnp.transpose(k, [perm.index(i) for i in range(len(perm))])  # to kernel order
    return k.reshape(tuple(1 if role == "in" else int(n) for role, n in zip(layout, shape)))


def _delta(a, b, layout, dtype):
    return delta(a, b, tuple(layout), dtype)


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float,
                 layout: Sequence[str], base: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """PEFT's DoRA merge: ``(W', n)`` with ``W' = (m/n)⊙(w + s·ΔW)`` in ``w``'s dtype
    (computed in float32) and ``n = ‖base + s·ΔW‖`` (``base`` defaults to ``w``; PEFT
    takes the norm on the base without earlier merged adapters). Keep ``n`` to unmerge.
    """
    n = weight_norm(w if base is None else base, a, b, scale, layout)
    w = _dense(w)
    compute = jnp.promote_types(w.dtype, jnp.float32)
    merged = w.astype(compute) + scale * _delta(a, b, layout, compute)
    k = scale_to_kernel(magnitude.astype(compute) / n.astype(compute), layout, w.shape)
    return (merged * k).astype(w.dtype), n


def unmerge_kernel(w_merged: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, norm: jax.Array,
                   scale: float, layout: Sequence[str]) -> jax.Array:
    """Inverse of :func:`merge_kernel` with the norm it returned: ``W = W'·(n/m) − s·ΔW``."""
    compute = jnp.promote_types(w_merged.dtype, jnp.float32)
    inv = scale_to_kernel(norm.astype(compute) / magnitude.astype(compute), layout, w_merged.shape)
    out = w_merged.astype(compute) * inv - scale * _delta(a, b, layout, compute)
    return out.astype(w_merged.dtype)


def chain_kernel(w: jax.Array, pairs: Sequence[Any], layout: Sequence[str]) -> jax.Array:
    """The effective kernel of several adapters on ``w`` applied in order (PEFT's
    composition): ``out ← kᵢ⊙(out + sᵢ·ΔWᵢ)`` for a DoRA adapter (``kᵢ`` from
    ``‖w + sᵢΔWᵢ‖``), ``out ← out + sᵢ·ΔWᵢ`` for a plain one. ``pairs`` are ``LoraWeight``s
    (their ``w`` is ignored). Computed in float32, returned in ``w``'s dtype."""
    w = _dense(w)
    compute = jnp.promote_types(w.dtype, jnp.float32)
    out = w.astype(compute)
    for p in pairs:
        out = out + p.scale * _delta(p.a, p.b, layout, compute)
        if getattr(p, "magnitude", None) is not None:
            k = p.magnitude.astype(compute) / weight_norm(w, p.a, p.b, p.scale, layout).astype(compute)
            out = out * scale_to_kernel(k, layout, w.shape)
    return out.astype(w.dtype)
