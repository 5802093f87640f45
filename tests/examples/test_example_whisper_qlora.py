"""examples/whisper_qlora.py --smoke: LoRA on Whisper over an NF4 base, the adapter loaded
by PEFT on the PyTorch Whisper (dense linears, and bitsandbytes Linear4bit layers holding
jlora's bytes) with matching logits."""

from __future__ import annotations

import re

import pytest

from support.examples import run_example

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_whisper_qlora_smoke():
    out = run_example("whisper_qlora.py", "--smoke")
    m = re.search(r"quantized (\d+) kernels \(nf4\): ([\d,]+) bytes vs ([\d,]+) in float32", out)
    assert m and int(m.group(1)) == 6 + 10, out[-3000:]  # one encoder and one decoder layer in --smoke
    assert int(m.group(2).replace(",", "")) < 0.15 * int(m.group(3).replace(",", ""))
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", out)
    loss = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", out)
    assert loss and float(loss.group(2)) < float(loss.group(1)), out[-3000:]
    assert "quantized base bit-identical after training: True" in out
    assert "PEFT on torch Whisper (dequantized linears) matches jlora: True" in out
    assert "PEFT on torch Whisper (bitsandbytes Linear4bit) matches jlora: True" in out
