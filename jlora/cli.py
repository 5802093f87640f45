"""The ``jlora`` command: inspect and convert LoRA adapters.

::

    jlora inspect ADAPTER            # config, targets (shapes, ranks), parameter count, size on disk,
                                     # DoRA, the init and whether it needs PiSSA/OLoRA's residual base
    jlora convert SRC DST [--to peft|orbax] [--overwrite] [--name-map NAME] [--convert-to-lora]

``ADAPTER``/``SRC`` may be a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) or a jlora Orbax checkpoint (written by ``jlora.save``,
or a ``CheckpointManager`` step or root directory whose item was written with
``jlora.io.AdapterSave``). ``convert`` writes the other format unless ``--to``
says otherwise; no base model is needed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import name_maps
from .io.orbax import find_adapter_dir, read_adapter, write_adapter
from .io.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    convert_to_lora_records,
    module_factors,
    peft_config_dict,
    read_peft,
    to_torch,
    write_peft,
)
from .nodes.inits import is_residual_init, pissa_niter

__all__ = ["main", "detect_format", "inspect_adapter", "convert", "rename"]


def detect_format(path: str) -> str:
    """``"peft"`` or ``"orbax"``; ``ValueError``/``FileNotFoundError`` otherwise."""
    p = Path(path)
    if p.is_dir() and ((p / CONFIG_NAME).exists() or (p / WEIGHTS_NAME).exists() or (p / "adapter_model.bin").exists()):
        return "peft"
    try:
        find_adapter_dir(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such adapter") from None
    except ValueError:
        raise ValueError(
            f"{path}: neither a PEFT adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a jlora Orbax checkpoint"
        ) from None
    return "orbax"


def _read(path: str, fmt: str):
    return read_peft(path) if fmt == "peft" else read_adapter(path)


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _config_line(cfg: Optional[dict]) -> str:
    if cfg is None:
        return "(none stored)"
    keys = ["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "modules_to_save",
            "rank_pattern", "alpha_pattern", "layers_to_transform", "task_type", "base_model_name_or_path"]
    parts = []
    for k in keys:
        if k in cfg and cfg[k] not in (None, {}, []):
            parts.append(f"{k}={cfg[k]!r}")
    return " ".join(parts)


def _shape(x) -> str:
    return "(" + ", ".join(str(int(s)) for s in x) + ")"


def inspect_adapter(path: str, *, as_json: bool = False, out=None) -> dict:
    """Prints (and returns) a summary of the adapter at ``path``."""
    out = out or sys.stdout
    fmt = detect_format(path)
    adapter = _read(path, fmt)
    if fmt == "peft":
        where = Path(path)
        size = sum((where / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME) if (where / n).exists())
    else:
        where = find_adapter_dir(path)
        size = _disk_size(where)
    rows = []
    for t in adapter.targets:
        pieces = module_factors(t) if t.torch else [(t.path, t.a, t.b)]
        for name, a, b in pieces:
            A, B = to_torch(a, b, t.kind)
            rows.append(
                {
                    "module": name,
                    "path": t.path,
                    "kind": t.kind,
                    "base_shape": list(t.base_shape) if t.base_shape is not None else None,
                    "layout": list(t.layout) if t.layout is not None else None,
                    "lora_A": list(A.shape),
                    "lora_B": list(B.shape),
                    "r": t.r,
                    "alpha": t.alpha,
                    "scale": t.scale,
                }
            )
    params = [{"name": (p.torch or [p.path])[0] if p.torch and len(p.torch) == 1 else (p.path or ""),
               "shape": list(p.value.shape)} for p in adapter.params]
    init, needs_residual, init_note = _init_info(adapter)
    summary = {
        "path": str(where),
        "format": fmt,
        "config": adapter.config,
        "use_dora": any(t.magnitude is not None for t in adapter.targets),
        "init_lora_weights": init,
        "needs_residual_base": needs_residual,
        "targets": rows,
        "trained_params": params,
        "parameters": int(adapter.n_params),
        "size_on_disk": int(size),
        "base_quantization": adapter.base_quantization,
    }
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
        return summary
    label = "PEFT adapter" if fmt == "peft" else "jlora Orbax checkpoint"
    print(f"{label}: {where}", file=out)
    print(f"config: {_config_line(adapter.config)}", file=out)
    if summary["use_dora"]:
        print("variant: DoRA (lora_magnitude_vector per output feature)", file=out)
    print(f"init: {init_note}", file=out)
    if adapter.base_quantization is not None:
        print(f"base: {_quantization_line(adapter.base_quantization)}", file=out)
    print(f"targets: {len(rows)} module(s)", file=out)
    if rows:
        w = max(len(r["module"]) for r in rows)
        print(f"  {'module':<{w}}  {'kind':<9} {'lora_A (r, in)':<16} {'lora_B (out, r)':<16} {'r':>4} {'alpha':>7} {'scale':>8}",
              file=out)
        for r in rows:
            print(
                f"  {r['module']:<{w}}  {r['kind']:<9} {_shape(r['lora_A']):<16} {_shape(r['lora_B']):<16} "
                f"{r['r']:>4} {str(r['alpha']):>7} {r['scale']:>8.4g}",
                file=out,
            )
    if params:
        print(f"fully trained: {len(params)} tensor(s)", file=out)
        for p in params:
            print(f"  {p['name']}  {_shape(p['shape'])}", file=out)
    print(f"parameters: {summary['parameters']:,d}", file=out)
    print(f"size on disk: {size:,d} bytes ({size / 2**20:.2f} MiB)", file=out)
    return summary


def _quantization_line(q: dict) -> str:
    """``nf4 + double quantization (blocks of 64), computed in bfloat16: 14 kernels, 4.13 bits/parameter``."""
    cfg = q.get("quantization_config", {})
    if cfg.get("load_in_8bit"):
        kind = "int8 (LLM.int8 rows)"
    else:
        kind = cfg.get("bnb_4bit_quant_type", "?") + (" + double quantization" if cfg.get("bnb_4bit_use_double_quant")
                                                       else "") + f" (blocks of {cfg.get('bnb_4bit_blocksize', 64)})"
    mixed = ", mixed configs" if q.get("mixed") else ""
    return (f"quantized, {kind}, computed in {cfg.get('bnb_4bit_compute_dtype', '?')}: {q.get('quantized_kernels')} "
            f"kernels, {q.get('bits_per_parameter', 0):.3f} bits/parameter{mixed}; the adapter itself is plain LoRA")


def _name_map(spec: str):
    """``--name-map``: a shipped map's name, or ``module:attribute`` naming a map object."""
    if ":" in spec:
        import importlib

        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--name-map {spec!r}: cannot import it ({err})") from None
    return spec


