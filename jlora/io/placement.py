"""Placing an adapter's records on a base tree: validation before any array is read
(paths or PyTorch names, shapes, dtypes, layouts, per-layer records of a stacked kernel),
shardings for the factors, and the LoRA tree built from them.

Both file formats read through here (:mod:`jlora.io.orbax`, :mod:`jlora.io.peft`), so a
file is checked against the base the same way whatever its format::

    Adapter + base params ──plan_adapter──▶ placements ──assemble_tree──▶ LoRA tree

>>> import jax.numpy as jnp, jlora
>>> from jlora.io.records import adapter_from_tree
>>> base = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> adapter = adapter_from_tree(jlora.wrap(base, jlora.LoraConfig(r=2, target_modules=["dense"])))
>>> type(tree_from_adapter(adapter, base)["dense"]["kernel"]).__name__
'LoraWeight'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .. import name_maps
from ..core.paths import KERNEL_LEAF_NAMES, LeafEntry
from ..layouts.from_tree import LayoutSpec, TreeFacts, infer_layout_guess, transposed_layout, user_layout
from ..layouts.from_use import find_kernel_uses
from ..layouts.kernel import KernelLayout
from ..nodes.inits import init_residual_factors, is_residual_init, residual_kernel
from ..nodes.weight import LoraWeight, Trainable, TrainableTokens, is_lora_node
from ..quant.array import is_quantized
from ..tree.targets import check_groups, flatten_params
from ..tree.wrap import factor_sharding
from .distributed import local_device, place
from .records import Adapter, ParamRecord, TargetRecord, TokenRecord, dtype_name, stack_first

__all__ = ["ShardingSpec", "plan_adapter", "assemble_tree", "tree_from_adapter", "uses_of"]

ShardingSpec = Union[None, jax.sharding.Sharding, Callable[[str, str], Optional[jax.sharding.Sharding]]]


def _sharding_of(x: Any) -> Optional[jax.sharding.Sharding]:
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else None


def _default_factor_shardings(w: Any, layout: tuple[str, ...]):
    a_sh, b_sh = factor_sharding(w, layout)
    if a_sh is not None:
        return a_sh, b_sh
    s = _sharding_of(w)
    if isinstance(s, jax.sharding.SingleDeviceSharding):
        return s, s
    if s is not None and len(s.device_set) > 1:
        mesh = jax.sharding.Mesh(np.array(sorted(s.device_set, key=lambda d: d.id)), ("d",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return rep, rep
    dev = jax.sharding.SingleDeviceSharding(local_device())
    return dev, dev


def _user_sharding(shardings: ShardingSpec, path: str, name: str):
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(path, name)
    raise TypeError(f"shardings must be a jax.sharding.Sharding or a function (path, name) -> Sharding, got {shardings!r}")


@dataclasses.dataclass
class _Placement:
    entry: LeafEntry
    layout: tuple[str, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    parts: list[tuple[TargetRecord, Optional[int]]]
    exact: bool  # one record, stored in final shape: restore straight onto the sharding
    a_sharding: Any = None
    b_sharding: Any = None
    groups: int = 1
    guessed: bool = False


@dataclasses.dataclass
class _TokenPlacement:
    entry: LeafEntry
    record: TokenRecord
    axis: int


@dataclasses.dataclass
class _ParamPlacement:
    entry: LeafEntry
    parts: list[tuple[ParamRecord, Optional[int]]]
    exact: bool
    sharding: Any = None
    names: Any = None  # the base's name map (converts values stored in PyTorch layout)


def _fmt(items: Sequence[str], limit: int = 30) -> str:
    items = list(items)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class _BaseIndex:
    """Lookups into the base tree: by Flax path and by PyTorch name."""

    def __init__(
        self, entries: list[LeafEntry], layouts: LayoutSpec, name_map: name_maps.NameMapSpec, prefix: Optional[str],
        uses: Optional[dict] = None,
    ):
        self.entries = entries
        self.by_path = {e.path: e for e in entries}
        self.uses = uses or {}
        self._layouts_spec = layouts
        self._name_map = name_map
        self._prefix = prefix
        self._facts: Optional[TreeFacts] = None
        self._layouts: dict[int, tuple[str, ...]] = {}
        self._torch: Optional[tuple[dict, dict]] = None
        self._map0: Optional[name_maps.TreeNames] = None
        self.names: Optional[name_maps.TreeNames] = None  # set by torch_tables

    def name_map(self) -> name_maps.TreeNames:
        """The base's name map without stack information (layouts, which leaves are kernels)."""
        if self._map0 is None:
            leaves = [(e.names, tuple(e.leaf.shape), 0) for e in self.entries if hasattr(e.leaf, "shape")]
            self._map0 = name_maps.for_tree(leaves, self._name_map, self._prefix)
        return self._map0

    def used(self, e: LeafEntry) -> Any:
        """How ``apply_fn`` uses the leaf as a kernel (a ``LeafUse``), or None."""
        u = self.uses.get(e.index)
        return u if u is not None and u.contracted else None

    def layout_source(self, e: LeafEntry) -> tuple[tuple[str, ...], str]:
        """The kernel's layout and what says so: ``"layouts="`` (checked against the use),
        ``"apply_fn"`` (the use), ``"name map"``, ``"tree"`` (evidence in the tree) or
        ``"guess"`` (a 2-D kernel's orientation by naming convention alone)."""
        if e.index not in self._layouts:
            if self._facts is None:
                self._facts = TreeFacts(self.entries)
            user, used = user_layout(self._layouts_spec, e), self.used(e)
            if user is not None:
                if used is not None:
                    used.check(user)
                got = (tuple(user), "layouts=")
            elif used is not None:
                got = (tuple(used.layout()), "apply_fn")
            else:
                known = self.name_map().layout(e.names, tuple(e.leaf.shape))
                if known is not None:
                    got = (tuple(known), "name map")
                else:
                    lay, guess = infer_layout_guess(e, self._facts)
                    got = (tuple(lay), "guess" if guess else "tree")
            self._layouts[e.index] = got
        return self._layouts[e.index]

    def layout(self, e: LeafEntry) -> tuple[str, ...]:
        return self.layout_source(e)[0]

    def _kernel_layout_or_none(self, e: LeafEntry) -> Optional[tuple[str, ...]]:
        if not hasattr(e.leaf, "shape") or len(e.leaf.shape) < 2:
            return None
        if not self.name_map().is_kernel(e.names, tuple(e.leaf.shape)):
            return None
        try:
            return self.layout(e)
        except ValueError:
            return None

    def torch_tables(self) -> tuple[dict[str, tuple[LeafEntry, Optional[int]]], dict[str, tuple[LeafEntry, Optional[int]]]]:
        """``({torch module: (kernel entry, layer)}, {torch param: (entry, layer)})``."""
        if self._torch is None:
            shapes = []
            for e in self.entries:
                if not hasattr(e.leaf, "shape"):
                    continue
                lay = self._kernel_layout_or_none(e)
                shape = tuple(e.leaf.shape)
                shapes.append((e.names, stack_first(shape, lay) if lay else shape, lay.count("stack") if lay else 0))
            tn = self.names = name_maps.for_tree(shapes, self._name_map, self._prefix)
            modules: dict[str, tuple[LeafEntry, Optional[int]]] = {}
            params: dict[str, tuple[LeafEntry, Optional[int]]] = {}
            for e in self.entries:
                if not hasattr(e.leaf, "shape"):
                    continue
                stacked = tn.split(e.names)
                if tn.is_kernel(e.names, tuple(e.leaf.shape)):
                    for i, m in enumerate(tn.modules(e.names)):
                        modules.setdefault(m, (e, i if stacked else None))
                for i, p in enumerate(tn.params(e.names)):
                    params.setdefault(p, (e, i if stacked else None))
            self._torch = (modules, params)
        return self._torch

    def torch_names(self) -> name_maps.TreeNames:
        """The base's name map with stack information (PyTorch names, layouts of tensors)."""
        self.torch_tables()
        assert self.names is not None
        return self.names

    def top_level(self) -> list[str]:
        return sorted({e.names[0] for e in self.entries if e.names})


