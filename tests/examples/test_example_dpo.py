"""``examples/dpo.py --smoke`` runs, says what it should, and its adapter loads in PEFT.

The adapter is saved in PEFT's format over the SFT-merged base, which the example writes
as a Hugging Face checkpoint with Flax and PyTorch weights (transformers' own conversion).
PyTorch's ``LlamaForCausalLM`` on it with ``PeftModel.from_pretrained`` must give the
policy log-probs the example computed in JAX, and with ``disable_adapter()`` the
reference log-probs.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from support.examples import run_example


def test_dpo_smoke(tmp_path):
    out = run_example("dpo.py", "--smoke", "--output-dir", str(tmp_path))  # one decoder layer: 7 targets
    assert re.search(r"reference = jlora.disable_adapter\(lp\): the same W buffers as the policy for all 7 "
                     r"targets \(no copy\): True", out), out[-3000:]
    m = re.search(r"DPO/SFT ([\d.]+)\)", out)
    assert m and abs(float(m.group(1)) - 1.0) <= 0.02, out[-3000:]
    m = re.search(r"^\s*reward accuracy \(ties count 1/2\)\s+([\d.]+)\s+([\d.]+)\s*$", out, re.M)
    assert m, out[-3000:]
    assert float(m.group(1)) == 0.5 and 0.0 <= float(m.group(2)) <= 1.0  # a fresh adapter: policy == reference
    assert "read back identical: True" in out
    for f in ("dpo_curves.png", "metrics.json", "adapter_peft/adapter_config.json",
              "adapter_peft/adapter_model.safetensors", "sft_base/config.json", "sft_base/model.safetensors"):
        assert (tmp_path / f).is_file(), f
    assert (tmp_path / "dpo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["after"]["reward_accuracy"] == pytest.approx(float(m.group(2)), abs=1e-3)
    assert len(metrics["losses"]) == metrics["args"]["steps"]

    check_in_peft(tmp_path, metrics)


def check_in_peft(tmp_path, metrics):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_base")  # the PyTorch twin the example wrote
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter_peft").eval()
    cfg = json.loads((tmp_path / "adapter_peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == metrics["args"]["rank"]

    def logps(model, ids, mask):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)
        return (lsm.gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(-1).numpy()

    sample = metrics["sample"]
    ids = [s["ids_c"] for s in sample] + [s["ids_r"] for s in sample]
    mask = [s["m_c"] for s in sample] + [s["m_r"] for s in sample]
    policy = np.array([s["pi"] for s in sample]).T.reshape(-1)  # chosen rows, then rejected rows
    reference = np.array([s["ref"] for s in sample]).T.reshape(-1)
    np.testing.assert_allclose(logps(pm, ids, mask), policy, rtol=1e-4, atol=1e-3)
    with pm.disable_adapter():
        np.testing.assert_allclose(logps(pm, ids, mask), reference, rtol=1e-4, atol=1e-3)
    assert np.abs(policy - reference).max() > 1e-4  # the adapter changed something, so both checks mean something
