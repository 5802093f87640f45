"""Orbax checkpoints of LoRA adapters: `save`, `load`, and `ocp.CheckpointManager` args.

Only what is trained is written: each target's ``A`` and ``B`` and every ``Trainable``
value (biases, ``modules_to_save``); never the base. The arrays are an Orbax
``StandardCheckpointHandler`` pytree::

    {"lora":   {"t0000": {"a": A, "b": B}, "t0001": ...},
     "params": {"p0000": value, ...}}                      # only if there are any

and everything needed to put them back, or to convert them to the PEFT format without
the base model, is JSON in the checkpoint's ``custom_metadata``::

    {"format": "jlora.adapter", "version": 1,
     "config": {...PEFT adapter_config keys...} | null,
     "targets": [{"key": "t0000", "path": "transformer/h/0/attn/c_attn/kernel",
                  "layout": ["out", "in"], "base_shape": [2304, 768], "base_dtype": "float32",
                  "kind": "linear", "torch": ["transformer.h.0.attn.c_attn"],
                  "r": 8, "alpha": 16.0, "scale": 2.0, "dropout": 0.0,
                  "a_shape": [768, 8], "a_dtype": "float32", "b_shape": [8, 2304], "b_dtype": "float32"}, ...],
     "params": [{"key": "p0000", "path": ".../bias", "shape": [...], "dtype": "...",
                 "torch": ["..."], "torch_layout": false}, ...],
     "torch_modules": [every kernel module of the base, by PyTorch name],
     "name_map": "hf" | "qwen3" | "llama3" | "gemma3" | ...}   # the map that gave the names

``path`` is the Flax leaf path; ``torch`` the PyTorch module name(s) (one per layer for
stacked kernels, or per slice of a kernel that holds several modules; see
:mod:`jlora.name_maps`); ``layout`` may be ``null`` for adapters converted
from PEFT without a base model, in which case ``A`` is stored (in_features, r) and ``B``
(r, out_features) and both are reshaped to the base kernel's layout on load.

:func:`save` is atomic: it writes to a temporary directory next to ``path`` and renames
it into place, so a save killed at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from . import name_maps
from .atomic import recover_interrupted_save as _recover, replace_directory, temp_sibling
from .config import LoraConfig
from .records import (
    Adapter,
    ParamRecord,
    ShardingSpec,
    TargetRecord,
    adapter_from_tree,
    dtype_name,
    plan_adapter,
    assemble_tree,
    tree_from_adapter,
)
from .targets import LayoutSpec

__all__ = [
    "save",
    "load",
    "read_metadata",
    "read_adapter",
    "write_adapter",
    "AdapterSave",
    "AdapterRestore",
    "AdapterCheckpointHandler",
    "find_adapter_dir",
    # the records, re-exported for code written against jlora 0.1 (they live in jlora.records)
    "Adapter",
    "TargetRecord",
    "ParamRecord",
    "adapter_from_tree",
    "tree_from_adapter",
]

FORMAT = "jlora.adapter"
VERSION = 1


# --------------------------------------------------------------------------------------
# Orbax encoding


def _map_name(source: Any) -> Optional[str]:
    name = source if isinstance(source, str) else getattr(source, "name", None)
    return name if isinstance(name, str) else None


def _encode(adapter: Adapter) -> tuple[dict, dict]:
    tree: dict[str, Any] = {"lora": {}}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": adapter.config,
        "targets": [],
        "params": [],
        "torch_modules": adapter.torch_modules,
        "name_map": _map_name(adapter.name_map),
    }
    for i, t in enumerate(adapter.targets):
        key = f"t{i:04d}"
        for name in ("a", "b"):
            x = getattr(t, name)
            if not isinstance(x, (jax.Array, np.ndarray)):
                raise TypeError(f"{t.path}: {name.upper()} is {type(x).__name__}, expected an array")
        tree["lora"][key] = {"a": t.a, "b": t.b}
        meta["targets"].append(
            {
                "key": key,
                "path": t.path,
                "kind": t.kind,
                "layout": list(t.layout) if t.layout is not None else None,
                "base_shape": list(t.base_shape) if t.base_shape is not None else None,
                "base_dtype": t.base_dtype,
                "torch": list(t.torch) if t.torch is not None else None,
                "r": t.r,
                "alpha": t.alpha,
                "scale": t.scale,
                "dropout": t.dropout,
                "a_shape": list(t.a.shape),
                "a_dtype": dtype_name(t.a.dtype),
                "b_shape": list(t.b.shape),
                "b_dtype": dtype_name(t.b.dtype),
            }
        )
    if adapter.params:
        tree["params"] = {}
    for i, p in enumerate(adapter.params):
        key = f"p{i:04d}"
        tree["params"][key] = p.value
        meta["params"].append(
            {
                "key": key,
                "path": p.path,
                "shape": list(p.value.shape),
                "dtype": dtype_name(p.value.dtype),
                "torch": list(p.torch) if p.torch is not None else None,
                "torch_layout": p.torch_layout,
            }
        )
    return tree, meta


def _decode_meta(meta: Any, where: str) -> tuple[Adapter, dict[int, str], dict[int, str]]:
    """An Adapter with ``jax.ShapeDtypeStruct`` arrays, and the Orbax keys by record id."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a jlora adapter checkpoint (no '{FORMAT}' metadata)")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{where}: adapter format version {meta['version']} is newer than this jlora ({VERSION})")
    targets, params = [], []
    tkeys: dict[int, str] = {}
    pkeys: dict[int, str] = {}
    for m in meta["targets"]:
        t = TargetRecord(
            path=m["path"],
            a=jax.ShapeDtypeStruct(tuple(m["a_shape"]), jnp.dtype(m["a_dtype"])),
            b=jax.ShapeDtypeStruct(tuple(m["b_shape"]), jnp.dtype(m["b_dtype"])),
            r=int(m["r"]),
            scale=float(m["scale"]),
            alpha=m.get("alpha"),
            layout=tuple(m["layout"]) if m.get("layout") is not None else None,
            base_shape=tuple(m["base_shape"]) if m.get("base_shape") is not None else None,
            base_dtype=m.get("base_dtype"),
            dropout=float(m.get("dropout", 0.0)),
            kind=m.get("kind", "linear"),
            torch=tuple(m["torch"]) if m.get("torch") is not None else None,
        )
        targets.append(t)
        tkeys[id(t)] = m["key"]
    for m in meta.get("params", []):
        p = ParamRecord(
            path=m["path"],
            value=jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"])),
            torch=tuple(m["torch"]) if m.get("torch") is not None else None,
            torch_layout=bool(m.get("torch_layout", False)),
        )
        params.append(p)
        pkeys[id(p)] = m["key"]
    adapter = Adapter(targets, params, meta.get("config"), meta.get("torch_modules"), meta.get("name_map"))
    return adapter, tkeys, pkeys


