"""Name maps: how the leaves of a parameter tree correspond to PyTorch names and layouts.

This is model knowledge, layer 2 (the machinery is in :mod:`.rules`, the tables in
:mod:`.families`, choosing one in :mod:`.lookup`, PEFT's defaults in :mod:`.hf`). The PEFT and Orbax
I/O (``jlora.save_peft`` / ``load_peft`` / ``save`` / ``load``), the ``jlora`` CLI and
the safetensors loader of :mod:`jlora.models` ask a name map, for each leaf of a tree,

* which PyTorch module(s) and state-dict name(s) it is (one, or one per slice when a
  single JAX array holds several PyTorch tensors, like Gemma's ``kv_einsum``),
* how its array is laid out against the PyTorch tensor (transpose, head axes
  flattened), and for a LoRA target the role of each kernel axis (its layout) and its
  PEFT layer kind (``linear`` / ``embedding`` / ``conv``).

Shipped maps, recognised from the tree's paths (so ``name_map=`` is rarely needed):

================  ===========================================================================
``"qwen3"``       NNX trees laid out like tunix / bonsai's Qwen3 (``layers/<i>/attn/q_proj/w`` (D, N, H), ``q_norm``)
``"llama3"``      the same without ``q_norm``/``k_norm`` (Llama 3)
``"gemma3"``      tunix / bonsai's Gemma 3: ``q_einsum/w`` (N, D, H), ``kv_einsum/w`` (2, K, D, H) =
                  PyTorch's ``k_proj`` and ``v_proj``, ``attn_vec_einsum/w`` (N, H, D)
``"qwen3_moe"``   Qwen3-MoE: Qwen3's attention, the router ``mlp/gate/w`` (D, E) and stacked experts
                  ``mlp/experts/gate_proj/w`` (E, D, F) = ``model.layers.i.mlp.experts.<e>.gate_proj``
``"hf"``          Hugging Face Flax models (transformers' own rules; everything else falls back to these)
================  ===========================================================================

For the NNX families the map is, per layer ``i`` (PyTorch names of ``*ForCausalLM``)::

    embedder/input_embedding      (V, D)    model.embed_tokens.weight        (V, D)
    layers/i/attn/q_proj/w        (D, N, H) model.layers.i.self_attn.q_proj.weight  (N·H, D)
    layers/i/attn/k_proj/w, v_proj/w (D, K, H)  ...k_proj / v_proj.weight    (K·H, D)
    layers/i/attn/o_proj/w        (N, H, D) ...o_proj.weight                 (D, N·H)
    layers/i/attn/q_norm/w        (H,)      ...self_attn.q_norm.weight       (H,)
    layers/i/mlp/gate_proj/kernel (D, F)    model.layers.i.mlp.gate_proj.weight  (F, D)
    layers/i/input_layernorm/w    (D,)      model.layers.i.input_layernorm.weight
    final_norm/w                  (D,)      model.norm.weight
    lm_head/w                     (D, V)    lm_head.weight                   (V, D)
    Gemma 3: attn/q_einsum/w (N, D, H) → q_proj; attn/kv_einsum/w (2, K, D, H) → k_proj, v_proj;
             attn/attn_vec_einsum/w (N, H, D) → o_proj; attn/_query_norm/scale → q_norm;
             pre_attention_norm → input_layernorm, post_attention_norm → post_attention_layernorm,
             pre_ffw_norm → pre_feedforward_layernorm, post_ffw_norm → post_feedforward_layernorm,
             final_norm/scale → model.norm

Head axes flatten head-major (``n·H + h``), which is the row order of PyTorch's
``q_proj.weight``; so a LoRA factor pair of an einsum kernel is PEFT's 2-D
``lora_A (r, in)`` / ``lora_B (out, r)`` after a reshape, and ``kv_einsum``'s factors
(layout ``("stack", "out", "in", "out")``, the stack axis being k/v) are two PEFT
adapters.

Stacked layers (``jlora.models``' ``scan_layers=True``): every ``layers/<i>/...`` rule also
matches the leaf stacked over the layers, ``layers/attn/q_proj/w`` (L, D, N, H) →
``model.layers.<i>.self_attn.q_proj.weight`` for each ``i`` (a leading ``"stack"`` axis;
:mod:`jlora.name_maps.stacked`), so PEFT files hold one adapter per layer either way.

Plugging in your own:

* ``name_map={"encoder.layers.query": "bert.encoder.layer.query"}`` or a function of
  the ``.``-joined module path returning a PyTorch module path (or ``None`` for the
  default): overrides on top of the recognised map (``{layer}`` in the result for
  stacked kernels);
* ``name_map="qwen3"`` (a shipped map by name) or a :class:`FamilyMap` of your own
  :class:`Rule` s: a table of path regex → PyTorch name(s) and axes (see
  :data:`QWEN3`'s source for the pattern);
* any object with ``bind(leaves, prefix=None) -> TreeNames``.
"""

from . import hf
from .families import FAMILY_MAPS, GEMMA3, LLAMA3, QWEN3, QWEN3_MOE
from .lookup import NameMapSpec, family_of, for_tree, get, layouts, recognise, record_param_to_torch, tree_leaves
from .rules import FamilyMap, HFNames, Rule, TreeNames, kernel_from_torch, kernel_to_torch, module_kind, torch_param_name

__all__ = [
    "Rule",
    "FamilyMap",
    "TreeNames",
    "HFNames",
    "QWEN3",
    "LLAMA3",
    "GEMMA3",
    "QWEN3_MOE",
    "FAMILY_MAPS",
    "NameMapSpec",
    "recognise",
    "for_tree",
    "get",
    "torch_param_name",
    "kernel_to_torch",
    "kernel_from_torch",
    "module_kind",
    "family_of",
    "record_param_to_torch",
    "layouts",
    "tree_leaves",
    "hf",
]
