"""qwix / tunix LoRA state, both ways: :func:`from_qwix` and :func:`to_qwix`; the factor forms
are :mod:`jlora.io.qwix_forms`.

Google's qwix (the LoRA of tunix's trainers and sampler, and of MaxText) keeps a LoRA
adapter as two ``nnx.LoRAParam`` leaves beside each adapted kernel ``<name>`` (for
Linen: two ``params`` entries), and applies it where the model calls ``jnp.einsum``,
``lax.dot_general`` or ``lax.conv_general_dilated`` on that kernel::

    <name>_lora_a   A_q          <name>_lora_b   B_q
    y = op(x, W) + (alpha / rank) · op'(x, A_q, B_q)

where ``alpha``, ``rank`` (and ``dropout``, on the input of ``A_q``) live on the
``qwix.LoraProvider``'s rule for the module (``LoraRule(module_path=regex, rank, alpha)``,
the first rule whose ``module_path`` fully matches the module's ``/``-joined path), not
in the state. The factor shapes follow the op (qwix 0.1.8, ``qwix/_src/providers/lora.py``;
the table of forms is :mod:`jlora.io.qwix_forms`'s docstring).
So ``BTD,DNH->BTNH`` on ``w (D, N, H)`` has ``A_q (D, r)``, ``B_q (r, N, H)``;
``BTNH,NHD->BTD`` on ``w (N, H, D)`` has ``A_q (N, H, r)``, ``B_q (r, D)``; an
``nnx.Linear`` kernel ``(in, out)`` has ``A_q (in, r)``, ``B_q (r, out)``. jlora's
canonical factors (:class:`jlora.LoraWeight`) are ``A (*stack, *in, r)`` and
``B (*stack, r, *out)`` with the roles of :class:`jlora.KernelLayout`: the same numbers,
rearranged, except where one side of qwix's pair is shared along an axis that jlora
treats as a ``"stack"`` axis (an einsum batch axis: ``B_q`` has no such axis; Gemma's
``kv_einsum (2, K, D, H)`` with k and v as two adapters: ``A_q`` has none). qwix → jlora
then broadcasts the shared factor; jlora → qwix takes one slice where the slices are
equal, or writes the slices side by side along the rank (rank ``n·r``, a block
``B_q``) when the qwix model was built with that rank for the kernel.

``ΔW`` is the same tensor in both, and so is the scale ``alpha / rank``: the converted
adapter computes what the qwix model computes.
"""


from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ..layouts.from_tree import LayoutSpec, user_layout
from ..layouts.from_use import find_kernel_uses
from ..nodes.weight import LoraWeight, MultiLoraWeight, Trainable, is_lora_node
from ..quant.array import is_quantized
from ..tree.targets import flatten_params
from .qwix_forms import (
    QwixForm,
    canonical_to_qwix,
    clean_number,
    kernel_roles,
    qwix_forms,
    qwix_to_canonical,
    required_rank,
)

__all__ = ["from_qwix", "to_qwix", "qwix_rules"]

LORA_A = "_lora_a"
LORA_B = "_lora_b"
_QWIX_ATTRIBUTES = ("qwix_path", "qwix_rngs", "disable_quant_stats_update")
_LORA_OPS = ("einsum", "dot_general", "conv_general_dilated")


def _nnx():
    return sys.modules.get("flax.nnx")


def _is_module(x: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Module)


def _is_state(x: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.State)


def _key(k: Any) -> Any:
    """A ``jax.tree_util`` path entry as the key it stands for (``None``: NNX's ``.value``)."""
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in ("value", "raw_value") else k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return k.key
    return k


def _flat_variables(tree: Any) -> list[tuple[tuple, Any, Optional[type]]]:
    """``[(keys, value, Variable type or None)]`` of a state tree (an ``nnx.State``, a
    nested dict), each NNX Variable as one entry."""
    nnx = _nnx()
    is_var = (lambda x: isinstance(x, nnx.Variable)) if nnx is not None else None
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        keys = tuple(k for k in (_key(p) for p in path) if k is not None)
        if nnx is not None and isinstance(x, nnx.Variable):
            out.append((keys, x.get_value(), type(x)))
        else:
            out.append((keys, x, None))
    return out


