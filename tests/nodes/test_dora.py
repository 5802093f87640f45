"""DoRA (``use_dora=True``) against PEFT 0.21.2 on torch CPU: logits both ways (GPT-2,
Llama, an embedding + conv net), gradients of A, B and m, dropout semantics, merge /
unmerge, two adapters on one layer, mixed batches (against per-adapter calls: PEFT
refuses them), the factored norm, and the errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest


import jlora  # noqa: E402
from support import models  # noqa: E402
from jlora.nodes import dora  # noqa: E402
from support.variant_helpers import (  # noqa: E402
    IDS, jitted, jlora_named, peft_named, perturb_magnitudes, perturb_tree_magnitudes, rel_err, torch_logits,
    torch_state, torch_twin,
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

CASES = {"gpt2": models.gpt2, "llama": models.llama}


def _peft_dora(case, targets):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(torch_twin(case), cfg).eval()
    perturb_magnitudes(pm)
    return pm


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_vs_peft_logits_grads_merge(name, tmp_path):
    """PEFT → jlora: same logits; ∂A, ∂B, ∂m equal PEFT's (and differ without the
    stop_gradient on the norm); merged kernels equal PEFT's merge_and_unload. jlora →
    PEFT: a jlora-made DoRA adapter loads in PEFT with the same logits."""
    case = CASES[name]()
    targets = ["c_attn", "c_proj"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    pm = _peft_dora(case, targets)
    pm.save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["use_dora"] is True

    lp = jlora.load_peft(tmp_path / "peft", case.params)
    assert jlora.count_parameters(lp)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    forward = jitted(case.apply)
    ids = jnp.asarray(IDS)
    out = np.asarray(forward(lp, ids))
    ref = torch_logits(pm)
    assert rel_err(out, ref) <= 1e-4

    # gradients of sum(logits * cot): PEFT's .grad against jax.grad, every adapter tensor
    cot = np.random.RandomState(1).standard_normal(ref.shape).astype(np.float32)
    logits = pm(input_ids=torch.tensor(IDS)).logits
    (logits * torch.tensor(cot)).sum().backward()
    ref_g = peft_named(pm, "grad")
    trainable, frozen = jlora.partition(lp)
    loss = lambda t: (forward(jlora.combine(t, frozen), ids) * cot).sum()  # noqa: E731
    got_g = jlora_named(jlora.combine(jax.grad(loss)(trainable), frozen))
    assert sorted(got_g) == sorted(ref_g)
    assert any(k.endswith("lora_magnitude_vector") for k in got_g)
    for k in ref_g:
        assert rel_err(got_g[k], ref_g[k]) <= 1e-4, k

    # merge: W' = (m / ‖W + s·ΔW‖) ⊙ (W + s·ΔW), as PEFT's merge_and_unload
    merged = torch_state(jlora.merge(lp))
    ref_state = pm.merge_and_unload().state_dict()
    for k, v in merged.items():
        np.testing.assert_allclose(v.numpy(), ref_state[k].numpy(), atol=2e-6, rtol=0, err_msg=k)

    # jlora → PEFT
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    ours = perturb_tree_magnitudes(jlora.wrap(case.params, config, rng=jax.random.key(2)))
    jlora.save_peft(tmp_path / "ours", ours, config=config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f:
        keys = sorted(f.keys())
    loaded = peft.PeftModel.from_pretrained(torch_twin(case), tmp_path / "ours").eval()
    assert keys == sorted(peft_named(loaded))  # every tensor PEFT holds came from the file
    assert rel_err(np.asarray(forward(ours, ids)), torch_logits(loaded)) <= 1e-4


# --------------------------------------------------------------------------------------
# One Linear: dropout, merge/unmerge, two adapters


class _Linear:
    """nn.Dense(12) on 16 features in Flax, nn.Linear(16, 12) in torch, same weights."""

    def __init__(self):
        import flax.linen as nn

        self.module = nn.Dense(12)
        self.x = np.random.RandomState(3).standard_normal((5, 16)).astype(np.float32)
        self.params = {"lin": self.module.init(jax.random.key(0), self.x)["params"]}
        self.apply = lambda p, x: self.module.apply({"params": p["lin"]}, x)

    def torch(self):
        net = torch.nn.Module()
        net.lin = torch.nn.Linear(16, 12)
        net.load_state_dict(torch_state(self.params))
        net.forward = lambda x: net.lin(x)
        return net


class _FixedDropout(torch.nn.Module):
    def __init__(self, mask, keep):
        super().__init__()
        self.mask, self.keep = mask, keep

    def forward(self, x):
        return x * self.mask / self.keep


def test_dora_norm_is_a_constant_for_the_gradient(monkeypatch):
    """∂A, ∂B, ∂m of one DoRA Linear equal PEFT's, and the negative control: without
    stop_gradient on ‖W + s·ΔW‖, ∂A differs (so the gradient match is not vacuous)."""
    lin = _Linear()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, init_lora_weights=False)
    lp = perturb_tree_magnitudes(jlora.wrap(lin.params, config, rng=jax.random.key(2)))
    lw = lp["lin"]["kernel"]
    cot = np.random.RandomState(4).standard_normal((5, 12)).astype(np.float32)
    pm = peft.get_peft_model(lin.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                                          init_lora_weights=False))
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lw.a).T))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(lw.b).T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(lw.magnitude)))
    (pm(torch.tensor(lin.x)) * torch.tensor(cot)).sum().backward()
    ref = {"a": layer.lora_A["default"].weight.grad.numpy().T, "b": layer.lora_B["default"].weight.grad.numpy().T,
           "magnitude": layer.lora_magnitude_vector["default"].weight.grad.numpy()}

    def grads():
        g = jax.grad(lambda q: (jlora.lora(lin.apply)(q, lin.x) * cot).sum())(lp)["lin"]["kernel"]
        return {k: np.asarray(getattr(g, k)) for k in ref}

    got = grads()
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-4, k
    monkeypatch.setattr(
        jlora.transform.api, "magnitude_scale",
        lambda w, a, b, m, s, layout: m / dora.weight_norm(jax.lax.stop_gradient(w), a, b, s, layout),
    )
    assert rel_err(grads()["a"], ref["a"]) > 1e-2


def test_dora_dropout_semantics():
    """With dropout in training, PEFT computes x·W + (k−1)⊙(x̃·W) + k⊙s·(x̃·A)·B (the plain
    base path sees the undropped x), not k⊙((W + s·ΔW)·x̃). jlora matches PEFT with the same
    mask; without a key (or with rate 0) the base product is not computed twice."""
    lin = _Linear()
    p = 0.4
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, init_lora_weights=False,
                              lora_dropout=p)
    lp = perturb_tree_magnitudes(jlora.wrap(lin.params, config, rng=jax.random.key(1)))
    key = jax.random.key(5)
    y = np.asarray(jlora.lora(lin.apply)(lp, lin.x, lora_rng=key))
    # the mask jlora drew: a probe adapter with A = B = I, W = 0 returns x̃ itself (same key, same draw)
    probe = {"lin": {"bias": jnp.zeros(16), "kernel": jlora.LoraWeight(
        jnp.zeros((16, 16)), jnp.eye(16), jnp.eye(16), scale=1.0, dropout=p)}}
    x_drop = np.asarray(jlora.lora(lambda q, x: x @ q["lin"]["kernel"] + q["lin"]["bias"])(probe, lin.x, lora_rng=key))
    mask = torch.tensor((x_drop != 0).astype(np.float32))

    pm = peft.get_peft_model(lin.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                                          init_lora_weights=False, lora_dropout=p))
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lp["lin"]["kernel"].a).T))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(lp["lin"]["kernel"].b).T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(lp["lin"]["kernel"].magnitude)))
    layer.lora_dropout["default"] = _FixedDropout(mask, 1 - p)
    pm.train()
    with torch.no_grad():
        ref = pm(torch.tensor(lin.x)).numpy()
        pm.eval()
        ref_eval = pm(torch.tensor(lin.x)).numpy()
    assert np.abs(y - ref).max() <= 1e-5
    # not the naive form k⊙((W + sΔW)·x̃) + b
    lw = lp["lin"]["kernel"]
    eff = np.asarray(jlora.merge(lp)["lin"]["kernel"])
    naive = x_drop @ eff + np.asarray(lin.params["lin"]["bias"])
    assert np.abs(naive - ref).max() > 1e-2
    assert np.abs(np.asarray(jlora.lora(lin.apply)(lp, lin.x)) - ref_eval).max() <= 1e-5

    def base_products(**kw):
        jaxpr = jax.make_jaxpr(lambda q, x: jlora.lora(lin.apply)(q, x, **kw))(lp, lin.x)
        return sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                   and tuple(e.invars[0].aval.shape) == lin.x.shape and tuple(e.invars[1].aval.shape) == lw.w.shape)

    assert base_products(lora_rng=key) == 2  # x·W and x̃·W
    assert base_products() == 1  # evaluation: x·W reused


def test_dora_merge_unmerge_and_two_adapters_in_order(tmp_path):
    """merge_adapter / unmerge_adapter restore W to float32 rounding; two DoRA adapters on
    one layer compose in order as PEFT's forward and merge do."""
    lin = _Linear()
    pm = peft.get_peft_model(lin.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                                          init_lora_weights=False))
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], use_dora=True,
                                             init_lora_weights=False))
    perturb_magnitudes(pm)
    pm.save_pretrained(tmp_path / "a")  # "default" at the root, "second" in a sub-directory
    pm.base_model.set_adapter(["default", "second"])
    x = torch.tensor(lin.x)
    with torch.no_grad():
        ref_two = pm(x).numpy()

    lp = jlora.load_peft(tmp_path / "a", lin.params)
    lw = lp["lin"]["kernel"]
    merged = jlora.merge_adapter(lp)
    assert merged["lin"]["kernel"].weight_norm is not None
    np.testing.assert_allclose(np.asarray(jlora.lora(lin.apply)(merged, lin.x)),
                               np.asarray(jlora.lora(lin.apply)(lp, lin.x)), atol=2e-6)
    back = jlora.unmerge_adapter(merged)["lin"]["kernel"]
    assert np.abs(np.asarray(back.w) - np.asarray(lw.w)).max() <= 1e-6 and back.weight_norm is None
    labels = jlora.trainable_labels(merged)["lin"]["kernel"]
    assert (labels.magnitude, labels.weight_norm) == ("trainable", "frozen")

    two = jlora.load_adapter(lp, tmp_path / "a" / "second", "second")
    two = jlora.set_adapter(two, ["default", "second"])
    out = np.asarray(jlora.lora(lin.apply, on_materialize="error")(two, lin.x))
    assert np.abs(out - ref_two).max() <= 1e-5
    # the merged kernel of both equals PEFT's merge of both
    ref_w = pm.merge_and_unload().lin.weight.detach().numpy()
    assert np.abs(np.asarray(jlora.merge(two)["lin"]["kernel"]).T - ref_w).max() <= 1e-6


