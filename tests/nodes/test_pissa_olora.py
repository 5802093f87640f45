"""PiSSA (``init_lora_weights="pissa"`` / ``"pissa_niter_N"``) and OLoRA (``"olora"``)
against PEFT 0.21.2 on torch CPU: the residual base and ``s·B·A`` equal PEFT's on the
same weights (sign-invariant: products), the output is unchanged at init, ``unload``
gives the original base, the converted adapter (rank 2r) loads in PEFT on the original
base, unconverted files load both ways (the init is run again), bfloat16 bases."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest


import jlora  # noqa: E402
from support import models  # noqa: E402
from jlora.nodes.factors import delta  # noqa: E402
from support.variant_helpers import IDS, jitted, rel_err, torch_logits, torch_state, torch_twin  # noqa: E402

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

CASES = {"gpt2": models.gpt2, "llama": models.llama}
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def _kernels(lp, fn):
    """The tree with every LoraWeight replaced by ``fn(lw)`` (a kernel-shaped array)."""
    return jax.tree_util.tree_map(lambda x: fn(x) if isinstance(x, jlora.LoraWeight) else x, lp,
                                  is_leaf=lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable)))


def _target_names(pm) -> list[str]:
    return [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize("name, init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_residual_and_delta_equal_peft(name, init):
    """Same W → same residual W − s·B·A and same s·B·A as PEFT (≤ 1e-4), output unchanged
    at init (≤ 1e-5 relative), unload gives the original base."""
    case = CASES[name]()
    pm = peft.get_peft_model(torch_twin(case), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name],
                                                               init_lora_weights=init))
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights=init)
    lp = jlora.wrap(case.params, config)
    residual = torch_state(_kernels(lp, lambda x: x.w))
    deltas = torch_state(_kernels(lp, lambda x: x.scale * delta(x.a, x.b, x.layout)))
    modules = _target_names(pm)
    assert len(modules) == len(jlora.lora_leaves(lp))
    for m in modules:
        layer = pm.base_model.model.get_submodule(m)
        ref_res = layer.base_layer.weight.detach().numpy()
        ref_delta = layer.get_delta_weight("default").detach().numpy()
        assert np.abs(residual[m + ".weight"].numpy() - ref_res).max() <= 1e-4, m
        assert np.abs(deltas[m + ".weight"].numpy() - ref_delta).max() <= 1e-4, m
    forward = jitted(case.apply)
    base = np.asarray(jax.jit(case.apply)(case.params, jnp.asarray(IDS)))
    assert rel_err(forward(lp, jnp.asarray(IDS)), base) <= 1e-5
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, y: bool(np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-6), jlora.unload(lp), case.params))
    # A0/B0 are frozen: labelled so, no optimizer state
    labels = jlora.trainable_labels(lp)
    lw = jlora.lora_leaves(labels)[0][1]
    assert (lw.a, lw.b, lw.a0, lw.b0) == ("trainable", "trainable", "frozen", "frozen")
    state = jlora.optimizer(__import__("optax").adam(1e-3)).init(lp)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0)
    assert n_state == 2 * jlora.count_parameters(lp)[0]


def test_olora_on_gpt2_conv1d_is_the_qr_of_the_linear_weight():
    """GPT-2's Conv1D stores W as (in, out): OLoRA is the QR of the nn.Linear-layout
    weight Wᵀ (PEFT's OLoRA takes the QR of the stored matrix and fails there)."""
    case = models.gpt2()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora")
    lp = jlora.wrap(case.params, config)
    deltas = torch_state(_kernels(lp, lambda x: x.scale * delta(x.a, x.b, x.layout)))
    original = torch_state(case.params)
    for path, lw in jlora.lora_leaves(lp):
        tname = path.replace("/", ".").replace(".kernel", ".weight")
        w_lin = original[tname].T  # (out, in), the nn.Linear layout
        q, r = torch.linalg.qr(w_lin)
        ref = (2.0 * q[:, :4] @ r[:4]).T.numpy()
        assert np.abs(deltas[tname].numpy() - ref).max() <= 1e-4, path
        b = np.asarray(lw.b)  # B = Q_r: orthonormal
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
    assert rel_err(jitted(case.apply)(lp, jnp.asarray(IDS)), case.apply(case.params, jnp.asarray(IDS))) <= 1e-5


def _train(lp, seed=0):
    """Stands in for training: moves A, B and the Trainable leaves."""
    rng = np.random.default_rng(seed)

    def f(x):
        if isinstance(x, jlora.LoraWeight):
            return x.replace(a=x.a + 0.05 * rng.standard_normal(x.a.shape).astype(np.float32),
                             b=x.b + 0.05 * rng.standard_normal(x.b.shape).astype(np.float32))
        if isinstance(x, jlora.Trainable):
            return jlora.Trainable(x.value + 0.02)
        return x

    return jax.tree_util.tree_map(f, lp, is_leaf=lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable)))