def _is_factor(keys: tuple, kind: Optional[type]) -> bool:
    nnx = _nnx()
    name = str(keys[-1]) if keys else ""
    if not name.endswith((LORA_A, LORA_B)):
        return False
    return kind is None or (nnx is not None and issubclass(kind, nnx.LoRAParam))


def _strip_mapping(tree: Any) -> Any:
    """A nested dict without qwix's factor entries (container types kept)."""
    if isinstance(tree, Mapping):
        kept = {k: _strip_mapping(v) for k, v in tree.items() if not _is_factor((k,), None) or isinstance(v, Mapping)}
        try:
            return type(tree)(kept)
        except TypeError:
            return kept
    return tree


def _iter_modules(m: Any):
    """``(path, submodule)`` of an ``nnx.Module``, itself included."""
    nnx = _nnx()
    return list(nnx.iter_modules(m)) if hasattr(nnx, "iter_modules") else list(m.iter_modules())


def _base_module(qmodel: Any) -> Any:
    """A copy of a qwix-LoRA ``nnx.Module`` as the module it was made from: the factor
    Variables and qwix's attributes removed, the root's class the unquantized one."""
    nnx = _nnx()
    m = nnx.clone(qmodel)
    for _, sub in _iter_modules(m):
        for name in list(vars(sub)):
            value = vars(sub)[name]
            if (isinstance(value, nnx.LoRAParam) and name.endswith((LORA_A, LORA_B))) or name in _QWIX_ATTRIBUTES \
                    or name.endswith("_lora_einsum_str"):
                delattr(sub, name)
    unquantized = getattr(type(m), "_unquantized_type", None)
    if unquantized is not None:
        object.__setattr__(m, "__class__", unquantized)
    return m


@dataclasses.dataclass(frozen=True)
class _Pair:
    kernel: str            # "/"-joined path of the kernel
    keys: tuple            # its keys
    a: Any
    b: Any


def _pairs(flat: Sequence[tuple[tuple, Any, Optional[type]]]) -> tuple[list[_Pair], dict[str, Any]]:
    """qwix's factor pairs by kernel, and every other leaf by path; a lone factor or a
    factor without its kernel is an error naming it."""
    factors: dict[tuple, dict[str, Any]] = {}
    others: dict[str, Any] = {}
    for keys, value, kind in flat:
        if _is_factor(keys, kind):
            name = str(keys[-1])
            which = "a" if name.endswith(LORA_A) else "b"
            kernel_keys = keys[:-1] + (name[: -len(LORA_A)],)
            factors.setdefault(kernel_keys, {})[which] = value
        else:
            others["/".join(map(str, keys))] = value
    pairs = []
    for kernel_keys, ab in factors.items():
        path = "/".join(map(str, kernel_keys))
        if set(ab) != {"a", "b"}:
            have = path + (LORA_A if "a" in ab else LORA_B)
            miss = path + (LORA_B if "a" in ab else LORA_A)
            raise ValueError(f"{have}: qwix's factors come in pairs, and {miss} is missing")
        if path not in others:
            near = sorted(p for p in others if p.rsplit("/", 1)[0] == path.rsplit("/", 1)[0])
            raise ValueError(
                f"{path}{LORA_A} / {path}{LORA_B}: no kernel {path} beside them (a quantized qwix base, QLoRA, "
                f"holds its kernel as a subtree; from_qwix needs a plain array there); that module has: {near}"
            )
        pairs.append(_Pair(path, kernel_keys, ab["a"], ab["b"]))
    return pairs, others


def _rules_of(provider: Any) -> list[Any]:
    """A ``qwix.LoraProvider``'s rules (or a list of ``qwix.LoraRule``)."""
    rules = getattr(provider, "_rules", None)
    if rules is None and isinstance(provider, (list, tuple)):
        rules = list(provider)
    if rules is None or not all(hasattr(r, "module_path") for r in rules):
        raise TypeError(
            f"provider must be a qwix.LoraProvider (or a list of qwix.LoraRule), got {type(provider).__name__}"
        )
    return list(rules)


