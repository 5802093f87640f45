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

Variants add, per target, arrays next to ``a``/``b`` (``"magnitude"``: DoRA's ``m``;
``"a0"``/``"b0"``: the initial factors of PiSSA/OLoRA, so that loading rebuilds the
residual base ``W − s·a0·b0`` exactly, ``pissa_niter_N`` included, without running the
SVD again), described in the target's metadata as ``"arrays": {name: {"shape",
"dtype"}}``, and ``"init": "pissa" | "pissa_niter_N" | "olora"``; ``"b_bias"`` (lora_bias's
lora_B bias) is one more such array; ``"groups"`` (a grouped convolution) and
``"guessed": true`` (a layout that was the tree's convention, not evidence) are written
when they differ from 1 / false. Trainable token rows are a third group of arrays,
``{"tokens": {"k0000": values}}``, described under ``"tokens"`` (path, indices, token
axis, PyTorch module).

``path`` is the Flax leaf path; ``torch`` the PyTorch module name(s) (one per layer for
stacked kernels, or per slice of a kernel that holds several modules; see
:mod:`jlora.name_maps`); ``layout`` may be ``null`` for adapters converted
from PEFT without a base model, in which case ``A`` is stored (in_features, r) and ``B``
(r, out_features) and both are reshaped to the base kernel's layout on load.

:func:`save` is atomic: it writes to a temporary directory next to ``path`` and renames
it into place, so a save killed at any point leaves the previous checkpoint loadable.

**Integrity.** Each target record also carries ``a_checksum``/``b_checksum`` and each
param record ``checksum`` (:func:`jlora.io.integrity.array_checksums`, algorithm
``"checksum_algorithm": "jlora-fmix64-v1"``: independent of sharding and of the number of
processes), and the metadata its own ``"digest"`` (SHA-256 of the rest as canonical
JSON). :func:`load` verifies all of them and raises ``ValueError`` naming the checkpoint
and the tensor on a mismatch; a missing, truncated or garbled file is a
``FileNotFoundError``/``ValueError`` naming the directory and the file. Checkpoints
written before checksums existed load unverified.

**Several processes.** Every process calls :func:`save` / :func:`load` (and
``CheckpointManager.save``/``restore`` with :class:`AdapterSave` / :class:`AdapterRestore`)
as with Orbax: the temporary directory's name is drawn on the primary process and
broadcast, Orbax writes each process's shards, the primary alone writes the metadata and
does the renames, and no process returns before the new checkpoint is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import os
import shutil
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .. import name_maps
from ..core.config import LoraConfig
from ..layouts.from_tree import LayoutSpec
from . import distributed
from .atomic import recover_interrupted_save as _recover, replace_directory, temp_sibling
from .integrity import ARRAY_ALGORITHM, array_checksums, json_digest
from .placement import ShardingSpec, assemble_tree, plan_adapter, uses_of
from .records import Adapter, ParamRecord, TargetRecord, TokenRecord, adapter_from_tree, dtype_name

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
]

FORMAT = "jlora.adapter"
VERSION = 1


# --------------------------------------------------------------------------------------
# Orbax encoding


