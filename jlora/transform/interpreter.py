"""`lora(fn)`: run an unchanged model with LoRA applied, without forming ``W + s·A·B``.

``lora(fn)`` traces ``fn`` with plain arrays standing in for every ``LoraWeight``
(``jax.make_jaxpr``) and evaluates the jaxpr with an interpreter in which a LoRA weight
is a value of its own (a view of ``W`` plus its factors ``A``, ``B`` and scale ``s``):

* ``dot_general`` with a LoRA operand on either side emits
  ``dot_general(x, W) + s·((x·A)·B)`` for any contracting/batch dimensions whose roles fit
  the factorisation: Dense, DenseGeneral, einsum projections, stacked layers whose stack
  axes are batch dimensions (vmapped layers) or free dimensions. A contraction over the
  *output* axes, as in tied embeddings ``x·Wᵀ``, gives ``(x·Bᵀ)·Aᵀ``.
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
s·A[ids]·B`` (embeddings) and for the two convolutions.

Dropout (``LoraConfig.lora_dropout``) is applied to the input of ``A`` only, in the
factored path, and only when a ``lora_rng`` key is passed; each use of a weight (each
layer of a ``scan``, each iteration of a ``while_loop``) draws its own mask from that
key, deterministically.

Only public JAX API is used (``jax.make_jaxpr``, ``jax.extend``, ``jax.lax``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from .dora import magnitude_scale
from . import qforward as _quant
from .quantization import is_quantized
from .targets import path_names
from .usage import reshape_blocks
from .weight import LoraWeight, MultiLoraWeight, Trainable

_DEFAULT_ADAPTER = "default"  # the name of a plain LoraWeight's adapter (jlora.adapters)

__all__ = ["lora", "explain", "LoraReport", "MaterializationWarning", "MaterializationError"]

OnMaterialize = Literal["warn", "error", "allow"]
try:
    from jax.extend.core import primitives as _prims
except ImportError:  # pragma: no cover - very old JAX
    _prims = None


class MaterializationWarning(UserWarning):
    """A LoRA weight was materialised as ``W + s·A·B`` (correct, but slower)."""


class MaterializationError(ValueError):
    """Raised by ``lora(fn, on_materialize="error")`` where a weight would be materialised."""


@dataclasses.dataclass(frozen=True)
class LoraEvent:
    path: str
    primitive: str
    action: str  # "factored" | "materialized"
    where: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """What ``lora(fn)`` did with each LoRA weight for one call: a list of events.

    ``factored``/``materialized`` list the target paths; ``str(report)`` is a table.
    """

    events: tuple[LoraEvent, ...]

    @property
    def factored(self) -> list[str]:
        return sorted({e.path for e in self.events if e.action == "factored"})

    @property
    def materialized(self) -> list[str]:
        return sorted({e.path for e in self.events if e.action == "materialized"})

    def __str__(self) -> str:
        rows = [("target", "primitive", "action", "where")]
        rows += [(e.path, e.primitive, e.action + (f" ({e.reason})" if e.reason else ""), e.where) for e in self.events]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * min(120, sum(widths) + 6 + max(len(r[3]) for r in rows)))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The LoRA value of the interpreter
# ----------------------------------------------------------------------------------

Axis = tuple[str, int]  # ("s", k) stack axis k, ("a", k) in-axis k of A, ("b", k) out-axis k of B


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One adapter's factors on a kernel: ``a`` (*stack, *in, r), ``b`` (*stack, r, *out)."""

    a: Any
    b: Any
    scale: float
    dropout: float
    gid: int = -2  # index of the adapter in the call's adapter list (for ``adapter_ids``)
    k: Any = None  # DoRA: m / ‖W + s·ΔW‖ (float32, b-shaped with r = 1: (*stack, 1, *out)); jlora.dora

    @property
    def dtype(self):
        return jnp.promote_types(self.a.dtype, self.b.dtype)


@dataclasses.dataclass(frozen=True)
class _Lora:
    """A kernel view ``w`` whose delta is ``Σ_pairs scale · Σ_r a[..., r] b[r, ...]``.

    Every pair has the same stack/in/out axes (ranks may differ). ``axes[i]`` says which
    factor axis view axis ``i`` of ``w`` corresponds to: ``("s", k)`` stack axis ``k``,
    ``("a", k)`` input axis ``k`` of A, ``("b", k)`` output axis ``k`` of B.
    """

    w: Any
    pairs: tuple[_Pair, ...]
    axes: tuple[Axis, ...]
    n_stack: int
    path: str

    @property
    def n_in(self) -> int:
        return self.pairs[0].a.ndim - self.n_stack - 1

    @property
    def n_out(self) -> int:
        return self.pairs[0].b.ndim - self.n_stack - 1

    @property
    def sizes(self) -> dict[str, list[int]]:
        a, b, ns = self.pairs[0].a, self.pairs[0].b, self.n_stack
        return {"s": list(a.shape[:ns]), "a": list(a.shape[ns:-1]), "b": list(b.shape[ns + 1:])}

    def with_w(self, w, axes=None, n_stack=None, ab=None) -> "_Lora":
        """A new view: ``w`` replaced, and each pair's (a, b) replaced by ``ab(a, b)``."""
        pairs = self.pairs
        if ab is not None:
            # DoRA's k has B's axes (rank 1): it follows B through every view change
            pairs = tuple(
                dataclasses.replace(p, **dict(zip(("a", "b"), ab(p.a, p.b))), k=None if p.k is None else ab(p.a, p.k)[1])
                for p in pairs
            )
        return dataclasses.replace(
            self, w=w, pairs=pairs, axes=self.axes if axes is None else tuple(axes),
            n_stack=self.n_stack if n_stack is None else n_stack,
        )

    def pair_delta_view(self, p: _Pair, dtype) -> jax.Array:
        """``scale · ΔW`` of one pair in the view's axis order, computed in ``dtype``."""
        ns = self.n_stack
        stack = tuple(range(ns))
        d = jax.lax.dot_general(
            p.a.astype(dtype), p.b.astype(dtype),
            (((p.a.ndim - 1,), (ns,)), (stack, stack)),
            precision=jax.lax.Precision.HIGHEST,
        ) * jnp.asarray(p.scale, dtype)
        offsets = {"s": 0, "a": ns, "b": ns + self.n_in}
        return jnp.transpose(d, [offsets[g] + k for g, k in self.axes])

    def delta_view(self, dtype) -> jax.Array:
        """``Σ scale · ΔW`` in the view's axis order, computed in ``dtype``."""
        return functools.reduce(jnp.add, [self.pair_delta_view(p, dtype) for p in self.pairs])

    def materialize(self, adapter_ids=None) -> jax.Array:
        if adapter_ids is not None and any(p.gid >= 0 for p in self.pairs):
            raise ValueError(
                f"jlora: LoRA weight {self.path!r} would have to be materialised, but a mixed batch "
                "(adapter_ids=) needs every use of a weight to stay factored"
            )
        w = _quant.dense(self.w)  # a quantized base is dequantized here
        compute = jnp.promote_types(w.dtype, jnp.float32)
        if any(p.k is not None for p in self.pairs):
            # DoRA: out ← k⊙(out + s·ΔW) per adapter, in order (jlora.dora.chain_kernel)
            out = w.astype(compute)
            for p in self.pairs:
                out = out + self.pair_delta_view(p, compute)
                if p.k is not None:
                    out = out * _k_on(p.k, self.n_stack, list(self.axes)).astype(compute)
            return out.astype(w.dtype)
        return (w.astype(compute) + self.delta_view(compute)).astype(w.dtype)


def _roles_str(lv: "_Lora") -> str:
    names = {"s": "stack", "a": "in", "b": "out"}
    return "(" + ", ".join(names[g] for g, _ in lv.axes) + ")"


def _roles_to_axes(layout: Sequence[str]) -> tuple[tuple[Axis, ...], int]:
    counts = {"s": 0, "a": 0, "b": 0}
    axes = []
    for role in layout:
        g = {"stack": "s", "in": "a", "out": "b"}[role]
        axes.append((g, counts[g]))
        counts[g] += 1
    return tuple(axes), counts["s"]


def _k_on(k: jax.Array, n_stack: int, target: Sequence[Any], stack_label=None) -> Optional[jax.Array]:
    """DoRA's ``k`` (``(*stack, 1, *out)``) arranged to broadcast against an array whose
    axes carry the labels ``target``: stack axis ``j`` is labelled ``stack_label(j)``
    (default ``("s", j)``), output axis ``j`` ``("b", j)``; target labels that are neither
    get size 1. None where ``k`` varies along an axis the target does not have."""
    k = jnp.squeeze(k, n_stack)
    label = stack_label or (lambda j: ("s", j))
    labels = [label(j) for j in range(n_stack)] + [("b", j) for j in range(k.ndim - n_stack)]
    present = [lab for lab in target if lab in labels]
    if len(present) != len(labels):
        return None
    k = jnp.transpose(k, [labels.index(lab) for lab in present])
    return k.reshape([k.shape[present.index(lab)] if lab in labels else 1 for lab in target])