def _rule_for(rules: Sequence[Any], module_path: str, ops: Sequence[str]) -> Any:
    """The rule qwix applies to an op of ``ops`` in the module at ``module_path``: the
    first whose ``module_path`` fully matches and whose ``op_names`` is empty or has the op
    (qwix's ``_get_current_rule_and_op_id``). ``None`` if none; ``ValueError`` if the op
    decides and is unknown."""
    found = []
    for op in ops:
        rule = next((r for r in rules if re.fullmatch(r.module_path, module_path)
                     and (not getattr(r, "op_names", ()) or op in r.op_names)), None)
        if all(rule is not f for f in found):
            found.append(rule)
    if len(found) > 1:
        raise ValueError(
            f"{module_path}: the provider's rules for it depend on the op ({', '.join(ops)}), which its qwix "
            f"state does not tell: {found}. Pass alpha= instead"
        )
    return found[0]


def _is_abstract(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _is_embedding_name(names: Sequence[str]) -> bool:
    return any("embed" in str(n).lower() or str(n) in ("wte", "tok_embeddings") for n in names[-2:])


def from_qwix(
    qwix_model: Any,
    provider: Any = None,
    *,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    apply_fn: Optional[Callable[..., Any]] = None,
    example_args: Sequence[Any] = (),
    layouts: LayoutSpec = None,
) -> Any:
    """A qwix-LoRA model (tunix, MaxText) as a jlora LoRA tree with the same outputs.

    Every kernel ``W`` with qwix factors ``<name>_lora_a`` / ``<name>_lora_b`` beside it
    becomes ``LoraWeight(w=W, a=A, b=B, scale=alpha/rank)`` with jlora's canonical
    ``A (*stack, *in, r)``, ``B (*stack, r, *out)``, such that
    ``W + (alpha/rank)·A·B`` (in W's layout) is the kernel qwix computes with; the factor
    leaves are gone, every other leaf is kept as it is, so the tree has the structure of
    the base model's state::

        qwix:   y = op(x, W) + (alpha / rank) · op'(x, A_q, B_q)
        jlora:  y = x·W + s·(x·A)·B,   s = alpha / rank,   A·B = A_q·B_q rearranged

    Which kernel axes are ``"in"``, ``"out"`` or ``"stack"`` follows from qwix's factor
    shapes (an einsum's ``A_q`` holds the axes the input shares, ``B_q`` the others); where
    the shapes leave it open (a square ``(D, D)`` kernel), ``layouts=``, else how
    ``apply_fn`` uses the kernel, else the tree (as :func:`jlora.wrap` infers layouts)
    decides, and the error says so when none does.

    Args:
      qwix_model: the model ``qwix.apply_lora_to_model`` returned (an ``nnx.Module``; the
        result is then a module of the original class, ``qwix``'s interception removed),
        its ``nnx.State`` (the result is a State with the base model's structure), or a
        Linen ``params`` dict of a qwix-LoRA Linen model.
      provider: the ``qwix.LoraProvider`` the model was built with: each kernel's rule
        (its module path fully matched by ``module_path``, as qwix matches) gives alpha,
        rank and dropout. qwix keeps them there, not in the state.
      alpha: instead of ``provider``: one alpha for every kernel (scale ``alpha / rank``,
        the rank read from the factors); ``dropout`` then sets the dropout rate.
      apply_fn, example_args: the base model's forward, called as
        ``apply_fn(tree, *example_args)`` with what this function returns (a module or a
        State); only traced. Decides layouts the factor shapes leave open, and checks
        that each adapted kernel is used only as qwix adapts it (a tied embedding is
        also looked up by rows, which qwix does not adapt: that is an error).
      layouts: ``{module regex: roles}`` or ``f(module_path, shape) -> roles``, as in
        :func:`jlora.wrap`; checked against the factors.

    Returns:
      The LoRA tree (``jlora.lora(apply)(lp, ...)`` computes the qwix model's output;
      ``jlora.save_peft(dir, lp)`` writes PEFT files for the torch model).

    Raises:
      ValueError: naming the kernel path, its shape and the factor shapes, when factors
        fit no kernel layout (or several, and nothing decides), when no rule of the
        provider matches an adapted module, when a rule's rank is not the factors' rank,
        when an adapted kernel is an embedding table used by rows too (qwix adapts only
        its einsum), or a factor has no partner or no kernel.

    Example:
      >>> provider = qwix.LoraProvider(module_path=".*(q|k|v|o)_proj", rank=8, alpha=16.0)  # doctest: +SKIP
      >>> qmodel = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(0))        # doctest: +SKIP
      >>> lmodel = jlora.from_qwix(qmodel, provider)                                       # doctest: +SKIP
      >>> logits = jlora.lora(lambda m, x: m(x))(lmodel, ids)  # == qmodel(ids)             # doctest: +SKIP
      >>> jlora.save_peft("out/adapter", nnx.state(lmodel))                                # doctest: +SKIP
    """
    if (provider is None) == (alpha is None):
        raise ValueError(
            "from_qwix needs the qwix.LoraProvider the model was built with (provider=), or alpha= (one alpha "
            "for every kernel): qwix keeps alpha and rank on the provider, not in the model's state"
        )
    rules = _rules_of(provider) if provider is not None else None
    nnx = _nnx()
    module_in = _is_module(qwix_model)
    if module_in:
        qstate = nnx.state(qwix_model)
        base_module = _base_module(qwix_model)
        graphdef, base = nnx.split(base_module)
        einsum_ops = {}
        for path, sub in _iter_modules(qwix_model):
            for name in vars(sub):
                if name.endswith("_lora_einsum_str"):
                    einsum_ops["/".join(map(str, path + (name[: -len("_lora_einsum_str")],)))] = "einsum"
    elif _is_state(qwix_model):
        qstate = qwix_model
        flat = [(k, v) for k, v in nnx.to_flat_state(qwix_model)]
        base = nnx.from_flat_state([(k, v) for k, v in flat if not _is_factor(k, type(v))])
        einsum_ops = {}
    elif isinstance(qwix_model, Mapping):
        qstate = qwix_model
        base = _strip_mapping(qwix_model)
        einsum_ops = {}
    else:
        raise TypeError(
            "from_qwix(qwix_model, ...): qwix_model must be the nnx.Module qwix.apply_lora_to_model returned, "
            f"its nnx.State, or a Linen params dict, got {type(qwix_model).__name__}"
        )
    pairs, _ = _pairs(_flat_variables(qstate))
    if not pairs:
        raise ValueError(
            f"from_qwix: no qwix LoRA factors (leaves named '<kernel>{LORA_A}' / '<kernel>{LORA_B}', nnx.LoRAParam) "
            "in this model; was it made by qwix.apply_lora_to_model, and did the provider's module_path match?"
        )

    entries, treedef = flatten_params(base)
    by_path = {e.path: e for e in entries}
    uses = None
    if apply_fn is not None:
        fn = apply_fn
        if module_in:
            fn = lambda s, *args: apply_fn(nnx.merge(graphdef, s), *args)  # noqa: E731
        uses = find_kernel_uses(fn, base, tuple(example_args), is_leaf=lambda x: is_lora_node(x) or is_quantized(x))

    new_leaves: dict[int, LoraWeight] = {}
    for pair in pairs:
        e = by_path.get(pair.kernel)
        if e is None or not hasattr(e.leaf, "shape"):
            raise ValueError(f"{pair.kernel}: qwix factors sit beside it, but it is not an array leaf of the model")
        shape = tuple(int(s) for s in e.leaf.shape)
        a_shape, b_shape = tuple(pair.a.shape), tuple(pair.b.shape)
        where = f"{pair.kernel} (shape {shape}; qwix factors A {a_shape}, B {b_shape})"
        use = uses.get(e.index) if uses is not None else None
        if use is not None:
            prims = {u.primitive for u in use.kernel_uses} - {"dot_general", "conv_general_dilated"}
            if prims:
                raise ValueError(
                    f"{where}: the model uses it by {sorted(prims)} too; qwix adapts only the einsum, "
                    "dot_general and conv uses of a kernel (a tied embedding's output head, not its row lookup), "
                    "jlora adapts every use of it. This adapter has no jlora equivalent: leave this module out "
                    "of the provider's module_path"
                )
        elif uses is None and _is_embedding_name(e.names):
            raise ValueError(
                f"{where}: an embedding table with qwix factors. qwix adapts only its einsum use (the tied output "
                "head), jlora every use (the row lookup too), so this is no jlora adapter unless the table is used "
                "only as a kernel: pass apply_fn= and example_args= to check how the model uses it, or leave "
                "the module out of the provider's module_path"
            )
        forms = qwix_forms(shape, a_shape, b_shape)
        if not forms:
            raise ValueError(
                f"{where}: these factors fit no layout of the kernel. qwix makes, for an einsum, A = (the kernel "
                "axes the input shares, in order, r) and B = (r, the other axes); for a dot_general A = (*batch, "
                "prod(contracted), r), B = (*batch, r, prod(kept)); the rank must be A's last and B's first "
                "(after batch) dimension"
            )
        told = user_layout(layouts, e)
        used = use.layout() if use is not None and use.contracted else None
        layout = tuple(told) if told is not None else used
        if layout is not None:
            options = sorted({f.natural_layout(len(shape)) for f in forms})
            # the form must fit how the model contracts the kernel (its use, not swapped: a
            # layouts= that reads x·Wᵀ as x·W would transpose ΔW) and what layouts= says
            fit = [f for f in forms if f.fits(layout) and (used is None or f.fits(used))]
            if len(fit) != 1:
                said = f"layouts= gives {layout}" if told is not None else f"apply_fn's use gives {layout}"
                if told is not None and used is not None:
                    said += f" and apply_fn's use {used}"
                raise ValueError(
                    f"{where}: {said}, which {'fit none' if not fit else 'fit several'} of the ways qwix's "
                    f"factors can lie on it: they fit {options}"
                )
            form = fit[0]
        elif len(forms) == 1:
            form = forms[0]
            layout = form.natural_layout(len(shape))
        else:
            # Flax's Dense / DenseGeneral / nnx.Linear / LinearGeneral / Conv kernels are
            # (*in, *out): for a leaf named "kernel", the one form whose A holds a prefix of
            # the axes. Any other leaf (a square einsum "w" may be contracted on either
            # axis) needs its use or layouts=.
            fit = []
            if e.name == "kernel":
                fit = [f for f in forms if not f.both
                       and sorted(f.a_axes) == list(range(len(f.a_axes))) and sorted(f.b_axes) == list(
                           range(len(f.a_axes), len(shape)))]
            if len(fit) != 1:
                options = sorted({f.natural_layout(len(shape)) for f in forms})
                raise ValueError(
                    f"{where}: qwix's factors fit several kernel layouts, {options}, and the factor shapes do not "
                    f"tell which axes the model contracts. Pass apply_fn= and example_args= (the layout comes from "
                    f"how the model uses it), or layouts={{{e.module!r}: {options[0]}}}"
                )
            form = fit[0]
            layout = form.natural_layout(len(shape))
        rank = int(a_shape[-1])
        if rules is not None:
            module_path = pair.kernel.rsplit("/", 1)[0] if "/" in pair.kernel else ""
            op = einsum_ops.get(pair.kernel)
            if op is None and any(len(g) > 1 for g in form.a + form.b):
                op = "dot_general"
            rule = _rule_for(rules, module_path, (op,) if op else _LORA_OPS)
            if rule is None:
                raise ValueError(
                    f"{where}: no rule of the provider matches its module path {module_path!r} (qwix matches "
                    f"rule.module_path with re.fullmatch), so qwix would not have made these factors; pass the "
                    "provider the model was built with"
                )
            if int(rule.rank) != rank:
                raise ValueError(
                    f"{where}: the provider's rule for {module_path!r} has rank {rule.rank}, the factors rank "
                    f"{rank}; pass the provider the model was built with"
                )
            scale, rate = float(rule.alpha) / float(rule.rank), float(getattr(rule, "dropout", 0.0))
        else:
            scale, rate = float(alpha) / rank, float(dropout)

        def convert(a_q, b_q, shape=shape, form=form, layout=layout):
            return qwix_to_canonical(a_q, b_q, shape, form, layout)

        if _is_abstract(pair.a) or _is_abstract(pair.b):
            a, b = jax.eval_shape(convert, pair.a, pair.b)
        else:
            a, b = convert(jnp.asarray(pair.a), jnp.asarray(pair.b))
        new_leaves[e.index] = LoraWeight(e.leaf, a, b, scale=scale, layout=tuple(layout), dropout=rate)

    leaves = [new_leaves.get(e.index, e.leaf) for e in entries]
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return nnx.merge(graphdef, tree) if module_in else tree


# --------------------------------------------------------------------------------------
# jlora -> qwix


@dataclasses.dataclass(frozen=True)
class _Target:
    keys: tuple            # the kernel's keys
    path: str
    lw: LoraWeight
    form: QwixForm
    rank: int              # qwix's rank for it


def _lora_targets(lp: Any) -> list[tuple[tuple, LoraWeight]]:
    nnx = _nnx()
    tree = nnx.state(lp) if _is_module(lp) else lp
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora_node)[0]:
        keys = tuple(k for k in (_key(p) for p in path) if k is not None)
        where = "/".join(map(str, keys))
        if isinstance(x, MultiLoraWeight):
            raise ValueError(
                f"{where}: several named adapters ({', '.join(x.adapters)}); a qwix model holds one: pass "
                "jlora.get_adapter(lp, name)"
            )
        if isinstance(x, Trainable):
            raise ValueError(
                f"{where}: trained in full (bias= or modules_to_save=); qwix's LoRA state has only LoRA factors"
            )
        if isinstance(x, LoraWeight):
            if x.merged:
                raise ValueError(f"{where}: the adapter is merged into the kernel; call jlora.unmerge_adapter first")
            if x.magnitude is not None:
                raise ValueError(f"{where}: a DoRA adapter (magnitude vector); qwix's LoRA has no DoRA")
            if x.a0 is not None:
                raise ValueError(
                    f"{where}: a PiSSA/OLoRA adapter (its kernel is the residual W - s·A0·B0); qwix adds A·B to the "
                    "original W: write it as plain LoRA first (jlora.save_peft(..., convert_to_lora=True), then "
                    "jlora.load_peft on the original base)"
                )
            out.append((keys, x))
    if not out:
        raise ValueError("to_qwix: lp holds no jlora.LoraWeight (is it a LoRA tree from jlora.wrap/load_peft?)")
    return out