# optional per-target arrays, stored next to "a" and "b" when present
_VARIANT_ARRAYS = ("magnitude", "a0", "b0", "b_bias")


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
    if adapter.base_quantization is not None:  # what the base was (jlora.quantize), for jlora inspect
        meta["base_quantization"] = adapter.base_quantization
    for i, t in enumerate(adapter.targets):
        key = f"t{i:04d}"
        for name in ("a", "b"):
            x = getattr(t, name)
            if not isinstance(x, (jax.Array, np.ndarray)):
                raise TypeError(f"{t.path}: {name.upper()} is {type(x).__name__}, expected an array")
        tree["lora"][key] = {"a": t.a, "b": t.b}
        extra = {}
        for name in _VARIANT_ARRAYS:  # DoRA's magnitude, PiSSA/OLoRA's initial factors
            x = getattr(t, name)
            if x is not None:
                tree["lora"][key][name] = x
                extra[name] = {"shape": list(x.shape), "dtype": dtype_name(x.dtype)}
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
                **({"arrays": extra} if extra else {}),
                **({"init": t.init} if t.init is not None else {}),
                **({"groups": int(t.groups)} if t.groups != 1 else {}),
                **({"guessed": True} if t.guessed else {}),
            }
        )
    if adapter.tokens:
        tree["tokens"] = {}
        meta["tokens"] = []
    for i, k in enumerate(adapter.tokens):
        key = f"k{i:04d}"
        tree["tokens"][key] = k.values
        meta["tokens"].append({"key": key, "path": k.path, "indices": [int(j) for j in k.indices], "axis": k.axis,
                               "torch": list(k.torch) if k.torch is not None else None,
                               "shape": list(k.values.shape), "dtype": dtype_name(k.values.dtype)})
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
    if distributed.is_multiprocess():
        # Orbax writes a numpy array once, from the primary; a jax.Array on this
        # process's devices only is the same value on every process: write it once too
        tree = jax.tree_util.tree_map(
            lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree
        )
    sums = array_checksums(tree)  # one jitted call; a collective for global arrays
    for m in meta["targets"]:
        m["a_checksum"] = sums["lora"][m["key"]]["a"]
        m["b_checksum"] = sums["lora"][m["key"]]["b"]
        for name, info in m.get("arrays", {}).items():  # DoRA's magnitude, PiSSA/OLoRA's A0/B0
            info["checksum"] = sums["lora"][m["key"]][name]
    for m in meta["params"]:
        m["checksum"] = sums["params"][m["key"]]
    for m in meta.get("tokens", []):
        m["checksum"] = sums["tokens"][m["key"]]
    meta["checksum_algorithm"] = ARRAY_ALGORITHM
    meta["digest"] = json_digest(meta)
    return tree, meta


def _check_digest(meta: dict, where: str) -> None:
    digest = meta.get("digest")
    if digest is not None and json_digest({k: v for k, v in meta.items() if k != "digest"}) != digest:
        raise ValueError(
            f"{where}: jlora's metadata in _METADATA does not match the digest recorded with it: the file was "
            "modified or is corrupt; restore the checkpoint from a copy"
        )


def _decode_meta(meta: Any, where: str, verify: bool = True) -> tuple[Adapter, dict[int, str], dict[int, str]]:
    """An Adapter with ``jax.ShapeDtypeStruct`` arrays, and the Orbax keys by record id."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a jlora adapter checkpoint (no '{FORMAT}' metadata)")
    if verify:
        _check_digest(meta, where)
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{where}: adapter format version {version!r}; this jlora reads versions up to {VERSION}")
    try:
        return _decode_records(meta)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{where}: malformed jlora metadata in _METADATA ({type(err).__name__}: {err}); the checkpoint is corrupt"
        ) from None


def _decode_records(meta: dict) -> tuple[Adapter, dict[int, str], dict[int, str]]:
    """Records with ``ShapeDtypeStruct`` arrays; the Orbax keys of targets, and of params and
    token rows (one dict: their keys differ, ``p…`` / ``k…``)."""
    targets, params, tokens = [], [], []
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
            init=m.get("init"),
            groups=int(m.get("groups", 1)),
            guessed=bool(m.get("guessed", False)),
            **{n: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"])) for n, v in m.get("arrays", {}).items()
               if n in _VARIANT_ARRAYS},
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
    for m in meta.get("tokens", []):
        k = TokenRecord(path=m["path"], values=jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"])),
                        indices=tuple(int(j) for j in m["indices"]), axis=m.get("axis"),
                        torch=tuple(m["torch"]) if m.get("torch") is not None else None)
        tokens.append(k)
        pkeys[id(k)] = m["key"]
    adapter = Adapter(targets, params, meta.get("config"), meta.get("torch_modules"), meta.get("name_map"),
                      base_quantization=meta.get("base_quantization"), tokens=tokens)
    return adapter, tkeys, pkeys


def _stored_abstract(meta: dict) -> dict:
    tree: dict[str, Any] = {"lora": {}}
    for m in meta["targets"]:
        tree["lora"][m["key"]] = {
            "a": jax.ShapeDtypeStruct(tuple(m["a_shape"]), jnp.dtype(m["a_dtype"])),
            "b": jax.ShapeDtypeStruct(tuple(m["b_shape"]), jnp.dtype(m["b_dtype"])),
            **{n: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"])) for n, v in m.get("arrays", {}).items()},
        }
    if meta.get("params"):
        tree["params"] = {m["key"]: jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"])) for m in meta["params"]}
    if meta.get("tokens"):
        tree["tokens"] = {m["key"]: jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"])) for m in meta["tokens"]}
    return tree


def _short(err: BaseException) -> str:
    """The informative line of an Orbax/TensorStore error (they carry whole tracebacks)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    codes = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNKNOWN")
    line = next((ln for ln in lines if any(c in ln for c in codes)), lines[-1] if lines else "")
    line = line.split(" [tensorstore_spec=", 1)[0]
    return f"{type(err).__name__}: {line[:400]}"


