"""The ``jlora`` command (inspect, convert) and the GPT-2 small adapter on disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jlora
from jlora import cli

GPT2_SMALL_LORA = 811_008  # r=8 on c_attn / c_proj (attn and mlp), as PEFT counts it


def _is_node(x):
    return isinstance(x, (jlora.LoraWeight, jlora.Trainable))


def _fill(alp, seed=0):
    """Random A and B (numpy) in an abstractly wrapped tree; the base stays abstract."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if isinstance(x, jlora.LoraWeight):
            return x.replace(a=rng.standard_normal(x.a.shape, np.float32), b=rng.standard_normal(x.b.shape, np.float32))
        if isinstance(x, jlora.Trainable):
            return jlora.Trainable(rng.standard_normal(x.value.shape, np.float32))
        return x

    return jax.tree_util.tree_map(fill, alp, is_leaf=_is_node)


@pytest.fixture(scope="module")
def gpt2_small(tmp_path_factory):
    """GPT-2 small (shapes only: no 500 MB base is allocated) with r=8 on c_attn/c_proj,
    saved as an Orbax checkpoint."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    model = FlaxGPT2LMHeadModel(GPT2Config(), _do_init=False)
    params = jax.eval_shape(lambda k: model.init_weights(k, (1, 1)), jax.random.key(0))
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
    lp = _fill(jlora.wrap(params, config))
    assert jlora.count_parameters(lp) == (GPT2_SMALL_LORA, 125_250_816)
    d = tmp_path_factory.mktemp("gpt2small")
    jlora.save(d / "orbax", lp, config=config)
    return params, lp, d / "orbax"


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_gpt2_small_checkpoint_size(gpt2_small):
    """About 811,008 × 4 bytes plus metadata (Orbax's zstd trims a little off random floats)."""
    _, _, path = gpt2_small
    size = _disk(path)
    assert 0.85 * GPT2_SMALL_LORA * 4 < size < GPT2_SMALL_LORA * 4 + 100_000, size


def test_inspect_gpt2_small_orbax_and_peft(gpt2_small, tmp_path, capsys):
    _, _, path = gpt2_small
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 811,008" in out
    assert "jlora Orbax checkpoint" in out and "r=8 lora_alpha=16" in out
    assert "transformer.h.11.mlp.c_proj" in out and "(8, 3072)" in out and "(768, 8)" in out
    assert "size on disk:" in out

    assert cli.main(["convert", str(path), str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "PEFT adapter" in out and "parameters: 811,008" in out
    assert "transformer.h.0.attn.c_attn" in out and "(8, 768)" in out and "(2304, 8)" in out

    assert cli.main(["inspect", "--json", str(tmp_path / "peft")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == GPT2_SMALL_LORA and len(summary["targets"]) == 36


def test_console_script(gpt2_small):
    """The installed ``jlora`` entry point (or ``python -m jlora.cli``)."""
    _, _, path = gpt2_small
    exe = Path(sys.executable).parent / "jlora"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jlora.cli"]
    proc = subprocess.run(cmd + ["inspect", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parameters: 811,008" in proc.stdout


def _tensors(d: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_convert_orbax_peft_orbax_is_bit_identical(gpt2_small, tmp_path):
    params, lp, path = gpt2_small
    assert cli.main(["convert", str(path), str(tmp_path / "peft")]) == 0
    assert cli.main(["convert", str(tmp_path / "peft"), str(tmp_path / "orbax2")]) == 0
    back = jlora.load(tmp_path / "orbax2", params)
    first = jlora.load(path, params)
    for (p1, x), (p2, y) in zip(jlora.lora_leaves(back), jlora.lora_leaves(first)):
        assert p1 == p2 and x.layout == y.layout and x.scale == y.scale
        assert np.array_equal(np.asarray(x.a), np.asarray(y.a)) and np.array_equal(np.asarray(x.b), np.asarray(y.b))
    # and it is the adapter we saved
    for (_, x), (_, y) in zip(jlora.lora_leaves(first), jlora.lora_leaves(lp)):
        assert np.array_equal(np.asarray(x.a), y.a) and np.array_equal(np.asarray(x.b), y.b)


def test_convert_peft_orbax_peft_is_bit_identical(tmp_path):
    """An adapter written by PEFT itself (with trained biases) survives PEFT → Orbax → PEFT:
    the same tensors under the same names, the same config."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], bias="lora_only",
                               init_lora_weights=False, rank_pattern={"wte": 2})
    )
    pm.save_pretrained(tmp_path / "peft")
    assert cli.main(["convert", str(tmp_path / "peft"), str(tmp_path / "orbax")]) == 0
    assert cli.main(["convert", str(tmp_path / "orbax"), str(tmp_path / "peft2")]) == 0
    t1, t2 = _tensors(tmp_path / "peft"), _tensors(tmp_path / "peft2")
    assert sorted(t1) == sorted(t2)
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and np.array_equal(t1[k], t2[k]), k
    c1 = jlora.io.read_peft_config(tmp_path / "peft")
    c2 = jlora.io.read_peft_config(tmp_path / "peft2")
    assert c1.replace(inference_mode=False) == c2.replace(inference_mode=False)
    # a jlora-written PEFT adapter converts back to byte-identical files
    assert cli.main(["convert", str(tmp_path / "peft2"), str(tmp_path / "orbax2")]) == 0
    assert cli.main(["convert", str(tmp_path / "orbax2"), str(tmp_path / "peft3")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft2" / name).read_bytes() == (tmp_path / "peft3" / name).read_bytes()
    # and PEFT accepts the converted adapter (on a fresh base: `model` is wrapped already)
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft3")
    assert loaded.peft_config["default"].rank_pattern == {"wte": 2}
    ids = torch.arange(12).reshape(2, 6) % 50
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids).logits, pm.eval()(ids).logits, atol=1e-6)


def test_convert_refuses_to_overwrite(gpt2_small, tmp_path, capsys):
    _, _, path = gpt2_small
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    before = hashlib.sha256((tmp_path / "dst" / "keep.txt").read_bytes()).hexdigest()
    assert cli.main(["convert", str(path), str(tmp_path / "dst")]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["convert", str(path), str(tmp_path / "dst"), "--overwrite"]) == 1
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert hashlib.sha256((tmp_path / "dst" / "keep.txt").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["keep.txt"]


def test_inspect_errors(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
    assert "no such adapter" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 1
    assert "neither a PEFT adapter" in capsys.readouterr().err
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert cli.main(["inspect", str(tmp_path / "p")]) == 1
    assert "adapter_config.json" in capsys.readouterr().err