def _plan(lp: Any, qwix_model: Any) -> list[_Target]:
    targets = _lora_targets(lp)
    if qwix_model is None:
        plan = []
        for keys, lw in targets:
            path = "/".join(map(str, keys))
            stack, ins, outs = kernel_roles(lw.layout)
            if stack:
                raise ValueError(
                    f"{path} (shape {lw.shape}, layout {lw.layout}): a 'stack' axis, which qwix shares or keeps "
                    "per slice depending on the model's op; pass the qwix model (or its nnx.eval_shape) as "
                    "qwix_model so that its factor shapes decide"
                )
            plan.append(_Target(keys, path, lw, QwixForm((), tuple((j,) for j in ins), tuple((j,) for j in outs)),
                                lw.rank))
        return plan
    nnx = _nnx()
    qstate = nnx.state(qwix_model) if _is_module(qwix_model) else qwix_model
    pairs, _ = _pairs(_flat_variables(qstate))
    by_kernel = {p.kernel: p for p in pairs}
    plan = []
    missing = []
    for keys, lw in targets:
        path = "/".join(map(str, keys))
        pair = by_kernel.pop(path, None)
        if pair is None:
            missing.append(path)
            continue
        a_shape, b_shape = tuple(pair.a.shape), tuple(pair.b.shape)
        where = f"{path} (shape {lw.shape}, layout {lw.layout}; qwix factors A {a_shape}, B {b_shape})"
        rank = int(a_shape[-1])
        forms = [f for f in qwix_forms(lw.shape, a_shape, b_shape) if f.fits(lw.layout)]
        if len(forms) != 1:
            raise ValueError(
                f"{where}: qwix's factors {'fit' if not forms else 'fit several ways'} this kernel's layout"
                + ("" if forms else " in no way")
                + "; was the qwix model made from the same base model?"
            )
        plan.append(_Target(keys, path, lw, forms[0], rank))
    if missing:
        raise ValueError(
            f"to_qwix: the qwix model has no LoRA factors for {len(missing)} of the adapter's kernels: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; build it with a provider whose module_path matches "
            "their modules (jlora.io.qwix_state.qwix_rules(lp) lists them)"
        )
    if by_kernel:
        extra = sorted(by_kernel)
        raise ValueError(
            f"to_qwix: the qwix model adapts {len(extra)} kernels this adapter does not: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}; narrow the provider's module_path to the adapter's modules "
            "(jlora.io.qwix_state.qwix_rules(lp) gives one that matches exactly)"
        )
    return plan


