"""The PEFT adapter format, both ways, against PEFT on PyTorch (CPU).

The base weights are shared: a small random PyTorch model is saved with safetensors and
loaded in Flax with ``from_pretrained(..., from_pt=True)`` (transformers' own conversion,
not jlora's), so PEFT and jlora see the same W.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest


import jlora  # noqa: E402
from jlora import hf  # noqa: E402
from jlora.io.records import adapter_from_tree  # noqa: E402
from jlora.io.peft import peft_tensors, read_peft  # noqa: E402

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = np.random.RandomState(0).randint(3, 90, size=(2, 7))


def _is_node(x):
    return isinstance(x, (jlora.LoraWeight, jlora.Trainable))


def _leaves_equal(x, y) -> bool:
    lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
    if jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(y) or len(lx) != len(ly):
        return False
    return all(
        np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lx, ly)
    )


def _same_adapter(x, y) -> bool:
    """Same LoRA factors, scales, layouts and Trainable values (bases may be abstract)."""
    nx = jax.tree_util.tree_leaves(x, is_leaf=_is_node)
    ny = jax.tree_util.tree_leaves(y, is_leaf=_is_node)
    if jax.tree_util.tree_structure(x, is_leaf=_is_node) != jax.tree_util.tree_structure(y, is_leaf=_is_node):
        return False
    for a, b in zip(nx, ny):
        if isinstance(a, jlora.LoraWeight):
            if not (isinstance(b, jlora.LoraWeight) and a.layout == b.layout and a.scale == b.scale):
                return False
            pairs = [(a.a, b.a), (a.b, b.b)]
        elif isinstance(a, jlora.Trainable):
            pairs = [(a.value, b.value)]
        else:
            continue
        for u, v in pairs:
            u, v = np.asarray(u), np.asarray(v)
            if u.dtype != v.dtype or not np.array_equal(u, v):
                return False
    return True


# --------------------------------------------------------------------------------------
# torch + Flax pairs with the same base weights


@dataclasses.dataclass
class Pair:
    name: str
    torch_path: str
    torch_cls: Any
    flax: Any
    params: Any
    flax_fn: Callable  # (params, ids) -> output
    torch_fn: Callable  # (model, ids) -> output
    targets: list
    extra: dict  # extra LoraConfig fields


def _t5_compat():
    import transformers.models.t5.modeling_flax_t5 as t5_module
    from support.models import _JnpClipCompat

    if not isinstance(t5_module.jnp, _JnpClipCompat):
        t5_module.jnp = _JnpClipCompat()


def _build(name: str, root: Path) -> Pair:
    T = transformers
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
        tcls, fcls = T.GPT2LMHeadModel, T.FlaxGPT2LMHeadModel
        ffn = lambda m: lambda p, ids: m(ids, params=p).logits  # noqa: E731
        tfn = lambda m, ids: m(input_ids=ids).logits  # noqa: E731
        targets, extra = ["c_attn", "c_proj"], {"bias": "lora_only"}
    elif name == "llama":
        cfg = T.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=32,
        )
        tcls, fcls = T.LlamaForCausalLM, T.FlaxLlamaForCausalLM
        ffn = lambda m: lambda p, ids: m(ids, params=p).logits  # noqa: E731
        tfn = lambda m, ids: m(input_ids=ids).logits  # noqa: E731
        targets, extra = ["q_proj", "v_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    elif name == "bert":
        cfg = T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=100, max_position_embeddings=32,
        )
        tcls, fcls = T.BertModel, T.FlaxBertModel
        ffn = lambda m: lambda p, ids: m(ids, params=p).pooler_output  # noqa: E731
        tfn = lambda m, ids: m(input_ids=ids).pooler_output  # noqa: E731
        targets, extra = ["query", "value"], {"modules_to_save": ["pooler"], "use_rslora": True}
    elif name == "t5":
        _t5_compat()
        cfg = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=100)
        tcls, fcls = T.T5ForConditionalGeneration, T.FlaxT5ForConditionalGeneration
        ffn = lambda m: lambda p, ids: m(input_ids=ids, decoder_input_ids=ids, params=p).logits  # noqa: E731
        tfn = lambda m, ids: m(input_ids=ids, decoder_input_ids=ids).logits  # noqa: E731
        targets, extra = ["q", "v"], {}
    else:  # pragma: no cover
        raise KeyError(name)
    path = root / f"{name}-base"
    tcls(cfg).eval().save_pretrained(path, safe_serialization=True)
    fm = fcls.from_pretrained(path, from_pt=True)
    return Pair(name, str(path), tcls, fm, fm.params, ffn(fm), tfn, targets, extra)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return functools.lru_cache(maxsize=None)(lambda name: _build(name, root))


def _torch_model(pair: Pair):
    return pair.torch_cls.from_pretrained(pair.torch_path).eval()


def _torch_out(pair: Pair, model) -> np.ndarray:
    with torch.no_grad():
        return pair.torch_fn(model, torch.tensor(IDS)).numpy()


def _flax_names_to_torch(params) -> dict[str, tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {hf.torch_param_name(jlora.core.paths.path_names(p)): (jlora.core.paths.path_names(p), x) for p, x in flat}


def _assert_merged_equal(merged_flax, merged_torch_state: dict, atol=1e-6):
    """Every Flax leaf equals PEFT's merge_and_unload weight of the same name."""
    n = 0
    for tname, (names, x) in _flax_names_to_torch(merged_flax).items():
        ref = merged_torch_state[tname].numpy()
        got = hf.param_to_torch(names, np.asarray(x))
        assert got.shape == ref.shape, tname
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=tname)
        n += 1
    assert n > 0