@pytest.mark.parametrize("name, init", [("llama", "pissa"), ("gpt2", "olora")])
def test_saved_adapter_in_peft_on_the_original_base(name, init, tmp_path):
    """convert_to_lora=True: a plain LoRA of rank 2r (A' = [A; A0], B' = [B, −B0]) that PEFT
    loads on the ORIGINAL base with the trained model's logits; modules_to_save survive.
    Unconverted: PEFT's own PiSSA files (PEFT re-runs the init on the original base), and
    jlora.load_peft / jlora.load do the same."""
    case = CASES[name]()
    extra = {"modules_to_save": ["lm_head"]} if name == "llama" else {}
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights=init, **extra)
    lp = _train(jlora.wrap(case.params, config))
    forward = jitted(case.apply)
    ids = jnp.asarray(IDS)
    trained = np.asarray(forward(lp, ids))
    assert rel_err(trained, case.apply(case.params, ids)) > 1e-3  # training changed the model

    jlora.save_peft(tmp_path / "conv", lp, config=config, convert_to_lora=True)
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    pm = peft.PeftModel.from_pretrained(torch_twin(case), tmp_path / "conv").eval()
    assert rel_err(torch_logits(pm), trained) <= 1e-4
    if extra:
        assert any(n.endswith("lm_head.modules_to_save.default.weight") for n, _ in pm.named_parameters())
    back = jlora.load_peft(tmp_path / "conv", case.params)  # a plain LoRA over the original base
    assert rel_err(forward(back, ids), trained) <= 1e-4

    if name == "llama":  # PEFT's OLoRA cannot run on GPT-2's Conv1D: only the converted file loads there
        jlora.save_peft(tmp_path / "raw", lp, config=config)
        assert json.loads((tmp_path / "raw" / "adapter_config.json").read_text())["init_lora_weights"] == init
        pm = peft.PeftModel.from_pretrained(torch_twin(case), tmp_path / "raw").eval()
        assert rel_err(torch_logits(pm), trained) <= 1e-4
    again = jlora.load_peft(tmp_path / "raw" if name == "llama" else tmp_path / "conv", case.params)
    assert rel_err(forward(again, ids), trained) <= 1e-4
    jlora.save(tmp_path / "orbax", lp, config=config)
    restored = jlora.load(tmp_path / "orbax", case.params)
    np.testing.assert_array_equal(np.asarray(forward(restored, ids)), trained)
    for x, y in zip(jax.tree_util.tree_leaves(jlora.unload(restored)), jax.tree_util.tree_leaves(jlora.unload(lp))):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-6  # the original base (and the trained head)