def _dora_sum(base, terms, out_dtype, k_of, base_of):
    """The output of one use of a kernel from its base product and each adapter's branch,
    in order, as PEFT composes them (``terms``: ``(pair, s·branch, mask, x̃)``, the branch
    already masked in a mixed batch, ``x̃`` the dropped input where dropout is on):

    - LoRA: ``y ← y + s·(x̃·A)·B``
    - DoRA: ``y ← k⊙(y + s·(x·A)·B)`` without dropout (reuses the base product);
      ``y ← y + (k−1)⊙(x̃·W) + k⊙s·(x̃·A)·B`` with dropout (PEFT's formula);
      in a mixed batch each example has one adapter: ``y ← y + mask⊙((k−1)⊙(x̃·W) + k⊙u)``.

    ``k_of(pair)`` is ``k`` shaped like the output, ``base_of(x̃)`` the base product of ``x̃``.
    The sum is formed in the wider of the base's and the branches' dtypes and rounded once.
    """
    acc = functools.reduce(jnp.promote_types, [base.dtype] + [u.dtype for _, u, _, _ in terms])
    y = base.astype(acc)
    for pair, u, mask, dropped in terms:
        if pair.k is None:
            y = y + u.astype(acc)
            continue
        kk = k_of(pair).astype(acc)
        bd = base.astype(acc) if dropped is None else base_of(dropped).astype(acc)
        if mask is not None:
            y = y + mask.astype(acc) * (kk - 1) * bd + kk * u.astype(acc)
        elif dropped is not None:
            y = y + (kk - 1) * bd + kk * u.astype(acc)
        else:
            y = kk * (y + u.astype(acc))
    return y.astype(out_dtype)


def _has_dora(lv: "_Lora") -> bool:
    return any(p.k is not None for p in lv.pairs)


# ----------------------------------------------------------------------------------
# Interpreter context
# ----------------------------------------------------------------------------------


def _on_current_mesh(x: Optional[jax.Array]) -> Optional[jax.Array]:
    """``x`` (adapter ids, a dropout key: values from outside ``fn``'s jaxpr) moved onto
    the abstract mesh of the equation being evaluated, replicated, where that mesh is not
    the one ``x`` lives on (inside an ``auto_axes`` region of an Explicit mesh)."""
    if x is None:
        return None
    current = jax.sharding.get_abstract_mesh()
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is None or current is None or mesh == current:
        return x
    if getattr(current, "empty", True) or getattr(mesh, "empty", True):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(current, jax.sharding.PartitionSpec()))