MODELS = ["gpt2", "llama", "bert", "t5"]


@pytest.mark.parametrize("name", MODELS)
def test_peft_adapter_loads_in_jlora(pairs, tmp_path, name):
    """(a) PEFT (non-zero B) → save_pretrained → jlora.load_peft: same outputs; (c) merge."""
    pair = pairs(name)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=pair.targets, init_lora_weights=False, **pair.extra)
    pm = peft.get_peft_model(_torch_model(pair), config).eval()
    with torch.no_grad():  # make fully trained leaves differ from the base, so loading them matters
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.05 * torch.randn_like(p))
    ref = _torch_out(pair, pm)
    pm.save_pretrained(tmp_path / "adapter")

    lp = jlora.load_peft(tmp_path / "adapter", pair.params)
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert jlora.count_parameters(lp)[0] == n_peft
    out = np.asarray(jax.jit(jlora.lora(pair.flax_fn))(lp, IDS))
    assert np.abs(out - ref).max() <= 1e-4

    merged = jlora.merge(lp)
    _assert_merged_equal(merged, pm.merge_and_unload().state_dict())


@pytest.mark.parametrize("name", MODELS)
def test_jlora_adapter_loads_in_peft(pairs, tmp_path, name):
    """(b) jlora (non-zero B) → save_peft → PeftModel.from_pretrained: same outputs; (c) merge;
    and save_peft → load_peft is bit-identical."""
    pair = pairs(name)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=pair.targets, init_lora_weights=False, **pair.extra)
    lp = jlora.wrap(pair.params, config, rng=jax.random.key(7))
    lp = jax.tree_util.tree_map(
        lambda x: jlora.Trainable(x.value + 0.05) if isinstance(x, jlora.Trainable) else x, lp, is_leaf=_is_node
    )
    out = np.asarray(jax.jit(jlora.lora(pair.flax_fn))(lp, IDS))
    jlora.save_peft(tmp_path / "adapter", lp, config=config, base_model_name_or_path=pair.torch_path)

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == pair.torch_path
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "pt" and set(f.metadata()) == {"format", "jlora"}  # checksums: issue 16
        assert all(k.startswith("base_model.model.") for k in f.keys())

    pm = peft.PeftModel.from_pretrained(_torch_model(pair), tmp_path / "adapter").eval()
    ref = _torch_out(pair, pm)
    assert np.abs(out - ref).max() <= 1e-4
    # every tensor PEFT holds for the adapter came from the file
    from peft.utils import get_peft_model_state_dict

    peft_state = {k: v.numpy() for k, v in get_peft_model_state_dict(pm).items()}
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        assert sorted(peft_state) == sorted(f.keys())
        for k in f.keys():
            np.testing.assert_array_equal(peft_state[k], f.get_tensor(k), err_msg=k)

    assert _leaves_equal(jlora.load_peft(tmp_path / "adapter", pair.params), lp)
    _assert_merged_equal(jlora.merge(lp), pm.merge_and_unload().state_dict())


# --------------------------------------------------------------------------------------
# Tree-level name map for eight architectures (shapes only; nothing is run)