def test_peft_pissa_adapters_load_in_jlora(tmp_path):
    """PEFT PiSSA adapter, unconverted: jlora re-runs the SVD on the original base, then
    loads A and B (exact); PEFT's converted adapter loads on the original base too."""
    case = models.llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="pissa")
    pm = peft.get_peft_model(torch_twin(case), cfg).eval()
    pm.save_pretrained(tmp_path / "init")
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    ref = torch_logits(pm)
    pm.save_pretrained(tmp_path / "raw")
    pm.save_pretrained(tmp_path / "peft-conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    forward = jitted(case.apply)
    ids = jnp.asarray(IDS)
    lp = jlora.load_peft(tmp_path / "raw", case.params)
    assert rel_err(forward(lp, ids), ref) <= 1e-4
    assert all(x.init == "pissa" and x.a0 is not None for _, x in jlora.lora_leaves(lp))
    converted = jlora.load_peft(tmp_path / "peft-conv", case.params)
    assert rel_err(forward(converted, ids), ref) <= 1e-4

    from jlora.cli import inspect_adapter

    import io

    info = inspect_adapter(str(tmp_path / "raw"), as_json=True, out=io.StringIO())
    assert (info["init_lora_weights"], info["needs_residual_base"]) == ("pissa", True)
    info = inspect_adapter(str(tmp_path / "peft-conv"), as_json=True, out=io.StringIO())
    assert info["needs_residual_base"] is False


class _Dense:
    def __init__(self, d_in=48, d_out=40, dtype=jnp.float32, seed=0):
        import flax.linen as nn

        rng = np.random.default_rng(seed)
        u, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
        v, _ = np.linalg.qr(rng.standard_normal((d_out, d_out)))
        k = min(d_in, d_out)
        spectrum = 0.5 ** np.arange(k) + 0.01  # decaying, so the randomised SVD has a clear top
        kernel = (u[:, :k] * spectrum) @ v[:k]
        self.module = nn.Dense(d_out, dtype=dtype)
        self.params = {"lin": {"kernel": jnp.asarray(kernel, dtype), "bias": jnp.zeros((d_out,), dtype)}}
        self.x = jnp.asarray(rng.standard_normal((6, d_in)), dtype)
        self.apply = lambda p, x: self.module.apply({"params": p["lin"]}, x)


def test_pissa_niter_invariants_and_reproducibility(tmp_path):
    """pissa_niter_N: residual identity, output unchanged, top-r subspace of the exact SVD;
    the same rng reproduces it (wrap and load_peft), the Orbax checkpoint without rng."""
    lin = _Dense()
    exact = jlora.wrap(lin.params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="pissa"))
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="pissa_niter_4")
    lp = jlora.wrap(lin.params, config, rng=jax.random.key(7))
    lw, ex = lp["lin"]["kernel"], exact["lin"]["kernel"]
    d_niter = np.asarray(lw.scale * delta(lw.a, lw.b, lw.layout))
    d_exact = np.asarray(ex.scale * delta(ex.a, ex.b, ex.layout))
    assert rel_err(d_niter, d_exact) <= 1e-3
    w = np.asarray(lin.params["lin"]["kernel"])
    assert np.abs(np.asarray(lw.w) + d_niter - w).max() <= 1e-6
    forward = jax.jit(jlora.lora(lin.apply))
    assert rel_err(forward(lp, lin.x), lin.apply(lin.params, lin.x)) <= 1e-5
    again = jlora.wrap(lin.params, config, rng=jax.random.key(7))["lin"]["kernel"]
    other = jlora.wrap(lin.params, config, rng=jax.random.key(8))["lin"]["kernel"]
    assert np.array_equal(np.asarray(again.a), np.asarray(lw.a)) and not np.array_equal(np.asarray(other.a), np.asarray(lw.a))

    trained = _train(lp)
    y = np.asarray(forward(trained, lin.x))
    jlora.save_peft(tmp_path / "p", trained, config=config)
    np.testing.assert_array_equal(np.asarray(forward(
        jlora.load_peft(tmp_path / "p", lin.params, rng=jax.random.key(7)), lin.x)), y)
    jlora.save(tmp_path / "o", trained, config=config)
    np.testing.assert_array_equal(np.asarray(forward(jlora.load(tmp_path / "o", lin.params), lin.x)), y)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bfloat16_base(init):
    """bf16 base: the init runs in float32 and the residual is cast once; the output error
    at init is PEFT's own bf16 rounding error (measured on the same weights), and the
    residual is PEFT's bit for bit up to rounding ties."""
    lin = _Dense(64, 64, jnp.bfloat16, seed=1)
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights=init)
    lp = jlora.wrap(lin.params, config)
    lw = lp["lin"]["kernel"]
    assert lw.w.dtype == jnp.bfloat16 and lw.a.dtype == jnp.float32
    err_jlora = float(jnp.abs(jlora.lora(lin.apply)(lp, lin.x).astype(jnp.float32)
                              - lin.apply(lin.params, lin.x).astype(jnp.float32)).max())

    net = torch.nn.Module()
    net.lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    net.load_state_dict(torch_state(lin.params))
    net.forward = lambda x: net.lin(x)
    x = torch.tensor(np.asarray(lin.x.astype(jnp.float32))).to(torch.bfloat16)
    with torch.no_grad():
        base = net(x).float().numpy()
        pm = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"],
                                                      init_lora_weights=init))
        err_peft = float(np.abs(pm(x).float().numpy() - base).max())
    res_peft = pm.base_model.model.lin.base_layer.weight.float().numpy()
    res_ours = np.asarray(lw.w.astype(jnp.float32)).T
    assert np.mean(res_ours == res_peft) >= 0.99
    assert err_jlora <= 1.5 * err_peft + 1e-3, (err_jlora, err_peft)


