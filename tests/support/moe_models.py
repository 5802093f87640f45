"""A tiny Qwen3-MoE shared by the MoE tests: transformers 4.57's ``Qwen3MoeForCausalLM``
(random weights, float32), the jlora.models NNX model loaded from it, and a torch twin with
transformers 5's fused experts (3-D ``gate_up_proj`` / ``down_proj`` parameters, which
transformers 4.57 does not have) on which PEFT's ``target_parameters`` adapters run.
Built once per process (``functools.lru_cache``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import numpy as np

VOCAB = 64
E, K = 4, 2
ATTN_AND_EXPERTS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def hf_config(**kw: Any):
    import transformers as tr

    return tr.Qwen3MoeConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": E,
        "num_experts_per_tok": K, "moe_intermediate_size": 16, "norm_topk_prob": True, "mlp_only_layers": [1],
        "max_position_embeddings": 64, "tie_word_embeddings": False, **kw,
    })


def randomize(model, seed: int = 0):
    """Weights large enough that every mapping or routing mistake shows in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 else 0.15 * noise)
    return model.eval()


@dataclasses.dataclass
class MoeCase:
    config: Any
    torch_model: Any
    base_state: dict
    model: Any
    graphdef: Any
    state: Any
    ids: np.ndarray
    apply: Callable

    def fresh_torch(self):
        import transformers as tr

        m = tr.Qwen3MoeForCausalLM(self.config)
        m.load_state_dict(self.base_state)
        return m.eval()


@functools.lru_cache(maxsize=None)
def case() -> MoeCase:
    import torch
    import transformers as tr
    from flax import nnx

    import jlora.models as jm

    torch.manual_seed(0)
    config = hf_config()
    tm = randomize(tr.Qwen3MoeForCausalLM(config))
    model = jm.from_torch(tm)
    graphdef, state = nnx.split(model)
    ids = np.random.RandomState(1).randint(0, VOCAB, (3, 9))

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    return MoeCase(config, tm, copy.deepcopy(tm.state_dict()), model, graphdef, state, ids, apply)


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def fused_twin(model):
    """``model`` (a 4.57 ``Qwen3MoeForCausalLM``) with each sparse block's experts fused as
    transformers 5 lays them out: ``experts.gate_up_proj`` (E, 2F, D), gate rows first,
    ``experts.down_proj`` (E, D, F), each expert applied with ``F.linear``; routing as 4.57."""
    import torch
    from torch import nn

    class FusedExperts(nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.num_experts = len(experts)
            self.gate_up_proj = nn.Parameter(torch.stack(
                [torch.cat([x.gate_proj.weight, x.up_proj.weight], 0) for x in experts]).detach().clone())
            self.down_proj = nn.Parameter(torch.stack([x.down_proj.weight for x in experts]).detach().clone())

        def forward(self, hidden, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden)
            for e in range(self.num_experts):
                token, pos = torch.where(top_k_index == e)
                if token.numel() == 0:
                    continue
                gate, up = nn.functional.linear(hidden[token], self.gate_up_proj[e]).chunk(2, dim=-1)
                h = nn.functional.linear(nn.functional.silu(gate) * up, self.down_proj[e])
                out.index_add_(0, token, h * top_k_weights[token, pos, None])
            return out

    class FusedBlock(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.gate = block.gate
            self.experts = FusedExperts(block.experts)
            self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob

        def forward(self, hidden_states):
            b, s, d = hidden_states.shape
            h = hidden_states.view(-1, d)
            logits = self.gate(h)
            w = nn.functional.softmax(logits, dim=1, dtype=torch.float)
            w, idx = torch.topk(w, self.top_k, dim=-1)
            if self.norm_topk_prob:
                w = w / w.sum(dim=-1, keepdim=True)
            return self.experts(h, idx, w.to(h.dtype)).reshape(b, s, d), logits

    twin = copy.deepcopy(model)
    for layer in twin.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = FusedBlock(layer.mlp)
    return twin.eval()