def _arch(name: str):
    T = transformers
    small = dict(vocab_size=64)
    if name == "gpt2":
        return T.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, **small), T.GPT2LMHeadModel, T.FlaxGPT2LMHeadModel
    if name in ("llama", "mistral"):
        cls = T.LlamaConfig if name == "llama" else T.MistralConfig
        c = cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, **small)
        return c, (T.LlamaForCausalLM if name == "llama" else T.MistralForCausalLM), (
            T.FlaxLlamaForCausalLM if name == "llama" else T.FlaxMistralForCausalLM)
    if name == "bert":
        return T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **small), T.BertModel, T.FlaxBertModel
    if name == "roberta":
        return (T.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **small),
                T.RobertaForMaskedLM, T.FlaxRobertaForMaskedLM)
    if name == "t5":
        _t5_compat()
        return (T.T5Config(d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8, **small),
                T.T5ForConditionalGeneration, T.FlaxT5ForConditionalGeneration)
    if name == "opt":
        return (T.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16, **small),
                T.OPTForCausalLM, T.FlaxOPTForCausalLM)
    if name == "whisper":
        c = T.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
            pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2, **small,
        )
        return c, T.WhisperForConditionalGeneration, T.FlaxWhisperForConditionalGeneration
    raise KeyError(name)


ARCHS = ["gpt2", "llama", "mistral", "bert", "roberta", "t5", "opt", "whisper"]


def _abstract_params(fcls, cfg):
    m = fcls(cfg, _do_init=False)
    shape = getattr(m, "input_shape", (1, 1))
    return jax.eval_shape(lambda k: m.init_weights(k, shape), jax.random.key(0))


def _random_lora(alp):
    rng = np.random.default_rng(0)

    def fill(x):
        if isinstance(x, jlora.LoraWeight):
            return x.replace(a=rng.standard_normal(x.a.shape).astype(np.float32),
                             b=rng.standard_normal(x.b.shape).astype(np.float32))
        if isinstance(x, jlora.Trainable):
            return jlora.Trainable(rng.standard_normal(x.value.shape).astype(x.value.dtype))
        return x

    return jax.tree_util.tree_map(fill, alp, is_leaf=_is_node)


@pytest.mark.parametrize("name", ARCHS)
def test_name_map_matches_transformers_and_peft(name):
    """Every Flax leaf has a PyTorch state-dict entry of the mapped name and shape, and
    save_peft writes exactly the tensor names and shapes PEFT itself would hold."""
    cfg, tcls, fcls = _arch(name)
    params = _abstract_params(fcls, cfg)
    tmodel = tcls(cfg)
    state = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    for tname, (names, x) in _flax_names_to_torch(params).items():
        assert tname in state, f"{name}: {'/'.join(names)} -> {tname} not in the PyTorch model"
        assert hf.param_to_torch(names, np.zeros(x.shape, np.int8)).shape == state[tname], tname

    if name == "whisper":
        targets = ["q_proj", "v_proj", "conv1"]  # not in PEFT's defaults; conv1 is a Conv1d
    else:
        targets = hf.default_target_modules(cfg.model_type)
    lp = _random_lora(jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=targets, bias="lora_only")))
    ours = {k: tuple(v.shape) for k, v in peft_tensors(adapter_from_tree(lp)).items()}

    from peft.utils import get_peft_model_state_dict

    pm = peft.get_peft_model(tmodel, peft.LoraConfig(r=2, target_modules=targets, bias="lora_only"))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    assert ours == theirs


def test_base_model_prefix_both_ways(tmp_path):
    """A PEFT adapter made on BertForSequenceClassification (``bert.`` names) loads into
    FlaxBertModel params; ``prefix="bert"`` writes names that model expects."""
    T = transformers
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    torch.manual_seed(0)
    pm = peft.get_peft_model(T.BertForSequenceClassification(cfg), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "cls")
    params = _abstract_params(T.FlaxBertModel, cfg)
    lp = jlora.load_peft(tmp_path / "cls", params)
    assert [p for p, _ in jlora.lora_leaves(lp)] == ["encoder/layer/0/attention/self/query/kernel"]

    ours = peft_tensors(adapter_from_tree(_random_lora(lp), prefix="bert"))
    from peft.utils import get_peft_model_state_dict

    lora_keys = {k for k in get_peft_model_state_dict(pm) if "lora_" in k}
    assert set(ours) == lora_keys