def test_residual_adapters_with_others_warn_and_restore():
    """PEFT warns when PiSSA is combined with other adapters; jlora warns (both ways) and
    still gives the original base back (unload, delete_adapter)."""
    lin = _Dense()
    plain = jlora.LoraConfig(r=2, target_modules=["lin"])
    pissa = plain.replace(init_lora_weights="pissa")
    lp = jlora.wrap(lin.params, plain)
    with pytest.warns(UserWarning, match="replaces the shared base"):
        both = jlora.add_adapter(lp, "p", pissa)
    w = np.asarray(lin.params["lin"]["kernel"])
    assert np.abs(np.asarray(both["lin"]["kernel"].w) - w).max() > 1e-2  # the shared base is the residual
    assert np.abs(np.asarray(jlora.unload(both)["lin"]["kernel"]) - w).max() <= 1e-6
    assert np.abs(np.asarray(jlora.delete_adapter(both, "p")["lin"]["kernel"].w) - w).max() <= 1e-6
    with pytest.warns(UserWarning, match="over a PiSSA/OLoRA base"):
        jlora.add_adapter(jlora.wrap(lin.params, pissa), "q", plain)


def test_residual_init_errors_and_embeddings():
    """Rank above min(d_in, d_out), a non-float base: errors naming the target. Embedding
    targets keep PEFT's default init (PEFT applies PiSSA/OLoRA to Linear layers only)."""
    lin = _Dense(8, 6)
    with pytest.raises(ValueError, match="r=7 exceeds min"):
        jlora.wrap(lin.params, jlora.LoraConfig(r=7, target_modules=["lin"], init_lora_weights="pissa"))
    ints = {"lin": {"kernel": jnp.ones((8, 6), jnp.int8), "bias": jnp.zeros(6)}}
    with pytest.raises(TypeError, match="'lin/kernel'.*int8"):
        jlora.wrap(ints, jlora.LoraConfig(r=2, target_modules=["lin"], init_lora_weights="olora"))
    case = models.conv_embed()
    with pytest.warns(UserWarning, match="embedding targets"):
        lp = jlora.wrap(case.params, jlora.LoraConfig(r=2, target_modules=["embed", "conv"], init_lora_weights="pissa"))
    emb = lp["embed"]["embedding"]
    assert emb.a0 is None and np.array_equal(np.asarray(emb.w), np.asarray(case.params["embed"]["embedding"]))
    assert lp["conv"]["kernel"].a0 is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(jax.jit(jlora.lora(case.apply))(lp, case.inputs), case.apply(case.params, case.inputs)) <= 1e-5


def test_conversion_doubles_patterns_and_keeps_dora(tmp_path):
    """Two Linear layers with rank_pattern / alpha_pattern / rsLoRA, PiSSA + DoRA: the
    magnitude is ‖W‖ of the original weight (as PEFT); the converted adapter has every rank
    doubled and every alpha ×√2 (so each scale is unchanged), keeps the DoRA magnitudes
    (PEFT's conversion drops them) and loads in PEFT on the original base."""
    import flax.linen as nn

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, name="b")(jnp.tanh(nn.Dense(12, name="a")(x)))

    model = Two()
    x = np.random.RandomState(0).standard_normal((4, 16)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    kw = dict(r=4, lora_alpha=6, target_modules=["a", "b"], rank_pattern={"b": 2}, alpha_pattern={"b": 3},
              use_rslora=True, use_dora=True, init_lora_weights="pissa")
    config = jlora.LoraConfig(**kw)
    lp = jlora.wrap(params, config)
    np.testing.assert_allclose(np.asarray(lp["a"]["kernel"].magnitude),
                               np.linalg.norm(np.asarray(params["a"]["kernel"]), axis=0), rtol=1e-5)

    class TwoT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 12), torch.nn.Linear(12, 10)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = TwoT()
    net.load_state_dict(torch_state(params))
    pm = peft.get_peft_model(net, peft.LoraConfig(**kw))
    ref_m = pm.base_model.model.a.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(lp["a"]["kernel"].magnitude), ref_m, rtol=1e-5)

    trained = _train(lp)
    y = np.asarray(jlora.lora(apply)(trained, x))
    jlora.save_peft(tmp_path / "c", trained, config=config, convert_to_lora=True)
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["rank_pattern"], cfg["init_lora_weights"], cfg["use_dora"]) == (8, {"b": 4}, True, True)
    np.testing.assert_allclose([cfg["lora_alpha"], cfg["alpha_pattern"]["b"]], [6 * 2 ** 0.5, 3 * 2 ** 0.5])
    net2 = TwoT()
    net2.load_state_dict(torch_state(params))
    loaded = peft.PeftModel.from_pretrained(net2, tmp_path / "c").eval()
    with torch.no_grad():
        assert np.abs(loaded(torch.tensor(x)).numpy() - y).max() <= 1e-5
