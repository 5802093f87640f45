"""The PEFT adapter format, both ways: `save_peft` and `load_peft`.

A PEFT LoRA adapter is a directory with

* ``adapter_config.json``: PEFT's ``LoraConfig`` keys (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``rank_pattern``, ...);
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) with, for each adapted
  PyTorch module ``M``::

      base_model.model.M.lora_A.weight   (r, in_features)      nn.Linear / Conv1D
      base_model.model.M.lora_B.weight   (out_features, r)
      base_model.model.M.lora_A.weight   (r, in, *kernel)       nn.ConvNd
      base_model.model.M.lora_B.weight   (out, r, 1, ...)
      base_model.model.M.lora_embedding_A  (r, num_embeddings)  nn.Embedding
      base_model.model.M.lora_embedding_B  (embedding_dim, r)

  and every parameter trained in full (``bias``, ``modules_to_save``) under its PyTorch
  name (a bias of an adapted module as ``M.base_layer.bias``).

jlora's factors relate to these by ``lora_A = A.reshape(in_features, r).T`` and
``lora_B = B.reshape(r, out_features).T`` (in/out axes flattened in row-major order,
which is how a DenseGeneral kernel flattens into a ``torch.nn.Linear``); PyTorch names
come from :mod:`jlora.name_maps.hf`. Nothing here needs torch: safetensors' numpy API reads and
writes the tensors, and nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .. import name_maps
from ..core.config import LoraConfig
from ..layouts.from_tree import LayoutSpec
from ..nodes.inits import is_residual_init
from . import distributed, peft_experts
from .atomic import recover_interrupted_save, replace_directory, temp_sibling
from .integrity import json_digest, sha256_hex
from .peft_config import peft_config_dict, peft_pattern
from .placement import ShardingSpec, tree_from_adapter, uses_of
from .records import Adapter, ParamRecord, TargetRecord, TokenRecord, adapter_from_tree, alpha_from_scale

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "save_peft",
    "load_peft",
    "read_peft",
    "read_peft_config",
    "write_peft",
    "peft_tensors",
    "convert_to_lora_records",
    "module_factors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
_EMB_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)$")
_BIAS_SUFFIX = ".lora_B.bias"  # lora_bias=True: the bias of lora_B
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # trainable_token_indices: the new rows


# --------------------------------------------------------------------------------------
# Layout conversion


def to_torch(a: np.ndarray, b: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One layer's canonical (or flat) factors → PEFT's (lora_A, lora_B). A grouped
    convolution's B ``(r/groups, out)`` becomes PEFT's grouped ``(out, r/groups, 1, ...)``."""
    r = int(a.shape[-1])
    if kind == "conv":
        n = a.ndim  # (*spatial, in, r) -> (r, in, *spatial)
        rb = int(b.shape[0])  # r, or r / groups for a grouped convolution
        A = np.transpose(a, (n - 1, n - 2, *range(n - 2)))
        B = b.reshape(rb, -1).T.reshape((-1, rb) + (1,) * (n - 2))
    else:
        A = a.reshape(-1, r).T
        B = b.reshape(r, -1).T
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def _from_torch(A: np.ndarray, B: np.ndarray, kind: str, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """PEFT's (lora_A, lora_B) → flat canonical ``(in, r)``, ``(r, out)`` (conv: ``(*spatial,
    in, r)``, ``(r/groups, out)``) and the groups of a convolution (PEFT's lora_B on a
    grouped convolution is a grouped 1x1 convolution ``(out, r/groups, 1, ...)``)."""
    r = int(A.shape[0])
    if kind == "conv":
        rb = int(B.shape[1]) if B.ndim == A.ndim else 0
        if B.ndim != A.ndim or rb < 1 or r % rb or any(s != 1 for s in B.shape[2:]) or int(B.shape[0]) % (r // rb):
            raise ValueError(
                f"{where}: conv LoRA factors lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} do not fit together: "
                f"lora_B must be (out, r, 1, ...), or (out, r/groups, 1, ...) for a grouped convolution, with r={r}"
            )
        n = A.ndim
        a = np.transpose(A, (*range(2, n), 1, 0))
        b = B.reshape(B.shape[0], rb).T
        return np.ascontiguousarray(a), np.ascontiguousarray(b), r // rb
    else:
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != r:
            raise ValueError(
                f"{where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be (r, in) and (out, r) "
                "with the same r"
            )
        a, b = A.T, B.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b), 1


def module_factors(t: TargetRecord, a: Any = None, b: Any = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(torch module, a, b)]``: one target's factors per PyTorch module it stands for.

    One module: the factors as they are. Several, one per slice of the kernel's first
    axis (``nn.scan`` layers; Gemma's ``kv_einsum`` = ``k_proj``, ``v_proj``): slice ``i``
    of a ``"stack"`` axis has factors ``a[i]``, ``b[i]``; if that axis is an output axis
    (a layout found from the einsum alone, one A shared by k and v) slice ``i`` is
    ``A · B[:, i]``, i.e. ``a`` and ``b[:, i]``; if it is an input axis, ``a[i]`` and ``b``.
    Several stack axes (a stacked ``kv_einsum`` (L, 2, K, D, H)) are taken in row-major
    order (``0.k, 0.v, 1.k, ...``), and a stacked kernel whose layers each stand for
    several modules is split per layer as above.
    ``a``/``b``: the factors as host arrays (default: ``t.a``/``t.b``, which must then be
    addressable here; :func:`peft_tensors` passes them gathered across processes).
    """
    if not t.torch:
        raise ValueError(f"{t.path}: no PyTorch module name for this target; pass name_map=")
    a = np.asarray(t.a if a is None else a)
    b = np.asarray(t.b if b is None else b)
    return [(m, a[sl_a], b[sl_b]) for m, sl_a, sl_b, _ in _module_slices(t, a.shape)]


def _module_slices(t: TargetRecord, a_shape: tuple[int, ...]) -> list[tuple[str, tuple, tuple, tuple]]:
    """``[(torch module, index into a, index into b, index into DoRA's magnitude)]`` (see
    :func:`module_factors`; the magnitude ``(*stack, *out)`` is split like B)."""
    n_stack = t.layout.count("stack") if t.layout is not None else 0
    n_layers = int(np.prod(a_shape[:n_stack])) if n_stack else 1
    if len(t.torch) % n_layers:
        raise ValueError(f"{t.path}: {n_layers} layer(s) but {len(t.torch)} PyTorch name(s) {t.torch}")
    per = len(t.torch) // n_layers
    stack_shape = tuple(a_shape[:n_stack])
    roles = tuple(r for r in t.layout if r != "stack") if t.layout is not None else ()
    out = []
    for i, m in enumerate(t.torch):
        layer = np.unravel_index(i // per, stack_shape) if n_stack else ()
        layer = tuple(int(x) for x in layer)
        if per == 1:
            out.append((m, layer, layer, layer))
            continue
        j = i % per
        per_shape = None
        if t.base_shape is not None:
            kl = [s for s, r in zip(t.base_shape, t.layout) if r != "stack"] if t.layout is not None else []
            per_shape = kl[0] if kl else None
        first = roles[0] if roles else None
        if first is None or per_shape is None or int(per_shape) != per:
            raise ValueError(
                f"{t.path}: 1 adapter but {per} PyTorch names per layer {t.torch[:per]}; the kernel's first axis "
                "must hold them"
            )
        if first == "out":
            out.append((m, layer, layer + (slice(None), j), layer + (j,)))
        else:
            out.append((m, layer + (j,), layer, layer))
    return out


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """The ``adapter_model.safetensors`` tensors of ``adapter`` (PEFT names and layouts).

    Factors sharded over several processes are gathered: then every process must call
    this (a collective)."""
    out: dict[str, np.ndarray] = {}
    target_modules: set[str] = set()
    # all factors whole on this process, one collective for all of them when sharded
    dora = [t for t in adapter.targets if t.magnitude is not None]
    biased = [t for t in adapter.targets if t.b_bias is not None]
    hosted = distributed.gather_to_host(
        [x for t in adapter.targets for x in (t.a, t.b)] + [p.value for p in adapter.params]
        + [t.magnitude for t in dora] + [t.b_bias for t in biased] + [k.values for k in adapter.tokens]
    )
    host_a = {id(t): hosted[2 * i] for i, t in enumerate(adapter.targets)}
    host_b = {id(t): hosted[2 * i + 1] for i, t in enumerate(adapter.targets)}
    n_ab = 2 * len(adapter.targets)
    host_v = {id(p): hosted[n_ab + i] for i, p in enumerate(adapter.params)}
    n_v = n_ab + len(adapter.params)
    host_m = {id(t): hosted[n_v + i] for i, t in enumerate(dora)}
    host_bb = {id(t): hosted[n_v + len(dora) + i] for i, t in enumerate(biased)}
    host_k = {id(k): hosted[n_v + len(dora) + len(biased) + i] for i, k in enumerate(adapter.tokens)}
    for t in adapter.targets:
        per_module = module_factors(t, host_a[id(t)], host_b[id(t)])
        m_index = [sl_m for _, _, _, sl_m in _module_slices(t, np.shape(host_a[id(t)]))]
        for i, (module, a, b) in enumerate(per_module):
            A, B = to_torch(a, b, t.kind)
            if t.kind == "embedding":
                names = (f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B")
            else:
                names = (f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight")
            tensors = [(names[0], A), (names[1], B)]
            if t.magnitude is not None:
                # DoRA: no ".weight" suffix; (out,) for Linear/Embedding, (1, out, 1, ...) for ConvNd
                m = np.asarray(host_m[id(t)])[m_index[i]].reshape(-1)
                if t.kind == "conv":
                    m = m.reshape((1, -1) + (1,) * (A.ndim - 2))
                tensors.append((f"{PEFT_PREFIX}{module}.lora_magnitude_vector", np.ascontiguousarray(m)))
            if biased:  # lora_bias: PEFT gives every target a lora_B bias (zeros where jlora has none)
                bb = host_bb.get(id(t))
                bb = np.zeros((B.shape[0],), B.dtype) if bb is None else np.asarray(bb)[m_index[i]].reshape(-1)
                tensors.append((f"{PEFT_PREFIX}{module}{_BIAS_SUFFIX}", np.ascontiguousarray(bb)))
            for name, x in tensors:
                if name in out:
                    raise ValueError(f"two targets map to the PyTorch name {name!r}; pass name_map=")
                out[name] = x
            target_modules.add(module)
    for k in adapter.tokens:
        if not k.torch:
            raise ValueError(f"{k.path}: no PyTorch module name for these trainable tokens; pass name_map=")
        key = f"{PEFT_PREFIX}{k.torch[0]}{_TOKENS_SUFFIX}"
        if key in out:
            raise ValueError(f"two tables map to the PyTorch name {key!r}; pass name_map=")
        out[key] = np.ascontiguousarray(host_k[id(k)])
    for p in adapter.params:
        if not p.torch:
            raise ValueError(f"{p.path}: no PyTorch name for this parameter; pass name_map=")
        v = host_v[id(p)]
        names = p.path.split("/") if p.path else None
        if not p.torch_layout and names is not None:
            xs = name_maps.record_param_to_torch(names, v, len(p.torch), adapter.name_map)
        else:
            xs = [v[i] if len(p.torch) > 1 else v for i in range(len(p.torch))]
        for tname, x in zip(p.torch, xs):
            module, leaf = tname.rsplit(".", 1) if "." in tname else ("", tname)
            if module in target_modules:
                tname = f"{module}.base_layer.{leaf}"
            key = PEFT_PREFIX + tname
            if key in out:
                raise ValueError(f"two parameters map to the PyTorch name {key!r}")
            out[key] = np.ascontiguousarray(x)
    return out


# --------------------------------------------------------------------------------------
# Writing


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_peft(
    directory: Union[str, os.PathLike],
    adapter: Adapter,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
    fused_experts: bool = False,
) -> Path:
    """Writes ``adapter`` in PEFT's format (see :func:`save_peft`).

    With several processes every process calls it: sharded factors are gathered, the
    primary process writes the files, the others wait for it and write nothing."""

    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a directory")
    tensors = peft_tensors(adapter)  # every process: gathers sharded factors
    tag = distributed.agreed_tag()
    if distributed.is_primary():
        _write_peft_files(d, tensors, adapter, tag, base_model_name_or_path, task_type, fused_experts)
    distributed.barrier(f"jlora_save_peft_{tag}")  # the others wait and write nothing
    return d


# The adapter_config.json keys that change the tree load_peft builds (ranks, scales,
# dropout); their digest is written with the tensors.
_CONFIG_KEYS_CHECKED = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "use_dora",
                        "lora_bias", "trainable_token_indices", "fan_in_fan_out")


def _config_digest(cfg: dict, keys: Any = _CONFIG_KEYS_CHECKED) -> str:
    return json_digest({k: cfg.get(k) for k in keys})


def _jlora_metadata(tensors: dict[str, np.ndarray], cfg: dict) -> str:
    """The ``jlora`` entry of the safetensors metadata (PEFT ignores it): a SHA-256 per
    tensor and a digest of the config keys that shape the loaded tree."""
    return json.dumps(
        {
            "version": 1,
            "algorithm": "sha256",
            "tensors": {k: sha256_hex(v) for k, v in sorted(tensors.items())},
            "config_keys": list(_CONFIG_KEYS_CHECKED),
            "config_digest": _config_digest(cfg),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors keeps the metadata in a hash map, so two keys come out in either order
    from one process to the next; sorted, the same adapter gives the same bytes. The
    header is JSON after an 8-byte little-endian length, padded with spaces to a multiple
    of 8; tensor offsets count from the end of the header, so they do not change."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def _write_peft_files(d: Path, tensors: dict, adapter: Adapter, tag: str, base_model_name_or_path, task_type,
                      fused_experts: bool = False) -> None:
    from safetensors.numpy import save as st_save

    cfg = peft_config_dict(adapter, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    if fused_experts:  # transformers 5's fused experts: PEFT's target_parameters
        tensors, cfg = peft_experts.fuse(tensors, cfg)
    LoraConfig.from_dict(peft_experts.unfuse_config(cfg))  # what we write must read back
    st_meta = {"format": "pt", "jlora": _jlora_metadata(tensors, cfg)}
    if adapter.base_quantization is not None:  # the quantized base it was trained on (PEFT ignores it)
        st_meta["jlora_base_quantization"] = json.dumps(adapter.base_quantization, sort_keys=True)
    files = {
        WEIGHTS_NAME: _sorted_metadata(st_save(tensors, metadata=st_meta)),
        CONFIG_NAME: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
    }
    others = [f for f in d.iterdir() if f.name not in files and not f.name.startswith(".")] if d.exists() else []
    if not others:
        # A fresh directory, or one holding only the adapter: write a new directory and
        # rename it into place (the old one is moved aside first; readers recover it if a
        # kill lands between the two renames).
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(d, tag)
        tmp.mkdir()
        try:
            for name, data in files.items():
                _fsync_write(tmp / name, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_directory(tmp, d, tag)
    else:
        # Other files live here (a README, a tokenizer): replace our two files one by one,
        # atomically each, weights first.
        for name, data in files.items():
            tmp_file = d / f".{name}.jlora-tmp-{tag}"
            try:
                _fsync_write(tmp_file, data)
                os.replace(tmp_file, d / name)
            except BaseException:
                tmp_file.unlink(missing_ok=True)
                raise


def convert_to_lora_records(adapter: Adapter) -> Adapter:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base (PEFT's
    ``path_initial_model_for_weight_conversion``), from the initial factors the records
    carry::

        A' = [A | A₀]   (in, 2r)      B' = [B; −B₀]   (2r, out)
        s·A'·B' = s·A·B − s·A₀·B₀  so  W + s·A'·B' = W_res + s·A·B

    Rank and alpha are doubled (``alpha·√2`` with rsLoRA; ``rank_pattern`` and
    ``alpha_pattern`` too), so every scale is unchanged, and ``init_lora_weights`` becomes
    ``True``. DoRA magnitudes and fully trained leaves (``modules_to_save``, biases) are
    carried over (PEFT 0.21.2 drops them). Targets without a residual are kept as they are.
    Raises ``ValueError`` for a residual target whose initial factors are not stored (an
    adapter read from PEFT's files: load it on its base with :func:`load_peft` first).
    """
    cfg = dict(adapter.config) if adapter.config is not None else None
    rslora = bool(cfg.get("use_rslora", False)) if cfg else False
    grow = math.sqrt(2.0) if rslora else 2.0
    targets = []
    for t in adapter.targets:
        if t.init is None:
            targets.append(t)
            continue
        if t.a0 is None or t.b0 is None or t.layout is None:
            raise ValueError(
                f"{t.path or t.torch}: init_lora_weights={t.init!r} but the initial factors A0/B0 are not stored; "
                "load the adapter on its base first (jlora.load_peft / jlora.load) and save the tree"
            )
        ns = t.layout.count("stack")
        a = np.concatenate([np.asarray(t.a), np.asarray(t.a0, dtype=np.asarray(t.a).dtype)], axis=-1)
        b = np.concatenate([np.asarray(t.b), -np.asarray(t.b0, dtype=np.asarray(t.b).dtype)], axis=ns)
        targets.append(dataclasses.replace(
            t, a=a, b=b, r=2 * t.r, alpha=alpha_from_scale(t.scale, 2 * t.r, rslora), init=None, a0=None, b0=None,
        ))
    if cfg is not None and any(t.init is not None for t in adapter.targets):
        cfg["r"] = 2 * int(cfg["r"])
        cfg["lora_alpha"] = _clean(cfg["lora_alpha"] * grow)
        cfg["rank_pattern"] = {k: 2 * int(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
        cfg["alpha_pattern"] = {k: _clean(v * grow) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        cfg["init_lora_weights"] = True
    return dataclasses.replace(adapter, targets=targets, config=cfg)


def _clean(x: float) -> Union[int, float]:
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else float(x)


def save_peft(
    directory: Union[str, os.PathLike],
    lp: Any,
    *,
    config: Optional[LoraConfig] = None,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
    convert_to_lora: bool = False,
    fused_experts: bool = False,
) -> Path:
    """Writes a LoRA tree as a PEFT adapter: ``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained`` and by
    serving stacks that read PEFT adapters.

    Tensor names are ``base_model.model.<torch module>.lora_A.weight`` (r, in) and
    ``...lora_B.weight`` (out, r) (``lora_embedding_A/B`` for embeddings), with PyTorch
    module names derived from the tree's paths by a name map (:mod:`jlora.name_maps`:
    recognised from the paths for NNX Qwen3 / Llama 3 / Gemma 3 trees, transformers'
    rules for Hugging Face Flax models); ``Trainable`` leaves are written under their PyTorch names and layouts. The scale is
    carried as ``lora_alpha``/``alpha_pattern`` so PEFT computes the same ``s``.

    The safetensors metadata also holds, under ``"jlora"``, a SHA-256 of every tensor
    and a digest of the config keys that set ranks and scales; :func:`load_peft` checks
    them (PEFT ignores the key).

    With several processes every process calls ``save_peft``: the factors are gathered
    (``process_allgather``; LoRA factors are small), the primary process writes the
    files, byte for byte what one process writes, and the others wait and write nothing.

    Args:
      directory: created if missing (atomically); files in an existing directory are
        replaced one by one, atomically, and nothing else in it is touched.
      lp: the LoRA tree.
      config: the :class:`LoraConfig` used to wrap (without it one is reconstructed from
        the tree: ranks, alphas, target names).
      name_map: which name map gives the PyTorch names (see :func:`jlora.name_maps.for_tree`):
        ``None`` (recognised from the paths), ``"hf"``, ``"qwen3"``, ``"llama3"``,
        ``"gemma3"``, a :class:`jlora.name_maps.FamilyMap`, or overrides
        ``{module path: torch module path}`` / a function of the module path.
      prefix: module path prepended to every PyTorch name (e.g. ``"bert"`` to use an
        adapter trained on ``FlaxBertModel`` with ``BertForSequenceClassification``).
      base_model_name_or_path, task_type: written into the config (PEFT's keys).
      convert_to_lora: for PiSSA/OLoRA trees (whose ``w`` is the residual ``W − s·A₀·B₀``):
        write a plain LoRA adapter of rank ``2r`` that loads on the *original* base
        (:func:`convert_to_lora`). Without it the files are what PEFT writes for such an
        adapter (``init_lora_weights="pissa"``/``"olora"``...): PEFT and :func:`load_peft`
        run the initialisation again on the original base, then load A and B (exact for
        ``"pissa"`` and ``"olora"``; ``"pissa_niter_N"`` is randomised: PEFT's torch RNG
        gives another residual, :func:`load_peft` reproduces it with the ``rng`` of
        :func:`jlora.wrap`). Convert before sharing a ``pissa_niter_N`` adapter.

      fused_experts: write stacked experts (the ``qwen3_moe`` map's ``mlp/experts/*/w``) as PEFT's
        ``target_parameters`` adapter of transformers 5's fused ``mlp.experts.gate_up_proj`` /
        ``down_proj`` (:mod:`jlora.io.peft_experts`); default: transformers 4.x's modules
        ``mlp.experts.<e>.gate_proj``, one per expert. :func:`load_peft` reads both.

    DoRA trees are written with ``lora_magnitude_vector`` (no ``.weight`` suffix; ``(out,)``,
    ``(1, out, 1, ...)`` for convolutions) and ``"use_dora": true``.

    Example:
      >>> jlora.save_peft("out/adapter", lp, config=config, base_model_name_or_path="gpt2")  # doctest: +SKIP
      >>> # torch: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("gpt2"), "out/adapter")
    """
    adapter = adapter_from_tree(lp, config, name_map=name_map, prefix=prefix)
    if convert_to_lora:
        if adapter.config is None:
            adapter = dataclasses.replace(adapter, config=peft_config_dict(adapter))
        adapter = convert_to_lora_records(adapter)
    return write_peft(directory, adapter, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                      fused_experts=fused_experts)


# --------------------------------------------------------------------------------------
# Reading


def _peft_dir(directory: Union[str, os.PathLike]) -> Path:
    d = Path(directory)
    if not d.exists():
        d = recover_interrupted_save(d.absolute(), lambda p: (p / CONFIG_NAME).is_file())
    if not d.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    return d


def _read_config_dict(d: Path) -> dict:
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{d}: missing {CONFIG_NAME}; a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type={peft_type!r}; jlora reads LoRA adapters only (peft_type 'LORA')")
    return cfg


def read_peft_config(directory: Union[str, os.PathLike]) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT adapter directory."""
    d = _peft_dir(directory)
    cfg = _read_config_dict(d)
    try:
        return LoraConfig.from_dict(peft_experts.unfuse_config(cfg))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{d / CONFIG_NAME}: not a valid LoRA adapter config: {err}") from None


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, meta
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def _verify(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str], cfg: dict) -> None:
    """Checks the SHA-256s and the config digest jlora wrote (files written by PEFT itself
    carry none and pass unchecked)."""
    raw = meta.get("jlora")
    if raw is None:
        return
    try:
        info = json.loads(raw)
        recorded = dict(info["tensors"])
        algorithm = info["algorithm"]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: the 'jlora' entry of the safetensors metadata is corrupt: {err}") from None
    if algorithm != "sha256":
        raise ValueError(f"{path}: unknown checksum algorithm {algorithm!r} in the 'jlora' metadata")
    missing = sorted(set(recorded) - set(tensors))
    extra = sorted(set(tensors) - set(recorded))
    if missing or extra:
        raise ValueError(
            f"{path}: the tensors differ from those jlora wrote: missing {missing}, not written by jlora {extra}"
        )
    for name in sorted(recorded):
        got = sha256_hex(tensors[name])
        if got != recorded[name]:
            raise ValueError(
                f"{path}: checksum mismatch for tensor {name!r}: recorded sha256 {recorded[name]}, read {got}; "
                "the file is corrupt"
            )
    want = info.get("config_digest")
    recorded_keys = info.get("config_keys", _CONFIG_KEYS_CHECKED[:7])  # the keys this file's digest covers
    if want is not None and _config_digest(cfg, recorded_keys) != want:
        keys = ", ".join(recorded_keys)
        raise ValueError(
            f"{path.parent / CONFIG_NAME}: the keys that set ranks, scales and dropout ({keys}) differ from those "
            f"written with {path.name}: the file was edited or is corrupt (pass verify=False to load it as it is)"
        )


def read_peft(directory: Union[str, os.PathLike], *, verify: bool = True) -> Adapter:
    """Reads a PEFT LoRA adapter into records (PyTorch names, factors flattened to
    ``(in, r)`` / ``(r, out)``); no base model needed. With ``verify``, the checksums
    jlora wrote into the safetensors metadata are checked (see :func:`load_peft`)."""
    d = _peft_dir(directory)
    cfg = _read_config_dict(d)
    read_peft_config(d)  # a valid config, or a ValueError naming the file
    path = d / WEIGHTS_NAME
    if not path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ValueError(
                f"{d}: only adapter_model.bin (a pickle) is present; jlora never unpickles. Re-save it with "
                "safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{d}: missing {WEIGHTS_NAME}")
    tensors, st_meta = _read_tensors(path)
    if verify:
        _verify(path, tensors, st_meta, cfg)
    if cfg.get("target_parameters"):  # transformers 5's fused experts: as one module per expert
        try:
            tensors, cfg = peft_experts.unfuse(tensors, cfg)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    config = LoraConfig.from_dict(cfg)
    factors: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    params: list[ParamRecord] = []
    magnitudes: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    tokens: list[TokenRecord] = []
    for key, x in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".lora_magnitude_vector"):
            magnitudes[name[: -len(".lora_magnitude_vector")]] = x
            continue
        if name.endswith(_BIAS_SUFFIX):
            biases[name[: -len(_BIAS_SUFFIX)]] = x
            continue
        if name.endswith(_TOKENS_SUFFIX):
            module = name[: -len(_TOKENS_SUFFIX)]
            tokens.append(TokenRecord(path=None, values=x, indices=_token_ids(config, module, path),
                                      torch=(module,)))
            continue
        m = _LORA_RE.match(name)
        emb = _EMB_RE.match(name)
        if m or emb:
            mm = m or emb
            module = mm.group("module")
            factors.setdefault(module, {})[mm.group("which")] = x
            kind = "embedding" if emb else "linear"
            if kinds.setdefault(module, kind) != kind:
                raise ValueError(f"{path}: {key}: module {module!r} has both lora_A/B and lora_embedding_A/B")
            continue
        if "lora_" in name:
            raise ValueError(
                f"{path}: tensor {key!r} is not a plain LoRA factor (DoRA, adapter-named or another variant); "
                "jlora reads lora_A/lora_B and lora_embedding_A/B"
            )
        if ".original_module." in name or ".modules_to_save." in name:
            continue  # copies PEFT also writes next to the trained module
        name = name.replace(".base_layer.", ".")
        params.append(ParamRecord(path=None, value=x, torch=(name,), torch_layout=True))
    targets: list[TargetRecord] = []
    stray = sorted(set(magnitudes) - set(factors))
    if stray:
        raise ValueError(f"{path}: lora_magnitude_vector for module(s) {stray} without lora_A/lora_B")
    stray = sorted(set(biases) - set(factors))
    if stray or (biases and not config.lora_bias):
        raise ValueError(f"{path}: lora_B.bias for module(s) {stray or sorted(biases)} "
                         + ("without lora_A/lora_B" if stray else f"but {CONFIG_NAME} says lora_bias=false"))
    if tokens and config.trainable_token_indices is None:
        raise ValueError(f"{path}: trainable_tokens_delta for {[k.torch[0] for k in tokens]} but {CONFIG_NAME} has no "
                         "trainable_token_indices")
    if magnitudes and not config.use_dora:
        raise ValueError(f"{path}: the file has DoRA magnitudes (lora_magnitude_vector) but {CONFIG_NAME} says "
                         "use_dora=false")
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise ValueError(f"{path}: module {module!r} has no lora_{missing}")
        kind = kinds[module]
        if kind == "linear" and ab["A"].ndim > 2:
            kind = "conv"
        a, b, groups = _from_torch(ab["A"], ab["B"], kind, f"{path}: {module}")
        r = int(ab["A"].shape[0])
        r_cfg = peft_pattern(dict(config.rank_pattern), module, config.r)
        if r_cfg != r:
            raise ValueError(f"{path}: {module}: lora_A has rank {r} but {CONFIG_NAME} gives r={r_cfg}")
        alpha = peft_pattern(dict(config.alpha_pattern), module, config.lora_alpha)
        magnitude = magnitudes.get(module)
        if config.lora_bias and module not in biases:
            raise ValueError(f"{path}: {CONFIG_NAME} says lora_bias=true but module {module!r} has no lora_B.bias")
        if config.use_dora and magnitude is None:
            raise ValueError(f"{path}: {CONFIG_NAME} says use_dora=true but module {module!r} has no "
                             "lora_magnitude_vector")
        # PiSSA/OLoRA: PEFT initialises Linear/Conv1D layers from W (embeddings keep the default init)
        init = config.init_lora_weights if is_residual_init(config.init_lora_weights) and kind != "embedding" else None
        targets.append(
            TargetRecord(
                path=None, a=a, b=b, r=r, scale=config.scale_for(r, alpha), alpha=alpha, layout=None,
                dropout=float(config.lora_dropout), kind=kind, torch=(module,),
                magnitude=None if magnitude is None else np.ascontiguousarray(magnitude.reshape(-1)), init=init,
                b_bias=None if module not in biases else np.ascontiguousarray(biases[module].reshape(-1)),
                groups=groups,
            )
        )
    if not targets and not params and not tokens:
        raise ValueError(f"{path}: no LoRA tensors found")
    quant = st_meta.get("jlora_base_quantization")
    return Adapter(targets, params, cfg_clean(cfg), None, base_quantization=json.loads(quant) if quant else None,
                   tokens=tokens)


def _token_ids(config: LoraConfig, module: str, path: Path) -> tuple[int, ...]:
    """The token ids of a ``trainable_tokens_delta`` from ``trainable_token_indices``: a
    list (the one table), or the entry of a dict whose key ends the module name (PEFT's
    matching)."""
    spec = config.trainable_token_indices
    if spec is None:
        raise ValueError(f"{path}: trainable_tokens_delta for {module!r} but {CONFIG_NAME} has no "
                         "trainable_token_indices")
    if not isinstance(spec, Mapping):
        return tuple(spec)
    hits = [k for k in spec if module.endswith(k)]
    if len(hits) != 1:
        raise ValueError(f"{path}: trainable_tokens_delta for {module!r}: trainable_token_indices {dict(spec)} has "
                         f"{'no key' if not hits else 'several keys'} matching the module")
    return tuple(spec[hits[0]])


def cfg_clean(cfg: dict) -> dict:
    """The keys of an ``adapter_config.json`` that jlora carries (``LoraConfig``'s)."""
    return LoraConfig.from_dict(cfg).to_dict()


def load_peft(
    directory: Union[str, os.PathLike],
    params: Any,
    *,
    name_map: name_maps.NameMapSpec = None,
    prefix: Optional[str] = None,
    layouts: LayoutSpec = None,
    dtype: Any = None,
    shardings: ShardingSpec = None,
    verify: bool = True,
    rng: Any = None,
    apply_fn: Any = None,
    example_args: Any = (),
) -> Any:
    """The LoRA tree of a PEFT adapter directory over the base ``params``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's
    ``save_pretrained`` writes them, matches every module by its PyTorch name (see
    :mod:`jlora.name_maps.hf`; a missing or extra ``base_model_prefix`` such as ``bert.`` is
    resolved automatically), reshapes ``lora_A``/``lora_B`` into the kernel's layout and
    sets ``scale = lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) per module as PEFT does.

    **Kernel layouts.** PEFT's factors are ``(r, in_features)`` / ``(out_features, r)``;
    which axis of a JAX kernel is its input is decided, in order, by ``layouts=``, by how
    ``apply_fn(params, *example_args)`` uses the kernel (traced abstractly, as
    :func:`jlora.wrap` does), by a name map, and by the tree; for a 2-D kernel, factor
    shapes that fit one orientation only decide it over the tree's (in, out) convention.
    A *square* 2-D kernel that only the convention orients, from a file whose
    ``fan_in_fan_out`` is true (PyTorch ``Conv1D``, whose JAX twins such as transformers'
    ``FlaxConv1D`` are ``(out, in)``), is a ``ValueError`` naming ``layouts=`` and
    ``apply_fn=``; with ``fan_in_fan_out`` false it loads as (in, out) and
    :func:`jlora.lora` raises if the model reads it transposed. Grouped convolutions
    (PEFT: a full ``lora_A``, a grouped ``lora_B``), ``lora_B.bias`` (``lora_bias``) and
    trainable token rows (``trainable_token_indices``) load as well; MiCA adapters load as
    the plain LoRA they compute.

    Errors name the problem: a missing ``adapter_config.json`` (``FileNotFoundError``), a
    ``peft_type`` other than ``"LORA"``, a truncated or corrupt safetensors file, modules
    that are not in ``params`` (all listed), factors whose shapes do not fit the base
    kernel (the path and both shapes) — all ``ValueError``.

    Files written by :func:`save_peft` carry a SHA-256 of every tensor and a digest of
    the config keys that set ranks and scales in the safetensors metadata (key
    ``"jlora"``, which PEFT ignores); they are checked before anything is built, and a
    mismatch is a ``ValueError`` naming the file and the tensor. Files written by PEFT
    itself have no checksums and load unchecked.

    With several processes every process calls ``load_peft``: each reads the (small)
    file whole and places its own shards of A and B.

    Args:
      directory: the PEFT adapter directory.
      params: the base parameters, e.g. ``FlaxLlamaForCausalLM.params``.
      name_map, prefix: PyTorch naming overrides (see :func:`save_peft`).
      layouts: kernel layout overrides, as in :func:`jlora.wrap`.
      dtype: dtype of A and B (default: as stored, usually float32).
      shardings: as in :func:`jlora.load`.
      verify: check jlora's checksums (``False`` skips it, e.g. for an edited config).
      rng: for ``init_lora_weights="pissa_niter_N"`` adapters, the key given to
        :func:`jlora.wrap` (default ``jax.random.key(0)``, wrap's default).
      apply_fn, example_args: the model's forward and its other arguments, as in
        :func:`jlora.wrap`: each kernel's layout (and a convolution's groups) comes from
        how the model uses it. Only traced; nothing is computed.

    DoRA adapters (``use_dora``) come with their magnitudes. PiSSA/OLoRA adapters
    (``init_lora_weights="pissa"``, ``"pissa_niter_N"``, ``"olora"``, not converted) are
    loaded as PEFT loads them: on the *original* ``params`` the initialisation is run again
    (SVD / randomised SVD / QR) to get the residual base and the initial factors (kept for
    :func:`jlora.unload` and conversion), then the trained A and B replace the initial
    ones. This is exact for ``"pissa"`` and ``"olora"``; ``"pissa_niter_N"`` reproduces
    the trained model only with the same ``rng`` (PEFT's reload never does).

    Example:
      >>> lp = jlora.load_peft("my-peft-adapter", model.params)          # doctest: +SKIP
      >>> logits = jlora.lora(model.__call__)(ids, params=lp).logits      # doctest: +SKIP
    """
    adapter = read_peft(directory, verify=verify)
    return tree_from_adapter(
        adapter, params, layouts=layouts, name_map=name_map, prefix=prefix, strict=False,
        shardings=shardings, dtype=dtype, rng=rng, uses=uses_of(apply_fn, params, example_args),
    )
