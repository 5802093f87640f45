"""Building the NNX decoders, and loading Hugging Face weights into them.

* :func:`build` / :func:`abstract`: a randomly initialised model, or its
  ``nnx.eval_shape`` twin whose leaves are ``jax.ShapeDtypeStruct`` (nothing allocated:
  a 70B-shaped model costs nothing).
* :func:`from_pretrained`: a local directory of Hugging Face safetensors
  (``model.safetensors`` or sharded with ``model.safetensors.index.json``) and its
  ``config.json``. Needs neither torch nor transformers: ``config.json`` is read as
  JSON, the tensors are memory-mapped straight from the files (safetensors' layout;
  ``bfloat16`` via ``ml_dtypes``, which JAX ships). Download the directory with
  ``huggingface_hub.snapshot_download("Qwen/Qwen3-0.6B")`` (or ``hf download``) first.
* :func:`from_torch`: a ``transformers`` PyTorch model (``Qwen3ForCausalLM``,
  ``LlamaForCausalLM``, ``Gemma3ForCausalLM``) or its ``state_dict()`` with a config.
* :func:`state_dict`: the other way, an NNX model as PyTorch-named numpy arrays
  (e.g. a merged fine-tune, for ``model.load_state_dict`` or ``safetensors``).

Names and layouts come from the family maps of :mod:`jlora.name_maps` (the same maps
that name LoRA adapters in PEFT files).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import name_maps
from ..core.paths import path_names
from .config import DecoderConfig, config_from_hf, hf_config_dict
from .decoder import Llama3, Qwen3
from .gemma3 import Gemma3
from .qwen3_moe import Qwen3Moe

__all__ = [
    "MODEL_CLASSES",
    "build",
    "abstract",
    "from_pretrained",
    "resolve_checkpoint",
    "from_torch",
    "from_tensors",
    "state_dict",
    "save_pretrained",
    "read_safetensors",
    "write_safetensors",
]

MODEL_CLASSES: dict[str, type] = {"qwen3": Qwen3, "llama3": Llama3, "gemma3": Gemma3, "qwen3_moe": Qwen3Moe}

# Tensors a checkpoint may hold that the NNX model has no leaf for, on purpose.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _family_map(config: DecoderConfig) -> name_maps.FamilyMap:
    return name_maps.get(config.family)


def build(config: DecoderConfig, *, rngs: Optional[nnx.Rngs] = None, seed: int = 0) -> nnx.Module:
    """A randomly initialised model of ``config.family`` (normal(0, initializer_range)
    weights, norms at identity, as transformers initialises them).

    >>> from jlora.models import DecoderConfig, build
    >>> model = build(DecoderConfig("llama3", 64, 16, 32, 2, 4, 2, 8))
    >>> type(model).__name__
    'Llama3'
    """
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a jlora.models.DecoderConfig, got {type(config).__name__}")
    return MODEL_CLASSES[config.family](config, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def abstract(config: DecoderConfig) -> nnx.Module:
    """The model of ``config`` under ``nnx.eval_shape``: every parameter a
    ``jax.ShapeDtypeStruct``, nothing allocated. ``nnx.split(abstract(cfg))[1]`` is an
    abstract ``nnx.State`` that ``jlora.wrap`` and ``jax.eval_shape`` accept.

    >>> from jlora.models import DecoderConfig, abstract
    >>> cfg = DecoderConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, tie_embeddings=True)
    >>> abstract(cfg).layers[0].attn.q_proj.w.shape
    (1024, 16, 128)
    """
    return nnx.eval_shape(lambda: build(config))


# --------------------------------------------------------------------------------------
# safetensors, read with numpy


_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "BOOL": np.bool_,
}


def _st_dtype(name: str, where: str) -> Any:
    if name in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[name])
    import ml_dtypes

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if name not in extra:
        raise ValueError(f"{where}: safetensors dtype {name!r} is not supported")
    return np.dtype(extra[name])


class _SafetensorsFile:
    """One ``.safetensors`` file: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the raw bytes.
    Tensors are memory-mapped on access (read-only)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > os.path.getsize(path) - 8:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.base = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _st_dtype(info["dtype"], f"{self.path}: {name}")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{self.path}: {name}: {end - begin} bytes for shape {shape} of {info['dtype']}")
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + begin, shape=shape)