def _prefix_fixes(names: Sequence[str], table: dict, top: Sequence[str]) -> list[tuple[str, Callable[[str], str]]]:
    fixes: list[tuple[str, Callable[[str], str]]] = [("", lambda n: n)]
    firsts = {n.split(".", 1)[0] for n in names if "." in n}
    for p in sorted(firsts):
        fixes.append((f"without leading {p!r}", lambda n, p=p: n[len(p) + 1:] if n.startswith(p + ".") else n))
    for q in top:
        fixes.append((f"with leading {q!r}", lambda n, q=q: n if n.split(".", 1)[0] == q else f"{q}.{n}"))
    return fixes


def _resolve_torch_names(
    module_names: Sequence[str], param_names: Sequence[str], index: _BaseIndex
) -> tuple[Callable[[str], str], list[str]]:
    """Finds the one prefix fix (none, drop a leading name, add a top-level name) under
    which every name resolves in the base; returns it and the names still unresolved."""
    modules, params = index.torch_tables()
    best = None
    for _label, fix in _prefix_fixes(list(module_names) + list(param_names), modules, index.top_level()):
        missing = [n for n in module_names if fix(n) not in modules] + [n for n in param_names if fix(n) not in params]
        if not missing:
            return fix, []
        if best is None or len(missing) < len(best[1]):
            best = (fix, missing)
    assert best is not None
    return best