def _is_read_echo(unraisable: Any) -> bool:
    """An echo of a failed parallel read, reported after Orbax closed its event loop: a
    TensorStore callback finding the loop closed, or a read coroutine never resumed."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None) if inspect.iscoroutine(obj) else None
    return code is not None and "orbax" in code.co_filename


class _ReadEchoLogFilter(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for reads Orbax abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith(("Future exception was never retrieved", "Task exception was never retrieved")):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not ("tensorstore" in msg or "orbax" in msg or (exc is not None and "tensorstore_spec" in str(exc)))


def _drop_read_echoes() -> None:
    """After a failed Orbax read, keeps its echoes off stderr, for the rest of the process.

    Orbax reads the arrays in parallel; when one read fails it closes its event loop while
    the others are still in flight. Those report later, whenever TensorStore next runs
    (often during the next read), as "Event loop is closed", read coroutines never resumed
    (through ``sys.unraisablehook``) and futures whose exception was never retrieved (the
    ``asyncio`` logger). jlora has already raised its own error for the failure, so a
    filter is put in front of the hook and the logger that drops exactly these, and passes
    everything else on. Installed once, on the failure path only.
    """
    hook = sys.unraisablehook
    if not getattr(hook, "jlora_drops_read_echoes", False):

        def filtered(unraisable: Any) -> None:
            if not _is_read_echo(unraisable):
                hook(unraisable)

        filtered.jlora_drops_read_echoes = True  # type: ignore[attr-defined]
        sys.unraisablehook = filtered
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _ReadEchoLogFilter) for f in logger.filters):
        logger.addFilter(_ReadEchoLogFilter())


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Where an Orbax read fails, only jlora's error reaches the user (see
    :func:`_drop_read_echoes`); the success path is untouched."""
    try:
        yield
    except BaseException:
        _drop_read_echoes()
        gc.collect()  # the abandoned read coroutines report now, through the filter
        raise


