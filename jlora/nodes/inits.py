"""PiSSA and OLoRA: initialisations that move the top of ``W`` into the factors.

Both work on the PyTorch-layout matrix of a kernel, ``M = Kᵀ: (d_out, d_in)`` (the
kernel's input axes flattened to ``d_in``, its output axes to ``d_out``, one matrix per
stacked layer), exactly as PEFT does on an ``nn.Linear`` weight, and return jlora's
canonical factors ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)`` in float32, and the
residual kernel::

    W_res = W − s·A₀·B₀         (computed in float32, cast once to W's dtype)

so that ``W_res + s·A₀·B₀ = W``: the output is unchanged at init.

- ``"pissa"`` (PEFT ``pissa_init``): ``M = U·diag(S)·Vh`` (exact SVD);
  ``A = diag(√(S_r/s))·Vh_r``, ``B = U_r·diag(√(S_r/s))``, so ``s·B·A = U_r S_r Vh_r``.
- ``"pissa_niter_N"``: the same from a randomised SVD with ``N`` subspace iterations
  (Halko et al., the algorithm of ``torch.svd_lowrank(M, q=r, niter=N)``), its Gaussian
  test matrix drawn from a JAX key: the same key gives the same factors.
- ``"olora"`` (PEFT ``olora_init``): ``M = Q·R`` (reduced QR); ``B = Q[:, :r]``,
  ``A = R[:r]``; ``s·B·A = s·Q_r R_r`` (as PEFT: not divided by ``s``).

In jlora's layout ``a = Aᵀ`` and ``b = Bᵀ``. GPT-2's ``Conv1D`` kernels are handled like
any other kernel (jlora knows their layout), where PEFT's OLoRA fails on them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..quant.array import is_quantized
from .factors import add_delta

__all__ = ["RESIDUAL_INITS", "is_residual_init", "pissa_niter", "init_residual_factors", "residual_kernel",
           "original_kernel"]

_NITER = re.compile(r"^pissa_niter_(\d+)$")


def pissa_niter(init: object) -> Optional[int]:
    """``N`` of ``"pissa_niter_N"``, else None."""
    if isinstance(init, str):
        m = _NITER.match(init)
        if m:
            return int(m.group(1))
    return None


def is_residual_init(init: object) -> bool:
    """Whether ``init_lora_weights=init`` replaces the base by a residual (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init == "pissa" or init == "olora" or pissa_niter(init) is not None)


RESIDUAL_INITS = ("pissa", "pissa_niter_N", "olora")


def _torch_matrix(w: jax.Array, layout: Sequence[str]) -> tuple[jax.Array, tuple, tuple, tuple]:
    roles = tuple(layout)
    stack = tuple(i for i, r in enumerate(roles) if r == "stack")
    ins = tuple(i for i, r in enumerate(roles) if r == "in")
    outs = tuple(i for i, r in enumerate(roles) if r == "out")
    s_shape = tuple(w.shape[i] for i in stack)
    i_shape = tuple(w.shape[i] for i in ins)
    o_shape = tuple(w.shape[i] for i in outs)
    k = jnp.transpose(w.astype(jnp.float32), stack + ins + outs)
    k = k.reshape(s_shape + (int(np.prod(i_shape)), int(np.prod(o_shape))))
    return jnp.swapaxes(k, -1, -2), s_shape, i_shape, o_shape  # (*stack, d_out, d_in)


def _orth(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x, mode="reduced")[0]


def _svd_lowrank(m: jax.Array, q: int, niter: int, key: jax.Array):
    """Randomised SVD of ``m`` (..., d_out, d_in) of rank ``q`` (torch.svd_lowrank's
    algorithm): ``U (…, d_out, q), S (…, q), V (…, d_in, q)``."""
    rows, cols = m.shape[-2:]
    flip = rows < cols
    a = jnp.swapaxes(m, -1, -2) if flip else m
    g = jax.random.normal(key, a.shape[:-2] + (a.shape[-1], q), jnp.float32)
    mh = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    qm = _orth(jnp.matmul(a, g, precision="highest"))
    for _ in range(niter):
        qm = _orth(jnp.matmul(mh(a), qm, precision="highest"))
        qm = _orth(jnp.matmul(a, qm, precision="highest"))
    small = jnp.matmul(mh(qm), a, precision="highest")
    u, s, vh = jnp.linalg.svd(small, full_matrices=False)
    u = jnp.matmul(qm, u, precision="highest")
    v = mh(vh)
    if flip:
        u, v = v, u
    return u, s, v