def read_safetensors(directory: Union[str, os.PathLike]) -> dict[str, Callable[[], np.ndarray]]:
    """``{tensor name: loader}`` for every tensor of the safetensors checkpoint in
    ``directory`` (one file, or shards listed in ``model.safetensors.index.json``, or
    every ``*.safetensors`` file). ``loader()`` returns a read-only memory-mapped numpy
    array; nothing is read before."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({d / f for f in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no *.safetensors files (a Hugging Face checkpoint directory holds model.safetensors "
            "and config.json; PyTorch .bin checkpoints are never unpickled)"
        )
    out: dict[str, Callable[[], np.ndarray]] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
        st = _SafetensorsFile(path)
        for name in st.keys():
            out[name] = (lambda st=st, name=name: st.get(name))
    return out


# --------------------------------------------------------------------------------------
# Filling a model from PyTorch-named tensors


# Where the family's names ("model.layers.0...") may live in a checkpoint: as they are, in a
# bare Qwen3Model/LlamaModel (no "model."), or nested in a multimodal Gemma 3.
_PREFIXES = ("model.", "", "model.language_model.", "language_model.model.")


def _with_prefix(name: str, prefix: str) -> str:
    return prefix + name[len("model."):] if name.startswith("model.") else name


def from_tensors(
    config: DecoderConfig,
    tensors: Mapping[str, Callable[[], Any]],
    *,
    where: str = "checkpoint",
) -> nnx.Module:
    """The model of ``config`` with every parameter from ``tensors`` (``{PyTorch name:
    () -> array}``), converted by the family's name map. Raises ``ValueError`` listing
    missing tensors and shape mismatches; warns about tensors the model does not use."""
    model = abstract(config)
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [(path_names(p), tuple(x.shape), 0) for p, x in flat]
    tn = name_maps.for_tree(leaves, _family_map(config))
    wanted = [tn.params(names) for names, _, _ in leaves]
    all_names = [n for ns in wanted for n in ns]
    available = set(tensors)
    missing_by_prefix = {p: [n for n in all_names if _with_prefix(n, p) not in available] for p in _PREFIXES}
    prefix = next((p for p in _PREFIXES if not missing_by_prefix[p]), None)
    if prefix is None:
        best = min(missing_by_prefix.values(), key=len)
        raise ValueError(
            f"{where}: {len(best)} tensor(s) the {config.family} model needs are missing: {best[:12]}"
            f"{' ...' if len(best) > 12 else ''}; the checkpoint has e.g. {sorted(available)[:8]}"
        )
    rewrite = lambda n: _with_prefix(n, prefix)  # noqa: E731
    pdt = jnp.dtype(config.param_dtype)
    values = []
    used = set()
    for (names, shape, _), tnames in zip(leaves, wanted):
        keys = [rewrite(n) for n in tnames]
        used.update(keys)
        arrays = [np.asarray(tensors[k]()) for k in keys]
        try:
            v = tn.param_from_torch(names, arrays, shape)
        except ValueError as err:
            raise ValueError(f"{where}: {', '.join(keys)}: {err}") from None
        values.append(jnp.asarray(v.astype(pdt) if v.dtype != pdt else v))
    unused = sorted(
        n for n in available - used
        if not n.endswith(_IGNORED_SUFFIXES) and not (config.tie_embeddings and n.endswith("lm_head.weight"))
    )
    if unused:
        warnings.warn(
            f"{where}: {len(unused)} tensor(s) not used by the {config.family} model: {unused[:12]}"
            f"{' ...' if len(unused) > 12 else ''}",
            stacklevel=3,
        )
    state = jax.tree_util.tree_unflatten(treedef, values)
    return nnx.merge(graphdef, state)


def resolve_checkpoint(name_or_path: Union[str, os.PathLike]) -> Path:
    """A local checkpoint directory: ``name_or_path`` itself if it is a directory, else a
    Hugging Face Hub id (``"Qwen/Qwen3-0.6B"``) fetched with
    ``huggingface_hub.snapshot_download`` (config, tokenizer and safetensors files only;
    the Hub's cache is reused, and ``HF_HUB_OFFLINE=1`` uses it without the network)."""
    d = Path(name_or_path).expanduser()
    if d.is_dir():
        return d
    name = os.fspath(name_or_path)
    if d.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{name_or_path}: not a local directory, and huggingface_hub (to download it from the Hub) is not "
            "installed: pip install huggingface_hub, or pass a directory"
        ) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return Path(snapshot_download(name, allow_patterns=patterns))