def _flat_to_canonical(rec: TargetRecord, layout: tuple[str, ...], base_shape: tuple[int, ...], where: str):
    """Expected per-layer canonical shapes and a function reshaping the stored factors."""
    kl = KernelLayout(layout)
    ins = tuple(base_shape[i] for i in kl.in_axes)
    outs = tuple(base_shape[i] for i in kl.out_axes)
    r = rec.r
    if rec.kind == "conv":
        a_shape, b_shape = kl.factor_shapes(base_shape, r, rec.groups)
        got_a, got_b = tuple(rec.a.shape), tuple(rec.b.shape)
        if got_a != a_shape or int(np.prod(got_b)) != int(np.prod(b_shape)):
            hint = ""
            if rec.groups != 1 or (len(got_a) == len(a_shape) and got_a[-2] != a_shape[-2]
                                    and got_a[-2] % max(1, ins[-1]) == 0):
                hint = (f"; PEFT's LoRA on a grouped convolution has a full lora_A (in_features = in/groups x groups) "
                        f"and a grouped lora_B (r/groups per output): this file says groups={rec.groups}, A's "
                        f"{got_a[-2]} input channels against the kernel's {ins[-1]} per group")
            raise ValueError(
                f"{where}: conv LoRA factors A{got_a}, B{got_b} do not fit the base kernel of shape {base_shape} "
                f"(layout {layout}): expected A{a_shape}, B{b_shape}{hint}"
            )
    else:
        a_shape, b_shape = ins + (r,), (r,) + outs
        in_f, out_f = int(np.prod(ins)), int(np.prod(outs))
        got_in, got_out = int(rec.a.shape[0]), int(rec.b.shape[-1])
        if rec.a.ndim != 2 or rec.b.ndim != 2 or got_in != in_f or got_out != out_f or rec.b.shape[0] != r:
            raise ValueError(
                f"{where}: LoRA factors with in_features={got_in}, out_features={got_out} (A {tuple(rec.a.shape)}, "
                f"B {tuple(rec.b.shape)}) do not fit the base kernel of shape {base_shape} (layout {layout}: "
                f"in_features={in_f}, out_features={out_f}); is the adapter for a different base model?"
            )
    return a_shape, b_shape


def _orient(rec: TargetRecord, layout: tuple[str, ...], source: str, shape: tuple[int, ...], where: str,
            module: str, fan_in_fan_out: bool) -> tuple[tuple[str, ...], bool]:
    """The orientation of a 2-D kernel (per layer) for PEFT factors ``rec`` (flat ``(in, r)``,
    ``(r, out)``), and whether it is still a guess. Factor shapes that fit one orientation
    only decide it over the tree's convention; evidence (``layouts=``, ``apply_fn``, a name
    map) that the shapes contradict is an error naming the orientation that would fit; a
    square kernel oriented by convention alone, from a file that says
    ``fan_in_fan_out: true`` (PyTorch ``Conv1D`` modules, whose JAX twins are often
    ``(out, in)``), is an error naming ``layouts=`` and ``apply_fn=``. A layout the
    convention gave and the shapes did not overturn stays a guess, as :func:`jlora.wrap`
    marks it (``LoraWeight.guessed``)."""
    roles = tuple(r for r in layout if r != "stack")
    if rec.kind != "linear" or roles not in (("in", "out"), ("out", "in")) or rec.a.ndim != 2 or rec.b.ndim != 2:
        return layout, False
    dims = [int(n) for n, r in zip(shape, layout) if r != "stack"]
    got = (int(rec.a.shape[0]), int(rec.b.shape[-1]))

    def fits(rs: tuple[str, ...]) -> bool:
        return (dims[rs.index("in")], dims[rs.index("out")]) == got

    other = transposed_layout(layout)
    other_roles = tuple(r for r in other if r != "stack")
    if fits(roles) and fits(other_roles):  # square
        if source != "guess":
            return layout, False
        if fan_in_fan_out:
            raise ValueError(
                f"{where}: the kernel of shape {shape} is square, so the factors fit both orientations, and the tree "
                f"does not say which one it is (taken as {layout} by Flax's Dense convention), while "
                "adapter_config.json says fan_in_fan_out: true (PyTorch Conv1D modules, whose JAX twins such as "
                "transformers' FlaxConv1D store (out, in)). Pass apply_fn= and example_args= (the layout found from "
                f"how the model uses the kernel) or layouts={{{module!r}: {other}}} (or {layout}) to say which"
            )
        return layout, True
    if fits(roles):  # the convention fits: still the convention (lora(fn) raises on a transposed use)
        return layout, source == "guess"
    if fits(other_roles):
        if source in ("tree", "guess"):
            return other, False
        raise ValueError(
            f"{where}: the factors (in_features={got[0]}, out_features={got[1]}) fit the kernel of shape {shape} as "
            f"{other}, but {source} gives {layout}; pass layouts={{{module!r}: {other}}} if the kernel is read that "
            "way, or check that the adapter is for this base model"
        )
    return layout, False


