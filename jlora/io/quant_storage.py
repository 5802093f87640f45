"""Storing a quantized base: Orbax checkpoints, and bitsandbytes' state-dict keys.

* :func:`save_quantized` / :func:`load_quantized`: an Orbax checkpoint of a tree holding
  :class:`~jlora.QuantizedArray` kernels (the output of :func:`jlora.quantize`), with
  each kernel's static data (shape, layout, type, block size, dtypes) in the checkpoint's
  metadata, so that loading needs no template and nobody quantizes twice. Orbax's own
  API works on such a tree too, given a template: ``ocp.StandardCheckpointer().restore(
  path, jax.eval_shape(lambda p: jlora.quantize(p, config), abstract_params))``.
* :func:`to_bnb_state_dict` / :func:`from_bnb_state_dict`: one kernel as the keys a
  bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (and transformers' 4-/8-bit
  checkpoints) store: ``weight``, ``weight.absmax``, ``weight.quant_map``,
  ``weight.nested_absmax``, ``weight.nested_quant_map``,
  ``weight.quant_state.bitsandbytes__nf4`` (a JSON dict as bytes); int8: ``weight``
  (``CB``), ``SCB``, ``weight_format``.

The adapter files of a QLoRA model are plain LoRA files (``jlora.save`` / ``save_peft``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..core.paths import path_names
from ..nodes.weight import is_lora_node
from ..quant.array import QuantizedArray, as_packed_rows, is_quantized, quantization_summary
from ..quant.codec import DYNAMIC_CODE, NESTED_BLOCK_SIZE, TABLES

__all__ = ["save_quantized", "load_quantized", "to_bnb_state_dict", "from_bnb_state_dict"]

_FORMAT = "jlora.quantized_base/1"
_AUX = ("item_shape", "roles", "dtype", "quant_type", "block_size", "double_quant", "compute_dtype")
_CHILDREN = ("codes", "absmax", "nested_absmax", "offset")


def _aux_json(q: QuantizedArray) -> dict[str, Any]:
    return {
        "item_shape": list(q.item_shape), "roles": list(q.roles), "dtype": np.dtype(q.dtype).name,
        "quant_type": q.quant_type, "block_size": q.block_size, "double_quant": q.double_quant,
        "compute_dtype": np.dtype(q.compute_dtype).name,
    }


def _as_storable(tree: Any) -> tuple[Any, dict[str, Any]]:
    """The tree with each QuantizedArray as a dict of its arrays, and its static data by path."""
    kernels: dict[str, Any] = {}

    def conv(path, x):
        if not is_quantized(x):
            return x
        kernels["/".join(path_names(path))] = _aux_json(x)
        return {n: getattr(x, n) for n in _CHILDREN if getattr(x, n) is not None}

    return jax.tree_util.tree_map_with_path(conv, tree, is_leaf=is_quantized), kernels


def save_quantized(directory: Union[str, os.PathLike], tree: Any, *, force: bool = False) -> None:
    """Saves ``tree`` (arrays and :class:`~jlora.QuantizedArray` kernels, in dicts/lists)
    as an Orbax checkpoint in ``directory``; the kernels' static data and
    :func:`jlora.quant.quantization_summary` go into its custom metadata.

    >>> save_quantized("/tmp/base_nf4", jlora.quantize(params))    # doctest: +SKIP
    >>> q = load_quantized("/tmp/base_nf4")                         # doctest: +SKIP
    """
    import orbax.checkpoint as ocp
    from etils import epath

    if any(is_lora_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_lora_node)):
        raise ValueError("save_quantized saves a base (jlora.quantize's output); save adapters with jlora.save "
                         "or jlora.save_peft, and the base with save_quantized(path, jlora.unload(lp))")
    storable, kernels = _as_storable(tree)
    if not kernels:
        raise ValueError("save_quantized: the tree holds no jlora.QuantizedArray (quantize it with jlora.quantize)")
    summary = quantization_summary(tree)
    meta = {"format": _FORMAT, "kernels": kernels, "quantization": json.loads(json.dumps(summary))}
    path = epath.Path(os.fspath(directory))
    if path.exists():
        if not force:
            raise FileExistsError(f"{path} exists; pass force=True to replace it")
        path.rmtree()
    args = ocp.args.StandardSave(storable, custom_metadata=meta)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(path, args=args)


def quantized_metadata(directory: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The custom metadata :func:`save_quantized` wrote (``None`` for other checkpoints)."""
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.fspath(directory))).custom_metadata
    except Exception:  # noqa: BLE001 - not an Orbax checkpoint
        return None
    return meta if isinstance(meta, Mapping) and meta.get("format") == _FORMAT else None


