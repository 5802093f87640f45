"""Grouped convolutions as PEFT adapts them: a full ``lora_A`` (every input channel) and a
grouped 1×1 ``lora_B`` (``r/groups`` rank channels per group of outputs), factored by
``jlora.lora``. For ``groups`` 1, 2 and ``r`` (depthwise-like: one rank channel per
group), with plain LoRA, DoRA (PEFT's norm) and ``lora_bias``: PEFT's adapter loads with
PEFT's outputs and gradients, jlora's adapter loads in PEFT with jlora's outputs, and
merging (impossible: ``W + s·ΔW`` is not a grouped kernel) is refused by both. The
reference is PEFT 0.21.2 on PyTorch CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jlora  # noqa: E402
from jlora.io.peft import to_torch  # noqa: E402

pytestmark = pytest.mark.torch

R = 4
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "bias": {"lora_bias": True}}


class Net(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)

    def forward(self, x):
        return self.conv(x)


def make(groups: int):
    torch.manual_seed(groups)
    net = Net(groups).eval()
    w = net.conv.weight.detach().numpy()
    params = {"conv": {"kernel": np.transpose(w, (2, 3, 1, 0)).copy(), "bias": net.conv.bias.detach().numpy().copy()}}
    conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=groups, name="conv")

    def apply(p, x):  # NCHW in and out, as the torch model
        return jnp.transpose(conv.apply({"params": p["conv"]}, jnp.transpose(x, (0, 2, 3, 1))), (0, 3, 1, 2))

    x = np.random.default_rng(groups).standard_normal((2, 8, 5, 5)).astype(np.float32)
    probe = np.random.default_rng(10 + groups).standard_normal((2, 8, 5, 5)).astype(np.float32)
    return net, params, apply, x, probe


def close(got, want, rtol: float = 2e-5) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and float(np.abs(got - want).max()) <= rtol * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("groups", [1, 2, R])
def test_grouped_conv_both_ways(groups, variant, tmp_path):
    net, params, apply, x, probe = make(groups)
    kw = dict(r=R, lora_alpha=6, target_modules=["conv"], init_lora_weights=False, **VARIANTS[variant])
    pm = peft.get_peft_model(net, peft.LoraConfig(**kw))
    with torch.no_grad():  # magnitudes away from the weight norm
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.linspace(0.8, 1.3, p.numel()).reshape(p.shape))
    xt = torch.tensor(x)
    out = pm(xt)
    (out * torch.tensor(probe)).sum().backward()
    want = out.detach().numpy()
    pm.save_pretrained(tmp_path / "peft")

    # PEFT -> jlora: outputs and gradients (factored, no W + s·ΔW formed)
    lp = jlora.load_peft(tmp_path / "peft", params)
    lw = lp["conv"]["kernel"]
    assert lw.groups == groups and lw.a.shape == (3, 3, 8, R) and lw.b.shape == (R // groups, 8)
    fwd = jlora.lora(apply, on_materialize="error")
    assert close(fwd(lp, x), want)
    g = jax.grad(lambda t: jnp.sum(fwd(t, x) * probe))(lp)["conv"]["kernel"]
    ga, gb = to_torch(np.asarray(g.a), np.asarray(g.b), "conv")
    layer = pm.base_model.model.conv
    assert close(ga, layer.lora_A["default"].weight.grad.numpy(), 1e-4)
    assert close(gb, layer.lora_B["default"].weight.grad.numpy(), 1e-4)
    if variant == "dora":
        assert close(np.asarray(g.magnitude), layer.lora_magnitude_vector["default"].weight.grad.numpy().reshape(-1),
                     1e-4)
    if variant == "bias":
        assert close(np.asarray(g.b_bias), layer.lora_B["default"].bias.grad.numpy(), 1e-4)

    # merging: no grouped kernel holds W + s·ΔW (groups > 1); PEFT refuses too
    if groups > 1:
        with pytest.raises(ValueError, match="grouped convolution"):
            jlora.merge(lp)
        with pytest.raises(NotImplementedError):
            peft.PeftModel.from_pretrained(Net(groups), tmp_path / "peft").merge_and_unload()
    else:
        merged = peft.PeftModel.from_pretrained(make(groups)[0], tmp_path / "peft").merge_and_unload()
        with torch.no_grad():
            assert close(apply(jlora.merge(lp), x), merged(xt).numpy())

    # jlora -> PEFT: wrap finds the grouping from the model's use
    config = jlora.LoraConfig(**kw)
    lp = jlora.wrap(params, config, rng=jax.random.key(2), apply_fn=apply, example_args=(x,))
    assert lp["conv"]["kernel"].groups == groups
    if variant == "dora":
        m = lp["conv"]["kernel"].magnitude
        lp = jax.tree_util.tree_map(lambda v: v, lp)
        lp["conv"]["kernel"] = lp["conv"]["kernel"].replace(magnitude=m * jnp.linspace(0.8, 1.3, m.size))
    mine = np.asarray(fwd(lp, x))
    jlora.save_peft(tmp_path / "jlora", lp, config=config)
    back = peft.PeftModel.from_pretrained(make(groups)[0], tmp_path / "jlora").eval()
    with torch.no_grad():
        assert close(back(xt).numpy(), mine)


def test_grouped_conv_errors(tmp_path):
    """Without apply_fn= wrap cannot see the grouping: the forward names the grouped
    convolution and what to pass; a rank not divisible by the groups is refused as PEFT
    refuses it; a file whose lora_A does not match the kernel's channels says so."""
    net, params, apply, x, _ = make(2)
    lp = jlora.wrap(params, jlora.LoraConfig(r=R, target_modules=["conv"]))
    with pytest.raises(ValueError, match=r"grouped convolution 'conv/kernel' \(feature_group_count=2\).*apply_fn="):
        jlora.lora(apply)(lp, x)
    with pytest.raises(ValueError, match="r divisible by the groups"):
        jlora.wrap(params, jlora.LoraConfig(r=3, target_modules=["conv"]), apply_fn=apply, example_args=(x,))
    # a groups=2 adapter on a groups=4 kernel: (3, 3, 2, 8) per group, lora_A reads 8 channels
    pm = peft.get_peft_model(net, peft.LoraConfig(r=R, target_modules=["conv"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "g2")
    with pytest.raises(ValueError, match="grouped convolution.*groups=2"):
        jlora.load_peft(tmp_path / "g2", make(R)[1])
