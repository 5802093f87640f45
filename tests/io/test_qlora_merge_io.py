"""Merging over a quantized base, and storing the base (Orbax; bitsandbytes' keys).

References: the factored forward over the quantized base (for the dense merge); the
re-quantization bitsandbytes itself computes (``quantize_4bit`` / ``dequantize_4bit`` of
the merged weight) for the share of ΔW that survives; ``bnb.nn.Linear4bit`` /
``Linear8bitLt`` loading jlora's state dict, and jlora loading theirs.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.io import quant_storage
from jlora.quant import RequantizeWarning

torch = pytest.importorskip("torch")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
bnb_F = bnb.functional


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(256, name="up")(x))
        h = nn.gelu(nn.Dense(128, name="mid")(h))
        return nn.Dense(64, name="down")(h)


@pytest.fixture(scope="module")
def net():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (8, 128))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    return model, params, x


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_is_dense_in_compute_dtype_and_reproduces_the_forward(net, use_dora):
    model, params, x = net
    q = jlora.quantize(params, jlora.QuantConfig(compute_dtype=jnp.float32))
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"], init_lora_weights=False,
                                        use_dora=use_dora))
    if use_dora:  # DoRA's magnitude away from ‖W‖ (else DoRA is plain LoRA here)
        is_lw = lambda x: isinstance(x, jlora.LoraWeight)  # noqa: E731
        spread = lambda x: x.replace(magnitude=x.magnitude * jnp.linspace(0.5, 1.5, x.magnitude.size))  # noqa: E731
        lp = jax.tree_util.tree_map(lambda x: spread(x) if is_lw(x) else x, lp, is_leaf=is_lw)
    merged = jlora.merge(lp)
    for name in ("up", "mid", "down"):  # the non-target "down" is dequantized too
        assert isinstance(merged[name]["kernel"], jax.Array) and merged[name]["kernel"].dtype == jnp.float32
    y = jlora.lora(lambda p, x: model.apply({"params": p}, x), on_materialize="error")(lp, x)
    assert rel_err(model.apply({"params": merged}, x), y) < 1e-5
    with pytest.raises(ValueError, match="merge_adapter/unmerge_adapter over a quantized base"):
        jlora.merge_adapter(lp)


def test_requantizing_merge_drops_a_small_update_as_bitsandbytes_does():
    """The reference's §9.8 setup: W ~ N(0, 0.02²), PyTorch shape 256 x 512, NF4 + double
    quantization, a rank-4 ΔW with ‖ΔW‖/‖W‖ = 0.01 or 0.2. The surviving share equals the
    one bitsandbytes' own re-quantization of the same merged weight gives."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 512)) * 0.02).astype(np.float32)  # torch (out, in)
    a = rng.standard_normal((512, 4)).astype(np.float32)
    b = rng.standard_normal((4, 256)).astype(np.float32)
    q = jlora.quantize({"lin": {"kernel": jnp.asarray(w.T)}}, jlora.QuantConfig(compute_dtype=jnp.float32))
    w0 = np.asarray(q["lin"]["kernel"].dequantize())
    survival = {}
    for ratio in (0.01, 0.2):
        scale = float(ratio * np.linalg.norm(w) / np.linalg.norm(a @ b))
        lw = jlora.LoraWeight(q["lin"]["kernel"], jnp.asarray(a), jnp.asarray(b), scale=scale)
        with pytest.warns(RequantizeWarning, match="kept"):
            out, report = jlora.merge({"lin": {"kernel": lw}}, requantize=True, with_report=True)
        requant = out["lin"]["kernel"]
        assert isinstance(requant, jlora.QuantizedArray) and requant.config == q["lin"]["kernel"].config
        # bitsandbytes re-quantizing the same merged weight (its offset: torch's mean)
        merged = torch.tensor((w0 + scale * (a @ b)).T.copy())
        packed, state = bnb_F.quantize_4bit(merged, blocksize=64, quant_type="nf4", compress_statistics=True)
        codes_equal = np.mean(np.asarray(requant.codes).reshape(-1) == packed.reshape(-1).numpy())
        assert codes_equal > 0.999
        kept = bnb_F.dequantize_4bit(packed, state).numpy().T - w0
        d = scale * (a @ b)
        ref = float(np.vdot(kept, d) / np.vdot(d, d))
        survival[ratio] = report.survival
        assert abs(report.survival - ref) < 0.02, (ratio, report.survival, ref)
        assert report.kernels["lin/kernel"][0] == pytest.approx(report.survival)
    assert survival[0.01] < 0.1 and survival[0.2] > 0.9