# --------------------------------------------------------------------------------------
# Layouts PEFT does not have a transformers model for: embedding, conv, nn.scan stacks


def _abstract_case(case: str):
    from support import models
    from flax import nnx

    ids = jnp.zeros((2, 8), jnp.int32)
    if case == "conv_embed":
        return jax.eval_shape(models.ConvEmbedNet().init, jax.random.key(0), ids)["params"], ["embed", "conv"]
    if case == "linen_scan":
        return jax.eval_shape(models.ScanLM().init, jax.random.key(0), ids)["params"], ["query", "value", "out"]
    module = nnx.eval_shape(lambda: models.NNXMLP(nnx.Rngs(0)))
    return nnx.split(module)[1], ["up", "down"]


@pytest.mark.parametrize("case", ["conv_embed", "linen_scan", "nnx_mlp"])
def test_round_trip_other_layouts(tmp_path, case):
    """Embedding, conv, nn.scan-stacked DenseGeneral and NNX state: save_peft → load_peft
    is bit-identical; stacked layers become per-layer PyTorch modules."""
    params, targets = _abstract_case(case)
    config = jlora.LoraConfig(r=3, lora_alpha=5, target_modules=targets, bias="all")
    lp = _random_lora(jlora.wrap(params, config))
    jlora.save_peft(tmp_path / "a", lp, config=config)
    back = jlora.load_peft(tmp_path / "a", params)
    assert _same_adapter(back, lp)
    modules = {m for t in read_peft(tmp_path / "a").targets for m in t.torch}
    if case == "linen_scan":
        assert {"layers.0.query", "layers.2.query", "layers.1.out"} <= modules
        assert dict(jlora.lora_leaves(back))["layers/out/kernel"].layout == ("stack", "in", "in", "out")
    if case == "conv_embed":
        assert {t.kind for t in read_peft(tmp_path / "a").targets} == {"embedding", "conv"}


def test_user_name_map(tmp_path):
    """Models whose PyTorch names differ from their Flax paths: a dict or a function,
    with {layer} for stacked kernels; loading needs the same map (else: listed error)."""
    params, _ = _abstract_case("linen_scan")
    config = jlora.LoraConfig(r=2, target_modules=["query", "head"])
    lp = _random_lora(jlora.wrap(params, config))

    def name_map(module: str):
        if module == "layers.query":
            return "model.blocks.{layer}.attn.q"
        return {"head": "lm_head"}.get(module)

    jlora.save_peft(tmp_path / "a", lp, config=config, name_map=name_map)
    keys = set(peft_tensors(read_peft(tmp_path / "a")))
    assert "base_model.model.model.blocks.2.attn.q.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["lm_head", "q"]
    assert _same_adapter(jlora.load_peft(tmp_path / "a", params, name_map=name_map), lp)
    with pytest.raises(ValueError, match="model.blocks.0.attn.q"):
        jlora.load_peft(tmp_path / "a", params)
    # a dict map, and prefix=
    nm = {"layers.query": "model.blocks.{layer}.attn.q", "head": "lm_head"}
    jlora.save_peft(tmp_path / "b", lp, config=config, name_map=nm, prefix="wrapper")
    assert "base_model.model.wrapper.lm_head.lora_A.weight" in set(peft_tensors(read_peft(tmp_path / "b")))
    assert _same_adapter(jlora.load_peft(tmp_path / "b", params, name_map=nm, prefix="wrapper"), lp)
    assert _same_adapter(jlora.load_peft(tmp_path / "b", params, name_map=nm), lp)  # prefix found by itself
    with pytest.raises(ValueError, match="stacked"):
        jlora.save_peft(tmp_path / "c", lp, name_map={"layers.query": "model.q"})


def test_conv_and_embedding_layouts_match_peft_numerically(tmp_path):
    """nn.Embed + nn.Conv (1-D) LoRA through the PEFT format equals a torch module tree
    with PEFT's Embedding and Conv1d LoRA layers."""
    from support import models

    abstract, _ = _abstract_case("conv_embed")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "conv"], init_lora_weights=False)
    lp = jlora.wrap(params, config, rng=jax.random.key(5))
    jlora.save_peft(tmp_path / "a", lp, config=config)
    ids = np.asarray(IDS)
    model = models.ConvEmbedNet()

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

    net = Net()
    state = {}
    for tname, (names, x) in _flax_names_to_torch(params).items():
        state[tname] = torch.tensor(hf.param_to_torch(names, np.asarray(x)))
    net.load_state_dict(state)
    pm = peft.PeftModel.from_pretrained(net, tmp_path / "a").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).numpy()
    out = np.asarray(jax.jit(jlora.lora(lambda p, x: model.apply({"params": p}, x)))(lp, ids))
    assert np.abs(out - ref).max() <= 1e-4