def from_pretrained(
    name_or_path: Union[str, os.PathLike],
    **overrides: Any,
) -> nnx.Module:
    """An NNX model with the weights of a Hugging Face checkpoint: a local directory
    (``config.json`` + ``*.safetensors``) or a Hub id such as ``"Qwen/Qwen3-0.6B"``
    (downloaded with ``huggingface_hub``, see :func:`resolve_checkpoint`).

    Reads ``config.json`` (:func:`jlora.models.config_from_hf`) and the safetensors
    files; no torch, no transformers. ``overrides`` set :class:`DecoderConfig` fields,
    e.g. ``param_dtype="bfloat16"`` (default ``float32``: checkpoints stored in bfloat16
    are upcast), ``dtype="bfloat16"`` (computation), and the memory settings
    ``scan_layers=True``, ``remat="full"``, ``attention="blockwise"`` (see
    :class:`jlora.models.DecoderConfig`).

    Example:
      >>> model = jlora.models.from_pretrained("Qwen/Qwen3-0.6B")             # doctest: +SKIP
      >>> logits = model(ids)                                              # doctest: +SKIP
    """
    d = resolve_checkpoint(name_or_path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path}: no config.json (expected a Hugging Face checkpoint directory)")
    config = config_from_hf(d / "config.json", **overrides)
    return from_tensors(config, read_safetensors(d), where=str(d))


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_torch(model_or_state_dict: Any, config: Any = None, **overrides: Any) -> nnx.Module:
    """An NNX model with the weights of a PyTorch ``transformers`` model (its config is
    read from ``model.config``) or of a ``state_dict`` (then ``config`` is required: a
    :class:`DecoderConfig`, a transformers config or a ``config.json`` dict).

    >>> import transformers                                                # doctest: +SKIP
    >>> tm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(...))  # doctest: +SKIP
    >>> model = jlora.models.from_torch(tm)                                # doctest: +SKIP
    """
    if hasattr(model_or_state_dict, "state_dict") and callable(model_or_state_dict.state_dict):
        sd = model_or_state_dict.state_dict()
        if config is None:
            config = getattr(model_or_state_dict, "config", None)
    elif isinstance(model_or_state_dict, Mapping):
        sd = model_or_state_dict
    else:
        raise TypeError(
            f"from_torch takes a transformers model or a state dict, got {type(model_or_state_dict).__name__}"
        )
    if config is None:
        raise ValueError("from_torch(state_dict): pass config= (a DecoderConfig or the model's HF config)")
    if not isinstance(config, DecoderConfig):
        config = config_from_hf(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    tensors = {k: (lambda v=v: _torch_to_numpy(v) if not isinstance(v, np.ndarray) else v) for k, v in sd.items()}
    return from_tensors(config, tensors, where="state_dict")


def state_dict(model: nnx.Module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters as ``{PyTorch name: numpy array}`` in PyTorch layouts
    (``Qwen3ForCausalLM`` etc. names; tied models have no ``lm_head.weight``).
    ``prefix`` replaces the leading ``model.`` (e.g. ``"model.language_model."``).

    >>> torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict(m).items()},
    ...                             strict=False)                          # doctest: +SKIP
    """
    state = nnx.state(model, nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    leaves = [(path_names(p), tuple(x.shape), 0) for p, x in flat]
    config = getattr(model, "config", None)
    tn = name_maps.for_tree(leaves, _family_map(config) if isinstance(config, DecoderConfig) else None)
    out: dict[str, np.ndarray] = {}
    for (names, _, _), (_, x) in zip(leaves, flat):
        for name, v in zip(tn.params(names), tn.param_to_torch(names, np.asarray(x))):
            if prefix and name.startswith("model."):
                name = prefix + name[len("model."):]
            out[name] = v
    return out


_ST_NAMES = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: Union[str, os.PathLike], tensors: Mapping[str, Any], metadata: Optional[dict] = None) -> None:
    """Writes ``{name: array}`` as one ``.safetensors`` file (any numpy dtype of the
    format, ``bfloat16`` included), readable by ``safetensors`` and ``transformers``."""
    import ml_dtypes

    names = {**_ST_NAMES, np.dtype(ml_dtypes.bfloat16).name: "BF16"}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        x = np.ascontiguousarray(np.asarray(tensors[name]))
        if x.dtype.name not in names:
            raise ValueError(f"{name}: dtype {x.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": names[x.dtype.name], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
        arrays.append(x)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in arrays:
            f.write(x.tobytes())


def save_pretrained(model: nnx.Module, directory: Union[str, os.PathLike]) -> Path:
    """Writes ``model`` as a Hugging Face checkpoint directory (``config.json`` +
    ``model.safetensors``, PyTorch names and layouts): what
    ``AutoModelForCausalLM.from_pretrained(directory)`` and :func:`from_pretrained` read.
    A merged fine-tune saved this way is a plain model again.

    >>> jlora.models.save_pretrained(model, "out/base")                      # doctest: +SKIP
    """
    config = getattr(model, "config", None)
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"save_pretrained needs a jlora.models model (with a DecoderConfig), got {type(model).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(model)
    write_safetensors(d / "model.safetensors", tensors)
    cfg = hf_config_dict(config)
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype) if tensors else config.param_dtype
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d