def test_orbax_save_and_load_quantized(net, tmp_path):
    model, params, x = net
    q = jlora.quantize(params, jlora.QuantConfig(quant_type="nf4", compute_dtype=jnp.float32,
                                                   skip_modules=["down"]))
    jlora.save_quantized(tmp_path / "base", q)
    back = jlora.load_quantized(tmp_path / "base")
    abstract = jax.eval_shape(lambda p: jlora.quantize(p, jlora.QuantConfig(compute_dtype=jnp.float32,
                                                                             skip_modules=["down"])), params)
    # Orbax's own API on the pytree, with a template from eval_shape
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "plain", q)
    checkpointer.wait_until_finished()
    direct = checkpointer.restore(tmp_path / "plain", abstract)
    for tree in (back, direct, jlora.load_quantized(tmp_path / "base", target=abstract)):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(q)
        for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(tree)):
            assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert str(back["up"]["kernel"]) == str(q["up"]["kernel"])
    meta = quant_storage.quantized_metadata(tmp_path / "base")
    assert meta["quantization"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert meta["quantization"]["quantized_kernels"] == 2
    with pytest.raises(FileExistsError):
        jlora.save_quantized(tmp_path / "base", q)
    with pytest.raises(ValueError, match="holds no jlora.QuantizedArray"):
        jlora.save_quantized(tmp_path / "none", params)


@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False), ("int8", False)])
def test_bitsandbytes_state_dict_round_trip(quant_type, dq):
    """jlora's kernel as a ``bnb.nn.Linear4bit``/``Linear8bitLt`` state dict: bitsandbytes
    loads it and dequantizes to jlora's values; bitsandbytes' own state dict loads into
    jlora and dequantizes to bitsandbytes' values."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    kernel = jnp.asarray(lin.weight.detach().numpy().T)
    config = jlora.QuantConfig(quant_type=quant_type, double_quant=dq, compute_dtype=jnp.float32)
    q = jlora.quantize_array(kernel, config)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in quant_storage.to_bnb_state_dict(q).items()}
    if quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
        layer.load_state_dict(torch.nn.Linear(128, 64, bias=False).state_dict())
        layer = layer.to("cpu")  # quantized; now it takes a quantized checkpoint
        layer.load_state_dict(sd)
        ref = bnb_F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    else:
        # how transformers loads a pre-quantized 4-bit checkpoint
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
        ref = bnb_F.dequantize_4bit(weight.data, weight.quant_state)
    np.testing.assert_array_equal(np.asarray(q.dequantize()).T, ref.numpy())

    # the other way: bitsandbytes quantizes, jlora reads its state dict
    if quant_type == "int8":
        theirs = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
        theirs.load_state_dict(lin.state_dict())
        theirs = theirs.to("cpu")
        ref = bnb_F.int8_vectorwise_dequant(theirs.weight.data, theirs.weight.SCB)
    else:
        theirs = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type=quant_type,
                                   compress_statistics=dq)
        theirs.load_state_dict(lin.state_dict())
        theirs = theirs.to("cpu")
        ref = bnb_F.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    loaded = quant_storage.from_bnb_state_dict(theirs.state_dict(), compute_dtype=jnp.float32)
    assert loaded.shape == (128, 64) and loaded.layout == ("in", "out")
    np.testing.assert_array_equal(np.asarray(loaded.dequantize(jnp.float32)).T, ref.numpy())


def test_adapter_files_stay_plain_lora_and_inspect_shows_the_base(net, tmp_path):
    """jlora.save / save_peft over a quantized base write the factors only (the PEFT file:
    lora_A/lora_B tensors, nothing of the base), loading them over the same quantized base
    gives the same forward, and ``jlora inspect`` reports the base's quantization."""
    import io
    import json

    from safetensors import safe_open

    from jlora import cli

    model, params, x = net
    q = jlora.quantize(params, jlora.QuantConfig(compute_dtype=jnp.float32))
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"], init_lora_weights=False)
    lp = jlora.wrap(q, config, rng=jax.random.key(2))
    jlora.save(tmp_path / "orbax", lp, config=config)
    jlora.save_peft(tmp_path / "peft", lp, config=config)
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="numpy") as f:
        keys = sorted(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    forward = jlora.lora(lambda p, x: model.apply({"params": p}, x), on_materialize="error")
    y = forward(lp, x)
    for back in (jlora.load(tmp_path / "orbax", q), jlora.load_peft(tmp_path / "peft", q)):
        assert isinstance(back["up"]["kernel"].w, jlora.QuantizedArray)
        np.testing.assert_array_equal(np.asarray(forward(back, x)), np.asarray(y))
    for sub in ("orbax", "peft"):
        buf = io.StringIO()
        summary = cli.inspect_adapter(str(tmp_path / sub), as_json=True, out=buf)
        base = json.loads(buf.getvalue())["base_quantization"]
        assert base == summary["base_quantization"]
        assert base["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and base["quantized_kernels"] == 3
        text = io.StringIO()
        cli.inspect_adapter(str(tmp_path / sub), out=text)
        assert "base: quantized, nf4 + double quantization (blocks of 64)" in text.getvalue()
