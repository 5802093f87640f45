"""PEFT's ``target_parameters`` factors of 3-D expert parameters, converted to one module per
expert and back (``jlora.io.peft_experts``), against PEFT 0.21.2's own ``ParamWrapper``: on a
small torch module holding transformers 5's fused ``gate_up_proj`` (E, 2F, D) and
``down_proj`` (E, D, F), PEFT's ``get_delta_weight`` is the reference for every expert's ΔW."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jlora.io import peft_experts

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

E, D, F, R = 3, 8, 5, 2


class Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * F, D, generator=g))
        self.down_proj = torch.nn.Parameter(torch.randn(E, D, F, generator=g))

    def forward(self, x):
        return x


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.experts = Experts()


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([Holder()])

    def forward(self, x):
        return x


@pytest.fixture(scope="module")
def peft_model():
    cfg = peft.LoraConfig(r=R, lora_alpha=6, target_modules=[], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 5})
    torch.manual_seed(0)
    with warnings.catch_warnings():  # PEFT 0.21.2 checks the patterns against modules only (they do apply)
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match", category=RuntimeWarning)
        pm = peft.get_peft_model(Model(), cfg)
    state = peft.get_peft_model_state_dict(pm)
    tensors = {k: v.detach().numpy() for k, v in state.items()}
    return pm, tensors, cfg.to_dict()


def _wrappers(pm):
    out = {}
    for _, m in pm.named_modules():
        if type(m).__name__ == "ParamWrapper":
            out[m.parameter_name] = m
    return out


def test_unfuse_gives_peft_delta_per_expert(peft_model):
    pm, tensors, cfg = peft_model
    cfg = dict(cfg, target_modules=[])
    per_expert, out_cfg = peft_experts.unfuse(tensors, cfg)
    assert out_cfg["target_parameters"] is None
    prefix = "base_model.model.model.layers.0.mlp.experts"
    wrappers = _wrappers(pm)
    for param, parts, rows in (("gate_up_proj", ("gate_proj", "up_proj"), F), ("down_proj", ("down_proj",), D)):
        with torch.no_grad():
            ref = wrappers[param].get_delta_weight("default").numpy()  # (E, out, in): PEFT's own ΔW
        r = 3 if param == "down_proj" else R
        alpha = 5 if param == "down_proj" else 6
        for e in range(E):
            for j, proj in enumerate(parts):
                name = f"model.layers.0.mlp.experts.{e}.{proj}"
                A = per_expert[f"{prefix}.{e}.{proj}.lora_A.weight"]
                B = per_expert[f"{prefix}.{e}.{proj}.lora_B.weight"]
                assert A.shape == (r, D if param == "gate_up_proj" else F)
                assert peft_experts.peft_pattern(out_cfg["rank_pattern"], name, out_cfg["r"]) == r
                s = peft_experts.peft_pattern(out_cfg["alpha_pattern"], name, out_cfg["lora_alpha"]) / r
                np.testing.assert_allclose(s * B @ A, ref[e, j * rows:(j + 1) * rows], rtol=1e-5, atol=1e-6)
    assert s == alpha / r


def test_fuse_inverts_unfuse(peft_model):
    _, tensors, cfg = peft_model
    cfg = dict(cfg, target_modules=[])
    per_expert, out_cfg = peft_experts.unfuse(tensors, cfg)
    fused, fused_cfg = peft_experts.fuse(per_expert, dict(out_cfg, target_modules=["gate_proj", "up_proj", "down_proj"]))
    assert set(fused) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(fused[k], tensors[k], err_msg=k)
    assert fused_cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert fused_cfg["target_modules"] == []


def test_fuse_refuses_what_param_wrapper_refuses(peft_model):
    _, tensors, cfg = peft_model
    per_expert, out_cfg = peft_experts.unfuse(tensors, dict(cfg, target_modules=[]))
    with pytest.raises(ValueError, match="lora_dropout"):
        peft_experts.fuse(per_expert, dict(out_cfg, lora_dropout=0.1))
    missing = {k: v for k, v in per_expert.items() if ".experts.1.down_proj" not in k}
    with pytest.raises(ValueError, match="every expert"):
        peft_experts.fuse(missing, out_cfg)