# --------------------------------------------------------------------------------------
# Embedding + Conv1d


def _conv_net():
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.conv = nn.Conv1d(16, 24, 3, padding=1)
            self.head = nn.Linear(24, 10)

        def forward(self, ids):
            x = self.embed(ids).transpose(1, 2)
            x = torch.relu(self.conv(x)).transpose(1, 2)
            return self.head(x)

    return Net


def test_dora_embedding_and_conv_both_ways(tmp_path):
    """DoRA on nn.Embed (norm over the vocabulary: m of shape (d,)) and a 1-D conv (m of
    shape (1, out, 1) in the file), PEFT → jlora and jlora → PEFT."""
    abstract = jax.eval_shape(models.ConvEmbedNet().init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
    model = models.ConvEmbedNet()
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    net = _conv_net()()
    net.load_state_dict(torch_state(params))
    torch.manual_seed(0)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "conv"], use_dora=True,
                                                  init_lora_weights=False)).eval()
    perturb_magnitudes(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).numpy()
    lp = jlora.load_peft(tmp_path / "peft", params)
    forward = jax.jit(jlora.lora(apply, on_materialize="error"))
    assert np.abs(np.asarray(forward(lp, IDS)) - ref).max() <= 1e-4

    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "conv"], use_dora=True,
                              init_lora_weights=False)
    ours = perturb_tree_magnitudes(jlora.wrap(params, config, rng=jax.random.key(4)))
    jlora.save_peft(tmp_path / "ours", ours, config=config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys() if "magnitude" in k}
    assert shapes == {"base_model.model.embed.lora_magnitude_vector": (16,),
                      "base_model.model.conv.lora_magnitude_vector": (1, 24, 1)}
    net2 = _conv_net()()
    net2.load_state_dict(torch_state(params))
    loaded = peft.PeftModel.from_pretrained(net2, tmp_path / "ours").eval()
    with torch.no_grad():
        assert np.abs(np.asarray(forward(ours, IDS)) - loaded(torch.tensor(IDS)).numpy()).max() <= 1e-4

    # mixed batch on the gather and conv rules (masked per-adapter form): against per-adapter calls
    lp2 = jlora.add_adapter(lp, "b", config, rng=jax.random.key(9))
    lp2 = perturb_tree_magnitudes(jlora.add_adapter(lp2, "plain", config.replace(use_dora=False), rng=jax.random.key(8)))
    _check_mixed(lp2, apply, jnp.asarray(np.concatenate([IDS, IDS[::-1]])), ["b", "default", "__base__", "plain"])


