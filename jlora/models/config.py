"""`DecoderConfig`: the shape and options of a Qwen3 / Llama 3 / Gemma 3 / Qwen3-MoE decoder.

One frozen (hashable) dataclass for the four families, read from a Hugging Face
``config.json`` by :func:`config_from_hf`. Which HF options are supported, and what is
refused with an error (never silently ignored):

* RoPE scaling (``rope_scaling.rope_type``): ``default``, ``linear`` and ``llama3``.
  ``dynamic``, ``yarn``, ``longrope`` and a ``partial_rotary_factor`` other than 1 are
  refused.
* Sliding-window attention: per layer, from ``layer_types`` (Gemma 3's local layers;
  Qwen3 with ``use_sliding_window``). Gemma 3's bidirectional variant
  (``use_bidirectional_attention``, EmbeddingGemma) is refused.
* Biases: ``attention_bias`` / ``mlp_bias`` must be false (as in every released
  checkpoint of these families), activations ``silu`` (Qwen3, Llama) and
  ``gelu_pytorch_tanh`` (Gemma 3).
* No KV cache: the models compute full sequences (training, scoring, and simple
  generation by recomputation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax
import numpy as np

from .attention import IMPLEMENTATIONS
from .stack import remat_mode

__all__ = ["DecoderConfig", "config_from_hf", "hf_config_dict", "FAMILIES", "rope_frequencies"]

FAMILIES = ("qwen3", "llama3", "gemma3", "qwen3_moe")
_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama3", "gemma3_text": "gemma3", "gemma3": "gemma3", "qwen3_moe": "qwen3_moe"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and options of a decoder of one of :data:`FAMILIES`.

    Attributes (HF ``config.json`` names in brackets):
      family: ``"qwen3"``, ``"llama3"``, ``"gemma3"`` or ``"qwen3_moe"``.
      vocab_size, embed_dim [hidden_size], hidden_dim [intermediate_size], num_layers
        [num_hidden_layers], num_heads [num_attention_heads], num_kv_heads
        [num_key_value_heads], head_dim.
      rms_norm_eps, rope_theta, rope_scaling: ``None`` or a tuple of ``(key, value)``
        pairs of HF's ``rope_scaling`` dict (a tuple keeps the config hashable).
      tie_embeddings [tie_word_embeddings]: logits from the input embedding (no ``lm_head``).
      layer_types: per layer ``"full_attention"`` or ``"sliding_attention"``.
      sliding_window: the window of sliding layers (a key attends to the query's last
        ``sliding_window`` positions, itself included).
      query_pre_attn_scalar: attention logits are scaled by ``query_pre_attn_scalar**-0.5``
        (Gemma 3; ``None`` means ``head_dim``).
      rope_local_base_freq: RoPE theta of Gemma 3's sliding layers (unscaled).
      final_logit_softcapping, attn_logit_softcapping: ``tanh`` capping (Gemma).
      remat: activation checkpointing around each decoder layer: ``"none"`` (default),
        ``"full"`` (keep only each layer's input) or ``"dots"`` (also keep the matmul
        outputs: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``); ``True``
        and ``False`` mean ``"full"`` and ``"none"``. See :mod:`jlora.models.stack`.
      scan_layers: stack the layers' parameters on a leading axis (``layers/attn/q_proj/w``
        (L, D, N, H)) and run them under one ``lax.scan``: the program and its compile
        time do not grow with depth. Default ``False``: a list, ``layers/<i>/...``.
      attention: ``"xla"`` (default: the reference, forms (B, heads, T, T) float32
        logits), ``"dot_product"`` (``jax.nn.dot_product_attention``; cuDNN flash
        attention on GPU) or ``"blockwise"`` (online softmax over tiles, pure JAX, any
        backend; never forms the (T, T) logits). See :mod:`jlora.models.attention`.
      attention_block_size: the tile size of ``"blockwise"`` attention.
      activation_sharding: a ``jax.sharding.Sharding`` of the residual stream
        (batch, seq, embed_dim), constrained at every layer's input (e.g.
        ``NamedSharding(mesh, P("fsdp", None, None))`` for FSDP: each chip keeps its own
        rows). ``None`` (default): XLA's sharding propagation decides, and with FSDP
        kernels it shards the activations along the hidden axis like the kernels (a
        Llama-3-70B step on 8 v5p chips: 31.3 GiB per chip for the frozen floor instead
        of 27.2, about twice the time by the compiler's estimate). The KV-cache
        generation loop does not constrain. Not saved with the checkpoint.
      dtype: computation dtype (``None``: the parameters' dtype); param_dtype: of the
        parameters.
      initializer_range: standard deviation of the random initialisation.
      num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob,
        decoder_sparse_step, mlp_only_layers: a mixture of experts (``qwen3_moe``), with
        HF's names and meaning: layer ``i`` is sparse unless ``i in mlp_only_layers`` or
        ``(i + 1) % decoder_sparse_step``; a sparse layer routes each token to its
        ``num_experts_per_tok`` most probable experts of width ``moe_intermediate_size``
        (probabilities renormalised over those when ``norm_topk_prob``); the other layers
        are dense MLPs of width ``hidden_dim``. ``num_experts=0`` for dense families.
    """

    family: str
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None
    tie_embeddings: bool = False
    layer_types: Optional[tuple[str, ...]] = None
    sliding_window: Optional[int] = None
    query_pre_attn_scalar: Optional[float] = None
    rope_local_base_freq: float = 10_000.0
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    remat: Union[bool, str] = "none"
    dtype: Optional[str] = None
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    scan_layers: bool = False
    attention: str = "xla"
    attention_block_size: int = 512
    activation_sharding: Optional[jax.sharding.Sharding] = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"DecoderConfig.family={self.family!r}; valid families are {FAMILIES}")
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DecoderConfig.{name}={v!r}: expected a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_dim}: RoPE needs an even head_dim")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type", "default"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling with rope_type={rope_type!r} is not supported; supported: {_ROPE_TYPES}"
                )
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"DecoderConfig.layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"DecoderConfig.layer_types: unknown {bad}; valid: 'full_attention', 'sliding_attention'")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("DecoderConfig: sliding_attention layers need a positive sliding_window")
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.family == "qwen3_moe":
            _check_moe(self)
        object.__setattr__(self, "remat", remat_mode(self.remat))
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"DecoderConfig.attention={self.attention!r}; valid: {IMPLEMENTATIONS}")
        if self.attention == "dot_product" and self.attn_logit_softcapping is not None:
            raise ValueError(
                "DecoderConfig: attention='dot_product' (jax.nn.dot_product_attention) has no logit softcap, and "
                f"attn_logit_softcapping={self.attn_logit_softcapping}; use attention='blockwise' or 'xla'"
            )
        b = self.attention_block_size
        if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"DecoderConfig.attention_block_size={b!r}: expected a positive int")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"DecoderConfig.scan_layers={self.scan_layers!r}: expected True or False")
        if self.activation_sharding is not None and not isinstance(self.activation_sharding, jax.sharding.Sharding):
            raise ValueError(
                f"DecoderConfig.activation_sharding={self.activation_sharding!r}: expected a jax.sharding.Sharding "
                "(e.g. NamedSharding(mesh, PartitionSpec('fsdp', None, None))) or None"
            )

    @property
    def qk_norm(self) -> bool:
        """Whether queries and keys are RMS-normalised per head (Qwen3, Qwen3-MoE, Gemma 3)."""
        return self.family in ("qwen3", "gemma3", "qwen3_moe")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` is a mixture of experts (transformers' ``Qwen3MoeDecoderLayer`` rule).

        >>> DecoderConfig("qwen3_moe", 10, 8, 16, 4, 2, 1, 4, num_experts=4, num_experts_per_tok=2,
        ...               moe_intermediate_size=6, decoder_sparse_step=2).is_moe_layer(1)
        True
        """
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        d = dict(self.rope_scaling)
        return d.get("rope_type", d.get("type", "default"))

    def replace(self, **changes: Any) -> "DecoderConfig":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters of the model this config builds.

        >>> DecoderConfig("llama3", 10, 8, 16, 1, 2, 1, 4).num_params()
        760
        """
        D, F, N, K, H, V = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.vocab_size
        attn = D * N * H * 2 + D * K * H * 2 + (2 * H if self.qk_norm else 0)
        norms = (4 if self.family == "gemma3" else 2) * D
        per_layer = attn + norms
        mlps = sum(
            D * self.num_experts + 3 * D * self.moe_intermediate_size * self.num_experts if self.is_moe_layer(i)
            else 3 * D * F for i in range(self.num_layers)
        )
        return V * D * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + mlps + D


def _check_moe(config: DecoderConfig) -> None:
    """The mixture-of-experts fields of a ``qwen3_moe`` config are consistent."""
    E, k = config.num_experts, config.num_experts_per_tok
    if not (isinstance(E, (int, np.integer)) and E > 0):
        raise ValueError(f"DecoderConfig(family='qwen3_moe').num_experts={E!r}: expected a positive int")
    if not (isinstance(k, (int, np.integer)) and 0 < k <= E):
        raise ValueError(f"DecoderConfig.num_experts_per_tok={k!r}: expected 1 <= k <= num_experts={E}")
    if not (isinstance(config.moe_intermediate_size, (int, np.integer)) and config.moe_intermediate_size > 0):
        raise ValueError(f"DecoderConfig.moe_intermediate_size={config.moe_intermediate_size!r}: expected a positive int")
    if config.decoder_sparse_step < 1:
        raise ValueError(f"DecoderConfig.decoder_sparse_step={config.decoder_sparse_step!r}: expected >= 1")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = cfg.get(key, default)
    return default if v is None else v


def config_from_hf(hf_config: Any, **overrides: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face config: a ``config.json`` dict, a
    ``transformers.PretrainedConfig``, or a path to ``config.json`` / its directory.

    ``model_type`` picks the family (``qwen3``, ``llama``, ``gemma3_text``; for a
    multimodal ``gemma3`` config its ``text_config`` is used). ``overrides`` replace
    fields (e.g. ``remat="full"``, ``scan_layers=True``, ``dtype="bfloat16"``).

    >>> cfg = config_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
    ...                       "intermediate_size": 64, "num_hidden_layers": 2,
    ...                       "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> cfg.family, cfg.head_dim
    ('llama3', 8)
    """
    import json
    import os

    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            cfg = json.load(f)
    elif isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    elif hasattr(hf_config, "to_dict"):
        cfg = hf_config.to_dict()
    else:
        raise TypeError(
            f"config_from_hf takes a config.json dict, a transformers PretrainedConfig or a path, "
            f"got {type(hf_config).__name__}"
        )
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and isinstance(cfg.get("text_config"), Mapping):
        cfg = dict(cfg["text_config"], model_type="gemma3_text")
        model_type = "gemma3_text"
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"config model_type={model_type!r}: jlora.models builds {sorted(_MODEL_TYPES)} "
            "(Qwen3ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM, Qwen3MoeForCausalLM)"
        )
    family = _MODEL_TYPES[model_type]
    where = f"config (model_type={model_type!r})"
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=True is not supported (the NNX models have no biases)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    want = "gelu_pytorch_tanh" if family == "gemma3" else "silu"
    if act is not None and act != want:
        raise ValueError(f"{where}: activation {act!r} is not supported; this family uses {want!r}")
    if float(_get(cfg, "partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=True (EmbeddingGemma) is not supported")
    D = int(cfg["hidden_size"])
    N = int(cfg["num_attention_heads"])
    H = int(_get(cfg, "head_dim", D // N))
    L = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types")
    sliding_window = cfg.get("sliding_window")
    if family == "qwen3" and not cfg.get("use_sliding_window", False):
        layer_types, sliding_window = None, None
    if family == "qwen3_moe":  # one sliding window for every layer, or none
        layer_types = ["sliding_attention"] * L if cfg.get("use_sliding_window") and sliding_window else None
    if family == "llama3":
        layer_types, sliding_window = None, None
    if family == "gemma3" and layer_types is None:
        pattern = int(_get(cfg, "sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    rope_scaling = cfg.get("rope_scaling")
    if isinstance(rope_scaling, Mapping):
        rope_scaling = tuple(sorted((k, v) for k, v in rope_scaling.items() if v is not None))
    kwargs: dict[str, Any] = dict(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        embed_dim=D,
        hidden_dim=int(cfg["intermediate_size"]),
        num_layers=L,
        num_heads=N,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", N)),
        head_dim=H,
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=float(_get(cfg, "rope_theta", 10_000.0)),
        rope_scaling=rope_scaling or None,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma3")),
        layer_types=tuple(layer_types) if layer_types is not None else None,
        sliding_window=int(sliding_window) if sliding_window and layer_types is not None else None,
        initializer_range=float(_get(cfg, "initializer_range", 0.02)),
    )
    if family == "qwen3_moe":
        kwargs.update(
            num_experts=int(cfg["num_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=int(_get(cfg, "decoder_sparse_step", 1)),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
        )
    if family == "gemma3":
        kwargs.update(
            query_pre_attn_scalar=float(_get(cfg, "query_pre_attn_scalar", H)),
            rope_local_base_freq=float(_get(cfg, "rope_local_base_freq", 10_000.0)),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        )
    kwargs.update(overrides)
    return DecoderConfig(**kwargs)


_HF_MODEL = {
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "silu"),
    "llama3": ("llama", "LlamaForCausalLM", "silu"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "gelu_pytorch_tanh"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "silu"),
}


def hf_config_dict(config: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a :class:`DecoderConfig` (inverse of
    :func:`config_from_hf`): ``transformers.AutoConfig.for_model(**d)`` /
    ``AutoModelForCausalLM.from_pretrained(dir)`` build the PyTorch twin.

    >>> hf_config_dict(DecoderConfig("llama3", 64, 16, 32, 2, 4, 2, 8))["model_type"]
    'llama'
    """
    model_type, arch, act = _HF_MODEL[config.family]
    d: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling is not None else None,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "attention_bias": False,
        "torch_dtype": config.param_dtype,
        "hidden_activation" if config.family == "gemma3" else "hidden_act": act,
    }
    if config.family == "llama3":
        d["mlp_bias"] = False
    if config.family == "qwen3":
        sliding = "sliding_attention" in config.layer_types
        d.update(use_sliding_window=sliding, sliding_window=config.sliding_window, layer_types=list(config.layer_types))
    if config.family == "qwen3_moe":
        sliding = "sliding_attention" in config.layer_types
        d.update(
            use_sliding_window=sliding, sliding_window=config.sliding_window, num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
        )
    if config.family == "gemma3":
        d.update(
            layer_types=list(config.layer_types),
            sliding_window=config.sliding_window,
            query_pre_attn_scalar=config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim,
            rope_local_base_freq=config.rope_local_base_freq,
            final_logit_softcapping=config.final_logit_softcapping,
            attn_logit_softcapping=config.attn_logit_softcapping,
        )
    return d


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[tuple[tuple[str, Any], ...]] = None) -> np.ndarray:
    """RoPE inverse frequencies ``θ^(-2i/H)``, ``i < H/2`` (float32, as transformers
    computes them), with ``linear`` (``/ factor``) or ``llama3`` (wavelength-dependent
    interpolation) scaling.

    >>> rope_frequencies(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    d = dict(scaling or ())
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return (inv / np.float32(d["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(d["factor"])
        low, high = float(d["low_freq_factor"]), float(d["high_freq_factor"])
        old = float(d["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {_ROPE_TYPES}")