def _read_custom_metadata(handler: ocp.StandardCheckpointHandler, directory: epath.Path) -> Any:
    """jlora's metadata of the checkpoint item at ``directory``; errors name the file."""
    f = Path(directory) / "_METADATA"
    if not f.is_file():
        raise FileNotFoundError(f"{directory}: missing {f.name}: the checkpoint is incomplete or damaged")
    try:
        json.loads(f.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{directory}: cannot read the checkpoint metadata file {f.name} (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from None
    try:
        with _quiet_failed_reads():
            return handler.metadata(directory).custom_metadata
    except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise ValueError(
            f"{directory}: cannot read the arrays' metadata from the checkpoint's array store (manifest.ocdbt, "
            f"d/, ocdbt.process_*/ under {directory}: missing, truncated or corrupt): {_short(err)}"
        ) from err


def _orbax_restore(handler: ocp.StandardCheckpointHandler, directory: epath.Path, target: Any) -> Any:
    try:
        with _quiet_failed_reads():
            return ocp.StandardCheckpointHandler.restore(handler, directory, args=ocp.args.StandardRestore(target))
    except Exception as err:  # noqa: BLE001 - TensorStore / Orbax errors of many types
        raise ValueError(
            f"{directory}: cannot read the array data: a file under {directory} (manifest.ocdbt, ocdbt.process_*/, "
            f"d/, array_metadatas/) is missing, truncated or corrupt: {_short(err)}"
        ) from err


def _verify(restored: dict, meta: dict, where: str) -> None:
    """Compares the checksums recorded at save time with the arrays just read."""
    algorithm = meta.get("checksum_algorithm")
    if algorithm is None:
        return  # written before jlora recorded checksums
    if algorithm != ARRAY_ALGORITHM:
        warnings.warn(f"{where}: unknown checksum algorithm {algorithm!r}; the arrays are not verified", stacklevel=3)
        return
    expected: list[tuple[str, str, Any]] = []
    arrays: list[Any] = []
    for m in meta["targets"]:
        for name in ("a", "b"):
            expected.append((f"factor {name.upper()} of target {m.get('path') or m.get('torch')} "
                             f"(Orbax key lora/{m['key']}/{name})", m.get(f"{name}_checksum"), None))
            arrays.append(restored["lora"][m["key"]][name])
        for name, info in m.get("arrays", {}).items():
            expected.append((f"{name} of target {m.get('path') or m.get('torch')} (Orbax key lora/{m['key']}/{name})",
                             info.get("checksum"), None))
            arrays.append(restored["lora"][m["key"]][name])
    for m in meta.get("params", []):
        expected.append((f"trained parameter {m.get('path') or m.get('torch')} (Orbax key params/{m['key']})",
                         m.get("checksum"), None))
        arrays.append(restored["params"][m["key"]])
    for m in meta.get("tokens", []):
        expected.append((f"trainable token rows of {m.get('path') or m.get('torch')} (Orbax key tokens/{m['key']})",
                         m.get("checksum"), None))
        arrays.append(restored["tokens"][m["key"]])
    got = array_checksums(arrays)
    for (what, want, _), have in zip(expected, got):
        if want != have:
            raise ValueError(
                f"{where}: checksum mismatch for {what}: recorded {want}, read {have}; the checkpoint's array data "
                f"(under {where}/ocdbt.process_*/d/) is corrupt: restore it from a copy"
            )


def _restore(handler: ocp.StandardCheckpointHandler, directory: epath.Path, args: "AdapterRestore") -> Any:
    meta = _read_custom_metadata(handler, directory)
    adapter, tkeys, pkeys = _decode_meta(meta, str(directory), args.verify)
    entries, treedef, pls, pps, tps = plan_adapter(
        adapter, args.params, layouts=args.layouts, name_map=args.name_map, prefix=args.prefix,
        strict=args.strict, shardings=args.shardings, uses=uses_of(args.apply_fn, args.params, args.example_args),
    )
    # Records that need reshaping (converted from PEFT) are read whole on each process;
    # the others are read straight onto their shardings, each process reading its shards.
    host = jax.sharding.SingleDeviceSharding(distributed.local_device())
    target = _stored_abstract(meta)
    for pl in pls:
        for t, _ in pl.parts:
            k = tkeys[id(t)]
            a_sh, b_sh = (pl.a_sharding, pl.b_sharding) if pl.exact else (host, host)
            target["lora"][k] = {
                "a": jax.ShapeDtypeStruct(tuple(t.a.shape), t.a.dtype, sharding=a_sh),
                "b": jax.ShapeDtypeStruct(tuple(t.b.shape), t.b.dtype, sharding=b_sh),
                **{n: jax.ShapeDtypeStruct(tuple(getattr(t, n).shape), getattr(t, n).dtype,
                                           sharding={"a0": a_sh, "b0": b_sh}.get(n, host))
                   for n in _VARIANT_ARRAYS if getattr(t, n) is not None},
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
    restored = _orbax_restore(handler, directory, target)
    if args.verify:
        _verify(restored, meta, str(directory))

    def arrays(rec, name):
        if isinstance(rec, TargetRecord):
            return restored["lora"][tkeys[id(rec)]][name]
        if isinstance(rec, TokenRecord):
            return restored["tokens"][pkeys[id(rec)]]
        return restored["params"][pkeys[id(rec)]]

    return assemble_tree(entries, treedef, pls, pps, arrays, args.dtype, tplacements=tps)


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
            adapter=jlora.io.AdapterSave(lp, config),
            opt_state=ocp.args.StandardSave(opt_state)))

    Writes the trained leaves and the JSON metadata described in :mod:`jlora.io.orbax`.
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
            adapter=jlora.io.AdapterRestore(params),
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
    verify: bool = True
    apply_fn: Any = None
    example_args: Any = ()


# --------------------------------------------------------------------------------------
# save / load


def _is_adapter_dir(path: Path) -> bool:
    return (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file()


def recover_interrupted_save(path: Path, complete: Callable[[Path], bool] = _is_adapter_dir) -> Path:
    """``path``, or the complete previous version a killed save left beside it (see
    :mod:`jlora.io.atomic`)."""
    return _recover(path, complete)


# what an Orbax item directory holds besides _METADATA (a CheckpointManager step
# directory has _CHECKPOINT_METADATA and commit_success.txt too, so those do not tell)
_ORBAX_FILES = ("manifest.ocdbt", "_sharding", "array_metadatas", "ocdbt.process_0")


def find_adapter_dir(path: Union[str, os.PathLike]) -> Path:
    """The Orbax item directory holding a jlora adapter: ``path`` itself, a
    ``CheckpointManager`` step directory (its item written with :class:`AdapterSave`), or
    a ``CheckpointManager`` root (its latest step)."""
    p = recover_interrupted_save(Path(path).absolute())
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if not p.is_dir():
        raise ValueError(f"{path}: a file, not a checkpoint directory")
    if (p / "_METADATA").is_file():
        return p
    if any((p / f).exists() for f in _ORBAX_FILES):
        raise FileNotFoundError(f"{p}: missing _METADATA: the Orbax checkpoint is incomplete or damaged")
    steps = sorted((c for c in p.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))
    if steps:
        p = steps[-1]
    unreadable: list[str] = []
    for child in sorted(c for c in p.iterdir() if c.is_dir()):
        if (child / "_METADATA").is_file():
            try:
                meta = ocp.StandardCheckpointHandler().metadata(epath.Path(child)).custom_metadata
            except Exception as err:  # noqa: BLE001 - another item, or a damaged one
                unreadable.append(f"{child}/_METADATA ({type(err).__name__}: {err})")
                continue
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                return child
        elif any((child / f).exists() for f in _ORBAX_FILES):
            unreadable.append(f"{child}: missing _METADATA")
    hint = "; it is a PEFT adapter: use jlora.load_peft" if (p / "adapter_config.json").exists() else ""
    if unreadable:
        hint += f"; unreadable Orbax items (damaged?): {'; '.join(unreadable)}"
    raise ValueError(f"{path}: not a jlora Orbax adapter checkpoint (no _METADATA with '{FORMAT}' metadata){hint}")


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The JSON metadata of an Orbax adapter checkpoint (no array data is read)."""
    d = find_adapter_dir(path)
    meta = _read_custom_metadata(ocp.StandardCheckpointHandler(), epath.Path(d))
    _decode_meta(meta, str(d))
    return meta


def read_adapter(path: Union[str, os.PathLike], *, verify: bool = True) -> Adapter:
    """The whole adapter of an Orbax checkpoint as records with numpy arrays (no base),
    checksums verified (``verify=False`` skips that). Every process reads all of it."""
    d = find_adapter_dir(path)
    handler = ocp.StandardCheckpointHandler()
    meta = _read_custom_metadata(handler, epath.Path(d))
    adapter, tkeys, pkeys = _decode_meta(meta, str(d), verify)
    host = jax.sharding.SingleDeviceSharding(distributed.local_device())
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), _stored_abstract(meta)
    )
    restored = _orbax_restore(handler, epath.Path(d), target)
    if verify:
        _verify(restored, meta, str(d))
    for t in adapter.targets:
        for name in ("a", "b") + _VARIANT_ARRAYS:
            if name in ("a", "b") or getattr(t, name) is not None:
                setattr(t, name, np.asarray(restored["lora"][tkeys[id(t)]][name]))
    for p in adapter.params:
        p.value = np.asarray(restored["params"][pkeys[id(p)]])
    for k in adapter.tokens:
        k.values = np.asarray(restored["tokens"][pkeys[id(k)]])
    return adapter


def write_adapter(path: Union[str, os.PathLike], adapter: Adapter, *, overwrite: bool = True) -> Path:
    """Writes ``adapter`` as an Orbax checkpoint at ``path``, atomically (see :func:`save`).

    With several processes every process calls it: they agree on one temporary
    directory, Orbax writes each process's shards into it, and the primary alone
    renames it into place; all return once it is there."""
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if path.is_file() or (any(path.iterdir()) and not _is_adapter_dir(path)):
            raise ValueError(f"{path} exists and is not a jlora adapter checkpoint; refusing to replace it")
    tree, meta = _encode(adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = distributed.agreed_tag()
    tmp = temp_sibling(path, tag)
    try:
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
            epath.Path(tmp), args=ocp.args.StandardSave(tree, custom_metadata=meta)
        )
    except BaseException:
        if distributed.is_primary():  # with Orbax's own temporary directory inside/beside it
            for leftover in [tmp, *tmp.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        raise
    if distributed.is_primary():
        replace_directory(tmp, path, tag)
    distributed.barrier(f"jlora_save_{tag}")  # nobody returns before the rename
    return path


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
    verify: bool = True,
    apply_fn: Any = None,
    example_args: Any = (),
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
      name_map, prefix: how PyTorch names map to ``params`` for adapters converted from PEFT
        (``None``: recognised from the paths; see :func:`jlora.name_maps.for_tree`).
      verify: compare every array read with the checksum recorded when it was written,
        and the metadata with its digest (``ValueError`` naming the checkpoint and the
        tensor on a mismatch); ``False`` skips that.
      apply_fn, example_args: the model's forward, as in :func:`jlora.wrap`: the stored
        layouts are checked against how the model uses each kernel (a ``ValueError``
        names the kernel where they differ), and adapters converted from PEFT get the
        layouts of that use.

    With several processes (``jax.distributed.initialize``) every process calls
    ``load``; with ``params`` on a global mesh, A and B land on the shardings
    :func:`jlora.wrap` would give them, and each process reads only its own shards.

    Example:
      >>> lp = jlora.load("ckpt/adapter", model.params)           # doctest: +SKIP
    """
    d = find_adapter_dir(path)
    handler = AdapterCheckpointHandler()
    return handler.restore(
        epath.Path(d),
        args=AdapterRestore(
            params, shardings=shardings, strict=strict, dtype=dtype, layouts=layouts, name_map=name_map,
            prefix=prefix, verify=verify, apply_fn=apply_fn, example_args=tuple(example_args),
        ),
    )