def to_qwix(lp: Any, qwix_model: Any = None, *, provider: Any = None) -> Any:
    """A jlora adapter as qwix's LoRA state: ``nnx.update(qwix_model, to_qwix(lp, qwix_model))``.

    For each ``LoraWeight`` at ``.../<name>``: ``nnx.LoRAParam`` leaves ``.../<name>_lora_a``
    and ``.../<name>_lora_b`` holding ``A_q``, ``B_q`` in qwix's layout (see the module
    docstring), with ``A_q·B_q`` = ``A·B`` rearranged, so that a qwix model of the same
    base, built with ``rank`` and ``alpha = scale · rank`` for each module, computes what
    ``jlora.lora(apply)(lp, ...)`` computes, and tunix's trainers and sampler continue from
    it. qwix keeps alpha and rank on its provider, not in the state:
    :func:`qwix_rules` gives the ``qwix.LoraRule`` arguments that match ``lp``, and
    ``provider=`` checks a provider against it.

    Args:
      lp: a LoRA tree (``nnx.State`` or ``nnx.Module`` from :func:`jlora.wrap`,
        :func:`jlora.load_peft`, :func:`from_qwix`; a dict gives a dict).
      qwix_model: the qwix-LoRA model to update (an ``nnx.Module``, its ``nnx.State``, or
        ``nnx.eval_shape`` of it: only shapes are read). Its factor shapes decide qwix's
        layout of each kernel and its rank; every adapter kernel must have factors there
        and every factor pair a kernel of the adapter. Needed when a target has a
        ``"stack"`` axis (e.g. Gemma's ``kv_einsum`` loaded from PEFT's ``k_proj`` and
        ``v_proj``); without it, ``A_q`` holds the ``"in"`` axes and ``B_q`` the ``"out"``
        axes in kernel order (qwix's einsum and ``nnx.Linear`` forms).
      provider: the ``qwix.LoraProvider`` (or list of ``qwix.LoraRule``) of the qwix
        model: each target's rule (as qwix matches module paths) must have the target's
        qwix rank and ``alpha / rank`` equal to the adapter's scale.

    Returns:
      An ``nnx.State`` of ``nnx.LoRAParam`` leaves (a nested dict for a dict ``lp``).

    Raises:
      ValueError: for what qwix cannot hold (DoRA, PiSSA/OLoRA residuals, several
        adapters, fully trained leaves, a merged adapter), factors that differ along an
        axis qwix shares at the qwix model's rank, targets missing in the qwix model (or
        extra ones there), and provider rules whose rank or alpha differ (the message
        gives the rule that fits).

    Example:
      >>> lp = jlora.load_peft("adapter", nnx.state(model))                               # doctest: +SKIP
      >>> rules = jlora.io.qwix_state.qwix_rules(lp)   # [{'module_path': ..., 'rank': 8, 'alpha': 16, ...}]  # doctest: +SKIP
      >>> provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])              # doctest: +SKIP
      >>> qmodel = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(0))      # doctest: +SKIP
      >>> nnx.update(qmodel, jlora.to_qwix(lp, qmodel, provider=provider))               # doctest: +SKIP
    """
    plan = _plan(lp, qwix_model)
    if provider is not None:
        rules = _rules_of(provider)
        bad = []
        for t in plan:
            module_path = t.path.rsplit("/", 1)[0] if "/" in t.path else ""
            rule = _rule_for(rules, module_path, _LORA_OPS)
            want_alpha = t.lw.scale * t.rank
            if rule is None:
                bad.append(f"{t.path}: no rule matches module path {module_path!r}")
            elif int(rule.rank) != t.rank or not math.isclose(float(rule.alpha) / float(rule.rank), t.lw.scale,
                                                               rel_tol=1e-6):
                bad.append(
                    f"{t.path}: the rule for {module_path!r} has rank {rule.rank}, alpha {clean_number(rule.alpha)} "
                    f"(scale {clean_number(float(rule.alpha) / float(rule.rank))}); this adapter needs rank {t.rank}, "
                    f"alpha {clean_number(want_alpha)} (scale {clean_number(t.lw.scale)})"
                )
        if bad:
            raise ValueError(
                f"to_qwix: the provider does not match the adapter at {len(bad)} kernels: " + "; ".join(bad[:6])
                + (" ..." if len(bad) > 6 else "")
                + ". jlora.io.qwix_state.qwix_rules(lp, qwix_model) gives rules that do"
            )
    flat = []
    for t in plan:
        where = f"{t.path} (shape {t.lw.shape}, layout {t.lw.layout})"
        if _is_abstract(t.lw.a) or _is_abstract(t.lw.b):
            a_q, b_q = jax.eval_shape(lambda lw, t=t, where=where: canonical_to_qwix(lw, t.form, t.rank, where), t.lw)
        else:
            a_q, b_q = canonical_to_qwix(t.lw, t.form, t.rank, where)
        name = str(t.keys[-1])
        flat.append((t.keys[:-1] + (name + LORA_A,), a_q))
        flat.append((t.keys[:-1] + (name + LORA_B,), b_q))
    nnx = _nnx()
    if isinstance(lp, Mapping) and not _is_state(lp):
        out: dict = {}
        for keys, value in flat:
            node = out
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        return out
    return nnx.from_flat_state([(keys, nnx.LoRAParam(value)) for keys, value in flat])