class _Context:
    def __init__(self, key: Optional[jax.Array], on_materialize: str, events: list[LoraEvent],
                 adapter_ids: Optional[jax.Array] = None):
        self.key = key
        self.on_materialize = on_materialize
        self.events = events
        self._adapter_ids = adapter_ids
        self._counter = [0]

    @property
    def adapter_ids(self) -> Optional[jax.Array]:
        return _on_current_mesh(self._adapter_ids)

    def child(self, key: Optional[jax.Array]) -> "_Context":
        c = _Context(key, self.on_materialize, self.events, self._adapter_ids)
        c._counter = self._counter
        return c

    def next_key(self) -> Optional[jax.Array]:
        if self.key is None:
            return None
        self._counter[0] += 1
        return jax.random.fold_in(_on_current_mesh(self.key), self._counter[0])

    def record(self, lv: _Lora, eqn: Any, action: str, reason: str = "") -> None:
        where = _where(eqn)
        event = LoraEvent(lv.path, eqn.primitive.name if eqn is not None else "output", action, where, reason)
        self.events.append(event)
        if action == "materialized":
            msg = (
                f"jlora: LoRA weight {lv.path!r} materialised as W + s·A·B at {event.primitive} "
                f"({where}){': ' + reason if reason else ''}. Correct, but gradients cost a full "
                "d_in x d_out product here."
            )
            if self.on_materialize == "error":
                raise MaterializationError(msg + " (on_materialize='error')")
            if self.on_materialize == "warn":
                warnings.warn(msg, MaterializationWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` pointing at the first frame outside jlora and JAX."""
    import os
    import sys

    skip = (os.path.dirname(__file__) + os.sep, os.path.dirname(jax.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _where(eqn: Any) -> str:
    if eqn is None:
        return "function output"
    try:
        summary = jex.source_info_util.summarize(eqn.source_info)
        stack = str(eqn.source_info.name_stack)
        return f"{stack} @ {summary}" if stack else summary
    except Exception:  # pragma: no cover - source info is best effort
        return "?"


def _eqn_context(eqn: Any) -> Any:
    """The context the equation was traced in (``JaxprEqn.ctx``: abstract mesh inside
    ``auto_axes``/``explicit_axes`` regions, compute type, ...), entered while evaluating
    it, as ``jax.core.eval_jaxpr`` does; a no-op where this JAX has none."""
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    return manager if manager is not None else contextlib.nullcontext()


def _bind_params(primitive: Any, params: dict) -> tuple[tuple, dict]:
    """``(subfuns, params)`` for ``primitive.bind`` (older JAX returns a pair, newer a dict)."""
    got = primitive.get_bind_params(params)
    if isinstance(got, tuple):
        return tuple(got[0]), got[1]
    return (), got


def _bind_with(primitive: Any, params: dict, invals: Sequence[Any]) -> Any:
    if any(_quant.is_view(x) for x in invals):  # a quantized kernel (jlora.qforward)
        return _quant.bind(primitive, params, invals, _bind_with)
    subfuns, bind_params = _bind_params(primitive, params)
    return primitive.bind(*subfuns, *invals, **bind_params)


def _bind(eqn: Any, invals: Sequence[Any]) -> Any:
    return _bind_with(eqn.primitive, eqn.params, invals)


def _materialize(x: Any, ctx: _Context, eqn: Any, reason: str = "") -> Any:
    if isinstance(x, _Lora):
        ctx.record(x, eqn, "materialized", reason)
        return x.materialize(ctx.adapter_ids)
    return _quant.dense(x)


def _dropout(x: jax.Array, pair: _Pair, ctx: _Context) -> jax.Array:
    """Inverted dropout on ``x`` (the input of one adapter's A), if a key was given."""
    if pair.dropout <= 0.0:
        return x
    key = ctx.next_key()
    if key is None:
        return x
    keep = 1.0 - pair.dropout
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _factor_dtype(lv: _Lora):
    return functools.reduce(jnp.promote_types, [p.dtype for p in lv.pairs])


def _example_mask(pair: _Pair, ctx: _Context, lv: _Lora, ndim: int, axis: Optional[int], size: Optional[int], dtype):
    """For a mixed batch (``adapter_ids``), the 0/1 mask selecting the examples that use
    ``pair``'s adapter, shaped to broadcast along output axis ``axis``; else None."""
    ids = ctx.adapter_ids
    if ids is None:
        return None
    if axis is None or size != ids.shape[0]:
        raise ValueError(
            f"jlora: adapter_ids has {ids.shape[0]} entries but the input of {lv.path!r} has "
            f"{'no batch axis' if axis is None else f'leading axis of size {size}'}; adapter_ids "
            "selects an adapter per example along axis 0 of each layer's input"
        )
    shape = [1] * ndim
    shape[axis] = size
    return (ids == pair.gid).astype(dtype).reshape(shape)


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: _Context, materialize_out: bool = True):
    """Evaluates ``jaxpr`` where some values may be ``_Lora``."""
    env: dict[Any, Any] = {}

    def read(v):
        if isinstance(v, jex.core.Literal):
            return v.val
        return env[v]

    def write(v, val):
        if not isinstance(v, jex.core.DropVar):
            env[v] = val

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c)
    for v, a in zip(jaxpr.invars, args):
        write(v, a)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name_stack = jex.source_info_util.current_name_stack() + eqn.source_info.name_stack
        with jex.source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), _eqn_context(eqn):
            if any(isinstance(x, _Lora) for x in invals):
                rule = _RULES.get(eqn.primitive.name, _rule_materialize)
                outvals = rule(eqn, invals, ctx)
            elif _structural(eqn) and any(_quant.is_view(x) for x in invals):
                outvals = _RULES[eqn.primitive.name](eqn, invals, ctx)  # a quantized kernel goes inside
            else:
                outvals = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for v, val in zip(eqn.outvars, outvals):
            write(v, val)
    outs = [read(v) for v in jaxpr.outvars]
    if materialize_out:
        outs = [_materialize(o, ctx, None, "returned from the function") for o in outs]
    return outs


# ----------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------


def _rule_materialize(eqn, invals, ctx, reason: str = ""):
    reason = reason or f"no factored rule for {eqn.primitive.name}"
    vals = [_materialize(x, ctx, eqn, reason) for x in invals]
    return _bind(eqn, vals)


def _rule_passthrough(eqn, invals, ctx):
    lv = invals[0]
    if not all(not isinstance(x, _Lora) for x in invals[1:]):
        return _rule_materialize(eqn, invals, ctx)
    return lv.with_w(_bind(eqn, [lv.w, *invals[1:]]))


def _rule_reshard(eqn, invals, ctx):
    """``reshard`` (Explicit mesh axes, and the entry to ``auto_axes`` regions): ``W`` and
    each factor move to the destination's mesh, each factor axis sharded as the kernel
    axis it stands for, the rank axis unsharded."""
    lv = invals[0]
    if any(isinstance(x, _Lora) for x in invals[1:]):
        return _rule_materialize(eqn, invals, ctx)
    dst = eqn.params.get("dst_sharding")
    spec_of_w = getattr(dst, "spec", None)
    if spec_of_w is None or not hasattr(dst, "mesh"):
        return _rule_passthrough(eqn, invals, ctx)
    spec = tuple(spec_of_w) + (None,) * (lv.w.ndim - len(spec_of_w))
    by_axis = {ax: spec[i] for i, ax in enumerate(lv.axes)}
    ns = lv.n_stack
    stack = [by_axis.get(("s", k)) for k in range(ns)]

    def move(x, entries):
        sharding = jax.sharding.NamedSharding(dst.mesh, jax.sharding.PartitionSpec(*entries))
        return _bind_with(eqn.primitive, dict(eqn.params, dst_sharding=sharding), [x])

    def ab(a, b):
        a_spec = stack + [by_axis.get(("a", k)) for k in range(a.ndim - ns - 1)] + [None]
        b_spec = stack + [None] + [by_axis.get(("b", k)) for k in range(b.ndim - ns - 1)]
        return move(a, a_spec), move(b, b_spec)

    return lv.with_w(_bind(eqn, [lv.w]), ab=ab)


def _rule_convert(eqn, invals, ctx):
    """A float kernel cast to another float dtype stays factored (the factors keep
    their own dtype); a cast to an integer or boolean type (quantisation) does not."""
    (lv,) = invals
    new_dtype = eqn.params.get("new_dtype")
    if new_dtype is None or not (jnp.issubdtype(new_dtype, jnp.floating) and jnp.issubdtype(lv.w.dtype, jnp.floating)):
        return _rule_materialize(eqn, invals, ctx, f"cast of a weight to {new_dtype}")
    return lv.with_w(_bind(eqn, [lv.w]))


def _rule_transpose(eqn, invals, ctx):
    (lv,) = invals
    perm = eqn.params["permutation"]
    return lv.with_w(_bind(eqn, [lv.w]), axes=[lv.axes[p] for p in perm])


def _reshape_lora(lv: _Lora, new_shape: Sequence[int]) -> Optional[_Lora]:
    """The factored value of ``reshape(view, new_shape)``, or None if it does not factor."""
    old = tuple(lv.w.shape)
    blocks = reshape_blocks(old, tuple(new_shape))
    if blocks is None:
        return None
    sizes = lv.sizes
    ns_old = lv.n_stack
    # per group: list of (first old factor idx, old idxs, new view axes, new sizes)
    plans: dict[str, list] = {"s": [], "a": [], "b": []}
    for oi, nj in blocks:
        if oi:
            groups = {lv.axes[i][0] for i in oi}
            if len(groups) != 1:
                return None
            g = groups.pop()
            idxs = [lv.axes[i][1] for i in oi]
            if idxs != list(range(idxs[0], idxs[0] + len(idxs))):
                return None
            plans[g].append((idxs[0], idxs, nj, [new_shape[j] for j in nj]))
        else:
            plans["b"].append((10**9, [], nj, [new_shape[j] for j in nj]))
    if plans["s"]:
        # stack axes may only pass through unchanged, or be dropped when of size 1
        for p in plans["s"]:
            if len(p[1]) != 1 or len(p[2]) > 1 or (not p[2] and sizes["s"][p[1][0]] != 1):
                return None
    new_axes: dict[int, Axis] = {}
    new_sizes: dict[str, list[int]] = {}
    for g, items in plans.items():
        items.sort(key=lambda p: p[0])
        covered = [k for p in items for k in p[1]]
        if sorted(covered) != list(range(len(sizes[g]))):
            return None
        out_sizes: list[int] = []
        for _, _, nj, nsz in items:
            for j, s in zip(nj, nsz):
                new_axes[j] = (g, len(out_sizes))
                out_sizes.append(int(s))
        new_sizes[g] = out_sizes
    if not new_sizes["a"] or not new_sizes["b"]:
        return None
    s, i, o = tuple(new_sizes["s"]), tuple(new_sizes["a"]), tuple(new_sizes["b"])
    axes = [new_axes[j] for j in range(len(new_shape))]
    return lv.with_w(
        lv.w, axes=axes, n_stack=len(s),
        ab=lambda a, b: (a.reshape(s + i + (a.shape[-1],)), b.reshape(s + (b.shape[ns_old],) + o)),
    )


def _rule_reshape(eqn, invals, ctx):
    lv = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        return _rule_materialize(eqn, invals, ctx)
    new = _reshape_lora(lv, eqn.params["new_sizes"])
    if new is None:
        return _rule_materialize(eqn, invals, ctx, "reshape mixes input and output axes")
    return dataclasses.replace(new, w=_bind(eqn, [lv.w]))


def _rule_squeeze(eqn, invals, ctx):
    (lv,) = invals
    dims = set(d % lv.w.ndim for d in eqn.params["dimensions"])
    new_shape = [s for i, s in enumerate(lv.w.shape) if i not in dims]
    new = _reshape_lora(lv, new_shape)
    if new is None:
        return _rule_materialize(eqn, invals, ctx, "squeeze removes a needed axis")
    return dataclasses.replace(new, w=_bind(eqn, [lv.w]))


def _rule_broadcast_in_dim(eqn, invals, ctx):
    lv = invals[0]
    shape = tuple(eqn.params["shape"])
    bdims = tuple(eqn.params["broadcast_dimensions"])
    is_expand = (
        len(invals) == 1
        and list(bdims) == sorted(bdims)
        and all(shape[bdims[d]] == lv.w.shape[d] for d in range(lv.w.ndim))
        and all(shape[i] == 1 for i in range(len(shape)) if i not in bdims)
    )
    if not is_expand:
        return _rule_materialize(eqn, invals, ctx, "broadcast of a weight")
    new = _reshape_lora(lv, shape)
    if new is None:
        return _rule_materialize(eqn, invals, ctx)
    return dataclasses.replace(new, w=_bind(eqn, [lv.w]))


def _factor_axis(lv: _Lora, view_axis: int) -> list[tuple[str, int]]:
    """The factor axes (``("a"|"b", index)``) that view axis ``view_axis`` indexes."""
    g, k = lv.axes[view_axis]
    if g == "s":
        return [("a", k), ("b", k)]
    if g == "a":
        return [("a", lv.n_stack + k)]
    return [("b", lv.n_stack + 1 + k)]


def _rule_slice(eqn, invals, ctx):
    """``W[i0:i1, j0:j1]`` slices the matching axes of A and B (any role)."""
    (lv,) = invals
    p = eqn.params
    strides = p.get("strides") or (1,) * lv.w.ndim
    if 0 in eqn.outvars[0].aval.shape:
        return _rule_materialize(eqn, invals, ctx, "empty slice")

    def cut(x, f):
        starts, limits, steps = [0] * x.ndim, list(x.shape), [1] * x.ndim
        for i in range(lv.w.ndim):
            for g, j in _factor_axis(lv, i):
                if g == f:
                    starts[j], limits[j], steps[j] = p["start_indices"][i], p["limit_indices"][i], strides[i]
        return jax.lax.slice(x, starts, limits, steps)

    return lv.with_w(_bind(eqn, [lv.w]), ab=lambda a, b: (cut(a, "a"), cut(b, "b")))


def _rule_dynamic_slice(eqn, invals, ctx):
    """``lax.dynamic_slice(W, starts)`` (e.g. ``W[i]`` of stacked layers in a loop)."""
    lv, *starts = invals
    if any(isinstance(s, _Lora) for s in starts) or len(starts) != lv.w.ndim:
        return _rule_materialize(eqn, invals, ctx, "LoRA weight used as an index")
    sizes = eqn.params["slice_sizes"]
    dtype = jnp.asarray(starts[0]).dtype

    def cut(x, f):
        st, sz = [jnp.zeros((), dtype)] * x.ndim, list(x.shape)
        for i in range(lv.w.ndim):
            for g, j in _factor_axis(lv, i):
                if g == f:
                    st[j], sz[j] = jnp.asarray(starts[i]).astype(dtype), sizes[i]
        return jax.lax.dynamic_slice(x, st, sz)

    return lv.with_w(_bind(eqn, [lv.w, *starts]), ab=lambda a, b: (cut(a, "a"), cut(b, "b")))


def _base_product(eqn, invals, fdtype):
    """The model's own product with the base kernel, and the dtype the model asked for.

    Where that dtype is a float narrower than the factors' (a bfloat16 model with float32
    factors), the product is accumulated in the wider dtype and rounded only once, after
    the LoRA branch is added, as a merged kernel's product would be.
    """
    out_dtype = eqn.outvars[0].aval.dtype
    acc = _acc_dtype(out_dtype, fdtype)
    if acc == out_dtype or "preferred_element_type" not in eqn.params:
        return _bind(eqn, invals), out_dtype
    params = dict(eqn.params, preferred_element_type=acc)
    return _bind_with(eqn.primitive, params, invals), out_dtype


def _acc_dtype(out_dtype, fdtype):
    if not jnp.issubdtype(out_dtype, jnp.floating) or not jnp.issubdtype(fdtype, jnp.floating):
        return out_dtype
    return jnp.promote_types(out_dtype, fdtype)


def _like_output(base, target, labels):
    """Under a mesh with ``Explicit`` axes: the sharding of an intermediate of the LoRA
    branch whose axes are ``labels``, taken from the base product's output (axes
    ``target``); axes the output does not have (the rank) are unsharded. This is what
    makes the branch's contractions unambiguous where the model's own product named its
    ``out_sharding``, and the branch add up with the base product. ``None`` otherwise
    (Auto axes or no mesh: XLA propagates shardings itself)."""
    explicit = _explicit_sharding(base)
    if explicit is None:
        return None
    mesh, spec = explicit
    entries = [spec[target.index(lab)] if lab in target else None for lab in labels]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))


def _explicit_sharding(x) -> Optional[tuple[Any, tuple]]:
    """``(mesh, spec)`` of ``x`` (the spec with one entry per axis) where it lives on a
    mesh with Explicit axes; ``None`` otherwise."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def _take_rows(table, rows):
    """``table[rows]``; on an Explicit mesh with the output sharded as ``rows`` along the
    new leading axis and as ``table`` along the others (what JAX asks to be told)."""
    row, tab = _explicit_sharding(rows), _explicit_sharding(table)
    if row is None or tab is None:
        return table[rows]
    (mesh, row_spec), (_, tab_spec) = row, tab
    used = {row_spec[0]} if row_spec[0] is not None else set()
    spec = (row_spec[0],) + tuple(None if e in used else e for e in tab_spec[1:])
    return table.at[rows].get(out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def _add_delta(base, delta, out_dtype):
    """``base + delta`` in the wider of their dtypes, rounded once to ``out_dtype``."""
    acc = jnp.promote_types(base.dtype, delta.dtype)
    return (base.astype(acc) + delta.astype(acc)).astype(out_dtype)


def _gathered_mixed_delta(lv, x, ctx, mode, xc, xb, cgroups, stack_batch, nsf, target, fdtype, precision, base):
    """The LoRA branch of a mixed batch with each example's own factors gathered.

    With ``Aₜ = [0, s₁A₁, s₂A₂, …]`` and ``Bₜ = [0, B₁, B₂, …]`` (ranks zero-padded to
    the largest), example ``e`` using adapter ``j`` gets ``(x_e·Aₜ[j])·Bₜ[j]``: two batched
    products over the example axis, so the cost is one adapter's, whatever the number of
    adapters. Row 0 (zeros) serves the base model and adapters absent on this kernel.
    Returns ``(branch, k)`` (``k``: DoRA's per-example scale shaped like the output, or
    None without DoRA adapters), or None where this form does not apply (the example axis of ``x`` is contracted or
    batched, stacked weights applied to one input, contraction over the output axes, or
    dropout in training, which draws a mask per adapter); the caller then sums masked
    per-adapter branches instead.
    """
    ids = ctx.adapter_ids
    pairs = [p for p in lv.pairs if p.gid >= 0]
    if (
        ids is None or mode != "in" or not pairs or 0 in xc or 0 in xb or nsf
        or x.shape[0] != ids.shape[0]
        or (ctx.key is not None and any(p.dropout > 0 for p in pairs))
    ):
        return None
    ns = lv.n_stack
    r_max = max(p.a.shape[-1] for p in pairs)

    def pad_r(arr, axis):
        extra = r_max - arr.shape[axis]
        if not extra:
            return arr
        widths = [(0, 0)] * arr.ndim
        widths[axis] = (0, extra)
        return jnp.pad(arr, widths)

    a_rows = [pad_r(p.a.astype(fdtype) * jnp.asarray(p.scale, fdtype), -1) for p in pairs]
    b_rows = [pad_r(p.b.astype(fdtype), ns) for p in pairs]
    # zeros_like: the zero row is sharded as the factors are (Explicit mesh axes)
    a_tab = jnp.stack([jnp.zeros_like(a_rows[0])] + a_rows)
    b_tab = jnp.stack([jnp.zeros_like(b_rows[0])] + b_rows)
    row = jnp.zeros_like(ids, dtype=jnp.int32)
    for j, p in enumerate(pairs):
        row = jnp.where(ids == p.gid, j + 1, row)
    a_ex, b_ex = _take_rows(a_tab, row), _take_rows(b_tab, row)  # (E, *stack, *in, r), (E, *stack, r, *out)
    nbat = len(xb)
    nx_free = x.ndim - len(xc) - nbat
    t_labels = [("x", 0)] + [("batch", i) for i in range(nbat)] + [("x", j) for j in range(1, nx_free)]
    labels = t_labels + [("b", k) for k in range(lv.n_out)]
    first_contract = tuple(1 + ns + k for _, k in cgroups)
    t = jax.lax.dot_general(
        x.astype(fdtype), a_ex,
        ((xc, first_contract), ((0,) + tuple(xb), (0,) + tuple(1 + k for k in stack_batch))),
        precision=precision, preferred_element_type=fdtype,
        out_sharding=_like_output(base, target, t_labels + [("r", 0)]),
    )  # (E, batch..., x_free[1:]..., r)
    u = jax.lax.dot_general(
        t, b_ex,
        (((t.ndim - 1,), (1 + ns,)), (tuple(range(1 + nbat)), (0,) + tuple(1 + k for k in stack_batch))),
        precision=precision, preferred_element_type=fdtype,
        out_sharding=_like_output(base, target, labels),
    )  # (E, batch..., x_free[1:]..., out...)
    delta = jnp.transpose(u, [labels.index(lab) for lab in target])
    k_ex = None
    if any(p.k is not None for p in pairs):
        # DoRA: k gathered per example like the factors (row 0 and LoRA adapters: k = 1)
        ones = jnp.ones(pairs[0].b.shape[:ns] + (1,) + pairs[0].b.shape[ns + 1:], jnp.float32)
        k_tab = jnp.stack([ones] + [ones if p.k is None else p.k.astype(jnp.float32) for p in pairs])
        k_rows = _take_rows(k_tab, row)  # (E, *stack, 1, *out)
        k_ex = _k_on(k_rows, 1 + ns, target,
                     lambda j: ("x", 0) if j == 0 else ("batch", list(stack_batch).index(j - 1)))
    return delta, k_ex


def _rule_dot_general(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(lhs, _Lora) and isinstance(rhs, _Lora):
        return _rule_materialize(eqn, invals, ctx, "both operands are LoRA weights")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lora_is_rhs = isinstance(rhs, _Lora)
    if lora_is_rhs:
        lv, x, lvc, xc, lvb, xb = rhs, lhs, tuple(rc), tuple(lc), tuple(rb), tuple(lb)
    else:
        lv, x, lvc, xc, lvb, xb = lhs, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    free = [i for i in range(lv.w.ndim) if i not in lvc and i not in lvb]
    cgroups = [lv.axes[i] for i in lvc]
    bgroups = [lv.axes[i] for i in lvb]
    fgroups = [lv.axes[i] for i in free]
    ns = lv.n_stack

    def covers(groups, g, n):
        return all(gg == g for gg, _ in groups) and sorted(k for _, k in groups) == list(range(n))

    # Stack axes may be batch dimensions (per-layer weights applied to per-layer inputs,
    # e.g. vmapped layers) or free dimensions (all layers applied to one input); the
    # contraction must cover exactly the input axes (or exactly the output axes).
    stack_batch = [k for _, k in bgroups]
    stack_free = sorted(k for g, k in fgroups if g == "s")
    nonstack_free = [(g, k) for g, k in fgroups if g != "s"]
    stack_ok = all(g == "s" for g, _ in bgroups) and sorted(stack_batch + stack_free) == list(range(ns))
    if stack_ok and covers(cgroups, "a", lv.n_in) and covers(nonstack_free, "b", lv.n_out):
        mode = "in"
    elif stack_ok and covers(cgroups, "b", lv.n_out) and covers(nonstack_free, "a", lv.n_in):
        mode = "out"
    else:
        return _rule_materialize(
            eqn, invals, ctx,
            f"contraction over kernel axes {tuple(lvc)} does not match its layout (roles {_roles_str(lv)})",
        )

    fdtype = _factor_dtype(lv)
    pair_x = None
    if mode == "out" and _has_dora(lv):
        # x·W_effᵀ with W_eff = c₀⊙W + Σᵢ cᵢ⊙sᵢΔWᵢ (cᵢ: product of the k of adapters i..n):
        # DoRA scales the input along the contracted output axes
        pair_x = _dora_scaled_inputs(lv, x, xc, xb, cgroups, stack_batch, stack_free, ctx)
        if pair_x is None:
            return _rule_materialize(eqn, invals, ctx, "DoRA on a contraction over output axes it cannot scale")
        x, pair_x = pair_x[0], pair_x[1:]
        lhs, rhs = (x, rhs) if lora_is_rhs else (lhs, x)
    base, out_dtype = _base_product(eqn, [lhs.w if not lora_is_rhs else lhs, rhs.w if lora_is_rhs else rhs], fdtype)
    precision = eqn.params.get("precision")
    nbat, nsf = len(xb), len(stack_free)
    nx_free = x.ndim - len(xc) - nbat
    x_free = [("x", j) for j in range(nx_free)]
    lora_free = [lv.axes[i] for i in free]
    target = [("batch", i) for i in range(nbat)] + (x_free + lora_free if lora_is_rhs else lora_free + x_free)
    # where axis 0 of x (the example axis of a mixed batch) lands in the output
    if 0 in xb:
        ex_axis = target.index(("batch", xb.index(0)))
    elif 0 in xc:
        ex_axis = None
    else:
        ex_axis = target.index(("x", 0))
    gathered = _gathered_mixed_delta(
        lv, x, ctx, mode, xc, xb, cgroups, stack_batch, nsf, target, fdtype, precision, base
    )
    if gathered is not None:
        ctx.record(lv, eqn, "factored")
        delta, k_ex = gathered
        if k_ex is not None:  # DoRA: y_e = k_e⊙(x_e·W + s·(x_e·A)·B), k gathered per example
            acc = jnp.promote_types(base.dtype, delta.dtype)
            return (k_ex.astype(acc) * (base.astype(acc) + delta.astype(acc))).astype(out_dtype)
        return _add_delta(base, delta, out_dtype)
    stack_label = lambda j: ("batch", stack_batch.index(j)) if j in stack_batch else ("s", j)  # noqa: E731
    spec = _BranchSpec(
        mode=mode, xc=xc, xb=xb, first_contract_in=tuple(k for _, k in cgroups), stack_batch=tuple(stack_batch),
        stack_free=tuple(stack_free), lora_free=tuple(lora_free), lora_is_rhs=lora_is_rhs, n_stack=ns,
        precision=precision, dtype=fdtype, base=base, target=tuple(target),
    )
    terms = []
    for i, pair in enumerate(lv.pairs):
        # y = x·W + (s·(dropout(x)·A))·B; over W's output axes (tied embeddings x·Wᵀ): (s·(x·Bᵀ))·Aᵀ
        if mode == "in":
            xd = _dropout(x.astype(fdtype), pair, ctx)
        else:
            xd = (x if pair_x is None else pair_x[i]).astype(fdtype)
        u = lora_branch(xd, pair.a, pair.b, pair.scale, spec)
        mask = _example_mask(pair, ctx, lv, u.ndim, ex_axis, None if ex_axis is None else u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        dropped = xd if mode == "in" and pair.k is not None and pair.dropout > 0 and ctx.key is not None else None
        terms.append((pair, u, mask, dropped))
    ctx.record(lv, eqn, "factored")
    if mode == "in" and _has_dora(lv):

        def base_of(xd):
            operands = [xd.astype(x.dtype), rhs.w] if lora_is_rhs else [lhs.w, xd.astype(x.dtype)]
            return _base_product(eqn, operands, fdtype)[0]

        return _dora_sum(base, terms, out_dtype, lambda p: _k_on(p.k, ns, target, stack_label), base_of)
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), out_dtype)


def _dora_scaled_inputs(lv, x, xc, xb, cgroups, stack_batch, stack_free, ctx):
    """For ``x·W_effᵀ`` (a contraction over the kernel's output axes) with DoRA adapters:
    ``[x⊙c₀, x⊙c₁, …]`` where ``c₀ = Πⱼ kⱼ`` scales the base product and ``cᵢ = Π_{j≥i} kⱼ``
    adapter ``i``'s branch (PEFT's in-order composition). In a mixed batch each example
    ``e`` has one adapter ``j``: every entry is ``x_e⊙k_j`` (``x_e`` for the base model;
    the caller masks the other adapters' branches). None where it cannot be done (a stack
    axis of the kernel is not an axis of x, or the example axis of x is contracted)."""
    ids = ctx.adapter_ids
    if stack_free or (ids is not None and (0 in xc or x.shape[0] != ids.shape[0])):
        return None
    x_labels = []
    free = 0
    for ax in range(x.ndim):
        if ax in xc:
            x_labels.append(cgroups[xc.index(ax)])
        elif ax in xb:
            x_labels.append(("s", stack_batch[xb.index(ax)]))
        else:
            x_labels.append(("x", free))
            free += 1
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if ids is not None:  # one adapter per example: c_e = k of its adapter (1 for the base / plain LoRA)
        c = jnp.ones((), acc)
        for p in lv.pairs:
            if p.k is None:
                continue
            kk = _k_on(p.k, lv.n_stack, x_labels)
            if kk is None:
                return None
            m = (ids == p.gid).astype(acc).reshape((-1,) + (1,) * (x.ndim - 1))
            c = c + m * (kk.astype(acc) - 1)
        scaled = (x.astype(acc) * c).astype(x.dtype)
        return [scaled] * (len(lv.pairs) + 1)
    cum = []
    c = None
    for p in reversed(lv.pairs):
        if p.k is not None:
            kk = _k_on(p.k, lv.n_stack, x_labels)
            if kk is None:
                return None
            c = kk if c is None else c * kk
        cum.append(c)
    cum = cum[::-1]
    scaled = [x if ci is None else (x.astype(acc) * ci).astype(x.dtype) for ci in cum]
    return [scaled[0]] + scaled


@dataclasses.dataclass(frozen=True)
class _BranchSpec:
    """How a ``dot_general`` with a LoRA kernel contracts, in factor terms (built by
    ``_rule_dot_general``; what :func:`lora_branch` needs to emit the branch).

    ``mode`` is ``"in"`` (the contraction covers W's input axes: ``(x·A)·B``) or ``"out"``
    (its output axes, e.g. tied embeddings: ``(x·Bᵀ)·Aᵀ``). ``xc``/``xb``: contracting and
    batch dimensions of ``x``; ``first_contract_in[i]`` the factor axis (input axis of A,
    or output axis of B in mode ``"out"``) that ``xc[i]`` contracts with; ``stack_batch``
    the stack axes matched to ``xb``; ``stack_free`` the stack axes left free (all layers
    applied to one input); ``lora_free`` the kernel's free view axes in view order;
    ``target`` the labels of the model's output axes.
    """

    mode: str
    xc: tuple
    xb: tuple
    first_contract_in: tuple
    stack_batch: tuple
    stack_free: tuple
    lora_free: tuple
    lora_is_rhs: bool
    n_stack: int
    precision: Any
    dtype: Any
    base: Any
    target: tuple


def lora_branch(xd: jax.Array, a: jax.Array, b: jax.Array, scale: float, spec: _BranchSpec) -> jax.Array:
    """The LoRA branch ``(s·(x·A))·B`` of one factor pair, in the layout of the model's
    own product ``x·W`` (``spec.target``), computed in ``spec.dtype``.

    The scale multiplies the rank-``r`` intermediate ``t = x·A`` (``tokens x r``
    elements) rather than the product (``tokens x d_out``), so neither the forward nor the
    backward pass scales an activation-sized array. Where the contraction allows it (no
    stacked-free axes, batch dimensions leading, contracted axes trailing in ``x``, no
    ``Explicit`` mesh axes) both products are emitted as plain matrix products on
    ``x`` flattened to ``(batch..., tokens, d_in)``, with the tiny factors reshaped and
    permuted instead of the activations: XLA:CPU then runs all four backward products
    without transposing an activation-sized cotangent (measured in
    ``benchmarks/lora_train_step.py``). Otherwise the general ``dot_general`` form.

    >>> # inside the interpreter: u = lora_branch(x, pair.a, pair.b, pair.scale, spec)
    """
    flat = _flat_branch(xd, a, b, scale, spec)
    if flat is not None:
        return flat
    return _general_branch(xd, a, b, scale, spec)


def _factor_roles(a, b, spec: _BranchSpec):
    """``(first, second, first_contract, first_r, second_r, second_free)`` for the mode."""
    ns = spec.n_stack
    if spec.mode == "in":
        first, second = a, b
        first_contract = [ns + k for k in spec.first_contract_in]
        first_r, second_r = a.ndim - 1, ns
        second_free = [ns + 1 + k for g, k in spec.lora_free if g != "s"]
    else:
        first, second = b, a
        first_contract = [ns + 1 + k for k in spec.first_contract_in]
        first_r, second_r = ns, a.ndim - 1
        second_free = [ns + k for g, k in spec.lora_free if g != "s"]
    return first, second, first_contract, first_r, second_r, second_free


def _flat_branch(xd, a, b, scale, spec: _BranchSpec):
    """The branch as (batched) 2-D matrix products, or None where it does not apply."""
    nbat, nc = len(spec.xb), len(spec.xc)
    if (
        spec.stack_free or tuple(spec.xb) != tuple(range(nbat))
        or sorted(spec.xc) != list(range(xd.ndim - nc, xd.ndim))
        or _explicit_sharding(spec.base) is not None
    ):
        return None
    first, second, first_contract, first_r, second_r, second_free = _factor_roles(a, b, spec)
    dtype, precision = spec.dtype, spec.precision
    sb = list(spec.stack_batch)
    bshape = tuple(xd.shape[:nbat])
    free_shape = tuple(xd.shape[nbat:xd.ndim - nc])
    m = int(np.prod(free_shape, dtype=np.int64))
    k = int(np.prod(xd.shape[xd.ndim - nc:], dtype=np.int64))
    contract_order = [first_contract[i] for i in sorted(range(nc), key=lambda i: spec.xc[i])]
    r = first.shape[first_r]
    first_m = jnp.transpose(first, sb + contract_order + [first_r]).reshape(bshape + (k, r)).astype(dtype)
    out_shape = tuple(second.shape[i] for i in second_free)
    n = int(np.prod(out_shape, dtype=np.int64))
    second_m = jnp.transpose(second, sb + [second_r] + second_free).reshape(bshape + (r, n)).astype(dtype)
    x3 = xd.reshape(bshape + (m, k))
    bat = tuple(range(nbat))
    t = jax.lax.dot_general(
        x3, first_m, (((nbat + 1,), (nbat,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
    ) * jnp.asarray(scale, dtype)  # (batch..., tokens, r)
    if spec.lora_is_rhs:
        u = jax.lax.dot_general(
            t, second_m, (((nbat + 1,), (nbat,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
        )  # (batch..., tokens, d_out)
        return u.reshape(bshape + free_shape + out_shape)
    u = jax.lax.dot_general(
        second_m, t, (((nbat,), (nbat + 1,)), (bat, bat)), precision=precision, preferred_element_type=dtype,
    )  # (batch..., d_out, tokens)
    return u.reshape(bshape + out_shape + free_shape)


def _general_branch(xd, a, b, scale, spec: _BranchSpec):
    """The branch as two ``dot_general`` over the factors' own axes, then a transpose."""
    first, second, first_contract, _, second_r, _ = _factor_roles(a, b, spec)
    dtype, precision, base, target = spec.dtype, spec.precision, spec.base, list(spec.target)
    xc, xb, stack_batch, stack_free = spec.xc, spec.xb, spec.stack_batch, spec.stack_free
    nbat, nsf = len(xb), len(stack_free)
    nx_free = xd.ndim - len(xc) - nbat
    x_free = [("x", j) for j in range(nx_free)]
    g2, n2 = ("b", second.ndim - spec.n_stack - 1) if spec.mode == "in" else ("a", second.ndim - spec.n_stack - 1)
    labels = (
        [("batch", i) for i in range(nbat)] + [("s", k) for k in stack_free]
        + x_free + [(g2, k) for k in range(n2)]
    )
    t_labels = [("batch", i) for i in range(nbat)] + x_free + [("s", k) for k in stack_free] + [("r", 0)]
    # t: (batch..., x_free..., stack_free..., r), scaled
    t = jax.lax.dot_general(
        xd, first.astype(dtype), ((xc, tuple(first_contract)), (xb, tuple(stack_batch))),
        precision=precision, preferred_element_type=dtype,
        out_sharding=_like_output(base, target, t_labels),
    ) * jnp.asarray(scale, dtype)
    t_batch = tuple(range(nbat)) + tuple(nbat + nx_free + i for i in range(nsf))
    # u: (batch..., stack_free..., x_free..., second's free factor axes in factor order)
    u = jax.lax.dot_general(
        t, second.astype(dtype),
        (((t.ndim - 1,), (second_r,)), (t_batch, tuple(stack_batch) + tuple(stack_free))),
        precision=precision, preferred_element_type=dtype,
        out_sharding=_like_output(base, target, labels),
    )
    return jnp.transpose(u, [labels.index(lab) for lab in target])


def _rule_gather(eqn, invals, ctx):
    operand, indices = invals
    if not isinstance(operand, _Lora) or isinstance(indices, _Lora):
        return _rule_materialize(eqn, invals, ctx, "LoRA weight used as gather indices")
    lv = operand
    dn = eqn.params["dimension_numbers"]
    slice_sizes = tuple(eqn.params["slice_sizes"])
    a_view = [i for i, (g, _) in enumerate(lv.axes) if g == "a"]
    other = [i for i, (g, _) in enumerate(lv.axes) if g != "a"]
    ok = (
        lv.n_stack == 0
        and not dn.operand_batching_dims
        and sorted(dn.collapsed_slice_dims) == a_view
        and sorted(dn.start_index_map) == a_view
        and all(slice_sizes[i] == 1 for i in a_view)
        and all(slice_sizes[i] == lv.w.shape[i] for i in other)
    )
    if not ok:
        return _rule_materialize(eqn, invals, ctx, "gather is not a row lookup over the input axes")
    base = _bind(eqn, [lv.w, indices])
    n_offset = len(other)
    batch_rank = base.ndim - n_offset
    fdtype = _factor_dtype(lv)
    ks = [lv.axes[i][1] for i in other]  # view order of the b axes
    batch_out = [i for i in range(base.ndim) if i not in dn.offset_dims]
    ex_axis = batch_out[0] if batch_out else None
    terms = []
    for pair in lv.pairs:
        r = pair.a.shape[-1]
        a_dn = jax.lax.GatherDimensionNumbers(
            offset_dims=(batch_rank,),
            collapsed_slice_dims=tuple(range(lv.n_in)),
            start_index_map=tuple(lv.axes[i][1] for i in dn.start_index_map),
            operand_batching_dims=(),
            start_indices_batching_dims=(),
        )
        params = dict(eqn.params)
        params.update(dimension_numbers=a_dn, slice_sizes=(1,) * lv.n_in + (r,))
        ga = _bind_with(eqn.primitive, params, [pair.a, indices])  # (batch..., r)
        u = jax.lax.dot_general(ga.astype(fdtype), pair.b.astype(fdtype), (((ga.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=fdtype)
        u = jnp.transpose(u, list(range(batch_rank)) + [batch_rank + k for k in ks])
        u = jnp.moveaxis(u, list(range(batch_rank, batch_rank + n_offset)), list(dn.offset_dims))
        u = u * jnp.asarray(pair.scale, fdtype)
        mask = _example_mask(pair, ctx, lv, u.ndim, ex_axis, None if ex_axis is None else u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        terms.append((pair, u, mask, None))
    ctx.record(lv, eqn, "factored")
    if _has_dora(lv):  # DoRA on an embedding: y = k⊙(W[ids] + s·A[ids]·B), k per feature
        target = [("x", i) for i in range(base.ndim)]
        for t, i in enumerate(dn.offset_dims):
            target[i] = lv.axes[other[t]]
        return _dora_sum(base, terms, base.dtype, lambda p: _k_on(p.k, 0, target), None)
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), base.dtype)


def _rule_conv(eqn, invals, ctx):
    x, k = invals
    if isinstance(x, _Lora) or not isinstance(k, _Lora):
        return _rule_materialize(eqn, invals, ctx, "LoRA weight used as conv input")
    lv = k
    p = eqn.params
    dn = p["dimension_numbers"]
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    ok = (
        lv.n_stack == 0 and lv.n_out == 1 and lv.axes[out_dim] == ("b", 0)
        and all(g == "a" for i, (g, _) in enumerate(lv.axes) if i != out_dim)
        and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
    )
    if not ok:
        if _has_dora(lv) and (p["feature_group_count"] != 1 or p["batch_group_count"] != 1):
            raise ValueError(
                f"jlora: DoRA (use_dora=True) on the grouped convolution {lv.path!r} (feature_group_count="
                f"{p['feature_group_count']}): PEFT's DoRA norm is wrong there and its merge fails; jlora does not "
                "support it. Leave this target out (exclude_modules) or use use_dora=False"
            )
        return _rule_materialize(eqn, invals, ctx, "grouped conv or unusual kernel layout")
    fdtype = _factor_dtype(lv)
    base, out_dtype = _base_product(eqn, [x, lv.w], fdtype)
    perm = [lv.n_in if i == out_dim else lv.axes[i][1] for i in range(lv.w.ndim)]
    params = dict(p)
    params["preferred_element_type"] = fdtype
    of, ex_axis = dn.out_spec[1], dn.out_spec[0]
    terms = []
    for pair in lv.pairs:
        a_kernel = jnp.transpose(pair.a, perm).astype(fdtype)
        xd = _dropout(x.astype(fdtype), pair, ctx)
        t = _bind_with(eqn.primitive, params, [xd, a_kernel])
        u = jax.lax.dot_general(t, pair.b.astype(fdtype), (((of,), (0,)), ((), ())), preferred_element_type=fdtype)
        u = jnp.moveaxis(u, -1, of) * jnp.asarray(pair.scale, fdtype)
        mask = _example_mask(pair, ctx, lv, u.ndim, ex_axis, u.shape[ex_axis], fdtype)
        if mask is not None:
            u = u * mask
        dropped = xd if pair.k is not None and pair.dropout > 0 and ctx.key is not None else None
        terms.append((pair, u, mask, dropped))
    ctx.record(lv, eqn, "factored")
    del in_dim
    if _has_dora(lv):
        target = [("x", i) for i in range(base.ndim)]
        target[of] = ("b", 0)
        return _dora_sum(base, terms, out_dtype, lambda p: _k_on(p.k, 0, target),
                         lambda xd: _base_product(eqn, [xd.astype(x.dtype), lv.w], fdtype)[0])
    return _add_delta(base, functools.reduce(jnp.add, [u for _, u, _, _ in terms]), out_dtype)


def _open(j: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` or an open ``Jaxpr``."""
    if hasattr(j, "consts") and hasattr(j, "jaxpr"):
        return j.jaxpr, j.consts
    return j, ()


def _sub_jaxpr(params: dict, names: Sequence[str]) -> Any:
    for n in names:
        if n in params:
            return params[n]
    raise KeyError(f"none of {names} in {sorted(params)}")


def _inline(*jaxpr_params: str):
    """Evaluates a nested jit / call / custom_jvp / custom_vjp body in place, so LoRA
    values stay factored inside it and may also come back out of it."""

    def rule(eqn, invals, ctx):
        jaxpr, consts = _open(_sub_jaxpr(eqn.params, jaxpr_params))
        return eval_jaxpr(jaxpr, consts, invals, ctx, materialize_out=False)

    rule.structural = True
    return rule


def _pair_arrays(p: _Pair) -> list[Any]:
    return [p.a, p.b] if p.k is None else [p.a, p.b, p.k]


def _lora_arrays(v: _Lora) -> list[Any]:
    return [v.w] + [x for p in v.pairs for x in _pair_arrays(p)]


def _lora_spec(v: _Lora) -> _Lora:
    # k=True marks a DoRA pair (its k is one more array)
    return dataclasses.replace(
        v, w=None, pairs=tuple(dataclasses.replace(p, a=None, b=None, k=None if p.k is None else True) for p in v.pairs)
    )


def _n_arrays(spec: _Lora) -> int:
    return 1 + sum(2 if p.k is None else 3 for p in spec.pairs)


def _lora_from(spec: _Lora, arrays: Sequence[Any]) -> _Lora:
    pairs, i = [], 1
    for p in spec.pairs:
        n = 2 if p.k is None else 3
        got = dict(zip(("a", "b", "k"), arrays[i:i + n]))
        pairs.append(dataclasses.replace(p, **got))
        i += n
    return dataclasses.replace(spec, w=arrays[0], pairs=tuple(pairs))


def _flatten_vals(vals: Sequence[Any]):
    """Splits values into arrays (a LoRA value as its w and factors) and a rebuild function."""
    flat: list[Any] = []
    specs: list[Any] = []
    for v in vals:
        if isinstance(v, _Lora):
            specs.append(_lora_spec(v))
            flat.extend(_lora_arrays(v))
        else:
            specs.append(None)
            flat.append(v)

    def rebuild(arrays: Sequence[Any]) -> list[Any]:
        out, i = [], 0
        for s in specs:
            if s is None:
                out.append(arrays[i])
                i += 1
            else:
                n = _n_arrays(s)
                out.append(_lora_from(s, arrays[i:i + n]))
                i += n
        return out

    return flat, rebuild


def _rule_remat(eqn, invals, ctx):
    """``jax.checkpoint`` / ``nn.remat`` / ``nnx.remat``: re-applied around the interpreted
    body with the same ``policy`` and ``prevent_cse``; the dropout key is an argument, so
    the recomputation draws the same masks. LoRA values returned by the body stay
    factored (``nnx.remat`` returns the module's state)."""
    p = eqn.params
    jaxpr, consts = _open(p["jaxpr"])
    flat, rebuild = _flatten_vals(invals)
    has_key = ctx.key is not None
    out_rebuild: list[Callable] = []

    def body(key, *arrays):
        sub = ctx.child(key if has_key else None)
        # LoRA values the body returns (an NNX module's state going in and out of
        # nnx.remat) leave factored, as W and its factors, and are rebuilt outside.
        outs = eval_jaxpr(jaxpr, consts, rebuild(arrays), sub, materialize_out=False)
        out_flat, out_rb = _flatten_vals(outs)
        out_rebuild.append(out_rb)
        return out_flat

    key = ctx.next_key() if has_key else jnp.zeros((), jnp.uint32)
    fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
    out = fn(key, *flat)
    return out_rebuild[-1](out)


def _rule_cond(eqn, invals, ctx):
    """``lax.cond`` / ``lax.switch``: every branch is interpreted with the LoRA operands."""
    index, *ops = invals
    if isinstance(index, _Lora):
        return _rule_materialize(eqn, invals, ctx, "LoRA weight used as a cond predicate")
    flat, rebuild = _flatten_vals(ops)
    key = ctx.next_key()

    def branch(closed):
        jaxpr, consts = _open(closed)

        def run(*arrays):
            return eval_jaxpr(jaxpr, consts, rebuild(arrays), ctx.child(key))

        return run

    return jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *flat)


def _rule_while(eqn, invals, ctx):
    """``lax.while_loop`` / ``fori_loop``: LoRA weights as loop constants stay factored
    (a LoRA value in the carry is materialised). With dropout, each iteration draws its
    own masks."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
    init = [_materialize(v, ctx, eqn, "LoRA weight carried through a loop") for v in invals[cn + bn:]]
    cjaxpr, cjconsts = _open(p["cond_jaxpr"])
    bjaxpr, bjconsts = _open(p["body_jaxpr"])
    key = ctx.next_key()

    def cond_fn(state):
        _, carry = state
        return eval_jaxpr(cjaxpr, cjconsts, [*cconsts, *carry], ctx.child(None))[0]

    def body_fn(state):
        i, carry = state
        sub = ctx.child(None if key is None else jax.random.fold_in(key, i))
        return i + 1, eval_jaxpr(bjaxpr, bjconsts, [*bconsts, *carry], sub)

    _, out = jax.lax.while_loop(cond_fn, body_fn, (jnp.zeros((), jnp.int32), init))
    return out


def _rule_scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts = list(invals[:nc])
    init = [_materialize(v, ctx, eqn, "LoRA weight carried through a scan") for v in invals[nc:nc + ncar]]
    xs = []
    for v in invals[nc + ncar:]:
        v = v.with_w(_quant.prepare_scanned(v.w)) if isinstance(v, _Lora) else _quant.prepare_scanned(v)
        if isinstance(v, _Lora) and v.axes[0][0] != "s":
            v = _materialize(v, ctx, eqn, "scan slices a non-stack axis of the weight")
        xs.append(v)

    # stacked LoRA values scanned over their leading stack axis
    xs_flat: list[Any] = []
    xs_specs: list[Any] = []
    for v in xs:
        if isinstance(v, _Lora):
            m = v.axes[0][1]
            moved = v.with_w(v.w, ab=lambda a, b: (jnp.moveaxis(a, m, 0), jnp.moveaxis(b, m, 0)))
            inner_axes = tuple(("s", k if k < m else k - 1) if g == "s" else (g, k) for g, k in v.axes[1:])
            xs_specs.append(dataclasses.replace(_lora_spec(v), axes=inner_axes, n_stack=v.n_stack - 1))
            xs_flat.append(tuple(_lora_arrays(moved)))
        else:
            xs_specs.append(None)
            xs_flat.append(v)
    length = p["length"]
    keys = None
    if ctx.key is not None:
        keys = jax.random.split(ctx.next_key(), length)
    body_jaxpr, body_consts = _open(p["jaxpr"])

    def body(carry, xs_and_key):
        xs_vals, key = xs_and_key
        vals = []
        for spec, val in zip(xs_specs, xs_vals):
            if spec is None:
                vals.append(val)
            else:
                vals.append(_lora_from(spec, val))
        sub = ctx.child(key)
        outs = eval_jaxpr(body_jaxpr, body_consts, [*consts, *carry, *vals], sub)
        return outs[:ncar], outs[ncar:]

    carry, ys = jax.lax.scan(
        body, init, (xs_flat, keys), length=length, reverse=p["reverse"], unroll=p["unroll"],
    )
    return [*carry, *ys]


_RULES: dict[str, Callable] = {
    "dot_general": _rule_dot_general,
    "transpose": _rule_transpose,
    "convert_element_type": _rule_convert,
    "copy": _rule_passthrough,
    "copy_p": _rule_passthrough,
    "sharding_constraint": _rule_passthrough,
    "reshard": _rule_reshard,
    "reshape": _rule_reshape,
    "squeeze": _rule_squeeze,
    "broadcast_in_dim": _rule_broadcast_in_dim,
    "slice": _rule_slice,
    "dynamic_slice": _rule_dynamic_slice,
    "gather": _rule_gather,
    "conv_general_dilated": _rule_conv,
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "custom_jvp_call": _inline("call_jaxpr", "fun_jaxpr"),
    "custom_vjp_call": _inline("call_jaxpr", "fun_jaxpr"),
    "custom_vjp_call_jaxpr": _inline("fun_jaxpr", "call_jaxpr"),
    "checkpoint": _rule_remat,
    "remat2": _rule_remat,
    "scan": _rule_scan,
    "cond": _rule_cond,
    "while": _rule_while,
}
# Primitive names as this JAX version spells them (names have moved between releases).
for _name, _rule in [
    ("jit_p", _inline("jaxpr")),
    ("closed_call_p", _inline("call_jaxpr")),
    ("call_p", _inline("call_jaxpr")),
    ("custom_jvp_call_p", _inline("call_jaxpr", "fun_jaxpr")),
    ("custom_vjp_call_p", _inline("call_jaxpr", "fun_jaxpr")),
    ("remat_p", _rule_remat),
    ("scan_p", _rule_scan),
    ("cond_p", _rule_cond),
    ("while_p", _rule_while),
    ("copy_p", _rule_passthrough),
    ("sharding_constraint_p", _rule_passthrough),
    ("reshard_p", _rule_reshard),
]:
    _prim = getattr(_prims, _name, None) if _prims is not None else None
    if _prim is not None:
        _RULES.setdefault(_prim.name, _rule)


for _rule in (_rule_remat, _rule_cond, _rule_while, _rule_scan):
    _rule.structural = True  # also evaluated for a quantized kernel alone (jlora.qforward)


def _structural(eqn: Any) -> bool:
    """Whether the equation's rule evaluates a nested body (jit, scan, remat, cond, ...)."""
    return getattr(_RULES.get(eqn.primitive.name), "structural", False)


# ----------------------------------------------------------------------------------
# The public transform
# ----------------------------------------------------------------------------------


def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraWeight, MultiLoraWeight, Trainable))


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