def _check_stored_layout(used: Any, layout: tuple[str, ...], where: str) -> None:
    """``ValueError`` unless a stored layout is the one the model's use gives (``"stack"``
    may stand for a kept ``"out"`` axis); uses that conflict among themselves need the
    stored layout to fit one of them (:meth:`LeafUse.check`)."""
    try:
        want = tuple(used.layout())
    except ValueError:
        used.check(layout)
        return
    if len(want) != len(layout) or not all(a == b or {a, b} == {"stack", "out"} for a, b in zip(want, layout)):
        raise ValueError(
            f"{where}: the adapter was saved for the kernel layout {layout}, but the model uses the kernel as {want} "
            f"({used.kernel_uses[0].describe()}): its factors belong to another orientation: load it on the model "
            "it was trained with (or without apply_fn=, as it was saved)"
        )


def uses_of(apply_fn: Any, params: Any, example_args: Any) -> Optional[dict]:
    """``{leaf index: LeafUse}`` of ``params`` (flattened as :func:`plan_adapter` does) from
    tracing ``apply_fn(params, *example_args)``; None without ``apply_fn``."""
    if apply_fn is None:
        if example_args:
            raise ValueError("example_args= is given without apply_fn=: pass the model's forward as apply_fn")
        return None
    if not isinstance(example_args, (tuple, list)):
        raise TypeError(f"example_args must be a tuple of apply_fn's other arguments, got {type(example_args).__name__}")
    return find_kernel_uses(apply_fn, params, tuple(example_args), is_leaf=lambda x: is_lora_node(x) or is_quantized(x))


