"""``benchmarks/gpu.py --tiny`` runs (on CPU here) and its numbers hold together: the three
train steps start from the same model (jlora's factored LoRA with B = 0, JAX full
fine-tuning, PEFT on the torch twin with the weights copied over), jlora and PEFT count
the same trainable parameters, and the merge matches W + s·A·B formed independently."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch  # the references are torch / PEFT

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("jlora_gpu_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("gpu") / "gpu_tiny.json"
    assert mod.main(["--tiny", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_phase_ran(result):
    steps = result["steps"]
    for name in ("jlora", "full (JAX)", "peft (torch)"):
        assert "skipped" not in steps[name], (name, steps[name])
        assert steps[name]["tokens_per_s"] > 0 and math.isfinite(steps[name]["mfu"])
        assert len(steps[name]["step_ms_all"]) >= 1
    assert "skipped" not in result["merge"]
    assert result["merge"]["merge_gb_per_s"] > 0 and result["merge"]["copy_gb_per_s"] > 0


def test_same_starting_model_in_all_three_steps(result):
    steps = result["steps"]
    first = {name: steps[name]["losses"][0] for name in ("jlora", "full (JAX)", "peft (torch)")}
    # bfloat16 weights and activations: agreement to bfloat16 rounding of a ~6.2 loss
    assert abs(first["jlora"] - first["full (JAX)"]) <= 2e-2, first
    assert abs(first["jlora"] - first["peft (torch)"]) <= 5e-2, first
    assert steps["peft (torch)"]["missing_keys"] == [] and steps["peft (torch)"]["unexpected_keys"] == []


def test_trainable_counts_match_peft(result):
    steps = result["steps"]
    assert steps["jlora"]["trainable_params"] == steps["peft (torch)"]["trainable_params"]
    assert steps["jlora"]["total_params"] == steps["peft (torch)"]["total_params"]


def test_merge_matches_reference(result):
    m = result["merge"]
    # W + s·A·B in float32 rounded once to bfloat16 (8 bits of mantissa)
    assert m["max_abs_error_vs_reference"] <= 2 ** -8 * m["reference_max_abs"]
    assert m["reference_max_abs"] > 0