# --------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written over


def _tree_digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _tiny_gpt2_params(n_embd=32):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    return _abstract_params(FlaxGPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=100, n_positions=32))


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory):
    params = _tiny_gpt2_params()
    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"])
    lp = _random_lora(jlora.wrap(params, config))
    d = tmp_path_factory.mktemp("peft") / "adapter"
    jlora.save_peft(d, lp, config=config)
    return params, lp, d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_error_missing_config(small_adapter, tmp_path):
    params, _, d = small_adapter
    bad = _copy(d, tmp_path / "x")
    (bad / "adapter_config.json").unlink()
    before = _tree_digest(bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        jlora.load_peft(bad, params)
    assert _tree_digest(bad) == before


def test_error_unknown_peft_type(small_adapter, tmp_path):
    params, _, d = small_adapter
    bad = _copy(d, tmp_path / "x")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        jlora.load_peft(bad, params)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_error_corrupt_safetensors(small_adapter, tmp_path, damage):
    params, _, d = small_adapter
    bad = _copy(d, tmp_path / "x")
    f = bad / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    before = _tree_digest(bad)
    with pytest.raises(ValueError, match="safetensors"):
        jlora.load_peft(bad, params)
    assert _tree_digest(bad) == before


def test_error_pickle_only(small_adapter, tmp_path):
    params, _, d = small_adapter
    bad = _copy(d, tmp_path / "x")
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        jlora.load_peft(bad, params)


def test_error_adapter_for_a_different_base(small_adapter):
    """GPT-2 adapter with n_embd=32 onto a GPT-2 with n_embd=16: names path and shapes."""
    _, _, d = small_adapter
    other = _tiny_gpt2_params(n_embd=16)
    with pytest.raises(ValueError) as err:
        jlora.load_peft(d, other)
    msg = str(err.value)
    assert "transformer/h/0/attn/c_attn/kernel" in msg and "(48, 16)" in msg and "in_features=32" in msg


def test_error_modules_not_in_base(small_adapter):
    """Target names the base does not have are all listed."""
    _, _, d = small_adapter
    cfg, _, fcls = _arch("llama")
    with pytest.raises(ValueError) as err:
        jlora.load_peft(d, _abstract_params(fcls, cfg))
    msg = str(err.value)
    assert "transformer.h.0.attn.c_attn" in msg and "transformer.h.1.attn.c_attn" in msg
    assert "not in the base params" in msg


def test_error_save_of_plain_params_writes_nothing(small_adapter):
    params, _, d = small_adapter
    before = _tree_digest(d)
    with pytest.raises(ValueError, match="no LoraWeight"):
        jlora.save_peft(d, params)
    assert _tree_digest(d) == before


def test_killed_save_peft_leaves_previous_adapter(small_adapter, tmp_path):
    """SIGKILL between moving the old adapter aside and renaming the new one in: the
    old adapter still loads, bit for bit."""
    params, lp, d = small_adapter
    target = _copy(d, tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, jlora
        params = {{"dense": {{"kernel": np.ones((4, 3), np.float32)}}}}
        lp = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["dense"]))
        real = os.rename
        def dying(src, dst):
            if str(dst) == {str(target)!r}:     # old moved aside, new not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.rename = dying
        jlora.save_peft({str(target)!r}, lp)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not target.exists()  # killed exactly between the renames
    assert _same_adapter(jlora.load_peft(target, params), lp)
    # the next save completes and cleans up
    jlora.save_peft(target, lp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert _same_adapter(jlora.load_peft(target, params), lp)


def test_default_target_modules():
    assert hf.default_target_modules("llama") == ["q_proj", "v_proj"]
    assert hf.default_target_modules("gpt2") == ["c_attn"]
    assert jlora.default_target_modules("t5") == ["q", "v"]
    with pytest.raises(ValueError, match="no default target_modules"):
        hf.default_target_modules("whisper")