def plan_adapter(
    adapter: Adapter,
    params: Any,
    *,
    layouts: LayoutSpec = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    strict: bool = True,
    shardings: ShardingSpec = None,
    uses: Optional[dict] = None,
) -> tuple[list[LeafEntry], Any, list[_Placement], list[_ParamPlacement], list[_TokenPlacement]]:
    """Validates ``adapter`` against the base ``params`` and decides where each record goes.

    Raises ``ValueError`` naming the path (and both shapes / dtypes) that does not fit,
    or listing every name that is not in the base. Reads no array data.

    The layout of a kernel whose record has none (PEFT's files): ``layouts=``, else its use
    (``uses``, from ``apply_fn``: :func:`uses_of`), else a name map, else the tree; for a 2-D
    kernel the factor shapes decide the orientation where only one fits (:func:`_orient`).
    """
    entries, treedef = flatten_params(params)
    index = _BaseIndex(entries, layouts, name_map, prefix, uses)
    fan_in_fan_out = bool((adapter.config or {}).get("fan_in_fan_out", False))

    # 1. Where does each record go?
    t_loc: list[tuple[TargetRecord, LeafEntry, Optional[int]]] = []
    p_loc: list[tuple[ParamRecord, LeafEntry, Optional[int]]] = []
    by_torch_t = [t for t in adapter.targets if not (t.path and t.path in index.by_path)]
    by_torch_p = [p for p in adapter.params if not (p.path and p.path in index.by_path)]
    by_torch_k = [k for k in adapter.tokens if not (k.path and k.path in index.by_path)]
    torch_ids = {id(x) for x in by_torch_t} | {id(x) for x in by_torch_p} | {id(x) for x in by_torch_k}
    missing_paths = [t.path for t in by_torch_t + by_torch_k if not t.torch] + [p.path for p in by_torch_p
                                                                                 if not p.torch]
    if missing_paths:
        raise ValueError(
            f"the adapter has paths that are not in the base params: {_fmt([str(p) for p in missing_paths])}. "
            f"Base paths: {_fmt([e.path for e in entries if e.name in KERNEL_LEAF_NAMES])}"
        )
    fix: Callable[[str], str] = lambda n: n  # noqa: E731
    if by_torch_t or by_torch_p or by_torch_k:
        mod_names = [n for t in by_torch_t + by_torch_k for n in t.torch]
        par_names = [n for p in by_torch_p for n in p.torch]
        fix, unresolved = _resolve_torch_names(mod_names, par_names, index)
        if unresolved:
            modules, _ = index.torch_tables()
            paths = {n: r.path for r in [*by_torch_t, *by_torch_p, *by_torch_k] for n in r.torch if r.path}
            shown = [f"{paths[n]} ({n})" if n in paths else n for n in unresolved]
            raise ValueError(
                f"{len(unresolved)} adapter module(s)/parameter(s) are not in the base params: {_fmt(shown)}. "
                f"Modules the base has (PyTorch names): {_fmt(sorted(modules))}. "
                "Pass name_map= / prefix= if the names differ, or use the base model this adapter was made for."
            )
    modules, ptable = index.torch_tables() if (by_torch_t or by_torch_p or by_torch_k) else ({}, {})

    def locate(rec, table, stacked: bool, out: list) -> None:
        found = [table[fix(n)] for n in rec.torch]
        if not stacked:
            out.extend((rec, e, layer) for e, layer in found)
            return
        # a record holding all layers of a stacked kernel: it must land on one stacked leaf
        e0 = found[0][0]
        if any(e is not e0 for e, _ in found) or [layer for _, layer in found] != list(range(len(found))):
            raise ValueError(
                f"{rec.path}: a stacked adapter entry ({len(found)} layers) maps to PyTorch names "
                f"{_fmt(list(rec.torch), 3)} that are not the layers of one stacked kernel in the base"
            )
        out.append((rec, e0, None))

    for t in adapter.targets:
        if id(t) in torch_ids:
            locate(t, modules, t.layout is not None and "stack" in t.layout, t_loc)
        else:
            t_loc.append((t, index.by_path[t.path], None))
    for p in adapter.params:
        if id(p) in torch_ids:
            locate(p, ptable, not p.torch_layout and len(p.torch) > 1, p_loc)
        else:
            p_loc.append((p, index.by_path[p.path], None))
    k_loc: list[tuple[TokenRecord, LeafEntry]] = []
    for k in adapter.tokens:
        k_loc.append((k, modules[fix(k.torch[0])][0] if id(k) in torch_ids else index.by_path[k.path]))

    # 2. Group by base leaf and validate shapes.
    groups: dict[int, list[tuple[TargetRecord, Optional[int]]]] = {}
    for t, e, layer in t_loc:
        groups.setdefault(e.index, []).append((t, layer))
    placements: list[_Placement] = []
    for idx, parts in groups.items():
        e = entries[idx]
        if not hasattr(e.leaf, "shape"):
            raise TypeError(f"{e.path}: the base leaf is {type(e.leaf).__name__}, not an array")
        shape = tuple(int(s) for s in e.leaf.shape)
        t0 = parts[0][0]
        where = e.path if t0.path == e.path else f"{_fmt(list(t0.torch or ()), 2)} → {e.path}"
        used = index.used(e)
        guessed = False
        if t0.layout is not None and parts[0][1] is None:
            layout = tuple(t0.layout)
            if used is not None:  # the stored layout must be the one the model uses
                _check_stored_layout(used, layout, where)
            guessed = bool(t0.guessed) and used is None and user_layout(layouts, e) is None
        else:
            layout, source = index.layout_source(e)
            if len(layout) == len(shape):
                layout, guessed = _orient(t0, layout, source, shape, where, e.module, fan_in_fan_out)
        if len(layout) != len(shape):
            raise ValueError(f"{e.path}: layout {layout} does not fit the base kernel of shape {shape}")
        n_groups = int(t0.groups)
        if used is not None and t0.kind == "conv" and used.groups != n_groups:
            raise ValueError(
                f"{where}: the adapter is for a convolution with groups={n_groups} (lora_B {tuple(t0.b.shape)}), the "
                f"model's convolution has feature_group_count={used.groups}"
            )
        check_groups(where, layout, t0.r, n_groups, used.feature_axis if used is not None else None, shape)
        if t0.base_shape is not None and parts[0][1] is None and tuple(t0.base_shape) != shape:
            raise ValueError(
                f"{e.path}: shape mismatch: the adapter was made for a kernel of shape {tuple(t0.base_shape)}, "
                f"the base has shape {shape}; is the adapter for a different base model?"
            )
        if strict and t0.base_dtype is not None and parts[0][1] is None and t0.base_dtype != dtype_name(e.leaf.dtype):
            raise ValueError(
                f"{e.path}: dtype mismatch: the adapter was made for a {t0.base_dtype} kernel, the base is "
                f"{dtype_name(e.leaf.dtype)}; pass strict=False to load it anyway"
            )
        kl = KernelLayout(layout)
        n_stack = len(kl.stack_axes)
        full_a, full_b = kl.factor_shapes(shape, t0.r, n_groups)
        exact = False
        if parts[0][1] is None:
            if len(parts) != 1:
                raise ValueError(f"{e.path}: {len(parts)} adapter entries map to the same kernel")
            if t0.layout is not None:
                if tuple(t0.a.shape) != full_a or tuple(t0.b.shape) != full_b:
                    raise ValueError(
                        f"{e.path}: factor shape mismatch: A {tuple(t0.a.shape)}, B {tuple(t0.b.shape)} stored, "
                        f"the base kernel {shape} (layout {layout}) needs A {full_a}, B {full_b}"
                    )
                exact = True
            else:
                if n_stack:
                    raise ValueError(f"{e.path}: a stacked kernel needs one adapter entry per layer")
                _flat_to_canonical(t0, layout, shape, where)
        else:
            if n_stack < 1:
                raise ValueError(f"{e.path}: per-layer adapter entries need a kernel with a stack axis, got {layout}")
            layers = sorted(layer for _, layer in parts)
            n_layers = math.prod(shape[i] for i in kl.stack_axes)  # several stack axes: row-major
            if layers != list(range(n_layers)):
                raise ValueError(
                    f"{e.path}: stacked kernel with {n_layers} layers, but the adapter has layers {layers}; "
                    "every layer needs an adapter"
                )
            per_layer = tuple(s for i, s in enumerate(shape) if i not in kl.stack_axes)
            per_layout = tuple(r for r in layout if r != "stack")
            for t, layer in parts:
                if t.r != t0.r or not math.isclose(t.scale, t0.scale, rel_tol=1e-12):
                    raise ValueError(
                        f"{e.path}: layers of a stacked kernel must share rank and scale; layer {layer} has "
                        f"r={t.r}, scale={t.scale}, layer 0 r={t0.r}, scale={t0.scale}"
                    )
                _flat_to_canonical(t, per_layout, per_layer, f"{where} (layer {layer})")
            parts = sorted(parts, key=lambda p: p[1])
        a_sh = _user_sharding(shardings, e.path, "a")
        b_sh = _user_sharding(shardings, e.path, "b")
        if a_sh is None or b_sh is None:
            da, db = _default_factor_shardings(e.leaf, layout)
            a_sh, b_sh = a_sh or da, b_sh or db
        placements.append(_Placement(e, layout, full_a, full_b, parts, exact, a_sh, b_sh, n_groups, guessed))

    pgroups: dict[int, list[tuple[ParamRecord, Optional[int]]]] = {}
    for p, e, layer in p_loc:
        pgroups.setdefault(e.index, []).append((p, layer))
    pplacements: list[_ParamPlacement] = []
    target_idx = set(groups)
    for idx, parts in pgroups.items():
        e = entries[idx]
        if idx in target_idx:
            raise ValueError(f"{e.path}: the adapter both adapts this kernel with LoRA and trains it in full")
        shape = tuple(int(s) for s in e.leaf.shape)
        p0 = parts[0][0]
        if parts[0][1] is None:
            if len(parts) != 1:
                raise ValueError(f"{e.path}: {len(parts)} adapter entries map to the same parameter")
            got = tuple(p0.value.shape)
            want = index.torch_names().torch_shapes(e.names, shape)[0] if p0.torch_layout else shape
            if got != want:
                raise ValueError(
                    f"{e.path}: shape mismatch: the adapter has {got}"
                    f"{' (from ' + p0.torch[0] + ')' if p0.torch_layout and p0.torch else ''}, the base has {shape}"
                    f"{' (PyTorch layout ' + str(want) + ')' if p0.torch_layout else ''}"
                )
            if strict and not p0.torch_layout and dtype_name(p0.value.dtype) != dtype_name(e.leaf.dtype):
                raise ValueError(
                    f"{e.path}: dtype mismatch: the adapter has {dtype_name(p0.value.dtype)}, the base "
                    f"{dtype_name(e.leaf.dtype)}; pass strict=False to cast"
                )
        else:
            layers = sorted(layer for _, layer in parts)
            if layers != list(range(shape[0])):
                raise ValueError(f"{e.path}: stacked parameter with {shape[0]} layers, adapter has layers {layers}")
            parts = sorted(parts, key=lambda p: p[1])
            for p, layer in parts:
                got = tuple(p.value.shape)
                want = index.torch_names().torch_shapes(e.names, shape)[layer] if p.torch_layout else shape[1:]
                if got != want:
                    raise ValueError(f"{e.path}: shape mismatch at layer {layer}: the adapter has {got}, expected {want}")
        sh = _user_sharding(shardings, e.path, "value") or _sharding_of(e.leaf)
        if sh is None:
            sh = jax.sharding.SingleDeviceSharding(local_device())
        exact = parts[0][1] is None and not p0.torch_layout
        pplacements.append(_ParamPlacement(e, parts, exact, sh, index.torch_names() if p0.torch_layout else None))
    tplacements = [_place_tokens(k, e, index, set(groups) | set(pgroups)) for k, e in k_loc]
    if len({id(tp.entry) for tp in tplacements}) != len(tplacements):
        raise ValueError("two trainable-token entries of the adapter map to the same table")
    return entries, treedef, placements, pplacements, tplacements