def _stored_abstract(meta: dict) -> dict:
    tree: dict[str, Any] = {"lora": {}}
    for m in meta["targets"]:
        tree["lora"][m["key"]] = {
            "a": jax.ShapeDtypeStruct(tuple(m["a_shape"]), jnp.dtype(m["a_dtype"])),
            "b": jax.ShapeDtypeStruct(tuple(m["b_shape"]), jnp.dtype(m["b_dtype"])),
        }
    if meta.get("params"):
        tree["params"] = {m["key"]: jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"])) for m in meta["params"]}
    return tree


def _restore(handler: ocp.StandardCheckpointHandler, directory: epath.Path, args: "AdapterRestore") -> Any:
    meta = handler.metadata(directory).custom_metadata
    adapter, tkeys, pkeys = _decode_meta(meta, str(directory))
    entries, treedef, pls, pps = plan_adapter(
        adapter, args.params, layouts=args.layouts, name_map=args.name_map, prefix=args.prefix,
        strict=args.strict, shardings=args.shardings,
    )
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _stored_abstract(meta)
    for pl in pls:
        for t, _ in pl.parts:
            k = tkeys[id(t)]
            a_sh, b_sh = (pl.a_sharding, pl.b_sharding) if pl.exact else (host, host)
            target["lora"][k] = {
                "a": jax.ShapeDtypeStruct(tuple(t.a.shape), t.a.dtype, sharding=a_sh),
                "b": jax.ShapeDtypeStruct(tuple(t.b.shape), t.b.dtype, sharding=b_sh),
            }
    for pp in pps:
        for p, _ in pp.parts:
            k = pkeys[id(p)]
            target["params"][k] = jax.ShapeDtypeStruct(
                tuple(p.value.shape), p.value.dtype, sharding=pp.sharding if pp.exact else host
            )
    for group in target.values():
        for k, v in group.items():
            if isinstance(v, jax.ShapeDtypeStruct) and v.sharding is None:
                group[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=host)
            elif isinstance(v, dict):
                group[k] = {
                    n: (x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host))
                    for n, x in v.items()
                }
    restored = ocp.StandardCheckpointHandler.restore(handler, directory, args=ocp.args.StandardRestore(target))

    def arrays(rec, name):
        if isinstance(rec, TargetRecord):
            return restored["lora"][tkeys[id(rec)]][name]
        return restored["params"][pkeys[id(rec)]]

    return assemble_tree(entries, treedef, pls, pps, arrays, args.dtype)


