"""The shipped family maps: Qwen3, Llama 3, Gemma 3 and Qwen3-MoE laid out like tunix / bonsai,
with the PyTorch names of transformers' ``*ForCausalLM`` (see :mod:`jlora.name_maps`).

>>> [m.name for m in FAMILY_MAPS]
['qwen3', 'llama3', 'gemma3', 'qwen3_moe']
"""

from __future__ import annotations

from .rules import LAYER_PATTERN, FamilyMap, Rule

__all__ = ["QWEN3", "LLAMA3", "GEMMA3", "QWEN3_MOE", "FAMILY_MAPS"]


_L = LAYER_PATTERN
_LS = r"layers/(?:\d+/)?"  # a layer's leaf, or the leaf stacked over the layers (scan_layers)
_T = r"model.layers.\1."


def _decoder_rules(qk_norm: bool) -> list[Rule]:
    rules = [
        Rule(r"embedder/input_embedding", "model.embed_tokens.weight", "v d", "v d", kind="embedding"),
        Rule(_L + r"attn/q_proj/w", _T + "self_attn.q_proj.weight", "d n h", "(n h) d"),
        Rule(_L + r"attn/k_proj/w", _T + "self_attn.k_proj.weight", "d k h", "(k h) d"),
        Rule(_L + r"attn/v_proj/w", _T + "self_attn.v_proj.weight", "d k h", "(k h) d"),
        Rule(_L + r"attn/o_proj/w", _T + "self_attn.o_proj.weight", "n h d", "d (n h)"),
        Rule(_L + r"mlp/(gate_proj|up_proj)/kernel", _T + r"mlp.\2.weight", "d f", "f d"),
        Rule(_L + r"mlp/down_proj/kernel", _T + "mlp.down_proj.weight", "f d", "d f"),
        Rule(_L + r"(input_layernorm|post_attention_layernorm)/w", _T + r"\2.weight", "d", "d", kind="param"),
        Rule(r"final_norm/w", "model.norm.weight", "d", "d", kind="param"),
        Rule(r"lm_head/w", "lm_head.weight", "d v", "v d"),
    ]
    if qk_norm:
        rules.append(Rule(_L + r"attn/(q_norm|k_norm)/w", _T + r"self_attn.\2.weight", "h", "h", kind="param"))
    return rules


QWEN3 = FamilyMap(
    "qwen3",
    _decoder_rules(qk_norm=True),
    requires=(_LS + r"attn/q_proj/w", _LS + r"attn/q_norm/w"),
    excludes=(_LS + r"mlp/(gate/w|experts/.*)",),
)
"""tunix / bonsai's Qwen3 (``Qwen3ForCausalLM`` names)."""

LLAMA3 = FamilyMap(
    "llama3",
    _decoder_rules(qk_norm=False),
    requires=(_LS + r"attn/q_proj/w",),
    excludes=(_LS + r"attn/q_norm/w",),
)
"""tunix / bonsai's Llama 3 (``LlamaForCausalLM`` names)."""

_GEMMA_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

GEMMA3 = FamilyMap(
    "gemma3",
    [
        Rule(r"embedder/input_embedding", "model.embed_tokens.weight", "v d", "v d", kind="embedding"),
        Rule(_L + r"attn/q_einsum/w", _T + "self_attn.q_proj.weight", "n d h", "(n h) d"),
        Rule(
            _L + r"attn/kv_einsum/w",
            (_T + "self_attn.k_proj.weight", _T + "self_attn.v_proj.weight"),
            "s k d h",
            "(k h) d",
        ),
        Rule(
            _L + r"attn/qkv_einsum/w",
            (_T + "self_attn.q_proj.weight", _T + "self_attn.k_proj.weight", _T + "self_attn.v_proj.weight"),
            "s n d h",
            "(n h) d",
        ),
        Rule(_L + r"attn/attn_vec_einsum/w", _T + "self_attn.o_proj.weight", "n h d", "d (n h)"),
        Rule(_L + r"attn/_query_norm/scale", _T + "self_attn.q_norm.weight", "h", "h", kind="param"),
        Rule(_L + r"attn/_key_norm/scale", _T + "self_attn.k_norm.weight", "h", "h", kind="param"),
        Rule(_L + r"mlp/(gate_proj|up_proj)/kernel", _T + r"mlp.\2.weight", "d f", "f d"),
        Rule(_L + r"mlp/down_proj/kernel", _T + "mlp.down_proj.weight", "f d", "d f"),
        *[
            Rule(_L + jax_name + "/scale", _T + torch_name + ".weight", "d", "d", kind="param")
            for jax_name, torch_name in _GEMMA_NORMS.items()
        ],
        Rule(r"final_norm/scale", "model.norm.weight", "d", "d", kind="param"),
    ],
    requires=(_LS + r"attn/(q_einsum|kv_einsum|qkv_einsum)/w",),
)
"""tunix / bonsai's Gemma 3 text decoder (``Gemma3ForCausalLM`` names)."""

QWEN3_MOE = FamilyMap(
    "qwen3_moe",
    [
        *_decoder_rules(qk_norm=True),
        Rule(_L + r"mlp/gate/w", _T + "mlp.gate.weight", "d e", "e d"),
        # one stacked kernel (E, D, F) = the E experts' nn.Linear modules of transformers 4.x
        Rule(_L + r"mlp/experts/(gate_proj|up_proj)/w", _T + r"mlp.experts.{i}.\2.weight", "e d f", "f d"),
        Rule(_L + r"mlp/experts/down_proj/w", _T + "mlp.experts.{i}.down_proj.weight", "e f d", "d f"),
    ],
    requires=(_L + r"attn/q_proj/w", _L + r"attn/q_norm/w", _L + r"mlp/experts/gate_proj/w"),
)
"""Qwen3-MoE (``Qwen3MoeForCausalLM`` names of transformers 4.x): the router ``mlp/gate/w``
(D, E) and the experts stacked, ``mlp/experts/{gate,up,down}_proj/w`` (E, D, F) / (E, F, D),
each expert slice one PyTorch module ``model.layers.<i>.mlp.experts.<e>.gate_proj`` (PEFT
adapters for experts name those modules). PEFT's ``target_parameters`` adapters for
transformers 5's fused experts are converted in :mod:`jlora.io.peft_experts`."""

FAMILY_MAPS: tuple[FamilyMap, ...] = (QWEN3, LLAMA3, GEMMA3, QWEN3_MOE)
"""The shipped family maps, in the order :func:`recognise` tries them."""