def rename(adapter, name_map, *, source: str = "adapter"):
    """``adapter`` with PyTorch names re-derived from its JAX paths by ``name_map`` (a
    shipped map's name such as ``"qwen3"``, a :class:`jlora.name_maps.FamilyMap`, ...).
    Needs the paths, i.e. an adapter read from an Orbax checkpoint."""
    if isinstance(name_map, str):
        name_map = _name_map(name_map)
    if any(t.path is None for t in adapter.targets) or any(p.path is None for p in adapter.params):
        raise ValueError(
            f"{source}: --name-map re-derives PyTorch names from JAX paths, and this adapter has none "
            "(a PEFT adapter is named by PyTorch modules already)"
        )
    leaves = [(tuple(t.path.split("/")), tuple(t.base_shape), (t.layout or ()).count("stack")) for t in adapter.targets]
    leaves += [(tuple(p.path.split("/")), tuple(p.value.shape), 0) for p in adapter.params]
    tn = name_maps.for_tree(leaves, name_map)
    for t in adapter.targets:
        t.torch = tuple(tn.modules(t.path.split("/")))
    for p in adapter.params:
        p.torch = tuple(tn.params(p.path.split("/")))
    adapter.torch_modules = None
    adapter.name_map = name_map if isinstance(name_map, name_maps.FamilyMap) else tn.name
    return adapter