class AdapterCheckpointHandler(ocp.StandardCheckpointHandler):
    """Orbax handler for LoRA adapters; use it through :class:`AdapterSave` /
    :class:`AdapterRestore` (registered, so ``ocp.args.Composite`` finds it)."""

    async def async_save(self, directory, item=None, save_args=None, args=None):  # type: ignore[override]
        if isinstance(args, AdapterSave):
            adapter = adapter_from_tree(args.lp, args.config, name_map=args.name_map, prefix=args.prefix)
            tree, meta = _encode(adapter)
            args = ocp.args.StandardSave(tree, custom_metadata=meta)
        return await super().async_save(directory, item=item, save_args=save_args, args=args)

    def restore(self, directory, item=None, args=None):  # type: ignore[override]
        if isinstance(args, AdapterRestore):
            return _restore(self, epath.Path(directory), args)
        return super().restore(directory, item=item, args=args)


@ocp.args.register_with_handler(AdapterCheckpointHandler, for_save=True)
@dataclasses.dataclass
class AdapterSave(ocp.args.CheckpointArgs):
    """Save args for a LoRA adapter inside an ``ocp.CheckpointManager``::

        mngr.save(step, args=ocp.args.Composite(
            adapter=jlora.checkpoint.AdapterSave(lp, config),
            opt_state=ocp.args.StandardSave(opt_state)))

    Writes the trained leaves and the JSON metadata described in :mod:`jlora.checkpoint`.
    """

    lp: Any
    config: Optional[LoraConfig] = None
    name_map: name_maps.NameMapSpec = None
    prefix: Optional[str] = None


