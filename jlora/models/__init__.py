"""Flax NNX decoders for Qwen3, Llama 3, Gemma 3 (text) and Qwen3-MoE, laid out as tunix / bonsai
lay them out, with loaders for Hugging Face checkpoints.

This package is model knowledge, not part of jlora's core (nothing in the core imports
it). The models exist so that LoRA on the trees JAX users fine-tune today (einsum
kernels under leaves named ``w``, ``nnx.Linear`` MLPs, an ``nnx.List`` of layers,
optional ``nnx.remat`` blocks) is tested against the PyTorch models of the same
checkpoints, and so that a notebook can load a real checkpoint without torch::

    import jlora, jlora.models
    model = jlora.models.from_pretrained("path/to/Qwen3-0.6B")    # safetensors + config.json
    logits = model(ids)                                          # (batch, seq, vocab)
    graphdef, state = nnx.split(model)

=====================  ===================================================================
:func:`build`          a randomly initialised model of a :class:`DecoderConfig`
:func:`abstract`       the same under ``nnx.eval_shape`` (``ShapeDtypeStruct`` leaves)
:func:`from_pretrained`  an HF checkpoint: a local safetensors directory or a Hub id (no torch, no transformers)
:func:`from_torch`     a transformers PyTorch model or a state dict
:func:`state_dict`     an NNX model as PyTorch-named numpy arrays
:func:`save_pretrained`  an NNX model as an HF checkpoint directory (``config.json`` + safetensors)
:func:`config_from_hf` a :class:`DecoderConfig` from ``config.json`` / a PretrainedConfig
:func:`causal_lm_loss` the mean next-token cross-entropy, chunked over the sequence (no (B, T, V) float32 logits)
:func:`generate`       text: prefill, then a jitted decode loop over a KV cache; greedy or sampled; with
                       LoRA, one adapter per row, adapter slots, a quantized base
=====================  ===================================================================

Real sizes on one chip: ``DecoderConfig(scan_layers=True)`` stacks the layers on a
leading axis under one ``lax.scan`` (:mod:`jlora.models.stack`), ``remat="full"`` /
``"dots"`` checkpoints each layer, ``attention="blockwise"`` (any backend) or
``"dot_product"`` (cuDNN flash attention on GPU) never forms (B, heads, T, T) float32
logits (:mod:`jlora.models.attention`), and :func:`causal_lm_loss` never forms the
(B, T, vocab) float32 logits (:mod:`jlora.models.loss`)::

    cfg = jlora.models.config_from_hf(path, scan_layers=True, remat="full", attention="blockwise",
                                      param_dtype="bfloat16")
    loss = jlora.models.causal_lm_loss(model, ids)

:mod:`jlora.models.bert` is a BERT encoder (``load_bert`` / ``save_bert`` over a
Hugging Face BERT directory, e.g. all-MiniLM-L6-v2), imported on its own:
``from jlora.models import bert``.

The PEFT names of these trees come from the family maps in :mod:`jlora.name_maps`,
recognised from the paths, so ``jlora.save_peft(dir, lp)`` writes an adapter that
``PeftModel.from_pretrained`` loads on the PyTorch model of the same checkpoint.
"""

from .config import FAMILIES, DecoderConfig, config_from_hf, hf_config_dict, rope_frequencies
from .decoder import Decoder, Llama3, Qwen3
from .gemma3 import Gemma3
from .generate import GenerateFunctions, bucket_length, decode_step, generate, generate_functions
from .loss import causal_lm_loss, causal_lm_loss_fn
from .qwen3_moe import Qwen3Moe
from .loader import (
    MODEL_CLASSES,
    abstract,
    build,
    from_pretrained,
    from_tensors,
    from_torch,
    read_safetensors,
    resolve_checkpoint,
    save_pretrained,
    state_dict,
    write_safetensors,
)

__all__ = [
    "FAMILIES",
    "DecoderConfig",
    "config_from_hf",
    "hf_config_dict",
    "rope_frequencies",
    "Decoder",
    "Qwen3",
    "Llama3",
    "Gemma3",
    "Qwen3Moe",
    "MODEL_CLASSES",
    "build",
    "abstract",
    "from_pretrained",
    "from_torch",
    "from_tensors",
    "state_dict",
    "save_pretrained",
    "read_safetensors",
    "resolve_checkpoint",
    "write_safetensors",
    "causal_lm_loss",
    "causal_lm_loss_fn",
    "generate",
    "generate_functions",
    "decode_step",
    "GenerateFunctions",
    "bucket_length",
]
