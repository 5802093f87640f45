"""examples/nnx_finetune.py --smoke: an NNX Gemma 3 with the memory settings (stacked layers
under one scan, remat "full", blockwise attention, the chunked loss) wrapped, trained,
merged back into the module, saved in both formats; the PEFT files it writes (one adapter
per layer), loaded by PEFT on the PyTorch model of the base it saved, compute what the
merged model it saved computes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from support.examples import run_example

pytestmark = pytest.mark.torch  # the references are torch / PEFT


def test_nnx_finetune_smoke(tmp_path):
    out = run_example("nnx_finetune.py", "--smoke", "--family", "gemma3", "--scan-layers", "--remat", "full",
                      "--attention", "blockwise", "--output-dir", str(tmp_path))
    assert "model: Gemma3 (random)" in out and "(stacked, one scan), remat full, attention blockwise" in out
    assert "trainable params:" in out
    m = re.search(r"explain: (\d+) targets factored, (\d+) materialised", out)
    assert m and int(m.group(1)) == 6 and int(m.group(2)) == 0, out[-3000:]  # one stacked kernel per module
    m = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out[-3000:]
    assert "read back: Orbax identical True, PEFT identical True" in out
    assert "merged model == adapter model: True" in out

    import peft
    import torch
    import transformers

    ids = torch.tensor(np.random.RandomState(0).randint(0, 256, (2, 16)))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter-peft")).eval()
    with torch.no_grad():
        want = merged(ids).logits.numpy()
        got = pm(ids).logits.numpy()
        plain = pm.get_base_model()
        with pm.disable_adapter():
            before = plain(ids).logits.numpy()
    assert float(np.abs(got - want).max()) <= 1e-4
    assert float(np.abs(got - before).max()) > 1e-3  # the adapter is not a no-op