@ocp.args.register_with_handler(AdapterCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class AdapterRestore(ocp.args.CheckpointArgs):
    """Restore args: the LoRA tree over the base ``params`` (see :func:`load`)::

        restored = mngr.restore(step, args=ocp.args.Composite(
            adapter=jlora.checkpoint.AdapterRestore(params),
            opt_state=ocp.args.StandardRestore(jax.eval_shape(tx.init, lp))))
        lp = restored.adapter
    """

    params: Any
    shardings: ShardingSpec = None
    strict: bool = True
    dtype: Any = None
    layouts: LayoutSpec = None
    name_map: name_maps.NameMapSpec = None
    prefix: Optional[str] = None


# --------------------------------------------------------------------------------------
# save / load


def _is_adapter_dir(path: Path) -> bool:
    return (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file()


def recover_interrupted_save(path: Path, complete: Callable[[Path], bool] = _is_adapter_dir) -> Path:
    """``path``, or the complete previous version a killed save left beside it (see
    :mod:`jlora.atomic`)."""
    return _recover(path, complete)


def find_adapter_dir(path: Union[str, os.PathLike]) -> Path:
    """The Orbax item directory holding a jlora adapter: ``path`` itself, a
    ``CheckpointManager`` step directory (its item written with :class:`AdapterSave`), or
    a ``CheckpointManager`` root (its latest step)."""
    p = recover_interrupted_save(Path(path).absolute())
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if (p / "_METADATA").is_file():
        return p
    steps = sorted((c for c in p.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))
    if steps:
        p = steps[-1]
    for child in sorted(c for c in p.iterdir() if c.is_dir()):
        if (child / "_METADATA").is_file():
            try:
                meta = ocp.StandardCheckpointHandler().metadata(epath.Path(child)).custom_metadata
            except Exception:  # noqa: BLE001 - not an Orbax pytree
                continue
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                return child
    hint = "; it is a PEFT adapter: use jlora.load_peft" if (p / "adapter_config.json").exists() else ""
    raise ValueError(f"{path}: not a jlora Orbax adapter checkpoint (no _METADATA with '{FORMAT}' metadata){hint}")


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The JSON metadata of an Orbax adapter checkpoint (no array data is read)."""
    d = find_adapter_dir(path)
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(d)).custom_metadata
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{d}: unreadable Orbax checkpoint metadata: {err}") from None
    _decode_meta(meta, str(d))
    return meta


def read_adapter(path: Union[str, os.PathLike]) -> Adapter:
    """The whole adapter of an Orbax checkpoint as records with numpy arrays (no base)."""
    d = find_adapter_dir(path)
    handler = ocp.StandardCheckpointHandler()
    meta = handler.metadata(epath.Path(d)).custom_metadata
    adapter, tkeys, pkeys = _decode_meta(meta, str(d))
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), _stored_abstract(meta)
    )
    restored = handler.restore(epath.Path(d), args=ocp.args.StandardRestore(target))
    for t in adapter.targets:
        t.a = np.asarray(restored["lora"][tkeys[id(t)]]["a"])
        t.b = np.asarray(restored["lora"][tkeys[id(t)]]["b"])
    for p in adapter.params:
        p.value = np.asarray(restored["params"][pkeys[id(p)]])
    return adapter


def write_adapter(path: Union[str, os.PathLike], adapter: Adapter, *, overwrite: bool = True) -> Path:
    """Writes ``adapter`` as an Orbax checkpoint at ``path``, atomically (see :func:`save`)."""
    tree, meta = _encode(adapter)
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if path.is_file() or (any(path.iterdir()) and not _is_adapter_dir(path)):
            raise ValueError(f"{path} exists and is not a jlora adapter checkpoint; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = temp_sibling(path, tag)
    try:
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
            epath.Path(tmp), args=ocp.args.StandardSave(tree, custom_metadata=meta)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_directory(tmp, path, tag)


def save(
    path: Union[str, os.PathLike],
    lp: Any,
    *,
    config: Optional[LoraConfig] = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    overwrite: bool = True,
) -> Path:
    """Saves the trained part of a LoRA tree as an Orbax checkpoint at ``path``.

    Writes each target's ``A`` and ``B``, every ``Trainable`` value, and JSON metadata:
    per target the Flax path, kernel layout, base shape/dtype, rank, alpha, scale and
    PyTorch module name, plus ``config`` (PEFT keys) if given. The base kernels are never
    written (``lp``'s ``w`` may even be ``jax.ShapeDtypeStruct``s). GPT-2 small with
    ``r=8`` on ``c_attn``/``c_proj`` is 811,008 float32 numbers: about 3.2 MB.

    The write is atomic: a temporary directory beside ``path`` renamed into place, so a
    save killed at any point leaves the previous checkpoint at ``path`` loadable.

    Args:
      path: checkpoint directory (replaced if it is a jlora checkpoint and ``overwrite``).
      lp: the LoRA tree (from :func:`jlora.wrap`).
      config: the :class:`LoraConfig` used to wrap; stored for :func:`jlora.save_peft` /
        ``jlora convert``.
      name_map, prefix: which name map gives the PyTorch names (``None``: recognised
        from the paths; see :func:`jlora.name_maps.for_tree`), and a module path
        prepended to them.

    Example:
      >>> jlora.save("ckpt/adapter", lp, config=config)          # doctest: +SKIP
      >>> lp = jlora.load("ckpt/adapter", model.params)           # doctest: +SKIP

    Inside an ``ocp.CheckpointManager`` use :class:`AdapterSave` / :class:`AdapterRestore`.
    """
    adapter = adapter_from_tree(lp, config, name_map=name_map, prefix=prefix)
    return write_adapter(path, adapter, overwrite=overwrite)


def load(
    path: Union[str, os.PathLike],
    params: Any,
    *,
    shardings: ShardingSpec = None,
    strict: bool = True,
    dtype: Any = None,
    layouts: LayoutSpec = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
) -> Any:
    """The LoRA tree of the adapter at ``path`` over the base ``params``.

    Validates before reading any array: every adapter path must be in ``params`` with
    the base shape (and, with ``strict``, dtype) the adapter was made for, otherwise a
    ``ValueError`` names the path and both shapes/dtypes. Adapters converted from PEFT
    without a base are matched by PyTorch name instead, with layouts inferred from
    ``params`` (``layouts=`` overrides, as in :func:`jlora.wrap`).

    Args:
      path: an adapter checkpoint written by :func:`save`, a ``CheckpointManager`` step
        or root directory (latest step) whose item was written with :class:`AdapterSave`.
      params: the base parameters (arrays, or ``jax.ShapeDtypeStruct`` with shardings).
      shardings: where to put the restored arrays: one ``Sharding`` for all, or
        ``f(path, "a"|"b"|"value") -> Sharding | None``. By default A and B follow their
        kernel's ``NamedSharding`` (rank axis replicated), like :func:`jlora.wrap`, and
        ``Trainable`` values their base leaf's sharding.
      strict: base dtypes must match the adapter's; ``False`` casts instead.
      dtype: cast A and B to this dtype (default: as stored).

    Example:
      >>> lp = jlora.load("ckpt/adapter", model.params)           # doctest: +SKIP
    """
    d = find_adapter_dir(path)
    handler = AdapterCheckpointHandler()
    return handler.restore(
        epath.Path(d),
        args=AdapterRestore(
            params, shardings=shardings, strict=strict, dtype=dtype, layouts=layouts, name_map=name_map, prefix=prefix
        ),
    )