def _place_tokens(k: TokenRecord, e: LeafEntry, index: _BaseIndex, taken: set) -> _TokenPlacement:
    """Where trainable token rows go: a 2-D table, its token axis (0 for an embedding, the
    output axis of a linear kernel), the rows' shape and the ids checked."""
    shape = tuple(int(s) for s in getattr(e.leaf, "shape", ()))
    if e.index in taken:
        raise ValueError(f"{e.path}: the adapter both trains token rows of this table and adapts or trains it otherwise")
    if len(shape) != 2:
        raise ValueError(f"{e.path}: trainable token rows need a 2-D table, the base leaf has shape {shape}")
    axis = k.axis
    if axis is None:
        used = index.used(e)
        if e.name in ("embedding", "embeddings") or (used is not None and used.kind == "embedding"):
            axis = 0
        else:
            axis = index.layout(e).index("out")
    n, d = shape[axis], shape[1 - axis]
    if tuple(k.values.shape) != (len(k.indices), d):
        raise ValueError(f"{e.path}: trainable token rows of shape {tuple(k.values.shape)} for {len(k.indices)} ids do "
                         f"not fit the table {shape} (token axis {axis}): expected {(len(k.indices), d)}")
    bad = [i for i in k.indices if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"{e.path}: trainable token ids {bad} out of range for a table of {n} tokens")
    return _TokenPlacement(e, k, int(axis))