def _adapter_names(leaves: Sequence[Any]) -> list[str]:
    """All adapter names, in order of first appearance (as ``jlora.adapter_names``)."""
    names: list[str] = []
    for x in leaves:
        if isinstance(x, LoraWeight):
            found = [_DEFAULT_ADAPTER]
        elif isinstance(x, MultiLoraWeight):
            found = list(x.adapters)
        else:
            continue
        names += [n for n in found if n not in names]
    return names


def _lora_value(leaf: Any, path: str, names: list[str], mixed: bool) -> Any:
    """The interpreter's value for a LoRA node: a ``_Lora``, or a plain kernel when no
    adapter applies (merged, disabled, none active)."""
    w = _quant.as_value(leaf.w) if is_quantized(leaf.w) else jax.lax.stop_gradient(leaf.w)
    if isinstance(leaf, LoraWeight):
        if leaf.merged:
            if mixed:
                raise ValueError(f"jlora: {path!r} is merged (merge_adapter); unmerge it to use adapter_ids")
            return leaf.w
        named = [(_DEFAULT_ADAPTER, leaf)]
    else:
        if not leaf.enabled:
            return w
        chosen = list(leaf.adapters) if mixed else [n for n in leaf.active if n in leaf.adapters]
        named = [(n, leaf.adapters[n]) for n in chosen]
    if not named:
        return w
    layout = named[0][1].layout
    axes, n_stack = _roles_to_axes(layout)
    pairs = tuple(
        _Pair(a=x.a, b=x.b, scale=x.scale, dropout=x.dropout, gid=names.index(n) if mixed else -2,
              k=_dora_k(leaf.w, x, n_stack)) for n, x in named
    )
    return _Lora(w=w, pairs=pairs, axes=axes, n_stack=n_stack, path=path)


