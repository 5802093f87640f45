"""Running the notebooks (in any virtual environment) and what their outputs must say.

Used by tests/test_notebooks.py (the pinned environment: transformers 4.57, torch, PEFT)
and tests/test_notebooks_tf5.py (``.venv-tf5``: transformers 5, no torch). Each check
reads a line that only a correct run prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def run_notebook(name: str, python: str, subs: Optional[dict] = None, timeout: int = 1200) -> dict:
    """Executes ``notebooks/<name>`` with ``python`` (its kernel runs in that environment),
    in smoke mode and offline; returns ``{"text", "images", "seconds", "python"}``."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", JLORA_SMOKE="1", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [python, str(ROOT / "tests" / "support" / "run_notebook.py"), str(NOTEBOOKS / name), "--subs", json.dumps(subs or {})]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed under {python} (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout)


def check_quickstart(out: dict, learns: bool = True) -> str:
    """``learns``: the training loss must go down (the offline path's random model over
    bytes learns in 20 steps; a random base under LoRA alone need not)."""
    text = out["text"]
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+", text), text[-3000:]
    assert re.search(r"layers/0/attn/q_proj/w\s+W \(\d+, \d+, \d+\)", text), text[-3000:]  # einsum kernels wrapped
    assert "wrapped == base: True" in text, text[-4000:]
    m = re.search(r"loss ([\d.]+) -> ([\d.]+) in", text)
    assert m, text[-3000:]
    assert float(m.group(2)) < float(m.group(1)) or not learns, m.group(0)
    assert "merged == adapter: True" in text, text[-4000:]
    assert "reloaded == trained: True" in text, text[-4000:]
    assert "adapter_model.safetensors" in text and "fine-tuned (merged)" in text, text[-4000:]
    assert out["images"] == 1, out["images"]  # the loss curve
    return text


def check_lora_explained(out: dict) -> str:
    text = out["text"]
    assert "layer 0 query kernel W: (384, 384) float32" in text, text[-3000:]
    assert re.search(r"numerical rank: ΔW (\d+) \(r = \1\), W 384", text), text[-3000:]
    assert "merge == W + s*A@B: True" in text, text[-4000:]
    assert "merged model == adapter model: True" in text, text[-4000:]
    assert re.search(r"Qwen3-0\.6B, abstract: [\d,]+ parameters, 0 bytes allocated", text), text[-3000:]
    assert out["images"] == 3, out["images"]  # singular values, update size vs rank, parameter counts
    return text


def count_row(text: str, r: int) -> tuple[int, int]:
    """``(trainable, all)`` of the rank-``r`` row of lora_explained's parameter table."""
    m = re.search(rf"^\s+{r}\s+([\d,]+)\s+([\d,]+)\s+[\d.]+%", text, re.M)
    assert m, text[-3000:]
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