def load_quantized(directory: Union[str, os.PathLike], target: Any = None) -> Any:
    """Restores a :func:`save_quantized` checkpoint: the same arrays, and each quantized
    kernel a :class:`~jlora.QuantizedArray` again (containers come back as dicts and
    lists). ``target``: an abstract tree (``jax.eval_shape`` of the quantization, with
    shardings if wanted) to restore into instead, exactly that structure."""
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(os.fspath(directory))
    meta = quantized_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: not a jlora quantized-base checkpoint (written by jlora.save_quantized)")
    handler = ocp.StandardCheckpointHandler()
    if target is not None:
        storable, _ = _as_storable(target)
        restored = handler.restore(path, args=ocp.args.StandardRestore(storable))
        return jax.tree_util.tree_map(
            lambda t, r: QuantizedArray(*(r.get(n) for n in _CHILDREN), *t._aux()) if is_quantized(t) else r,
            target, restored, is_leaf=is_quantized,
        )
    restored = handler.restore(path)
    for name, aux in meta["kernels"].items():
        restored = _replace_at(restored, name.split("/") if name else [], aux)
    return restored


def _replace_at(tree: Any, keys: Sequence[str], aux: dict[str, Any]) -> Any:
    if not keys:  # (files of jlora 0.1 hold 4-bit codes flat: as_packed_rows takes them to rows)
        return as_packed_rows(QuantizedArray(
            *(jnp.asarray(tree[n]) if n in tree else None for n in _CHILDREN),
            item_shape=tuple(aux["item_shape"]), roles=tuple(aux["roles"]), dtype=np.dtype(jnp.dtype(aux["dtype"])),
            quant_type=aux["quant_type"], block_size=int(aux["block_size"]), double_quant=bool(aux["double_quant"]),
            compute_dtype=np.dtype(jnp.dtype(aux["compute_dtype"])),
        ))
    head, rest = keys[0], keys[1:]
    if isinstance(tree, (list, tuple)):
        items = list(tree)
        items[int(head)] = _replace_at(items[int(head)], rest, aux)
        return type(tree)(items)
    out = dict(tree)
    out[head] = _replace_at(tree[head], rest, aux)
    return out


# ----------------------------------------------------------------------------------
# bitsandbytes state-dict keys
# ----------------------------------------------------------------------------------


def _torch_shape(q: QuantizedArray) -> list[int]:
    outs = [s for s, r in zip(q.item_shape, q.roles) if r == "out"]
    ins = [s for s, r in zip(q.item_shape, q.roles) if r == "in"]
    return [int(np.prod(outs)), int(np.prod(ins))]


def to_bnb_state_dict(q: QuantizedArray, prefix: str = "") -> dict[str, np.ndarray]:
    """One (unstacked) quantized kernel as bitsandbytes' state-dict entries (NumPy
    arrays), the PyTorch weight being ``(out, in)``; ``prefix`` e.g.
    ``"model.layers.0.self_attn.q_proj."``. A ``bnb.nn.Linear4bit`` loads them
    (``load_state_dict``) and dequantizes to the same values.

    >>> sd = to_bnb_state_dict(jlora.quantize_array(kernel))          # doctest: +SKIP
    >>> sorted(sd)[:2]                                                 # doctest: +SKIP
    ['weight', 'weight.absmax']
    """
    if q.stack_shape:
        raise ValueError(f"{q!r}: a stacked kernel is several bitsandbytes layers; pass one layer (q[i] via tree_map)")
    get = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
    if q.quant_type == "int8":
        return {prefix + "weight": get(q.codes), prefix + "SCB": get(q.absmax).astype(np.float32),
                prefix + "weight_format": np.zeros((), np.uint8)}
    state: dict[str, Any] = {"quant_type": q.quant_type, "blocksize": q.block_size,
                             "dtype": np.dtype(q.dtype).name, "shape": _torch_shape(q)}
    out = {prefix + "weight": get(q.codes).reshape(-1, 1), prefix + "weight.absmax": get(q.absmax).reshape(-1),
           prefix + "weight.quant_map": np.array(TABLES[q.quant_type], np.float32)}
    if q.double_quant:
        out[prefix + "weight.nested_absmax"] = get(q.nested_absmax).astype(np.float32)
        out[prefix + "weight.nested_quant_map"] = np.array(DYNAMIC_CODE, np.float32)
        state.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=float(get(q.offset)))
    out[prefix + f"weight.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(
        json.dumps(state).encode(), np.uint8).copy()
    return out