def _check_mixed(lp, apply, x, names):
    ids = jlora.adapter_ids(lp, names)
    mixed = np.asarray(jax.jit(jlora.lora(apply, on_materialize="error"))(lp, x, adapter_ids=ids))
    for i, n in enumerate(names):
        one = jlora.disable_adapter(lp) if n == "__base__" else jlora.set_adapter(lp, n)
        ref = np.asarray(jlora.lora(apply)(one, x))
        assert np.abs(mixed[i] - ref[i]).max() <= 1e-5, n


def test_dora_mixed_batch_gathers_magnitudes():
    """Llama with two DoRA adapters (ranks 4 and 2) and a LoRA one: a mixed batch (factors
    and k gathered per example) equals each adapter's own call. PEFT refuses this."""
    case = models.llama()
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                           init_lora_weights=False)
    lp = jlora.wrap(case.params, cfg, rng=jax.random.key(1))
    lp = jlora.add_adapter(lp, "b", cfg.replace(r=2, lora_alpha=5), rng=jax.random.key(2))
    lp = jlora.add_adapter(lp, "plain", cfg.replace(use_dora=False), rng=jax.random.key(3))
    lp = perturb_tree_magnitudes(lp)
    x = jnp.asarray(np.concatenate([IDS, IDS]))
    _check_mixed(lp, case.apply, x, ["b", "default", "__base__", "plain"])


