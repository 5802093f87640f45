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
from ..layouts.from_tree import LayoutSpec, TreeFacts, infer_layout, user_layout
from ..layouts.kernel import KernelLayout
from ..nodes.inits import init_residual_factors, is_residual_init, residual_kernel
from ..nodes.weight import LoraWeight, Trainable
from ..tree.targets import flatten_params
from ..tree.wrap import factor_sharding
from .distributed import local_device, place
from .records import Adapter, ParamRecord, TargetRecord, dtype_name, stack_first

__all__ = ["ShardingSpec", "plan_adapter", "assemble_tree", "tree_from_adapter"]

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
        self, entries: list[LeafEntry], layouts: LayoutSpec, name_map: name_maps.NameMapSpec, prefix: Optional[str]
    ):
        self.entries = entries
        self.by_path = {e.path: e for e in entries}
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

    def layout(self, e: LeafEntry) -> tuple[str, ...]:
        if e.index not in self._layouts:
            if self._facts is None:
                self._facts = TreeFacts(self.entries)
            known = self.name_map().layout(e.names, tuple(e.leaf.shape))
            self._layouts[e.index] = tuple(user_layout(self._layouts_spec, e) or known or infer_layout(e, self._facts))
        return self._layouts[e.index]

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
    a_shape, b_shape = ins + (r,), (r,) + outs
    if rec.kind == "conv":
        got_a, got_b = tuple(rec.a.shape), tuple(rec.b.shape)
        if got_a != a_shape or int(np.prod(got_b)) != int(np.prod(b_shape)):
            raise ValueError(
                f"{where}: conv LoRA factors A{got_a}, B{got_b} do not fit the base kernel of shape {base_shape} "
                f"(layout {layout}): expected A{a_shape}, B{b_shape}"
            )
    else:
        in_f, out_f = int(np.prod(ins)), int(np.prod(outs))
        got_in, got_out = int(rec.a.shape[0]), int(rec.b.shape[-1])
        if rec.a.ndim != 2 or rec.b.ndim != 2 or got_in != in_f or got_out != out_f or rec.b.shape[0] != r:
            raise ValueError(
                f"{where}: LoRA factors with in_features={got_in}, out_features={got_out} (A {tuple(rec.a.shape)}, "
                f"B {tuple(rec.b.shape)}) do not fit the base kernel of shape {base_shape} (layout {layout}: "
                f"in_features={in_f}, out_features={out_f}); is the adapter for a different base model?"
            )
    return a_shape, b_shape


def plan_adapter(
    adapter: Adapter,
    params: Any,
    *,
    layouts: LayoutSpec = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    strict: bool = True,
    shardings: ShardingSpec = None,
) -> tuple[list[LeafEntry], Any, list[_Placement], list[_ParamPlacement]]:
    """Validates ``adapter`` against the base ``params`` and decides where each record goes.

    Raises ``ValueError`` naming the path (and both shapes / dtypes) that does not fit,
    or listing every name that is not in the base. Reads no array data.
    """
    entries, treedef = flatten_params(params)
    index = _BaseIndex(entries, layouts, name_map, prefix)

    # 1. Where does each record go?
    t_loc: list[tuple[TargetRecord, LeafEntry, Optional[int]]] = []
    p_loc: list[tuple[ParamRecord, LeafEntry, Optional[int]]] = []
    by_torch_t = [t for t in adapter.targets if not (t.path and t.path in index.by_path)]
    by_torch_p = [p for p in adapter.params if not (p.path and p.path in index.by_path)]
    torch_ids = {id(x) for x in by_torch_t} | {id(x) for x in by_torch_p}
    missing_paths = [t.path for t in by_torch_t if not t.torch] + [p.path for p in by_torch_p if not p.torch]
    if missing_paths:
        raise ValueError(
            f"the adapter has paths that are not in the base params: {_fmt([str(p) for p in missing_paths])}. "
            f"Base paths: {_fmt([e.path for e in entries if e.name in KERNEL_LEAF_NAMES])}"
        )
    fix: Callable[[str], str] = lambda n: n  # noqa: E731
    if by_torch_t or by_torch_p:
        mod_names = [n for t in by_torch_t for n in t.torch]
        par_names = [n for p in by_torch_p for n in p.torch]
        fix, unresolved = _resolve_torch_names(mod_names, par_names, index)
        if unresolved:
            modules, _ = index.torch_tables()
            paths = {n: r.path for r in list(by_torch_t) + list(by_torch_p) for n in r.torch if r.path}
            shown = [f"{paths[n]} ({n})" if n in paths else n for n in unresolved]
            raise ValueError(
                f"{len(unresolved)} adapter module(s)/parameter(s) are not in the base params: {_fmt(shown)}. "
                f"Modules the base has (PyTorch names): {_fmt(sorted(modules))}. "
                "Pass name_map= / prefix= if the names differ, or use the base model this adapter was made for."
            )
    modules, ptable = index.torch_tables() if (by_torch_t or by_torch_p) else ({}, {})

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
        layout = tuple(t0.layout) if (t0.layout is not None and parts[0][1] is None) else index.layout(e)
        if len(layout) != len(shape):
            raise ValueError(f"{e.path}: layout {layout} does not fit the base kernel of shape {shape}")
        where = e.path if t0.path == e.path else f"{_fmt(list(t0.torch or ()), 2)} → {e.path}"
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
        full_a, full_b = kl.factor_shapes(shape, t0.r)
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
        placements.append(_Placement(e, layout, full_a, full_b, parts, exact, a_sh, b_sh))

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
    return entries, treedef, placements, pplacements


def assemble_tree(
    entries: list[LeafEntry],
    treedef: Any,
    placements: list[_Placement],
    pplacements: list[_ParamPlacement],
    arrays: Callable[[Any, str], Any],
    dtype: Any = None,
    rng: Optional[jax.Array] = None,
) -> Any:
    """Builds the LoRA tree; ``arrays(record, "a"|"b"|"magnitude"|"a0"|"b0"|"value")``
    gives a record's data (called for DoRA's and PiSSA's arrays only where the record has
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
        lw = LoraWeight(pl.entry.leaf, a, b, scale=float(t0.scale), layout=pl.layout, dropout=float(t0.dropout))
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
) -> Any:
    """The LoRA tree of ``adapter`` over the base ``params`` (validated; see :func:`load`;
    ``rng``: see :func:`assemble_tree`)."""
    entries, treedef, pls, pps = plan_adapter(
        adapter, params, layouts=layouts, name_map=name_map, prefix=prefix, strict=strict, shardings=shardings
    )
    return assemble_tree(entries, treedef, pls, pps, lambda rec, k: getattr(rec, k), dtype, rng)

