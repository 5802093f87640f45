"""LoRA factors as arrays: ``ΔW = A·B`` in a kernel's axis order, ``W ± s·ΔW``, and the
initial factors PEFT draws.

The factors are stored canonically, ``A: (*stack, *in, r)`` and ``B: (*stack, r, *out)``
(:class:`jlora.KernelLayout`), so every function here takes the kernel's layout.

>>> import jax.numpy as jnp
>>> delta(jnp.ones((3, 1)), jnp.ones((1, 2)), ("out", "in")).shape    # kernel (out, in) = (2, 3)
(2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..layouts.kernel import KernelLayout, Layout

__all__ = ["delta", "add_delta", "init_factors", "init_b_bias"]


def delta(a: jax.Array, b: jax.Array, layout: Layout, dtype=jnp.float32) -> jax.Array:
    """``ΔW = A·B`` arranged in the kernel's axis order (without the scale).

    Computed as ``dot_general`` over the rank axis with the stack axes batched, then
    transposed from canonical (stack, in, out) order into ``layout`` order.
    """
    kl = KernelLayout(layout)
    n_stack = len(kl.stack_axes)
    stack = tuple(range(n_stack))
    d = jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((a.ndim - 1,), (n_stack,)), (stack, stack)),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.transpose(d, kl.canonical_permutation())


def add_delta(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: Layout, sign: float) -> jax.Array:
    """``w + sign·scale·ΔW``, computed in float32 and cast to ``w``'s dtype."""
    compute = jnp.promote_types(w.dtype, jnp.float32)
    out = w.astype(compute) + (sign * scale) * delta(a, b, layout, compute)
    return out.astype(w.dtype)


def _kaiming_uniform_a_sqrt5(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    # PEFT / torch: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_factors(
    key: Optional[jax.Array],
    shape: Sequence[int],
    layout: Layout,
    r: int,
    init: Union[bool, str] = True,
    dtype=jnp.float32,
    embedding: bool = False,
    groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Initial ``(A, B)`` for a kernel of ``shape`` and ``layout``, as PEFT initialises them.

    - ``init=True``: A ~ U(±1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), B = 0; for an
      embedding table PEFT's order: A = 0, B ~ N(0, 1).
    - ``init="gaussian"``: A ~ N(0, (1/r)²), B = 0.
    - ``init=False``: A and B both random (torch's default Linear init: U(±1/sqrt(fan_in)));
      the adapter is *not* an identity at start; for tests.

    ``fan_in`` is the product of A's input axes. ``groups > 1``: a grouped convolution
    as PEFT adapts it (:meth:`jlora.KernelLayout.factor_shapes`: A full, B grouped).

    >>> a, b = init_factors(jax.random.key(0), (6, 4), ("in", "out"), r=2)
    >>> a.shape, b.shape, float(abs(b).sum())
    ((6, 2), (2, 4), 0.0)
    """
    kl = KernelLayout(layout)
    a_shape, b_shape = kl.factor_shapes(tuple(shape), r, groups)
    fan_in = int(np.prod([shape[i] for i in kl.in_axes])) * groups
    if key is None:
        raise ValueError("init_factors needs a PRNG key: pass rng=jax.random.key(seed) to jlora.wrap")
    ka, kb = jax.random.split(key)
    if init is True:
        if embedding:
            return jnp.zeros(a_shape, dtype), jax.random.normal(kb, b_shape, dtype)
        return _kaiming_uniform_a_sqrt5(ka, a_shape, fan_in, dtype), jnp.zeros(b_shape, dtype)
    if init == "gaussian":
        return (jax.random.normal(ka, a_shape, dtype) / r).astype(dtype), jnp.zeros(b_shape, dtype)
    if init is False:
        return (_kaiming_uniform_a_sqrt5(ka, a_shape, fan_in, dtype),
                _kaiming_uniform_a_sqrt5(kb, b_shape, r // groups, dtype))
    raise ValueError(f"init_lora_weights={init!r}: valid values are True, False, 'gaussian'")


def init_b_bias(key: jax.Array, shape: Sequence[int], r: int, init: Union[bool, str] = True,
                dtype=jnp.float32) -> jax.Array:
    """PEFT's initial ``lora_B.bias`` (``lora_bias=True``) of shape ``(*stack, *out)``:
    zeros, except with ``init=False`` (PEFT then keeps torch's default layer init,
    ``U(±1/sqrt(fan_in))``, ``fan_in`` the rank B reads).

    >>> init_b_bias(jax.random.key(0), (3,), 4).tolist()
    [0.0, 0.0, 0.0]
    """
    if init is False:
        return _kaiming_uniform_a_sqrt5(key, tuple(shape), r, dtype)
    return jnp.zeros(tuple(shape), dtype)