def _init_info(adapter) -> tuple:
    """``(init_lora_weights, needs the residual base?, a sentence)`` of an adapter."""
    cfg = adapter.config or {}
    inits = sorted({t.init for t in adapter.targets if t.init is not None})
    init = inits[0] if len(inits) == 1 else (inits or cfg.get("init_lora_weights", True))
    if not inits or not is_residual_init(init):
        return init, False, f"{init!r}: a plain LoRA adapter; load it on the original base model"
    stored = all(t.a0 is not None for t in adapter.targets if t.init is not None)
    how = ("the initial factors A0/B0 are stored, so loading restores that residual exactly"
           if stored else "loading runs the initialisation again on the original base (as PEFT)")
    exact = (" (randomised: reproducible only with the same rng; PEFT's reload is not)"
             if pissa_niter(init) is not None and not stored else "")
    return init, True, (
        f"{init!r}: the trained model's base is the residual W - s*A0*B0 of the original base, not the original "
        f"base itself; {how}{exact}. save_peft(..., convert_to_lora=True) (or jlora convert --convert-to-lora) "
        "writes a plain LoRA adapter of rank 2r for the original base"
    )


def convert(src: str, dst: str, *, to: Optional[str] = None, overwrite: bool = False,
            base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None,
            name_map=None, convert_to_lora: bool = False) -> str:
    """Converts the adapter at ``src`` to ``dst`` (the other format unless ``to``).

    ``name_map`` (``--name-map``) re-derives the PyTorch names of an Orbax checkpoint's
    targets from their JAX paths with that map (``hf``, ``qwen3``, ``llama3``,
    ``gemma3``, ``auto``, or ``module:attribute``) instead of the names stored at save time.
    ``convert_to_lora``: a PiSSA/OLoRA adapter whose initial factors are stored (a jlora
    Orbax checkpoint) becomes a plain LoRA adapter of rank 2r for the original base
    (:func:`jlora.io.peft.convert_to_lora_records`)."""
    fmt = detect_format(src)
    to = to or ("orbax" if fmt == "peft" else "peft")
    if to not in ("peft", "orbax"):
        raise ValueError(f"--to {to!r}: valid formats are 'peft' and 'orbax'")
    d = Path(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: destination is the source")
    if d.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
        if to == "peft" and d.is_dir() and any(d.iterdir()) and not (d / CONFIG_NAME).exists():
            raise ValueError(f"{dst} exists and is not a PEFT adapter directory; refusing to write into it")
    adapter = _read(src, fmt)
    if name_map is not None:
        adapter = rename(adapter, name_map, source=src)
    if convert_to_lora:
        if adapter.config is None:
            import dataclasses

            adapter = dataclasses.replace(adapter, config=peft_config_dict(adapter))
        adapter = convert_to_lora_records(adapter)
    if to == "peft":
        write_peft(d, adapter, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    else:
        write_adapter(d, adapter, overwrite=overwrite)
    return to


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description="Inspect and convert LoRA adapters (PEFT <-> Orbax).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="print config, targets, parameter count and size on disk")
    p_inspect.add_argument("adapter", help="PEFT adapter directory or jlora Orbax checkpoint")
    p_inspect.add_argument("--json", action="store_true", help="print a JSON summary")
    p_convert = sub.add_parser("convert", help="convert between the PEFT format and jlora Orbax checkpoints")
    p_convert.add_argument("src")
    p_convert.add_argument("dst")
    p_convert.add_argument("--to", choices=["peft", "orbax"], help="output format (default: the other one)")
    p_convert.add_argument("--overwrite", action="store_true", help="replace an existing adapter at DST")
    p_convert.add_argument("--base-model-name-or-path", help="written into adapter_config.json")
    p_convert.add_argument("--task-type", help="written into adapter_config.json (e.g. CAUSAL_LM)")
    p_convert.add_argument(
        "--name-map",
        help="re-derive PyTorch names of an Orbax checkpoint from its JAX paths with this map: "
        "hf, qwen3, llama3, gemma3, auto, or module:attribute (default: the names stored at save time)",
    )
    p_convert.add_argument("--convert-to-lora", action="store_true",
                           help="PiSSA/OLoRA with stored initial factors -> plain LoRA (rank 2r) for the original base")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            inspect_adapter(args.adapter, as_json=args.json)
        else:
            to = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite,
                         base_model_name_or_path=args.base_model_name_or_path, task_type=args.task_type,
                         name_map=args.name_map,
                         convert_to_lora=args.convert_to_lora)
            print(f"wrote {to} adapter: {args.dst}")
    except (ValueError, TypeError, OSError) as err:
        print(f"jlora: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