# --------------------------------------------------------------------------------------
# Factored: the norm without W + s·ΔW, and the train step's products


def _dots(jaxpr, out):
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            out.append(tuple(e.outvars[0].aval.shape))
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    _dots(getattr(inner, "jaxpr", inner), out)
    return out


def test_dora_train_step_forms_no_kernel_shaped_product():
    """The DoRA gradient on GPT-2 never makes a d_in × d_out product (no W + s·ΔW, no
    B·A, no weight gradient), and the factored norm equals the dense norm in float32,
    bfloat16 bases included."""
    case = models.gpt2()
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True)
    lp = jlora.wrap(case.params, config, rng=jax.random.key(0))
    trainable, frozen = jlora.partition(lp)
    ids = jnp.asarray(IDS)
    loss = lambda t: jlora.lora(case.apply, on_materialize="error")(jlora.combine(t, frozen), ids).sum()  # noqa: E731
    shapes = set(_dots(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr, []))
    kernels = {s for _, x in jlora.lora_leaves(lp) for s in (x.w.shape, x.w.shape[::-1])}
    assert shapes and not shapes & kernels

    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(rng.standard_normal((3, 40, 24)), dtype)  # stacked (layers, in, out)
        a = jnp.asarray(rng.standard_normal((3, 40, 4)) * 0.1, jnp.float32)
        b = jnp.asarray(rng.standard_normal((3, 4, 24)), jnp.float32)
        dense = np.linalg.norm(np.asarray(w, np.float64) + 0.5 * np.einsum("lir,lro->lio", a, b), axis=1)
        got = dora.weight_norm(w, a, b, 0.5, ("stack", "in", "out"))
        assert got.dtype == jnp.float32 and rel_err(got, dense) <= 1e-6


# --------------------------------------------------------------------------------------
# What PEFT rejects or gets wrong


def test_dora_errors():
    """lora_bias + DoRA (PEFT rejects it), add_weighted_adapter of DoRA adapters (PEFT
    makes a wrong adapter, #3761), DoRA on a grouped convolution: clear errors."""
    d = peft.LoraConfig(r=4, target_modules=["q"], use_dora=True).to_dict()
    d = json.loads(json.dumps(d, default=sorted))
    d["lora_bias"] = True
    with pytest.raises(ValueError, match="lora_bias.*use_dora"):
        jlora.LoraConfig.from_dict(d)

    lin = _Linear()
    cfg = jlora.LoraConfig(r=2, target_modules=["lin"], use_dora=True)
    lp = jlora.add_adapter(jlora.wrap(lin.params, cfg), "b", cfg)
    with pytest.raises(ValueError, match=r"\['b', 'default'\] are DoRA adapters"):
        jlora.add_weighted_adapter(lp, ["default", "b"], [0.5, 0.5], "mix", "linear")

    import flax.linen as nn

    conv = nn.Conv(8, (3,), feature_group_count=2, name="conv")
    x = jnp.ones((1, 6, 4))
    params = {"conv": conv.init(jax.random.key(0), x)["params"]}
    lpc = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    with pytest.raises(ValueError, match="grouped convolution 'conv/kernel'"):
        jlora.lora(lambda p, x: conv.apply({"params": p["conv"]}, x))(lpc, x)