def assemble_tree(
    entries: list[LeafEntry],
    treedef: Any,
    placements: list[_Placement],
    pplacements: list[_ParamPlacement],
    arrays: Callable[[Any, str], Any],
    dtype: Any = None,
    rng: Optional[jax.Array] = None,
    tplacements: Sequence[_TokenPlacement] = (),
) -> Any:
    """Builds the LoRA tree; ``arrays(record, "a"|"b"|"magnitude"|"a0"|"b0"|"b_bias"|"value"|"values")``
    gives a record's data (called for the optional arrays only where the record has
    them). PiSSA/OLoRA targets get the residual base: ``W − s·a0·b0`` from the stored
    initial factors, or, where none are stored (PEFT's files), from the initialisation
    run again on the base (``rng`` seeds ``pissa_niter_N``: ``jax.random.fold_in(rng,
    leaf index)`` as :func:`jlora.wrap` does; default ``jax.random.key(0)``)."""
    leaves: list[Any] = [e.leaf for e in entries]

    def put(x, sharding, dt):
        x = x if dt is None else x.astype(dt)
        return place(x, sharding)  # shardings may span processes

    for pl in placements:
        t0 = pl.parts[0][0]
        if pl.exact:
            a, b = arrays(t0, "a"), arrays(t0, "b")
        else:
            a_list, b_list = [], []
            per_layout = tuple(r for r in pl.layout if r != "stack")
            kl = KernelLayout(pl.layout)
            per_shape = tuple(int(s) for i, s in enumerate(pl.entry.leaf.shape) if i not in kl.stack_axes)
            for t, _layer in pl.parts:
                a_s, b_s = _flat_to_canonical(t, per_layout, per_shape, pl.entry.path)
                a_list.append(np.asarray(arrays(t, "a")).reshape(a_s))
                b_list.append(np.asarray(arrays(t, "b")).reshape(b_s))
            stack_shape = tuple(int(pl.entry.leaf.shape[i]) for i in kl.stack_axes)
            a = np.stack(a_list).reshape(stack_shape + a_list[0].shape) if pl.parts[0][1] is not None else a_list[0]
            b = np.stack(b_list).reshape(stack_shape + b_list[0].shape) if pl.parts[0][1] is not None else b_list[0]
        a, b = put(a, pl.a_sharding, dtype), put(b, pl.b_sharding, dtype)
        lw = LoraWeight(pl.entry.leaf, a, b, scale=float(t0.scale), layout=pl.layout, dropout=float(t0.dropout),
                        groups=pl.groups, guessed=pl.guessed)
        leaves[pl.entry.index] = _with_variants(lw, pl, arrays, dtype, rng)
    for pp in pplacements:
        e = pp.entry
        vals = [arrays(p, "value") for p, _layer in pp.parts]
        if pp.parts[0][0].torch_layout:
            v = pp.names.param_from_torch(e.names, [np.asarray(x) for x in vals], tuple(e.leaf.shape))
        else:
            v = np.stack([np.asarray(x) for x in vals]) if pp.parts[0][1] is not None else vals[0]
        v = put(jnp.asarray(v) if not isinstance(v, jax.Array) else v, pp.sharding, e.leaf.dtype)
        leaves[e.index] = Trainable(v)
    for tp in tplacements:
        values = jnp.asarray(arrays(tp.record, "values"))
        leaves[tp.entry.index] = TrainableTokens(tp.entry.leaf, values if dtype is None else values.astype(dtype),
                                                 tuple(int(i) for i in tp.record.indices), tp.axis)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _variant_array(pl: _Placement, arrays: Callable[[Any, str], Any], name: str, shape: tuple[int, ...]) -> Any:
    """A record's DoRA/PiSSA array in canonical ``shape`` (per-layer records stacked)."""
    if pl.exact:
        return arrays(pl.parts[0][0], name)
    per = [np.asarray(arrays(t, name)) for t, _ in pl.parts]
    if pl.parts[0][1] is not None:
        n_stack = len(KernelLayout(pl.layout).stack_axes)  # per-layer records, several stack axes row-major
        return np.stack([x.reshape(shape[n_stack:]) for x in per]).reshape(shape)
    return per[0].reshape(shape)


