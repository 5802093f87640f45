"""``lora_bias`` (a trained bias on lora_B) and ``trainable_token_indices`` (chosen
embedding rows trained as PEFT's trainable tokens) on a tiny GPT-2, whose ``c_attn`` is a
transformers ``Conv1D`` with a bias and whose output layer is tied to the token
embedding. Against PEFT on PyTorch CPU, both ways: PEFT's adapter in jlora gives PEFT's
logits and gradients; jlora's adapter in PEFT gives jlora's logits; jlora.merge equals
merge_and_unload (the token rows and ``s·b_B`` folded in); Orbax keeps them.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jlora  # noqa: E402

pytestmark = pytest.mark.torch

TOKENS = [0, 5]


def close(got, want, rtol: float = 3e-5) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and float(np.abs(got - want).max()) <= rtol * max(1.0, float(np.abs(want).max()))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A 1-layer GPT-2 in torch (saved) and the same weights in Flax; ids that use the tokens."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    path = tmp_path_factory.mktemp("gpt2") / "base"
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    flax_model = transformers.FlaxGPT2LMHeadModel.from_pretrained(path, from_pt=True)
    ids = np.array([[0, 3, 5, 7, 5, 1], [2, 0, 9, 5, 4, 0]])
    probe = np.random.default_rng(0).standard_normal((2, 6, 40)).astype(np.float32)

    def torch_model():
        return transformers.GPT2LMHeadModel.from_pretrained(path).eval()

    apply = lambda p, x: flax_model(x, params=p).logits  # noqa: E731
    return torch_model, flax_model.params, apply, ids, probe


CASES = {
    "trainable_tokens": dict(target_modules=["c_attn"], trainable_token_indices=TOKENS),
    "lora_bias": dict(target_modules=["c_attn", "c_proj"], lora_bias=True, lora_alpha=12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_jlora_outputs_gradients_merge(gpt2, case, tmp_path):
    torch_model, params, apply, ids, probe = gpt2
    pm = peft.get_peft_model(torch_model(), peft.LoraConfig(init_lora_weights=False, **CASES[case]))
    with torch.no_grad():  # token rows away from the originals
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pm.eval()
    out = pm(input_ids=torch.tensor(ids)).logits
    (out * torch.tensor(probe)).sum().backward()
    pm.save_pretrained(tmp_path / "peft")

    lp = jlora.load_peft(tmp_path / "peft", params)
    fwd = jlora.lora(apply, on_materialize="error")
    assert close(fwd(lp, ids), out.detach().numpy())
    grads = jax.grad(lambda t: jnp.sum(fwd(t, ids) * probe))(lp)
    if case == "trainable_tokens":
        tt = lp["transformer"]["wte"]["embedding"]
        assert isinstance(tt, jlora.TrainableTokens) and tt.indices == tuple(TOKENS)
        want = dict(pm.named_parameters())["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"]
        # the tied lm_head reads the same rows: their gradient has both uses, as PEFT's
        assert close(grads["transformer"]["wte"]["embedding"].values, want.grad.numpy(), 1e-4)
        n_peft, _ = pm.get_nb_trainable_parameters()
        assert jlora.count_parameters(lp)[0] == n_peft
    else:
        for name in ("c_attn", "c_proj"):
            g = grads["transformer"]["h"]["0"]["attn"][name]["kernel"].b_bias
            want = dict(pm.named_parameters())[f"base_model.model.transformer.h.0.attn.{name}.lora_B.default.bias"]
            assert close(g, want.grad.numpy(), 1e-4), name
    merged = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "peft").merge_and_unload()
    with torch.no_grad():
        assert close(apply(jlora.merge(lp), ids), merged(input_ids=torch.tensor(ids)).logits.numpy())
    # Orbax keeps the token rows / lora_B biases (and their checksums)
    jlora.save(tmp_path / "orbax", lp)
    assert close(fwd(jlora.load(tmp_path / "orbax", params), ids), out.detach().numpy())


@pytest.mark.parametrize("case", list(CASES))
def test_jlora_to_peft(gpt2, case, tmp_path):
    torch_model, params, apply, ids, _ = gpt2
    config = jlora.LoraConfig(init_lora_weights=False, **CASES[case])
    lp = jlora.wrap(params, config, rng=jax.random.key(4))
    if case == "trainable_tokens":  # the list form: the input embedding (wte, not wpe); trained rows
        tt = lp["transformer"]["wte"]["embedding"]
        lp["transformer"]["wte"]["embedding"] = tt.replace(values=tt.values + 0.5)
    mine = np.asarray(jlora.lora(apply, on_materialize="error")(lp, ids))
    jlora.save_peft(tmp_path / "a", lp, config=config)
    pm = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "a").eval()
    with torch.no_grad():
        assert close(pm(input_ids=torch.tensor(ids)).logits.numpy(), mine)
    # merge_adapter / unmerge_adapter fold s·b_B into the base bias and out again
    if case == "lora_bias":
        inplace = jlora.merge_adapter(lp)
        assert close(jlora.lora(apply)(inplace, ids), mine)
        back = jlora.unmerge_adapter(inplace)
        bias = back["transformer"]["h"]["0"]["attn"]["c_attn"]["bias"]
        assert close(bias, params["transformer"]["h"]["0"]["attn"]["c_attn"]["bias"], 1e-6)


def test_lora_bias_without_a_base_bias():
    """PEFT warns that a lora_B bias on a layer without a bias cannot be merged; jlora warns
    at wrap and merge raises naming the kernel. The forward still adds s·b_B."""
    params = {"lin": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}}
    with pytest.warns(UserWarning, match="no bias next to their kernel"):
        lp = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["lin"], lora_bias=True, init_lora_weights=False))
    lw = lp["lin"]["kernel"]
    x = jnp.ones((2, 4))
    got = jlora.lora(lambda p, x: x @ p["lin"]["kernel"])(lp, x)
    want = x @ (lw.w + lw.scale * lw.a @ lw.b) + lw.scale * lw.b_bias
    assert close(got, want, 1e-6)
    with pytest.raises(ValueError, match="lin/kernel: lora_bias: the module has no bias"):
        jlora.merge(lp)


def test_trainable_tokens_errors():
    """Trainable tokens that PEFT refuses or that cannot be placed: clear errors."""
    params = {"emb": {"embedding": jnp.zeros((10, 4))}, "pos": {"embedding": jnp.zeros((6, 4))},
              "lin": {"kernel": jnp.zeros((4, 4))}}
    with pytest.raises(ValueError, match="2 embedding tables"):
        jlora.wrap(params, jlora.LoraConfig(target_modules=["lin"], trainable_token_indices=[1]))
    with pytest.raises(ValueError, match="out of range for a table of 10 tokens"):
        jlora.wrap(params, jlora.LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": [10]}))
    with pytest.raises(ValueError, match="matches no embedding"):
        jlora.wrap(params, jlora.LoraConfig(target_modules=["lin"], trainable_token_indices={"nope": [1]}))
    with pytest.raises(ValueError, match="both a LoRA target and in trainable_token_indices"):
        jlora.wrap(params, jlora.LoraConfig(target_modules=["emb"], trainable_token_indices={"emb": [1]}))
    lp = jlora.wrap(params, jlora.LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": [1, 3]}))
    # the optimizer trains the rows only; the table stays frozen
    labels = jlora.trainable_labels(lp)["emb"]["embedding"]
    assert labels.values == "trainable" and labels.w == "frozen"
    grads = jax.grad(lambda t: jnp.sum(jlora.lora(lambda p: p["emb"]["embedding"][jnp.array([1, 2])])(t)))(lp)
    assert float(jnp.abs(grads["emb"]["embedding"].w).sum()) == 0.0
    assert grads["emb"]["embedding"].values.tolist() == [[1.0] * 4, [0.0] * 4]


def test_trainable_tokens_on_an_output_head(tmp_path):
    """Trainable token rows of an untied ``nn.Linear`` output head (PEFT's TrainableTokens
    on a Linear: rows of its (vocab, d) weight): on the Flax ``Dense`` twin, whose kernel
    is (d, vocab), they are columns (token axis 1). Both ways and merged, against PEFT."""
    import flax.linen as nn

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)
            self.proj = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 20, bias=False)

        def forward(self, ids):
            return self.lm_head(torch.tanh(self.proj(self.emb(ids))))

    class FlaxLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = jnp.tanh(nn.Dense(4, name="proj")(nn.Embed(20, 4, name="emb")(ids)))
            return nn.Dense(20, use_bias=False, name="lm_head")(h)

    def torch_model():
        torch.manual_seed(0)
        return TorchLM().eval()

    m = torch_model()
    t2n = lambda x: x.detach().numpy().copy()  # noqa: E731
    params = {"emb": {"embedding": t2n(m.emb.weight)}, "proj": {"kernel": t2n(m.proj.weight).T,
              "bias": t2n(m.proj.bias)}, "lm_head": {"kernel": t2n(m.lm_head.weight).T}}
    apply = lambda p, ids: FlaxLM().apply({"params": p}, ids)  # noqa: E731
    ids = np.array([[1, 3, 5, 7]])
    kw = dict(target_modules=["proj"], trainable_token_indices={"lm_head": [1, 3]})
    pm = peft.get_peft_model(torch_model(), peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(1.0)
    pm.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(torch.tensor(ids)).numpy()
    lp = jlora.load_peft(tmp_path / "peft", params)
    tt = lp["lm_head"]["kernel"]
    assert isinstance(tt, jlora.TrainableTokens) and tt.axis == 1
    assert close(jlora.lora(apply, on_materialize="error")(lp, ids), want)
    assert close(apply(jlora.merge(lp), ids), want)
    config = jlora.LoraConfig(init_lora_weights=False, **kw)
    mine = jlora.wrap(params, config, rng=jax.random.key(0))
    mine["lm_head"]["kernel"] = mine["lm_head"]["kernel"].replace(values=mine["lm_head"]["kernel"].values - 0.7)
    out = np.asarray(jlora.lora(apply)(mine, ids))
    jlora.save_peft(tmp_path / "mine", mine, config=config)
    back = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "mine").eval()
    with torch.no_grad():
        assert close(back(torch.tensor(ids)).numpy(), out)