def from_bnb_state_dict(state_dict: Mapping[str, Any], prefix: str = "", *, shape: Optional[Sequence[int]] = None,
                        layout: Sequence[str] = ("in", "out"), compute_dtype: Any = jnp.bfloat16,
                        dtype: Any = None) -> QuantizedArray:
    """A :class:`~jlora.QuantizedArray` from bitsandbytes' state-dict entries (torch
    tensors or arrays) of one 4-bit or 8-bit layer: the same bytes, so it dequantizes to
    bitsandbytes' values exactly. ``shape``/``layout``: the Flax kernel's (default: a
    ``Dense`` kernel, ``(in, out)`` of the PyTorch ``(out, in)`` weight). ``dtype``: the
    original dtype (4-bit states record it; int8 ones do not: default float32).

    >>> q = from_bnb_state_dict(bnb_linear.state_dict(), compute_dtype=jnp.float32)  # doctest: +SKIP
    """
    state_keys = [k for k in state_dict if k.startswith(prefix + "weight.quant_state.bitsandbytes__")]

    def arr(key):
        v = state_dict[prefix + key]
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().cpu()
            if key == "weight" and state_keys and str(v.dtype) != "torch.uint8":
                import torch  # packed codes stored as another dtype (bnb_4bit_quant_storage): the same bytes

                v = v.contiguous().view(torch.uint8)
            return v.numpy()
        return np.asarray(v)

    layout = tuple(layout)
    if not state_keys:
        if prefix + "SCB" not in state_dict:
            raise ValueError(f"no bitsandbytes state under {prefix!r}: expected 'weight.quant_state.bitsandbytes__*' "
                             f"(4-bit) or 'SCB' (int8) keys; got {sorted(state_dict)[:10]}")
        cb, scb = arr("weight"), arr("SCB")
        torch_shape = list(cb.shape)
        if len(torch_shape) != 2:
            raise ValueError(f"{prefix}weight: an int8 weight is (out, in), got {tuple(torch_shape)}")
        q = QuantizedArray(jnp.asarray(cb.astype(np.int8)), jnp.asarray(scb.astype(np.float32)), None, None,
                           quant_type="int8", block_size=64, double_quant=False,
                           dtype=np.dtype(jnp.dtype(dtype or np.float32)),
                           compute_dtype=np.dtype(compute_dtype), **_item(torch_shape, shape, layout))
        return q
    state = json.loads(bytes(arr(state_keys[0][len(prefix):]).astype(np.uint8)).decode())
    torch_shape = list(state["shape"])
    nested = "nested_offset" in state
    codes = jnp.asarray(arr("weight").reshape(-1).view(np.uint8))
    absmax = jnp.asarray(arr("weight.absmax"))
    nested_absmax = jnp.asarray(arr("weight.nested_absmax").astype(np.float32)) if nested else None
    offset = jnp.asarray(np.float32(state["nested_offset"])) if nested else None
    return as_packed_rows(QuantizedArray(
        codes, absmax, nested_absmax, offset, quant_type=state["quant_type"], block_size=int(state["blocksize"]),
        double_quant=nested, dtype=np.dtype(jnp.dtype(dtype or state["dtype"])), compute_dtype=np.dtype(compute_dtype),
        **_item(torch_shape, shape, layout),
    ))


def _item(torch_shape: Sequence[int], shape: Optional[Sequence[int]], layout: tuple[str, ...]) -> dict[str, Any]:
    if "stack" in layout:
        raise ValueError(f"layout {layout}: a bitsandbytes layer is one kernel (no stack axes)")
    if shape is None:
        if layout != ("in", "out") and layout != ("out", "in"):
            raise ValueError(f"layout {layout}: pass the Flax kernel's shape=")
        out, in_ = torch_shape
        shape = (in_, out) if layout == ("in", "out") else (out, in_)
    shape = tuple(int(s) for s in shape)
    outs = int(np.prod([s for s, r in zip(shape, layout) if r == "out"]))
    ins = int(np.prod([s for s, r in zip(shape, layout) if r == "in"]))
    if [outs, ins] != list(torch_shape):
        raise ValueError(f"kernel shape {shape} with layout {layout} is ({outs}, {ins}) as a PyTorch weight; "
                         f"the bitsandbytes state holds {tuple(torch_shape)}")
    return {"item_shape": shape, "roles": layout}