def init_residual_factors(w: jax.Array, layout: Sequence[str], r: int, scale: float, init: str,
                          key: Optional[jax.Array] = None, path: str = "") -> tuple[jax.Array, jax.Array]:
    """PiSSA / OLoRA factors ``(a, b)`` of kernel ``w`` (float32, jlora's canonical shapes).

    >>> w = jax.random.normal(jax.random.key(0), (6, 4))
    >>> a, b = init_residual_factors(w, ("in", "out"), r=2, scale=1.0, init="pissa")
    >>> bool(jnp.allclose(w - residual_kernel(w, a, b, 1.0, ("in", "out")), a @ b, atol=1e-5))
    True
    """
    where = f" at {path!r}" if path else ""
    if is_quantized(w) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"init_lora_weights={init!r}{where}: the base kernel is {'quantized' if is_quantized(w) else w.dtype}; "
            "PiSSA/OLoRA need a float "
            "kernel (float32, float16 or bfloat16). Initialise on the float weights, then quantize the residual."
        )
    m, s_shape, i_shape, o_shape = _torch_matrix(w, layout)
    d_out, d_in = m.shape[-2:]
    if r > min(d_in, d_out):
        raise ValueError(
            f"init_lora_weights={init!r}{where}: rank r={r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of the "
            f"kernel {tuple(w.shape)}; use r <= {min(d_in, d_out)} (rank_pattern) for this target"
        )
    niter = pissa_niter(init)
    if init == "olora":
        q, rr = jnp.linalg.qr(m, mode="reduced")
        b_t, a_t = q[..., :, :r], rr[..., :r, :]  # B (out, r), A (r, in)
    elif init == "pissa" or niter is not None:
        if niter is None:
            u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
            u, sv, vh = u[..., :, :r], sv[..., :r], vh[..., :r, :]
        else:
            if key is None:
                raise ValueError(f"init_lora_weights={init!r}{where}: the randomised SVD needs a PRNG key (rng=)")
            u, sv, v = _svd_lowrank(m, r, niter, key)
            vh = jnp.swapaxes(v, -1, -2)
        root = jnp.sqrt(sv / jnp.asarray(scale, jnp.float32))
        a_t = root[..., :, None] * vh  # diag(√S)·Vh: (r, in)
        b_t = u * root[..., None, :]  # U·diag(√S): (out, r)
    else:
        raise ValueError(f"init_lora_weights={init!r}: not a PiSSA/OLoRA init; valid: {RESIDUAL_INITS}")
    a = jnp.swapaxes(a_t, -1, -2).reshape(s_shape + i_shape + (r,))
    b = jnp.swapaxes(b_t, -1, -2).reshape(s_shape + (r,) + o_shape)
    return a, b


def residual_kernel(w: jax.Array, a0: jax.Array, b0: jax.Array, scale: float, layout: Sequence[str]) -> jax.Array:
    """``W − s·A₀·B₀``: computed in float32, cast once to ``w``'s dtype."""
    return add_delta(w, a0, b0, scale, tuple(layout), sign=-1.0)


def original_kernel(w_res: jax.Array, a0: jax.Array, b0: jax.Array, scale: float, layout: Sequence[str]) -> jax.Array:
    """``W_res + s·A₀·B₀``: the kernel before PiSSA/OLoRA (to float32 rounding; for a
    bfloat16 base, within the rounding of the residual's cast)."""
    return add_delta(w_res, a0, b0, scale, tuple(layout), sign=1.0)