def _with_variants(lw: LoraWeight, pl: _Placement, arrays: Callable[[Any, str], Any], dtype: Any,
                   rng: Optional[jax.Array]) -> LoraWeight:
    """DoRA's magnitude and PiSSA/OLoRA's residual base on a freshly built LoraWeight."""
    t0 = pl.parts[0][0]
    kl = KernelLayout(pl.layout)
    shape = tuple(int(s) for s in pl.entry.leaf.shape)
    where = pl.entry.path
    if t0.magnitude is not None:
        m_shape = tuple(shape[i] for i in kl.stack_axes) + tuple(shape[i] for i in kl.out_axes)
        if pl.exact and tuple(t0.magnitude.shape) != m_shape:
            raise ValueError(
                f"{where}: DoRA magnitude of shape {tuple(t0.magnitude.shape)} does not fit the base kernel "
                f"{shape} (layout {pl.layout}): expected {m_shape}"
            )
        n_out = int(np.prod([shape[i] for i in kl.out_axes]))
        if not pl.exact and any(t.magnitude is None or int(np.prod(t.magnitude.shape)) != n_out for t, _ in pl.parts):
            raise ValueError(
                f"{where}: DoRA magnitude (lora_magnitude_vector) of shape {tuple(t0.magnitude.shape)} does not fit "
                f"the base kernel {shape} (layout {pl.layout}): expected {n_out} values (out_features) per layer"
            )
        m = jnp.asarray(_variant_array(pl, arrays, "magnitude", m_shape))
        lw = lw.replace(magnitude=m if dtype is None else m.astype(dtype))
    if t0.b_bias is not None:  # lora_bias: lora_B's bias, (*stack, *out)
        o_shape = tuple(shape[i] for i in kl.stack_axes) + tuple(shape[i] for i in kl.out_axes)
        n_out = int(np.prod([shape[i] for i in kl.out_axes]))
        if pl.exact:
            ok = tuple(t0.b_bias.shape) == o_shape
        else:
            ok = all(t.b_bias is not None and int(np.prod(t.b_bias.shape)) == n_out for t, _ in pl.parts)
        if not ok:
            raise ValueError(f"{where}: lora_B bias of shape {tuple(t0.b_bias.shape)} does not fit the base kernel "
                             f"{shape} (layout {pl.layout}): expected {o_shape if pl.exact else (n_out,)}")
        bb = jnp.asarray(_variant_array(pl, arrays, "b_bias", o_shape))
        lw = lw.replace(b_bias=bb if dtype is None else bb.astype(dtype))
    if t0.init is None:
        return lw
    if not is_residual_init(t0.init):
        raise ValueError(f"{where}: unknown initialisation {t0.init!r} in the adapter")
    base = pl.entry.leaf
    if t0.a0 is not None:
        a0 = jnp.asarray(_variant_array(pl, arrays, "a0", tuple(lw.a.shape))).astype(lw.a.dtype)
        b0 = jnp.asarray(_variant_array(pl, arrays, "b0", tuple(lw.b.shape))).astype(lw.b.dtype)
    elif isinstance(base, jax.ShapeDtypeStruct):
        a0 = jax.ShapeDtypeStruct(lw.a.shape, lw.a.dtype)
        b0 = jax.ShapeDtypeStruct(lw.b.shape, lw.b.dtype)
    else:
        key = jax.random.fold_in(rng if rng is not None else jax.random.key(0), pl.entry.index)
        a0, b0 = init_residual_factors(base, pl.layout, lw.rank, lw.scale, t0.init, key, where)
        a0, b0 = a0.astype(lw.a.dtype), b0.astype(lw.b.dtype)
    w = base if isinstance(base, jax.ShapeDtypeStruct) else residual_kernel(base, a0, b0, lw.scale, pl.layout)
    return lw.replace(w=w, a0=a0, b0=b0, init=t0.init)


def tree_from_adapter(
    adapter: Adapter,
    params: Any,
    *,
    layouts: LayoutSpec = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    strict: bool = True,
    shardings: ShardingSpec = None,
    dtype: Any = None,
    rng: Optional[jax.Array] = None,
    uses: Optional[dict] = None,
) -> Any:
    """The LoRA tree of ``adapter`` over the base ``params`` (validated; see :func:`load`;
    ``rng``: see :func:`assemble_tree`; ``uses``: :func:`uses_of`)."""
    entries, treedef, pls, pps, tps = plan_adapter(
        adapter, params, layouts=layouts, name_map=name_map, prefix=prefix, strict=strict, shardings=shardings,
        uses=uses,
    )
    return assemble_tree(entries, treedef, pls, pps, lambda rec, k: getattr(rec, k), dtype, rng, tps)