def test_dora_stacked_dense_general_kernels(tmp_path):
    """nn.scan-stacked DenseGeneral kernels (layers, embed, heads, head_dim) and
    (layers, heads, head_dim, embed): the factored DoRA forward equals the model on the
    merged kernels, each merged kernel equals k⊙(W + s·ΔW) with the norm per (layer,
    output feature) computed densely in float64, and the PEFT file round trip (one
    PyTorch module and magnitude per layer) is exact."""
    from jlora import KernelLayout
    from jlora.nodes.factors import delta

    case = models.linen_scan()
    config = jlora.LoraConfig(r=3, lora_alpha=5, target_modules=["query", "out"], use_dora=True,
                              init_lora_weights=False)
    lp = perturb_tree_magnitudes(jlora.wrap(case.params, config, rng=jax.random.key(3)))
    merged = jlora.merge(lp)
    for path, lw in jlora.lora_leaves(lp):
        kl = KernelLayout(lw.layout)
        eff = np.asarray(lw.w, np.float64) + lw.scale * np.asarray(delta(lw.a, lw.b, lw.layout), np.float64)
        n = np.sqrt((eff ** 2).sum(axis=kl.in_axes, keepdims=True))
        m = np.expand_dims(np.asarray(lw.magnitude, np.float64), kl.in_axes)  # stack leads, out axes in order
        got = merged
        for k in path.split("/"):
            got = got[k]
        assert rel_err(got, m / n * eff) <= 1e-5, path
    x = case.inputs
    out = np.asarray(jax.jit(jlora.lora(case.apply, on_materialize="error"))(lp, x))
    assert rel_err(out, jax.jit(case.apply)(merged, x)) <= 1e-5
    jlora.save_peft(tmp_path / "a", lp, config=config)
    jlora.save(tmp_path / "o", lp, config=config)
    for back in (jlora.load_peft(tmp_path / "a", case.params), jlora.load(tmp_path / "o", case.params)):
        for (p1, x1), (p2, x2) in zip(jlora.lora_leaves(back), jlora.lora_leaves(lp)):
            assert p1 == p2 and np.array_equal(np.asarray(x1.magnitude), np.asarray(x2.magnitude)), p1


def test_dora_mixed_batch_on_a_tied_embedding():
    """A tied embedding read twice, as a table (gather) and as the output layer
    (``x·Eᵀ``, a contraction over the kernel's output axes), with two DoRA adapters and a
    LoRA one: a mixed batch stays factored (each example's input scaled by its adapter's
    k) and equals each adapter's own call."""
    import flax.linen as nn

    class TiedLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(96, 12, name="embed")
            h = jnp.tanh(nn.Dense(12, name="mix")(embed(ids)))
            return embed.attend(h)

    model = TiedLM()
    params = model.init(jax.random.key(0), IDS)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "mix"], use_dora=True, init_lora_weights=False)
    lp = jlora.wrap(params, cfg, rng=jax.random.key(1))
    lp = jlora.add_adapter(lp, "b", cfg.replace(r=3, lora_alpha=5), rng=jax.random.key(2))
    lp = perturb_tree_magnitudes(jlora.add_adapter(lp, "plain", cfg.replace(use_dora=False), rng=jax.random.key(3)))
    names = ["b", "default", "__base__", "plain"]
    x = jnp.asarray(np.concatenate([IDS, IDS[::-1]]))
    mixed = np.asarray(jax.jit(jlora.lora(apply, on_materialize="error"))(lp, x, adapter_ids=jlora.adapter_ids(lp, names)))
    for i, n in enumerate(names):  # against each adapter's merged model (the plain forward on W_eff)
        merged = jlora.unload(lp) if n == "__base__" else jlora.merge(jlora.set_adapter(lp, n))
        assert np.abs(mixed[i] - np.asarray(apply(merged, x))[i]).max() <= 1e-5, n
