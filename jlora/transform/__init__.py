"""`lora(fn)`: run an unchanged model with LoRA applied, without forming ``W + s·A·B``.

``lora(fn)`` traces ``fn`` with plain arrays standing in for every ``LoraWeight``
(``jax.make_jaxpr``) and evaluates the jaxpr with an interpreter in which a LoRA weight
is a value of its own (a view of ``W`` plus its factors ``A``, ``B`` and scale ``s``):

* ``dot_general`` with a LoRA operand on either side emits
  ``dot_general(x, W) + s·((x·A)·B)`` for any contracting/batch dimensions whose roles fit
  the factorisation: Dense, DenseGeneral, einsum projections, stacked layers whose stack
  axes are batch dimensions (vmapped layers) or free dimensions. A contraction over the
  *output* axes, as in tied embeddings ``x·Wᵀ``, gives ``(x·Bᵀ)·Aᵀ``.
* ``ragged_dot_general`` (``jax.lax.ragged_dot``: experts applied to tokens sorted by
  expert, the kernel's group axis a stack axis) emits ``ragged_dot(x, W, g) +
  ragged_dot(s·ragged_dot(x, A, g), B, g)`` with the same group sizes; in a mixed batch the
  rows are traced back to their examples (:mod:`.ragged`, :mod:`.rows`).
* ``gather`` on an embedding table (a row lookup over its input axes) gives
  ``W[ids] + s·A[ids]·B``.
* ``conv_general_dilated`` on a kernel gives ``conv(x, W) + s·conv1x1(conv(x, A), B)``
  (``A`` as an ``r``-channel conv with ``W``'s window, ``B`` as a 1×1 conv).
* The value stays factored through ``transpose``, ``convert_element_type``, ``copy``,
  ``sharding_constraint``, ``reshape``/``squeeze``/``expand_dims`` (wherever no
  reshaped axis mixes input and output axes), ``slice``/``dynamic_slice`` (``W[i]`` of
  stacked layers, ``W[:, :d]``), and into the bodies of nested ``jit``/``closed_call``,
  ``custom_jvp``/``custom_vjp`` functions, ``remat`` (with the same policy and
  ``prevent_cse``), ``scan`` (as constants, or as scanned stacked weights), ``cond`` /
  ``switch`` and ``while_loop`` / ``fori_loop`` (as loop constants). ``reshard`` (meshes
  with ``Explicit`` axes) moves W and the factors alike.
* On a mesh with ``Explicit`` axes the branch's products take their ``out_sharding``
  from the model's own product, so a row-parallel layer that names its output sharding
  works factored; each equation is evaluated in the context it was traced in (e.g. the
  ``auto_axes`` region of ``.at[ids].get(out_sharding=)``).
* Anything else (an elementwise op on the kernel, a LoRA weight in a loop carry or
  returned from ``fn``) materialises ``W + s·A·B`` at that one point: correct, only
  slower. ``on_materialize`` decides whether that warns, raises or passes silently, and
  :func:`explain` lists, per call, which targets stayed factored and which were
  materialised, at which primitive and where (module path and source line).

Nested ``custom_jvp``/``custom_vjp`` functions that receive a LoRA weight as an argument
are evaluated through their body, which JAX then differentiates directly: their custom
rule is not used for that call. This gives the same gradients whenever the rule is the
derivative of the body (what such rules are for), but not for a rule that deliberately
differs from it, such as a straight-through estimator around quantisation.

Precision and dtypes. Let ``o`` be the dtype of the model's own product ``x·W`` (for a
bfloat16 model, bfloat16) and ``f = promote_types(A.dtype, B.dtype)`` the factors' dtype
(float32 by default, whatever the base dtype). The LoRA branch is computed in ``f``:
``x`` is cast to ``f`` (and dropout applied in ``f``), ``x·A`` and ``(x·A)·B`` are both
``dot_general`` with ``preferred_element_type=f`` and the model's ``precision``, and the
result is multiplied by ``s`` in ``f``. The base product ``x·W`` uses the model's
operands, dtypes and ``precision``; where ``o`` is a float narrower than ``f`` it is
accumulated in ``promote_types(o, f)`` instead of being rounded to ``o`` first. The sum
``x·W + s·(x·A)·B`` is formed in ``promote_types(o, f)`` and rounded once to ``o``, so
the output dtype is always the base output's dtype, and with bfloat16 kernels and
float32 factors the only bfloat16 rounding is the final one (as for a merged kernel's
product, minus the rounding of ``W + s·A·B`` itself). The same holds for ``W[ids] +
s·A[ids]·B`` (embeddings) and for the two convolutions. One exception: a quantized
kernel's product ``x·dequantize(Q)`` is rounded to ``o`` before the branch is added, as
bitsandbytes' layer computes it under PEFT; a float32 output there is an activation-sized
float32 array that XLA:TPU writes to HBM (the product is recomputed inside
``jax.checkpoint`` and does not fuse with the branch's).

Dropout (``LoraConfig.lora_dropout``) is applied to the input of ``A`` only, in the
factored path, and only when a ``lora_rng`` key is passed; each use of a weight (each
layer of a ``scan``, each iteration of a ``while_loop``) draws its own mask from that
key, deterministically.

The package, top layer of jlora: :mod:`.values` (the LoRA value, the context, the
report), :mod:`.interpreter` (the evaluator and the rule table), the rules by kind
(:mod:`.views`, :mod:`.products`, :mod:`.ragged`, :mod:`.control_flow`; each registers its rules at
import) and :mod:`.api` (``lora``, ``explain``).

Only public JAX API is used (``jax.make_jaxpr``, ``jax.extend``, ``jax.lax``).
"""

from __future__ import annotations


from . import control_flow, products, ragged, views  # noqa: F401  (each registers its rules)
from .api import explain, lora
from .products import lora_branch
from .values import LoraEvent, LoraReport, MaterializationError, MaterializationWarning

__all__ = ["lora", "explain", "LoraReport", "LoraEvent", "MaterializationWarning", "MaterializationError", "lora_branch"]
