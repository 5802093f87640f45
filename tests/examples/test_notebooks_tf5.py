"""Both notebooks execute in a second virtual environment as on today's Colab:
transformers 5 (no Flax models at all), no torch, no PEFT (``.venv-tf5``, made by
``scripts/venv-tf5.sh``; an up-to-date one is reused). A notebook that imports anything
only transformers 4 has, or that needs torch, fails here. quickstart_tpu.ipynb runs its
offline path (a random Qwen3 over bytes); its PyTorch check must say it was skipped.

``JLORA_SKIP_TF5=1`` skips this file (nothing else does: a failed install fails the test).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from support.notebook_checks import ROOT, check_lora_explained, check_quickstart, count_row, run_notebook

if os.environ.get("JLORA_SKIP_TF5") == "1":
    pytest.skip("JLORA_SKIP_TF5=1", allow_module_level=True)


@pytest.fixture(scope="module")
def tf5_python() -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "venv-tf5.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"scripts/venv-tf5.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"\n{proc.stdout.strip()} [{time.perf_counter() - t0:.0f}s]")
    return str(ROOT / ".venv-tf5" / "bin" / "python")


def test_tf5_environment(tf5_python):
    code = ("import importlib.util, transformers; "
            "print(transformers.__version__, hasattr(transformers, 'FlaxBertModel'), "
            "importlib.util.find_spec('torch') is None, importlib.util.find_spec('peft') is None)")
    out = subprocess.run([tf5_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0].split(".")[0]) >= 5 and out[1:] == ["False", "True", "True"], out


def test_quickstart_tf5(tf5_python, tmp_path):
    out = run_notebook("quickstart_tpu.ipynb", tf5_python, {"OUT_DIR = \"runs/quickstart\"": f"OUT_DIR = {str(tmp_path)!r}"})
    assert out["python"].startswith(str(ROOT / ".venv-tf5")), out["python"]
    text = check_quickstart(out)
    assert "transformers 5." in text and "Qwen3: 4 layers, width 128, vocab 256" in text
    assert "PyTorch check skipped: torch is not installed" in text
    print(f"\nquickstart_tpu.ipynb under transformers 5: {out['seconds']:.0f}s")


def test_lora_explained_tf5(tf5_python):
    out = run_notebook("lora_explained.ipynb", tf5_python)
    text = check_lora_explained(out)
    assert "(transformers 5." in text  # the install cell's report
    trainable, total = count_row(text, 8)
    assert 0 < trainable < total
    print(f"\nlora_explained.ipynb under transformers 5: {out['seconds']:.0f}s")