def _dora_k(w: Any, x: LoraWeight, n_stack: int) -> Any:
    """DoRA's ``k = m / stop_gradient(‖W + s·ΔW‖)`` for adapter ``x`` on kernel ``w``, once per
    call (float32, ``(*stack, 1, *out)``: B's axes with rank 1); None for a LoRA adapter."""
    if x.magnitude is None:
        return None
    if is_quantized(w):  # the norm of the dequantized base (a constant: no residual)
        w = w.dequantize(w.compute_dtype)
    return jnp.expand_dims(magnitude_scale(w, x.a, x.b, x.magnitude, x.scale, x.layout), n_stack)


def _run(fn, args, kwargs, key, on_materialize, events, adapter_ids=None):
    flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(
        (args, kwargs), is_leaf=lambda x: _is_node(x) or is_quantized(x)
    )
    flat = [leaf for _, leaf in flat_with_path]
    names = _adapter_names(flat)
    mixed = adapter_ids is not None
    if mixed:
        adapter_ids = jnp.asarray(adapter_ids)
        if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise ValueError(
                f"adapter_ids must be a 1-D integer array (one adapter index per example, -1 for the base "
                f"model; see jlora.adapter_ids), got {adapter_ids.dtype}{list(adapter_ids.shape)}"
            )
        from .adapters import check_adapter_ids  # issue 16: no silent out-of-range ids

        check_adapter_ids(adapter_ids, names)
    statics = list(flat)
    dyn_idx: list[int] = []
    dyn_vals: list[Any] = []
    for i, (path, leaf) in enumerate(flat_with_path):
        if isinstance(leaf, (LoraWeight, MultiLoraWeight)):
            pn = path_names(path)
            dyn_idx.append(i)
            dyn_vals.append(_lora_value(leaf, "/".join(pn[2:]) or "/".join(pn), names, mixed))
        elif isinstance(leaf, Trainable):
            dyn_idx.append(i)
            dyn_vals.append(leaf.value)
        elif is_quantized(leaf):  # a frozen quantized kernel that is not a LoRA target
            dyn_idx.append(i)
            dyn_vals.append(_quant.as_value(leaf))
        elif _is_dynamic(leaf):
            dyn_idx.append(i)
            dyn_vals.append(leaf)

    def flat_fn(*dyn):
        leaves = list(statics)
        for i, v in zip(dyn_idx, dyn):
            leaves[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, leaves)
        return fn(*a, **k)

    avals = [_abstract(v.w if isinstance(v, _Lora) else v) for v in dyn_vals]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
    ctx = _Context(key, on_materialize, events, adapter_ids)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, dyn_vals, ctx)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _abstract(value: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of ``value`` (an array or a tracer), to trace ``fn`` with:
    under a mesh with ``Explicit`` axes the sharding is part of the type, and a jaxpr traced
    without it would build replicated intermediates that clash with the real ones."""
    if _quant.is_view(value):
        return value.aval
    t = jax.typeof(value)
    return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)


def lora(fn: Callable[..., Any], *, on_materialize: OnMaterialize = "warn") -> Callable[..., Any]:
    """Returns ``fn`` with LoRA applied to every ``LoraWeight`` in its arguments.

    For each LoRA weight used as a kernel, the wrapped function computes::

        y = x·W + s · (dropout(x)·A)·B          s = lora_alpha / r

    without ever forming ``W + s·A·B`` (see the module docstring for where it is formed).
    The base ``W`` is frozen (``stop_gradient``): gradients flow to A, B and ``Trainable``
    leaves only. ``Trainable`` leaves are passed to ``fn`` as plain arrays; leaves of
    merged weights (:func:`jlora.merge_adapter`) are passed as they are.

    The returned function has ``fn``'s signature plus two keyword-only arguments:

    - ``lora_rng``: a PRNG key for LoRA dropout (rate ``LoraConfig.lora_dropout``, on the
      input of A). No key (the default) means no dropout, as in evaluation. The same key
      gives the same masks; each use of a weight (each scanned layer) its own mask.
    - ``adapter_ids``: for trees with several named adapters (:mod:`jlora.adapters`), a
      mixed batch: one adapter index per example (from :func:`jlora.adapter_ids`; ``-1``
      for the base model alone), applied along axis 0 of each targeted layer's input.
      Without it, the active adapters' deltas are summed for every example. Concrete
      ids outside ``-1 .. n_adapters - 1`` raise ``ValueError``; traced ids (under
      ``jit``) cannot be checked, and an out-of-range id there selects no adapter (the
      example gets the base model), so build ids with :func:`jlora.adapter_ids`.

    Non-array arguments (Python bools, strings, ints) are static.

    Args:
      fn: any function whose arguments hold parameter trees, e.g. ``model.apply``.
      on_materialize: what to do where a weight cannot stay factored: ``"warn"`` (a
        :class:`MaterializationWarning`), ``"error"`` (:class:`MaterializationError`),
        or ``"allow"``.

    Example:
      >>> forward = lora(model.apply)                                  # doctest: +SKIP
      >>> logits = forward({"params": lp}, x)                          # doctest: +SKIP
      >>> loss = forward({"params": lp}, x, lora_rng=jax.random.key(1))  # with dropout
    """
    if on_materialize not in ("warn", "error", "allow"):
        raise ValueError(f"on_materialize={on_materialize!r}: must be 'warn', 'error' or 'allow'")

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_rng: Optional[jax.Array] = None, adapter_ids: Optional[jax.Array] = None,
                **kwargs: Any) -> Any:
        return _run(fn, args, kwargs, lora_rng, on_materialize, [], adapter_ids)

    return wrapped


def explain(fn: Callable[..., Any], *args: Any, lora_rng: Optional[jax.Array] = None,
            adapter_ids: Optional[jax.Array] = None, **kwargs: Any) -> LoraReport:
    """Reports, for the call ``fn(*args, **kwargs)``, which LoRA weights ``lora(fn)``
    keeps factored and which it materialises, and where (primitive, module, source line).

    Only traces (``jax.eval_shape``); nothing is computed.

    >>> print(explain(model.apply, {"params": lp}, x))        # doctest: +SKIP
    >>> explain(model.apply, {"params": lp}, x).materialized  # doctest: +SKIP
    []
    """
    events: list[LoraEvent] = []
    # Only arrays are traced; everything else (Python flags such as ``train=False``,
    # strings, modules) is passed through unchanged, as ``lora(fn)`` does.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x) or isinstance(x, jax.ShapeDtypeStruct)]

    def run(dyn_vals, ids):
        full = list(leaves)
        for i, v in zip(dyn, dyn_vals):
            full[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return _run(fn, a, k, lora_rng, "allow", events, ids)

    jax.eval_shape(run, [leaves[i] for i in dyn], adapter_ids)
    return LoraReport(tuple(events))