def qwix_rules(lp: Any, qwix_model: Any = None) -> list[dict[str, Any]]:
    """The ``qwix.LoraRule`` arguments under which a qwix model holds ``lp`` exactly:
    ``[{"module_path": regex, "rank": r_q, "alpha": scale·r_q, "dropout": p}, ...]``, one
    rule per distinct (rank, alpha, dropout), each ``module_path`` matching exactly the
    adapter's modules of that group (layer indices written ``\\d+`` where that selects no
    other module of the tree). ``qwix_model`` as in :func:`to_qwix` (its factor shapes
    give the rank, e.g. twice ``r`` for a Gemma ``kv_einsum`` whose k and v adapters
    have their own A).

    >>> rules = qwix_rules(lp)                                             # doctest: +SKIP
    >>> provider = qwix.LoraProvider([qwix.LoraRule(**r) for r in rules])  # doctest: +SKIP
    """
    plan = _plan(lp, qwix_model)
    nnx = _nnx()
    tree = nnx.state(lp) if _is_module(lp) else lp
    modules = set()
    for keys, _ in ((k, None) for k, _, _ in _flat_variables(jax.tree_util.tree_map(
            lambda x: x.w if isinstance(x, LoraWeight) else x, tree, is_leaf=is_lora_node))):
        for i in range(1, len(keys)):
            modules.add("/".join(map(str, keys[:i])))
    groups: dict[tuple, list[str]] = {}
    for t in plan:
        rank = required_rank(t.lw, t.form)
        key = (rank, clean_number(t.lw.scale * rank), float(t.lw.dropout))
        groups.setdefault(key, []).append(t.path.rsplit("/", 1)[0] if "/" in t.path else "")
    rules = []
    for (rank, alpha, rate), paths in groups.items():
        patterns = []
        mine = set(paths)
        for p in sorted(mine):
            general = "/".join(r"\d+" if part.isdigit() else re.escape(part) for part in p.split("/"))
            hits = {m for m in modules if re.fullmatch(general, m)}
            pat = general if hits <= mine else re.escape(p)
            if pat not in patterns:
                patterns.append(pat)
        rules.append({"module_path": "|".join(patterns) if len(patterns) > 1 else patterns[0],
                      "rank": int(rank), "alpha": float(alpha), "dropout": rate})
    return rules
